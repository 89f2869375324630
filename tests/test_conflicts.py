"""The conflict rules of DESIGN.md, scene by scene, between two peers that sync.

Each scene: both peers start from the same synced document, write
concurrently (offline), then sync both ways; both end with the same data,
equal to a replay, and every conflict is audited with both values. The same
scenes run again under ``reject`` and under a named resolver.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from conftest import ledger_items, strict

from txengine.ops import Insert, State
from txengine.peer import Peer
from txengine.policy import register_resolver


@register_resolver("union")
def union(op, state: State, revision: str, reason: str) -> State:
    """An insert over an existing document keeps the fields of both (the newcomer's win)."""
    doc, incarnation = state
    if isinstance(op, Insert) and doc is not None:
        return {**doc, **op.doc}, incarnation
    return state


def write(peer: Peer, fn: Callable, partition: str = "default") -> str:
    with peer.transaction("w", partition=partition) as tx:
        fn(tx)
    time.sleep(0.002)  # distinct hlc milliseconds: "later" means later
    return tx.revision.id


@pytest.fixture
def pair(store_url: str, new_store) -> Iterator[tuple[Peer, Peer]]:
    a = Peer.open(store_url, peer_id="alice")
    b = Peer.open(new_store(), peer_id="bob")
    b.trust_sequencer("alice")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def seeded(a: Peer, b: Peer, policy: str | None = None) -> str:
    if policy is not None:
        a.configure(policies={"items": policy}, sequencer="alice")
    root = write(a, lambda tx: tx.insert("items", {"_id": "x", "n": 0, "f": 0}))
    a.sync(b)
    assert b.get("items", "x") == a.get("items", "x")
    return root


def replayed(source: Peer, url: str) -> dict:
    """Replay ``source``'s integrated revisions, config barriers included, into ``url``."""
    with Peer.open(url, peer_id="replayer") as fresh:
        fresh._take_lease()
        fresh._engine.receive(ledger_items(source, list(source._engine.applied)), trusted=True)
        fresh.upgrade("heads")
        return fresh.snapshot()


def converged(a: Peer, b: Peer, new_store) -> dict:
    a.sync(b)
    assert strict(a.snapshot()) == strict(b.snapshot())
    assert strict(a.snapshot()) == strict(replayed(a, new_store()))
    assert a.verify().ok and b.verify().ok
    return a.get("items", "x")


def conflicts(peer: Peer, rev_id: str) -> list[dict]:
    return [e.detail for e in peer.audit(rev_id) if e.action == "conflict"]


def test_concurrent_updates_of_different_fields_merge(pair, new_store) -> None:
    a, b = pair
    seeded(a, b)
    write(a, lambda tx: tx.update("items", "x", set={"a": 1}))
    write(b, lambda tx: tx.update("items", "x", set={"b": 2}))
    assert converged(a, b, new_store) == {"_id": "x", "n": 0, "f": 0, "a": 1, "b": 2}


def test_the_later_write_wins_per_field(pair, new_store) -> None:
    a, b = pair
    seeded(a, b)
    write(a, lambda tx: tx.update("items", "x", set={"f": "alice", "a": 1}))
    write(b, lambda tx: tx.update("items", "x", set={"f": "bob"}))
    assert converged(a, b, new_store) == {"_id": "x", "n": 0, "f": "bob", "a": 1}


@pytest.mark.parametrize("delete_first", [True, False])
def test_delete_wins_over_a_concurrent_update(pair, new_store, delete_first: bool) -> None:
    a, b = pair
    seeded(a, b)
    if delete_first:
        write(a, lambda tx: tx.delete("items", "x"))
        update = write(b, lambda tx: tx.update("items", "x", set={"f": 9}))
    else:
        update = write(b, lambda tx: tx.update("items", "x", set={"f": 9}))
        write(a, lambda tx: tx.delete("items", "x"))
    assert converged(a, b, new_store) is None
    if delete_first:
        [entry] = conflicts(a, update)
        assert entry["reason"] == "update of a missing document"
        assert entry["op"]["set"] == {"f": 9} and entry["current"] is None
        assert update in a._engine.conflicted and a.status().conflicted == 1


def test_an_update_aimed_at_a_deleted_then_reinserted_document_does_nothing(
        pair, new_store) -> None:
    a, b = pair
    seeded(a, b)
    write(a, lambda tx: tx.delete("items", "x"))
    write(a, lambda tx: tx.insert("items", {"_id": "x", "fresh": True}))
    update = write(b, lambda tx: tx.update("items", "x", set={"f": 9}))
    assert converged(a, b, new_store) == {"_id": "x", "fresh": True}
    [entry] = conflicts(b, update)
    assert entry["reason"] == "written against another incarnation"
    assert entry["current"] == {"_id": "x", "fresh": True} and entry["op"]["set"] == {"f": 9}


def test_concurrent_incs_both_count(pair, new_store) -> None:
    a, b = pair
    seeded(a, b)
    write(a, lambda tx: tx.update("items", "x", inc={"n": 5}))
    write(b, lambda tx: tx.update("items", "x", inc={"n": 7}))
    write(a, lambda tx: tx.update("items", "x", inc={"n": 1}))
    assert converged(a, b, new_store)["n"] == 13


def test_concurrent_inserts_of_one_key_leave_one_writers_document_whole(
        pair, new_store) -> None:
    a, b = pair
    seeded(a, b)
    write(a, lambda tx: tx.insert("items", {"_id": "y", "from": "alice", "p": 1}))
    later = write(b, lambda tx: tx.insert("items", {"_id": "y", "from": "bob", "q": 2}))
    converged(a, b, new_store)
    assert a.get("items", "y") == {"_id": "y", "from": "bob", "q": 2}
    [entry] = conflicts(a, later)
    assert entry["reason"] == "replaced an existing document"
    assert entry["current"] == {"_id": "y", "from": "alice", "p": 1}
    assert entry["op"]["doc"] == {"_id": "y", "from": "bob", "q": 2}


def test_a_revert_leaves_a_later_change_by_another_peer_in_place(pair, new_store) -> None:
    a, b = pair
    seeded(a, b)
    target = write(a, lambda tx: tx.update("items", "x", set={"f": 1, "a": 1}))
    a.sync(b)
    write(b, lambda tx: tx.update("items", "x", set={"f": 2}))
    a.sync(b)
    a.revert(target)
    assert converged(a, b, new_store) == {"_id": "x", "n": 0, "f": 2}


def test_the_same_key_in_two_partitions_stays_two_documents(pair, new_store) -> None:
    a, b = pair
    mine = write(a, lambda tx: tx.insert("items", {"_id": 1, "who": "alice"}))
    theirs = write(b, lambda tx: tx.insert("items", {"_id": 1, "who": "bob"}), "user:1")
    a.sync(b)
    for peer in (a, b):
        assert peer.get("items", 1) == {"_id": 1, "who": "alice"}
        assert peer.get("items", 1, partition="user:1") == {"_id": 1, "who": "bob"}
        assert not conflicts(peer, mine) and not conflicts(peer, theirs)
        for rev_id in (mine, theirs):
            assert any(e.action in ("apply", "integrate") for e in peer.audit(rev_id))
    assert strict(a.snapshot()) == strict(b.snapshot())


# -- the same scenes under reject and under a resolver ------------------------------------


def test_under_reject_a_conflicting_revision_is_integrated_as_a_no_op(pair, new_store) -> None:
    a, b = pair
    seeded(a, b, policy="reject")
    write(a, lambda tx: tx.delete("items", "x"))
    write(a, lambda tx: tx.insert("items", {"_id": "y", "from": "alice"}))
    update = write(b, lambda tx: (tx.update("items", "x", set={"f": 9}),
                                  tx.insert("items", {"_id": "z"})))
    assert converged(a, b, new_store) is None
    assert a.get("items", "z") is None, "the whole revision is a no-op"
    assert update in a._engine.conflicted and update in b._engine.conflicted
    [entry] = conflicts(a, update)
    assert entry["policy"] == "reject" and entry["result"] == "rejected"


def test_under_reject_different_fields_still_merge_and_incs_still_count(
        pair, new_store) -> None:
    a, b = pair
    seeded(a, b, policy="reject")
    write(a, lambda tx: tx.update("items", "x", set={"a": 1}, inc={"n": 1}))
    write(b, lambda tx: tx.update("items", "x", set={"b": 2}, inc={"n": 2}))
    assert converged(a, b, new_store) == {"_id": "x", "n": 3, "f": 0, "a": 1, "b": 2}


def test_under_reject_concurrent_inserts_keep_the_first_document(pair, new_store) -> None:
    a, b = pair
    seeded(a, b, policy="reject")
    write(a, lambda tx: tx.insert("items", {"_id": "y", "from": "alice"}))
    write(b, lambda tx: tx.insert("items", {"_id": "y", "from": "bob"}))
    converged(a, b, new_store)
    assert a.get("items", "y") == {"_id": "y", "from": "alice"}


def test_under_a_resolver_concurrent_inserts_keep_both_writers_fields(pair, new_store) -> None:
    a, b = pair
    seeded(a, b, policy="resolver:union")
    write(a, lambda tx: tx.insert("items", {"_id": "y", "from": "alice", "p": 1}))
    later = write(b, lambda tx: tx.insert("items", {"_id": "y", "from": "bob", "q": 2}))
    converged(a, b, new_store)
    assert a.get("items", "y") == {"_id": "y", "from": "bob", "p": 1, "q": 2}
    [entry] = conflicts(a, later)
    assert entry["policy"] == "resolver:union"
    assert entry["result"] == {"_id": "y", "from": "bob", "p": 1, "q": 2}


def test_under_a_resolver_delete_still_wins(pair, new_store) -> None:
    a, b = pair
    seeded(a, b, policy="resolver:union")
    write(a, lambda tx: tx.delete("items", "x"))
    write(b, lambda tx: tx.update("items", "x", set={"f": 9}))
    assert converged(a, b, new_store) is None
