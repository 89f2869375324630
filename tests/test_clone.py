"""Clone: a new peer bootstrapped by replay of another's revisions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import fail_background_commit
from hypothesis import given, settings
from hypothesis import strategies as st
from test_verify import tamper

from txengine.cli import cli
from txengine.clone import replayable
from txengine.engine import Progress
from txengine.exceptions import (
    ForkedRevision,
    InvalidInput,
    MalformedPayload,
    MissingParent,
    TxEngineError,
)
from txengine.intake import check_follows, check_items, check_rows
from txengine.ledger import COPY_COLUMNS, descriptor_from_row, payload_of
from txengine.peer import Peer
from txengine.revision import MAX_PAYLOAD_BYTES, Revision, compute_digest
from txengine.values import sha256


def fill(peer: Peer, count: int, partitions: tuple[str, ...] = ("default",)) -> None:
    """Write ``count`` revisions: inserts, then updates of earlier keys, across partitions."""
    for n in range(count):
        partition = partitions[n % len(partitions)]
        with peer.transaction(f"rev {n}", partition=partition) as tx:
            if n < max(1, count // 2):
                tx.insert("items", {"_id": n, "n": n})
            else:
                key = n - count // 2
                tx.update("items", key, {"n": -n}) if partitions[key % len(partitions)] \
                    == partition else tx.insert("items", {"_id": n, "n": n})


def filled(tmp_path: Path, count: int) -> tuple[str, str, dict[Any, Any]]:
    """Return a source store of ``count`` revisions (:func:`fill`) in ``tmp_path``, a target
    path beside it, and the source's snapshot."""
    source_url, target = str(tmp_path / "source.db"), str(tmp_path / "copy.db")
    with Peer.open(source_url, peer_id="source") as source:
        fill(source, count)
        return source_url, target, source.snapshot()


def short_lease(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make every ledger opened from now on hold the apply lease for ``seconds`` only."""
    from txengine.ledger import Ledger

    init = Ledger.__init__

    def shortened(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self.lease_seconds = seconds

    monkeypatch.setattr(Ledger, "__init__", shortened)


def heads(peer: Peer) -> list[str]:
    return sorted(h.id for h in peer.heads())


def test_clone_gives_equal_data_heads_and_a_clean_replay(store_url: str, new_store) -> None:
    seen: list[Progress] = []
    with Peer.open(store_url, peer_id="source") as source:
        fill(source, 300, ("default", "user:1"))
        with Peer.clone(store_url, new_store(), "copy", progress=seen.append) as copy:
            assert copy.snapshot() == source.snapshot()
            assert heads(copy) == heads(source)
            assert len(copy.history()) == 300
            assert copy.verify(replay=True).ok
            assert copy.status().fetched == 0
        assert source.status().unsent == 0, "the source learns the clone holds its revisions"
    assert (seen[0].done, seen[-1].done, seen[-1].total) == (0, 300, 300)
    assert all(p.done < p.total for p in seen[:-1])


@pytest.mark.parametrize("direction", ["into MongoDB", "from MongoDB"])
def test_a_clone_crosses_store_kinds(tmp_path: Path, direction: str) -> None:
    """A one-pass clone between a SQL store and a MongoDB one (mongomock here): the SQL
    ledger's bulk writes and the MongoDB ledger's staged ones both take it."""
    sqlite = str(tmp_path / "peer.db")
    mongo = f"mongomock://localhost/clone_{tmp_path.name}"
    source_url, target = (sqlite, mongo) if direction == "into MongoDB" else (mongo, sqlite)
    with Peer.open(source_url, peer_id="source") as source:
        fill(source, 40, ("default", "user:1"))
        with Peer.clone(source_url, target, "copy") as copy:
            assert copy.snapshot() == source.snapshot()
            assert heads(copy) == heads(source)
            assert copy.verify(replay=True).ok
        assert source.status().unsent == 0


def test_clone_of_one_partition_takes_only_that_partition(store_url: str, new_store) -> None:
    with Peer.open(store_url, peer_id="source") as source:
        fill(source, 40, ("default", "user:1"))
        with Peer.clone(store_url, new_store(), "copy", partition="user:1") as copy:
            wanted = {k: v for k, v in source.snapshot().items() if k[0] == "user:1"}
            assert copy.snapshot() == wanted
            assert {h.partition for h in copy.heads()} == {"user:1"}
            assert copy.verify(replay=True).ok


def test_clone_into_a_store_with_revisions_is_refused(store_url: str, new_store) -> None:
    target = new_store()
    with Peer.open(target, peer_id="copy") as copy:
        fill(copy, 1)
    with Peer.open(store_url, peer_id="source") as source:
        fill(source, 2)
    with pytest.raises(InvalidInput) as info:
        Peer.clone(store_url, target, "copy")
    assert str(info.value) == (f"store {target!r} already holds 1 revisions: clone needs an"
                               " empty store")


def test_cli_clone(tmp_path: Path) -> None:
    source, target = str(tmp_path / "source.db"), str(tmp_path / "copy.db")
    with Peer.open(source, peer_id="source") as peer:
        fill(peer, 10)
        want = heads(peer)
    result = CliRunner().invoke(cli, ["--store", target, "--peer-id", "copy", "clone", source,
                                      "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["peer"], out["revisions"], sorted(out["heads"])) == ("copy", 10, want)
    again = CliRunner().invoke(cli, ["--store", target, "clone", source])
    assert again.exit_code == 1 and "clone needs an empty store" in again.output


def test_clone_of_ten_thousand_revisions(tmp_path: Path) -> None:
    source_url, target = str(tmp_path / "source.db"), str(tmp_path / "copy.db")
    with Peer.open(source_url, peer_id="source") as source:
        fill(source, 10_000, ("default", "user:1", "user:2"))
        with Peer.clone(source_url, target, "copy") as copy:
            assert copy.snapshot() == source.snapshot()
            assert heads(copy) == heads(source)
            assert copy.verify(replay=True).ok


def test_clone_of_data_revisions_replays_in_one_pass(tmp_path: Path) -> None:
    """A data-only history is applied as it is recorded: no revision is ever announced."""
    source_url, target = str(tmp_path / "source.db"), str(tmp_path / "copy.db")
    with Peer.open(source_url, peer_id="source") as source:
        fill(source, 30, ("default", "user:1"))
        with Peer.clone(source_url, target, "copy", batch_size=7) as copy:
            actions = [e.action for e in copy.audit()]
            assert "announce" not in actions and "receive" not in actions
            assert actions.count("integrate") == 5  # one audit row a batch of 7
            assert copy.snapshot() == source.snapshot()
            assert copy.verify(replay=True).ok


def test_clone_of_a_tampered_source_refuses_that_revision_alone(tmp_path: Path) -> None:
    """A payload edited in the source's ledger is refused; the rest of the history arrives."""
    source_url, target = str(tmp_path / "source.db"), str(tmp_path / "copy.db")
    with Peer.open(source_url, peer_id="source") as source:
        for n in range(20):
            with source.transaction(f"rev {n}", partition=f"p{n % 2}") as tx:
                tx.insert("items", {"_id": n, "n": n})
        bad = [h.id for h in source.history() if h.partition == "p1"][0]
    tamper(f"sqlite:///{source_url}", "UPDATE txengine_revisions SET payload = :p"
           " WHERE id = :id", p=b"[]", id=bad)
    with Peer.clone(source_url, target, "copy", batch_size=4) as copy:
        assert bad not in {h.id for h in copy.history()}
        assert len(copy.find("items", partition="p0")) == 10  # the other partition is whole
        refusals = [e for e in copy.audit(bad) if e.outcome == "refused"]
        assert refusals and "the payload was altered" in refusals[0].detail["reason"]


@pytest.mark.parametrize("one_pass", [True, False])
def test_a_clone_longer_than_the_lease_keeps_it(tmp_path: Path, monkeypatch, one_pass) -> None:
    """Each batch extends the apply lease: a clone (or a sync leg) that outlasts one lease
    does not stop with StaleLease halfway."""
    import time

    from txengine.engine import Engine

    source_url, target = str(tmp_path / "source.db"), str(tmp_path / "copy.db")
    with Peer.open(source_url, peer_id="source") as source:
        fill(source, 24)
        if not one_pass:  # a barrier in the history: the clone goes through sync's messages
            source.trust_sequencer("source")
            source.checkpoint()
        expected = source.snapshot()
    begin_batch = Engine._begin_batch  # each batch of either path applies through it
    batches = []

    def slow(self, *args, **kwargs):
        batches.append(1)
        time.sleep(0.3)
        return begin_batch(self, *args, **kwargs)

    short_lease(monkeypatch, 1.0)
    monkeypatch.setattr(Engine, "_begin_batch", slow)
    with Peer.clone(source_url, target, "copy", batch_size=4) as copy:  # 6 batches, ~2 s
        assert copy.snapshot() == expected
    assert len(batches) >= 6, "every batch took the slow step"


def test_an_intake_step_that_outlasts_the_lease_takes_it_again(tmp_path: Path, monkeypatch) -> None:
    """A single batch longer than the whole lease: the next batch re-takes the lease
    (nobody else held it) rather than stopping."""
    import time

    from txengine.engine import Engine

    source_url, target, expected = filled(tmp_path, 8)
    begin_copied = Engine.begin_copied
    slept = []

    def slow(self, *args, **kwargs):
        finish = begin_copied(self, *args, **kwargs)

        def finish_then_sleep():
            finish()
            slept.append(1)
            time.sleep(0.6)  # after the batch committed: the lease runs out before the next

        return finish_then_sleep

    short_lease(monkeypatch, 0.5)
    monkeypatch.setattr(Engine, "begin_copied", slow)
    with Peer.clone(source_url, target, "copy", batch_size=4) as copy:
        assert copy.snapshot() == expected
    assert len(slept) == 2


def test_a_commit_that_fails_beside_the_next_checks_leaves_a_prefix_sync_completes(
        tmp_path: Path, monkeypatch) -> None:
    """A one-pass clone commits each batch on a helper thread while it checks the next;
    when that commit fails, the clone stops with its error, the batches committed
    before stay, and a sync from the source completes the copy."""
    source_url, target, expected = filled(tmp_path, 12)
    calls = fail_background_commit(monkeypatch, 2)
    with pytest.raises(Exception, match="no_such_table"):
        Peer.clone(source_url, target, "copy", batch_size=4)
    assert calls[0] > 0, "the first batch's inserts ran on the helper"
    monkeypatch.undo()
    with Peer.open(target, peer_id="copy") as copy:
        assert len(copy.history()) == 4, "the first batch stays, the second is gone"
        assert copy.verify(replay=True).ok
        with Peer.open(source_url, peer_id="source") as source:
            copy.sync(source)
        assert copy.snapshot() == expected


def test_a_source_that_changes_during_the_clone_is_finished_through_sync(
        tmp_path: Path, monkeypatch) -> None:
    """A row the read plan named that a batch read no longer finds (a concurrent prune):
    the one-pass clone stops with its one-line error and sync takes the rest."""
    from txengine.ledger import Ledger

    source_url, target, expected = filled(tmp_path, 20)
    rows_at = Ledger.rows_at
    calls = []

    def lose_one(self, at, *columns):
        calls.append(1)
        rows = rows_at(self, at, *columns)
        return rows[:-1] if len(calls) == 2 else rows  # the second batch misses a row

    monkeypatch.setattr(Ledger, "rows_at", lose_one)
    with Peer.clone(source_url, target, "copy", batch_size=8) as copy:
        assert copy.snapshot() == expected
        assert copy.verify(replay=True).ok
    assert len(calls) == 2, "the one-pass path stopped at the changed batch"


def test_a_bad_row_in_a_later_piece_refuses_its_whole_batch(tmp_path: Path,
                                                             monkeypatch) -> None:
    """A one-pass clone checks a batch a piece at a time (``clone._PIECE`` rows) but
    refuses it whole: a bad row in its last piece leaves none of its earlier pieces
    applied, and the batches before it stay."""
    from txengine import clone as clone_module

    monkeypatch.setattr(clone_module, "_PIECE", 3)
    source_url, target, _expected = filled(tmp_path, 20)
    with Peer.open(source_url, peer_id="source") as source:
        bad = replayable(source, None)[14][0]  # batch 8-15, its last piece 14-15
    tamper(f"sqlite:///{source_url}", "UPDATE txengine_revisions SET payload = :p"
           " WHERE id = :id", p=b"[]", id=bad)
    with Peer.open(source_url, peer_id="source") as source, \
            Peer.open(target, peer_id="copy") as copy:
        copy._take_lease()
        with pytest.raises(TxEngineError, match="altered"):
            clone_module.replay(source, copy, replayable(source, None), 8)
    with Peer.open(target, peer_id="copy") as copy:
        assert len(copy.history()) == 8, "the first batch stays; nothing of the second"
        assert copy.verify(replay=True).ok


@pytest.mark.parametrize(("revisions", "payload"), [(10, 1 << 30), (10 ** 6, 700)])
def test_a_clone_holds_its_committed_batches_up_to_a_bound(tmp_path: Path, monkeypatch,
                                                           revisions, payload) -> None:
    """A one-pass clone keeps committed batches' objects until its last commit, so that
    freeing them does not slow the next batch, but never more than the bound (revisions,
    payload bytes): past it, the oldest are freed as it goes."""
    from txengine import clone as clone_module

    held: list[tuple[int, int]] = []  # (revisions, payload bytes) held after each batch
    kept: list[list[list[Any]]] = []  # each batch's lists
    add, free = clone_module._Held.add, clone_module._Held.free

    def add_spied(self, lists: list[list[Any]], *args: Any) -> None:
        add(self, lists, *args)
        held.append((self.revisions, self.payload))
        kept.append(lists)

    def free_spied(self) -> None:  # the last commit runs
        assert all(objects for objects in kept[-1]), "the last batch is still held"
        free(self)

    monkeypatch.setattr(clone_module._Held, "add", add_spied)
    monkeypatch.setattr(clone_module._Held, "free", free_spied)
    monkeypatch.setattr(clone_module, "_HOLD_REVISIONS", revisions)
    monkeypatch.setattr(clone_module, "_HOLD_PAYLOAD", payload)
    source_url, target, expected = filled(tmp_path, 40)
    with Peer.clone(source_url, target, "copy", batch_size=4) as copy:
        assert copy.snapshot() == expected
        assert copy.verify(replay=True).ok
    assert len(held) == 10, "one entry a batch"
    assert all(n <= revisions and size <= payload for n, size in held), held
    assert max(n for n, _size in held) >= 8, f"it holds batches while within the bound: {held}"
    assert all(len(lists) == 4 for lists in kept), "revisions, rows, keys and apply entries"
    assert not any(objects for lists in kept for objects in lists), "all freed by the end"


def _revision(rev_id: str, hlc: list[int], parents: list[str], seq: int,
              origin: str = "o:0") -> Revision:
    return Revision({"id": rev_id, "partition": "default", "origin": origin, "seq": seq,
                     "hlc": hlc, "parents": parents, "depends_on": [], "digest": rev_id},
                    b"[]")


def test_checks_of_a_stream_in_canonical_order() -> None:
    """check_follows, what a one-pass clone checks against what it took before: each
    parent came first with a lower hlc, and each (origin, seq) slot is free."""
    seen: dict[str, list[int]] = {}
    slots: dict[tuple[str, str, int], str] = {}
    coming = {"a", "b", "c", "d"}
    first = {"a": _revision("a", [1, 0], [], 1), "b": _revision("b", [2, 0], ["a"], 2)}
    assert [r.id for r in check_follows(first, seen, slots, coming)] == ["a", "b"]
    assert seen == {"a": [1, 0], "b": [2, 0]} and slots[("default", "o:0", 2)] == "b"
    with pytest.raises(MissingParent):
        check_follows({"x": _revision("x", [3, 0], ["nowhere"], 3)}, seen, slots, coming)
    with pytest.raises(MalformedPayload, match="sorts before its parent"):
        check_follows({"c": _revision("c", [3, 0], ["d"], 3)}, seen, slots, coming)
    with pytest.raises(MalformedPayload, match="not above its parent"):
        check_follows({"c": _revision("c", [2, 0], ["b"], 3)}, seen, slots, coming)
    with pytest.raises(ForkedRevision, match="seq 2"):
        check_follows({"c": _revision("c", [3, 0], ["b"], 2)}, seen, slots, coming)
    assert "c" not in seen, "a refused revision is not taken"


def test_a_source_row_with_a_malformed_column_is_refused_in_one_line(tmp_path: Path) -> None:
    source_url, target = str(tmp_path / "source.db"), str(tmp_path / "copy.db")
    with Peer.open(source_url, peer_id="source") as source:
        fill(source, 6)
        source._store.conn.exec_driver_sql(
            "UPDATE txengine_revisions SET parents = 'not json' WHERE seq = 4")
        source._store.commit()
    with pytest.raises(TxEngineError, match="is not (a )?JSON") as caught:
        Peer.clone(source_url, target, "copy")
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def source_rows(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """A source's ledger rows as a one-pass clone reads them: inserts, updates, a delete, a
    revision of two ops in two collections, two partitions."""
    url = str(tmp_path_factory.mktemp("rows") / "source.db")
    with Peer.open(url, peer_id="source") as source:
        fill(source, 8, ("default", "user:1"))
        with source.transaction("two ops") as tx:
            tx.insert("notes", {"_id": "n", "text": "ünïcode \"quoted\""})
            tx.delete("items", 0)
        plan = replayable(source, None)
        assert plan is not None
        return source._ledger.rows_at([at for _id, at in plan], *COPY_COLUMNS, "payload")


def _per_row(rows: list[Any]) -> tuple[Any, ...]:
    """What check_items, each row's descriptor alone, makes of ``rows``."""
    try:
        batch = check_items([(descriptor_from_row(r), payload_of(r)) for r in rows], False)
    except TxEngineError as exc:
        return ("refused", type(exc), str(exc))
    except Exception as exc:  # noqa: BLE001 - a crash is an outcome check_rows must not hide
        return ("crashed", type(exc))
    return ("ok", {k: (r.descriptor, r.payload, r.ops) for k, r in batch.items()})


def test_checking_rows_by_column_gives_what_each_row_alone_gives(source_rows) -> None:
    fast = check_rows(source_rows)
    assert fast is not None, "plain rows take the column path"
    assert _per_row(source_rows) == ("ok", {k: (r.descriptor, r.payload, r.ops)
                                            for k, r in fast.items()})


_EDGES = [None, 0, -1, 1, 2**64, 2**70, 1.5, True, "", "x", "a-b", "[]", '["x"]', "[1]",
          '[["x"]]', "{}", "not json", '[ "x"]', '["x","x"]', "script", "data", b"[]",
          b'[{"op":"drop"}]', b"[" + b" " * MAX_PAYLOAD_BYTES + b"]",
          '{"key":"k","sig":"s"}', '{"key":"k","sig":""}', '{"key":"k"}', "[" + "1" * 30 + "]",
          '{"key":"k","sig":"' + "s" * 201 + '"}', '["' + "m" * 5000 + '"]', "m" * 5000]
"""Cells at the edges of what the checks allow: each refused by one check or just allowed."""
_CELLS = st.one_of(st.sampled_from(_EDGES), st.sampled_from(_EDGES), st.none(),
                   st.integers(min_value=-2, max_value=2**70), st.floats(allow_nan=False),
                   st.text(max_size=4), st.binary(max_size=4))


def _sealed(row: Any) -> Any:
    """``row`` with the checksum, digest and (for data) id its other cells give, as its
    author would seal it; as it was where they give none."""
    try:
        d = descriptor_from_row(row)
        digest = compute_digest(d)
        checksum = sha256(row.payload)
    except Exception:  # noqa: BLE001 - a cell no author could seal
        return row
    return row._replace(digest=digest, checksum=checksum,
                        id=digest if d["kind"] == "data" else row.id)


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_checking_rows_by_column_never_takes_what_a_row_alone_refuses(source_rows, data) -> None:
    """Any one cell changed (another type, value, or another row's cell), and the row
    sealed again or not: the column path either steps aside (None), or decides exactly as
    the per-row checks do."""
    rows = list(source_rows)
    i = data.draw(st.integers(0, len(rows) - 1))
    column = data.draw(st.sampled_from(rows[i]._fields[:16]))
    other = data.draw(st.sampled_from(rows))
    value = data.draw(st.one_of(_CELLS, st.just(getattr(other, column)),
                                st.sampled_from([getattr(rows[i], c) for c in rows[i]._fields])))
    rows[i] = rows[i]._replace(**{column: value})
    if data.draw(st.booleans()):
        rows[i] = _sealed(rows[i])
    expected = _per_row(rows)
    try:
        fast = check_rows(rows)
    except TxEngineError as exc:
        assert expected == ("refused", type(exc), str(exc))
        return
    if fast is not None:
        assert expected == ("ok", {k: (r.descriptor, r.payload, r.ops) for k, r in fast.items()})


@pytest.mark.parametrize(("column", "value"), [
    ("seq", 0), ("seq", "1"), ("hlc_ms", -1), ("hlc_c", 1.5), ("parents", "[1]"),
    ("depends_on", '[["x"]]'), ("branch_labels", "{}"), ("parents", "not json"),
    ("message", 5), ("message", "m" * 5000), ("origin", None), ("partition", b"p"),
    ("kind", "script"), ("signature", '{"key":"k"}'), ("signature", '{"key":"k","sig":""}'),
    ("signature", "not json"), ("collections", '["other"]'), ("payload", b'[{"op":"drop"}]')])
def test_checking_rows_by_column_refuses_what_a_row_alone_refuses(source_rows, column,
                                                                  value) -> None:
    """Each cell a sealed row may not hold: refused by the per-row checks, and never taken
    by the column path (it steps aside, or refuses in the same words)."""
    rows = list(source_rows)
    rows[3] = _sealed(rows[3]._replace(**{column: value}))
    expected = _per_row(rows)
    assert expected[0] == "refused"
    try:
        assert check_rows(rows) is None
    except TxEngineError as exc:
        assert expected == ("refused", type(exc), str(exc))
