"""Distributed undo: a revert spreads like any revision; a pinned peer stays where it was."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import ledger_items, strict, write
from hypothesis import given, settings
from hypothesis import strategies as st

from txengine.cli import cli
from txengine.exceptions import PinnedPeer
from txengine.peer import Peer
from txengine.sync import SyncEvent


@pytest.fixture
def trio(store_url: str, new_store: Any) -> Iterator[tuple[Peer, Peer, Peer]]:
    """Three empty peers: alice on the backend under test, bob and carol on others."""
    peers = [Peer.open(store_url, peer_id="alice"), Peer.open(new_store(), peer_id="bob"),
             Peer.open(new_store(), peer_id="carol")]
    try:
        yield peers[0], peers[1], peers[2]
    finally:
        for p in peers:
            p.close()


def update(peer: Peer, key: Any, **fields: Any) -> str:
    with peer.transaction(f"update {key}") as tx:
        tx.update("items", key, set=fields)
    assert tx.revision is not None
    return tx.revision.id


def relay(a: Peer, b: Peer, c: Peer) -> None:
    """Sync along a line, a - b - c and back: c hears a only through b."""
    a.sync(b)
    b.sync(c)
    a.sync(b)


def test_a_revert_on_one_peer_undoes_the_change_on_every_peer_after_sync(trio) -> None:
    a, b, c = trio
    write(a, 1, v="old")
    relay(a, b, c)
    with a.transaction("change") as tx:
        tx.update("items", 1, set={"v": "new"})
        tx.insert("items", {"_id": 2, "v": "added"})
    change = tx.revision.id
    relay(a, b, c)
    assert c.get("items", 1) == {"_id": 1, "v": "new"} and c.get("items", 2) is not None
    revert = a.revert(change)
    assert revert is not None and revert.origin == "alice:0"
    relay(a, b, c)
    for peer in (a, b, c):
        assert peer.get("items", 1) == {"_id": 1, "v": "old"}, peer.peer_id
        assert peer.get("items", 2) is None, peer.peer_id
        assert revert.id in peer._engine.applied and change in peer._engine.applied
        assert peer.verify(replay=True).ok, peer.peer_id
    assert strict(a.snapshot()) == strict(b.snapshot()) == strict(c.snapshot())


def test_a_revert_leaves_a_later_change_relayed_from_a_third_peer_in_place(trio) -> None:
    """Carol changes one field after the reverted change; it reaches alice through bob
    before she reverts: her revert restores only the field that still holds her value."""
    a, b, c = trio
    write(a, 1, v="old", w="old")
    change = update(a, 1, v="new", w="new")
    relay(a, b, c)
    update(c, 1, v="carol")
    relay(c, b, a)
    a.revert(change)
    relay(a, b, c)
    for peer in (a, b, c):
        assert peer.get("items", 1) == {"_id": 1, "v": "carol", "w": "old"}, peer.peer_id
        assert peer.verify(replay=True).ok
    assert strict(a.snapshot()) == strict(b.snapshot()) == strict(c.snapshot())


def conflicts(peer: Peer, rev_id: str) -> list[dict[str, Any]]:
    return [e.detail for e in peer.audit(rev_id) if e.action == "conflict"]


def test_a_revert_leaves_a_concurrent_change_by_a_third_peer_in_place(trio) -> None:
    """Carol changes v while alice, who has not seen it, reverts the change of v, w and n.

    The revert sorts after carol's change, and its compare-and-set is checked
    where it is applied: on every peer v keeps carol's value, w goes back, the
    counter keeps carol's increment, and the revert is audited as a conflict.
    """
    a, b, c = trio
    write(a, 1, v="old", w="old", n=0)
    with a.transaction("change") as tx:
        tx.update("items", 1, set={"v": "new", "w": "new"}, inc={"n": 3})
    change = tx.revision.id
    relay(a, b, c)
    with c.transaction("carol") as tx:
        tx.update("items", 1, set={"v": "carol"}, inc={"n": 1})
    time.sleep(0.005)  # the revert's hlc is above carol's: it sorts after her change
    revert = a.revert(change)
    assert a.get("items", 1) == {"_id": 1, "v": "old", "w": "old", "n": 0}
    relay(a, b, c)
    relay(c, b, a)
    for peer in (a, b, c):
        assert peer.get("items", 1) == {"_id": 1, "v": "carol", "w": "old", "n": 1}, peer.peer_id
        assert revert.id in peer._engine.conflicted, peer.peer_id
        entry = conflicts(peer, revert.id)[-1]
        assert entry["reason"] == "compare-and-set: changed fields ['v'] were left in place"
        assert entry["op"]["cas"] is True and entry["op"]["before"]["v"] == "new"
        assert entry["current"]["v"] == "carol" and entry["result"]["v"] == "carol"
        assert peer.verify(replay=True).ok, peer.peer_id
    assert strict(a.snapshot()) == strict(b.snapshot()) == strict(c.snapshot())


def test_a_revert_leaves_documents_a_third_peer_changed_concurrently_in_place(trio) -> None:
    """Alice reverts a revision that inserted 2 and deleted 3 while carol, unseen, updates
    2 and inserts 3 anew: the revert neither removes nor replaces carol's documents."""
    a, b, c = trio
    write(a, 3, v="old")
    with a.transaction("swap") as tx:
        tx.insert("items", {"_id": 2, "v": "new"})
        tx.delete("items", 3)
    change = tx.revision.id
    relay(a, b, c)
    update(c, 2, v="carol")
    write(c, 3, v="carol")
    time.sleep(0.005)
    revert = a.revert(change)
    assert a.get("items", 2) is None and a.get("items", 3) == {"_id": 3, "v": "old"}
    relay(a, b, c)
    relay(c, b, a)
    for peer in (a, b, c):
        assert peer.get("items", 2) == {"_id": 2, "v": "carol"}, peer.peer_id
        assert peer.get("items", 3) == {"_id": 3, "v": "carol"}, peer.peer_id
        assert {e["reason"] for e in conflicts(peer, revert.id)} == {
            "compare-and-set: a changed document was left in place",
            "compare-and-set: an existing document was left in place"}, peer.peer_id
        assert peer.verify(replay=True).ok, peer.peer_id
    assert strict(a.snapshot()) == strict(b.snapshot()) == strict(c.snapshot())


def test_a_revert_of_an_insert_that_replaced_a_document_brings_the_old_one_back(trio) -> None:
    a, b, c = trio
    write(a, 1, v="first")
    change = write(a, 1, v="second")
    relay(a, b, c)
    a.revert(change)
    relay(a, b, c)
    for peer in (a, b, c):
        assert peer.get("items", 1) == {"_id": 1, "v": "first"}, peer.peer_id
        assert peer.verify(replay=True).ok, peer.peer_id


FIELDS = ("a", "b", "c")
SEED = {"_id": 1, "a": "seed", "b": "seed", "c": "seed", "n": 0}
carol_edits = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(FIELDS), st.sampled_from(["seed", "new", "carol"])),
    st.tuples(st.just("unset"), st.sampled_from(FIELDS), st.none()),
    st.tuples(st.just("inc"), st.just("n"), st.integers(-3, 3)),
), min_size=1, max_size=3)
changes = st.fixed_dictionaries({f: st.sampled_from(["set", "unset", "keep"]) for f in FIELDS})


def expected_after_revert(change: dict[str, str], carol: dict[str, Any] | None) -> Any:
    """The model: a field goes back to its seed value only where carol left the change's."""
    if carol is None:
        return None
    after = {f: "new" for f, kind in change.items() if kind == "set"}
    out = dict(carol)
    for f, kind in change.items():
        if kind != "keep" and carol.get(f) == after.get(f):
            out[f] = SEED[f]
    out["n"] -= 2
    return out


@settings(max_examples=20, deadline=None)
@given(change=changes, edits=carol_edits, deletes=st.booleans(), data=st.data())
def test_a_reverts_outcome_does_not_depend_on_what_it_saw_or_on_arrival_order(
        change, edits, deletes, data) -> None:
    """Carol edits concurrently with alice's revert; a fourth peer receives carol's
    revisions and the revert interleaved at random. Every peer ends where the model says."""
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        a, c, d = (stack.enter_context(Peer.open(f"sqlite:///{tmp}/{name}.db", peer_id=name))
                   for name in ("alice", "carol", "dave"))
        write(a, 1, **{k: v for k, v in SEED.items() if k != "_id"})
        with a.transaction("change") as tx:
            tx.update("items", 1, set={f: "new" for f, k in change.items() if k == "set"},
                      unset=[f for f, k in change.items() if k == "unset"], inc={"n": 2})
        changed = tx.revision.id
        a.sync(c)
        model: dict[str, Any] | None = dict(c.get("items", 1))
        for kind, name, value in edits:
            with c.transaction(f"{kind} {name}") as tx:
                if kind == "set":
                    tx.update("items", 1, set={name: value})
                elif kind == "unset":
                    tx.update("items", 1, unset=[name])
                else:
                    tx.update("items", 1, inc={name: value})
            model = c.get("items", 1)
        if deletes:
            with c.transaction("delete") as tx:
                tx.delete("items", 1)
            model = None
        time.sleep(0.005)  # the revert sorts after carol's edits
        revert = a.revert(changed)
        assert revert is not None
        d.receive(ledger_items(a, [r for r in a._engine.applied if r != revert.id]))
        d.upgrade("heads")
        carols = [r for r in ledger_items(c) if r[0]["origin"].startswith("carol")]
        arrivals = [*carols]
        arrivals.insert(data.draw(st.integers(0, len(carols)), label="revert arrives at"),
                        ledger_items(a, [revert.id])[0])
        for item in arrivals:
            d.receive([item])
            d.upgrade("heads")
        a.sync(c)
        expected = expected_after_revert(change, model)
        for peer in (a, c, d):
            assert peer.get("items", 1) == expected, peer.peer_id
        assert strict(a.snapshot()) == strict(c.snapshot()) == strict(d.snapshot())
        assert d.verify(replay=True).ok


def test_a_pinned_peer_stays_where_it_was_through_a_sync_until_upgrade(pair) -> None:
    a, b = pair
    write(a, 1, v=1)
    change = update(a, 1, v=2)
    a.sync(b)
    b.downgrade("-1")
    assert b.pinned and b.get("items", 1) == {"_id": 1, "v": 1}
    before, applied = strict(b.snapshot()), set(b._engine.applied)
    revert = a.revert(change)
    assert revert is not None
    extra = write(a, 2)
    events: list[SyncEvent] = []
    result = b.sync(a, events=events.append)
    assert strict(b.snapshot()) == before and set(b._engine.applied) == applied
    assert result.local.applied == [] and result.local.fetched == 2
    assert [e.kind for e in events if e.revision == revert.id] == ["announced", "fetched"]
    status = b.status()
    assert (status.pinned, status.announced, status.fetched) == (True, 0, 3)
    with pytest.raises(PinnedPeer):
        write(b, 3)
    b.upgrade("heads")
    assert not b.pinned
    assert b.get("items", 1) == {"_id": 1, "v": 1} and b.get("items", 2) == {"_id": 2}
    assert strict(b.snapshot()) == strict(a.snapshot())
    assert {revert.id, extra, change} <= set(b._engine.applied)
    assert b.verify(replay=True).ok


def test_status_shows_the_pin_in_text_and_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with Peer.open(url, peer_id="alice") as peer:
        write(peer, 1)
        write(peer, 2)
    runner = CliRunner()

    def status() -> tuple[str, dict[str, Any]]:
        text = runner.invoke(cli, ["--store", url, "status"])
        as_json = runner.invoke(cli, ["--store", url, "status", "--json"])
        assert text.exit_code == as_json.exit_code == 0, (text.output, as_json.output)
        return text.stdout.splitlines()[0], json.loads(as_json.stdout)

    assert status()[0] == "peer alice (origin alice:0)"
    assert status()[1]["pinned"] is False
    assert runner.invoke(cli, ["--store", url, "downgrade", "-1"]).exit_code == 0
    line, data = status()
    assert line == "peer alice (origin alice:0) pinned"
    assert data["pinned"] is True and data["fetched"] == 1
    assert runner.invoke(cli, ["--store", url, "upgrade"]).exit_code == 0
    line, data = status()
    assert line == "peer alice (origin alice:0)" and data["pinned"] is False
