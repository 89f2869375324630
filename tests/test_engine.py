"""Engine behaviours through the Peer API: writes, partitions, graph queries, merge,
stamp, revert, pinning, out-of-order downgrades, the clock, seq and the audit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import ledger_items, replayed_snapshot, strict

from txengine.clock import Clock
from txengine.exceptions import DocumentNotFound, PinnedPeer
from txengine.peer import Peer


class Boom(Exception):
    pass


def write(peer: Peer, message: str, fn, partition: str = "default") -> str:
    with peer.transaction(message, partition=partition) as tx:
        fn(tx)
    time.sleep(0.003)  # distinct hlc milliseconds keep the canonical order readable
    return tx.revision.id


def share(source: Peer, target: Peer) -> None:
    target.receive([i for i in ledger_items(source) if i[0]["id"] not in target._engine.graph])


def test_exception_inside_a_transaction_writes_nothing(peer: Peer) -> None:
    write(peer, "seed", lambda tx: tx.insert("items", {"_id": 1}))
    audit = len(peer.audit())
    with pytest.raises(Boom):
        with peer.transaction("doomed") as tx:
            tx.insert("items", {"_id": 2})
            tx.update("items", 1, set={"a": 1})
            raise Boom()
    assert tx.revision is None
    assert peer.find("items") == [{"_id": 1}]
    assert len(peer.history()) == 1 and len(peer.audit()) == audit


def test_update_of_a_missing_document_says_how_to_fix_it(peer: Peer) -> None:
    with pytest.raises(DocumentNotFound, match=r"^no document '1' in 'items': insert it first"):
        with peer.transaction("bad") as tx:
            tx.update("items", "1", set={"a": 1})
    assert peer.history() == []


def test_partitions_isolate_the_same_collection_and_key(peer: Peer) -> None:
    write(peer, "a", lambda tx: tx.insert("items", {"_id": 1, "who": "default"}))
    write(peer, "b", lambda tx: tx.insert("items", {"_id": 1, "who": "user"}), "user:1")
    write(peer, "c", lambda tx: tx.delete("items", 1))
    assert peer.get("items", 1) is None
    assert peer.get("items", 1, partition="user:1") == {"_id": 1, "who": "user"}
    assert {r.partition for r in peer.heads()} == {"default", "user:1"}


def test_seq_counts_per_origin_and_partition(peer: Peer) -> None:
    ids = [write(peer, "a", lambda tx: tx.insert("items", {"_id": 1})),
           write(peer, "b", lambda tx: tx.insert("items", {"_id": 1}), "user:1"),
           write(peer, "c", lambda tx: tx.insert("items", {"_id": 2}))]
    seqs = [(peer.revision(r).descriptor["partition"], peer.revision(r).descriptor["seq"])
            for r in ids]
    assert seqs == [("default", 1), ("user:1", 1), ("default", 2)]
    assert {peer.revision(r).descriptor["origin"] for r in ids} == {"test:0"}


def test_heads_current_history_and_parents_follow_the_chain(peer: Peer) -> None:
    first = write(peer, "one", lambda tx: tx.insert("items", {"_id": 1}))
    second = write(peer, "two", lambda tx: tx.update("items", 1, set={"a": 1}))
    assert [r.id for r in peer.heads()] == [second]
    assert [r.id for r in peer.current()] == [second]
    assert [r.id for r in peer.history()] == [second, first]
    assert peer.info(second).parents == (first,) and peer.info(first).parents == ()
    assert peer.info(second).message == "two" and peer.info(second).is_head
    peer.downgrade("-1")
    assert [r.id for r in peer.current()] == [first]
    assert [r.id for r in peer.heads()] == [second]


def concurrent_peers(store_url: str, new_store) -> tuple[Peer, Peer, str]:
    a = Peer.open(store_url, peer_id="alice")
    b = Peer.open(new_store(), peer_id="bob")
    root = write(a, "root", lambda tx: (tx.insert("items", {"_id": "x", "n": 0}),
                                        tx.insert("items", {"_id": "y", "n": 0})))
    share(a, b)
    b.upgrade("heads")
    return a, b, root


def test_concurrent_heads_show_as_branches_and_merge_joins_them(store_url, new_store) -> None:
    """
        root
        /  \\
      a1    b1      -> merge(a1, b1)
    """
    a, b, root = concurrent_peers(store_url, new_store)
    try:
        a1 = write(a, "a1", lambda tx: tx.update("items", "x", set={"a": 1}))
        b1 = write(b, "b1", lambda tx: tx.update("items", "y", set={"b": 1}))
        share(b, a)
        assert a.info(b1).applied is False
        a.upgrade("heads")
        assert sorted(h.id for h in a.heads()) == sorted([a1, b1])
        assert [r.id for r in a.branches()] == [root]
        merged = a.merge(message="join")
        assert merged.parents == tuple(sorted([a1, b1]))
        assert [h.id for h in a.heads()] == [merged.id] == [r.id for r in a.current()]
        assert a.get("items", "x")["a"] == 1 and a.get("items", "y")["b"] == 1
        assert a.verify(replay=True).ok
    finally:
        a.close()
        b.close()


def test_downgrade_of_a_middle_branch_redoes_later_conflicting_revisions(
        store_url, new_store) -> None:
    """Canonical order root, a1, b1, a2, b2; a2 and b2 both write x, b1 writes y.

        root
        /  \\
      a1    b1
      |     |
      a2    b2      downgrade a1: a2 goes, b2 (after it, same key) is undone and redone.
    """
    a, b, root = concurrent_peers(store_url, new_store)
    try:
        a1 = write(a, "a1", lambda tx: tx.update("items", "x", set={"a": 1}))
        b1 = write(b, "b1", lambda tx: tx.update("items", "y", set={"b": 1}))
        a2 = write(a, "a2", lambda tx: tx.update("items", "x", set={"c": 2}, inc={"n": 10}))
        b2 = write(b, "b2", lambda tx: tx.update("items", "x", inc={"n": 1}))
        share(b, a)
        a.upgrade("heads")
        assert a._engine.graph.canonical_order([root, a1, a2, b1, b2]) == [root, a1, b1, a2, b2]
        assert a.get("items", "x") == {"_id": "x", "n": 11, "a": 1, "c": 2}
        result = a.downgrade(a1)
        assert result.undone == [a2]
        assert sorted(a._engine.applied) == sorted([root, a1, b1, b2])
        assert a.get("items", "x") == {"_id": "x", "n": 1, "a": 1}
        assert a.get("items", "y") == {"_id": "y", "n": 0, "b": 1}
        assert strict(a.snapshot()) == strict(replayed_snapshot(a, new_store()))
        assert a.verify(replay=True).ok
        a.upgrade("heads")
        assert a.get("items", "x") == {"_id": "x", "n": 11, "a": 1, "c": 2}
    finally:
        a.close()
        b.close()


def test_downgrade_pins_the_peer_and_refuses_writes_until_upgrade_heads(peer: Peer) -> None:
    write(peer, "one", lambda tx: tx.insert("items", {"_id": 1}))
    write(peer, "two", lambda tx: tx.insert("items", {"_id": 2}))
    peer.downgrade("-1")
    assert peer.pinned
    with pytest.raises(PinnedPeer, match=r"^this peer is pinned by a local downgrade and refuses"
                       r" new writes: run `txengine upgrade heads` to unpin it$"):
        with peer.transaction("no") as tx:
            tx.insert("items", {"_id": 3})
    peer.upgrade("+1")
    assert not peer.pinned, "reaching every head unpins"
    write(peer, "three", lambda tx: tx.insert("items", {"_id": 3}))
    assert [a.action for a in peer.audit() if a.action in ("pin", "unpin")] == ["pin", "unpin"]


def test_stamp_marks_revisions_applied_without_running_them(store_url, new_store) -> None:
    with Peer.open(store_url, peer_id="test") as source, Peer.open(new_store()) as other:
        first = write(source, "one", lambda tx: tx.insert("items", {"_id": 1}))
        second = write(source, "two", lambda tx: tx.insert("items", {"_id": 2}))
        share(source, other)
        result = other.stamp(first)
        assert result.applied == [first]
        assert other.snapshot() == {} and [r.id for r in other.current()] == [first]
        other.upgrade("heads")
        assert other.find("items") == [{"_id": 2}]
        other.stamp("base")
        assert other.current() == [] and other.find("items") == [{"_id": 2}]
        assert [e.action for e in other.audit(second)][-1] in ("unstamp", "stamp")


def test_revert_restores_only_what_still_holds_the_reverted_value(peer: Peer) -> None:
    write(peer, "create", lambda tx: tx.insert("items", {"_id": 1, "a": 1, "b": 1, "n": 5}))
    target = write(peer, "change", lambda tx: tx.update("items", 1, set={"a": 2, "b": 2},
                                                        inc={"n": 3}))
    write(peer, "later", lambda tx: tx.update("items", 1, set={"b": 3}))
    reverted = peer.revert(target)
    assert reverted.message == f"Revert {target[:12]}: change"
    assert peer.get("items", 1) == {"_id": 1, "a": 1, "b": 3, "n": 5}
    assert peer.verify(replay=True).ok


def test_revert_of_a_deleted_insert_writes_nothing(peer: Peer) -> None:
    target = write(peer, "create", lambda tx: tx.insert("items", {"_id": 1}))
    write(peer, "gone", lambda tx: tx.delete("items", 1))
    assert peer.revert(target) is None
    assert peer.get("items", 1) is None


def test_clock_stays_monotonic_when_the_wall_clock_steps_back() -> None:
    readings = iter([1000, 1000, 400, 400, 2000])
    clock = Clock(wall=lambda: next(readings))
    issued = [clock.tick() for _ in range(5)]
    assert issued == [(1000, 0), (1000, 1), (1000, 2), (1000, 3), (2000, 0)]
    later = Clock(wall=lambda: 10)
    assert later.tick([(5000, 7)]) == (5000, 8)


def test_new_revision_hlc_exceeds_its_parents_across_a_reopen(store_url: str) -> None:
    with Peer.open(store_url, peer_id="test") as peer:
        first = write(peer, "one", lambda tx: tx.insert("items", {"_id": 1}))
        hlc = peer.info(first).hlc
    with Peer.open(store_url, peer_id="test") as peer:
        peer._engine.clock._wall = lambda: 1  # the wall clock jumped back to 1970
        second = write(peer, "two", lambda tx: tx.insert("items", {"_id": 2}))
        assert peer.info(second).hlc > hlc


def test_audit_rows_have_every_field_and_are_never_updated(peer: Peer) -> None:
    rev = write(peer, "one", lambda tx: tx.insert("items", {"_id": 1}))
    peer.downgrade("base")
    first = peer.audit()
    peer.upgrade("heads")
    write(peer, "two", lambda tx: tx.insert("items", {"_id": 2}))
    after = peer.audit()
    assert after[:len(first)] == first
    assert [e.seq for e in after] == sorted({e.seq for e in after})
    assert [(e.action, e.revision) for e in after if e.revision == rev][:2] == [
        ("apply", rev), ("undo", rev)]
    for entry in after:
        assert entry.peer_id == "test" and entry.os_user and entry.outcome == "ok"
        assert entry.at.endswith("Z") and entry.duration_ms >= 0
        assert isinstance(entry.detail, dict)


def test_first_write_after_open_does_not_reload_the_ledger(store_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening loads the graph once; taking a free lease afterwards must not load it again.

    But when another process wrote in between, the next write sees its revision: taken
    from the audit (a refresh), not by loading the whole ledger again.
    """
    with Peer.open(store_url, peer_id="test") as first:
        write(first, "one", lambda tx: tx.insert("items", {"_id": 1}))
    with Peer.open(store_url) as peer:
        loads = []
        original = peer._engine.load
        monkeypatch.setattr(peer._engine, "load", lambda: (loads.append(1), original())[1])
        write(peer, "two", lambda tx: tx.insert("items", {"_id": 2}))
        assert loads == []
        with Peer.open(store_url) as other:
            peer._ledger.release_lease()
            three = write(other, "three", lambda tx: tx.insert("items", {"_id": 3}))
        four = write(peer, "four", lambda tx: tx.insert("items", {"_id": 4}))
        assert loads == []  # a refresh from the audit, not a load
        assert peer.info(four).parents == (three,)


def test_a_plan_that_outlasts_the_lease_takes_it_again_unless_another_wrote(tmp_path) -> None:
    """Planning a million revisions can take longer than the 30 s lease."""
    from txengine.exceptions import StaleLease

    store = str(tmp_path / "p.db")
    with Peer.open(store, peer_id="a") as peer:
        for key in range(3):
            with peer.transaction(f"w{key}") as tx:
                tx.insert("items", {"_id": key})
        peer.downgrade("base")
        steps = peer.plan("upgrade", "heads")
        peer._ledger._lease_expires = time.time() - 1  # as if planning took too long
        peer._engine.run(steps, "upgrade")
        assert len(peer.find("items")) == 3
        peer.downgrade("base")
        steps = peer.plan("upgrade", "heads")
        peer._ledger._lease_expires = 0.0
        peer._ledger.conn.exec_driver_sql("UPDATE txengine_lock SET expires_at = 0")
        peer._ledger.conn.commit()
        with Peer.open(store) as other:  # the same peer, in another process
            other._take_lease()  # another process takes the expired lease, then leaves
        with pytest.raises(StaleLease, match="while this command was running"):
            peer._engine.run(steps, "upgrade")
        assert peer.find("items") == []


def test_a_big_graph_is_frozen_out_of_the_cyclic_collectors_sight(tmp_path, monkeypatch) -> None:
    """Opening a big history freezes its objects: no full collection walks them later."""
    import gc

    from txengine import engine

    store = str(tmp_path / "big.db")
    with Peer.open(store, peer_id="a") as peer:
        for n in range(5):
            write(peer, f"w{n}", lambda tx, n=n: tx.insert("items", {"_id": n}))
    monkeypatch.setattr(engine, "_FREEZE_AT", 5)
    gc.unfreeze()
    try:
        with Peer.open(store, peer_id="a") as peer:
            peer.heads()  # the graph loads on first use
            assert gc.get_freeze_count() > 0
        monkeypatch.setattr(engine, "_FREEZE_AT", 6)
        gc.unfreeze()
        with Peer.open(store, peer_id="a") as peer:
            peer.heads()
            assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_a_bulk_batchs_sqlite_writes_search_by_key_and_never_scan_a_table(tmp_path) -> None:
    """The multi-row statements a batch hands to its commit find each row by key or
    rowid: a form that scans (such as ``(a, b) IN (VALUES ...)``) would make every
    batch, and every single write, cost the size of the collection."""
    from txengine.ledger import Applied
    from txengine.stores.sql import raw_cursor

    with Peer.open(str(tmp_path / "a.db"), peer_id="a") as peer:
        for n in range(3):
            with peer.transaction("w") as tx:
                tx.insert("items", {"_id": n})
        ids = [h.id for h in peer.history()]
        statements: list = []
        peer._store.write_states("default", "items", {"0": (None, None), "1": (None, None),
                                                      "5": ({"_id": 5}, "x")}, statements)
        peer._ledger.rows(ids, "kind")  # bulk reads address rows by rowid afterwards
        peer._ledger.mark_applied([Applied(i, n, []) for n, i in enumerate(ids)], statements)
        peer._ledger.mark_unapplied(ids, statements)
        cur = raw_cursor(peer._store.conn)
        plans = []
        for sql, params in statements:
            cur.execute("EXPLAIN QUERY PLAN " + sql, params)
            plans += [row[3] for row in cur.fetchall()]
        peer._store.rollback()
    assert len(statements) == 4, statements
    scans = [p for p in plans if p.startswith("SCAN") and "CONSTANT ROW" not in p
             and not p.startswith("SCAN v")]
    assert not scans, plans



def test_a_bulk_upgrade_commits_the_stores_batch_unless_the_peer_names_one(tmp_path) -> None:
    """SQL stores commit 20,000 revisions a batch (each commit rewrites the pages its
    batch dirtied), MongoDB 2,000 (a transaction is bounded); ``batch_size`` wins."""
    import uuid

    with Peer.open(str(tmp_path / "a.db"), peer_id="a") as a:
        for n in range(2100):
            with a.transaction("w") as tx:
                tx.insert("items", {"_id": n})
        for name, batch_size, rows in (("b", None, 1), ("c", 1000, 3)):
            with Peer.open(str(tmp_path / f"{name}.db"), peer_id=name,
                           batch_size=batch_size) as peer:
                share(a, peer)
                peer.upgrade("heads")
                batches = [e.detail["count"] for e in peer.audit() if e.action == "upgrade"]
                assert len(batches) == rows and sum(batches) == 2100
                assert peer.snapshot() == a.snapshot()
    with Peer.open(f"mongomock://localhost/batch_{uuid.uuid4().hex}") as peer:
        assert peer._engine.batch_size == 2000


def test_bulk_reads_by_rowid_survive_a_stale_rowid_hint(tmp_path, monkeypatch) -> None:
    """Bulk reads address SQLite rows by a rowid hint read once per process; a row
    inserted since, or a rowid that now holds another revision, is read by id."""
    from txengine import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "_BY_ROWID", 2)
    with Peer.open(str(tmp_path / "a.db"), peer_id="a") as peer:
        for n in range(4):
            with peer.transaction("w") as tx:
                tx.insert("items", {"_id": n})
        ids = [h.id for h in peer.history()]
        led = peer._ledger
        assert set(led.rows(ids, "kind")) == set(ids)  # reads the hint
        hint = led._rowid_index()
        first, second = ids[0], ids[1]
        hint[first], hint[second] = hint[second], hint[first] + 10_000  # both stale
        rows = led.rows(ids, "kind", "seq")
        assert set(rows) == set(ids)
        assert all(rows[i].id == i and rows[i].kind == "data" for i in ids)
        assert led._rowid_index()[first] == rows[first].rowid  # read by id: the hint is mended
        assert led.rows([second, first], "kind").keys() == {first, second}


def test_a_peer_loads_its_graph_on_first_use_and_a_clone_never_loads_its_sources(
        tmp_path, monkeypatch) -> None:
    """Opening a peer reads no descriptor until something needs the graph; a one-pass
    clone reads its source's rows and never loads the source's graph."""
    from txengine import engine

    loads: list[str] = []
    original = engine.Engine.load

    def counted(self) -> None:
        loads.append(self.origin)
        original(self)

    monkeypatch.setattr(engine.Engine, "load", counted)
    source = str(tmp_path / "source.db")
    with Peer.open(source, peer_id="src") as peer:
        for n in range(3):
            write(peer, f"w{n}", lambda tx, n=n: tx.insert("items", {"_id": n}))
        loads.clear()
    with Peer.open(source) as peer:
        assert loads == []
        assert peer.get("items", 1) == {"_id": 1}
        assert len(peer.heads()) == 1 and loads == ["src:0"]
    loads.clear()
    with Peer.clone(source, str(tmp_path / "copy.db"), "copy") as copy:
        assert loads == ["copy:0"]
        with Peer.open(source) as peer:
            assert copy.snapshot() == peer.snapshot()


def test_sql_peers_never_load_the_mongodb_driver(tmp_path: Path) -> None:
    """Opening, writing and cloning SQLite peers leaves pymongo unimported (~0.1 s of
    every command's start)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from txengine import Peer\n"
        f"with Peer.open({str(tmp_path / 'a.db')!r}, peer_id='a') as peer:\n"
        "    with peer.transaction('one') as tx:\n"
        "        tx.insert('items', {'_id': 1})\n"
        f"Peer.clone({str(tmp_path / 'a.db')!r}, {str(tmp_path / 'b.db')!r}, 'b').close()\n"
        "print('pymongo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
