"""Refresh: a process takes in what another recorded in the same store from the audit.

Two ``Peer`` objects on one store stand for two server processes. After each
operation of one, the other catches up when it next takes the lease; its
in-memory state must then equal a fresh load's, whatever the operations were.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txengine.engine import Engine
from txengine.exceptions import TxEngineError
from txengine.peer import Peer

OPS = ("write", "write_other", "sync_outside", "downgrade", "upgrade", "revert", "delete")


def engine_state(engine: Engine) -> dict[str, Any]:
    """Everything a load rebuilds that later commands rely on (not the clock: a refresh
    keeps a clock at least as high, which only sends new work down the general path)."""
    held = engine.held
    return {
        "nodes": {r: engine.graph.get(r) for r in engine.graph},
        "order": engine.graph.canonical_order(),
        "heads": sorted(engine.graph.heads()),
        "applied": dict(engine.applied),
        "pending": set(engine.pending),
        "conflicted": set(engine.conflicted),
        "quarantined": dict(engine.quarantined),
        "partition": dict(engine.partition),
        "messages": dict(engine.messages),
        "applied_heads": {p: set(h) for p, h in engine.applied_heads.items() if h},
        "seqs": {p: s for p, s in engine.seqs.items() if s},
        "held": ({k: dict(v) for k, v in held._ids.items() if v},
                 {k: v for k, v in held._contiguous.items() if v},
                 {k: v for k, v in held._max.items() if v}),
    }


def _write(peer: Peer, n: int) -> None:
    key = n % 4
    partition = ("default", "user:1")[n % 2]
    with peer.transaction(f"w{n}", partition=partition) as tx:
        if tx.get("items", key) is None:
            tx.insert("items", {"_id": key, "n": n})
        else:
            tx.update("items", key, set={"n": n})


def _delete(peer: Peer, n: int) -> None:
    with peer.transaction(f"d{n}") as tx:
        if tx.get("items", n % 4) is not None:
            tx.delete("items", n % 4)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(OPS), st.booleans()), min_size=1, max_size=12))
def test_a_refresh_from_the_audit_equals_a_fresh_load(tmp_path_factory, script) -> None:
    tmp: Path = tmp_path_factory.mktemp("refresh")
    store, outside_store = str(tmp / "hub.db"), str(tmp / "outside.db")
    first, second = Peer.open(store, peer_id="hub"), Peer.open(store, peer_id="hub")
    outside = Peer.open(outside_store, peer_id="outside")
    loads: list[int] = []
    try:
        for peer in (first, second):
            original = peer._engine.load
            peer._engine.load = lambda original=original: (loads.append(1), original())[1]
        for n, (op, by_first) in enumerate(script):
            actor = first if by_first else second
            actor._take_lease()  # catches up with the other process first
            if op == "write" and not actor.pinned:
                _write(actor, n)
            elif op == "write_other":
                _write(outside, n)
            elif op == "sync_outside":
                _write(outside, n)
                actor.sync(outside)
            elif op == "downgrade" and actor._engine.applied:
                target = sorted(actor._engine.applied)[n % len(actor._engine.applied)]
                with contextlib.suppress(TxEngineError):  # not every revision is a target
                    actor.downgrade(target)
            elif op == "upgrade":
                actor.upgrade("heads")
            elif op == "revert" and actor._engine.applied and not actor.pinned:
                target = sorted(actor._engine.applied)[n % len(actor._engine.applied)]
                if actor.info(target).kind == "data":
                    actor.revert(target)
            elif op == "delete" and not actor.pinned:
                _delete(actor, n)
            actor._ledger.release_lease()
            other = second if by_first else first
            other._take_lease()
            other._ledger.release_lease()
            with Peer.open(store, peer_id="hub") as fresh:
                assert engine_state(other._engine) == engine_state(fresh._engine), (n, op)
                if other._engine.applied:
                    assert other._engine.next_position > max(other._engine.applied.values())
        assert loads == [], "every catch-up was a refresh"
    finally:
        for peer in (first, second, outside):
            peer.close()


def test_a_change_a_refresh_cannot_take_loads_the_ledger(tmp_path: Path) -> None:
    """A new epoch (revisions re-issued and deleted) is not taken from the audit."""
    store = str(tmp_path / "hub.db")
    with Peer.open(store, peer_id="hub") as first, Peer.open(store, peer_id="hub") as second:
        _write(first, 1)
        first._ledger.release_lease()
        assert second._engine.refresh() is True
        first._ledger.audit("epoch", None, detail={"from": "hub:0", "epoch": 1})
        first._store.commit()
        assert second._engine.refresh() is False


def test_every_store_kind_catches_up_to_a_fresh_load(store_url: str, new_store) -> None:
    """The same catch-up on SQLite, PostgreSQL and MongoDB (which loads: its audit is not
    read back incrementally)."""
    outside = Peer.open(new_store(), peer_id="outside")
    with Peer.open(store_url, peer_id="hub") as first, \
            Peer.open(store_url, peer_id="hub") as second, outside:
        for n, step in enumerate(("write", "sync", "write", "downgrade", "upgrade", "write")):
            actor, other = (first, second) if n % 2 == 0 else (second, first)
            actor._take_lease()
            if step == "write":
                _write(actor, n)
            elif step == "sync":
                _write(outside, n)
                _write(outside, n + 1)
                actor.sync(outside)
            elif step == "downgrade":
                actor.downgrade(actor.history()[-1].id)  # the oldest: undo what follows it
            else:
                actor.upgrade("heads")
            actor._ledger.release_lease()
            other._take_lease()
            other._ledger.release_lease()
            with Peer.open(store_url, peer_id="hub") as fresh:
                assert engine_state(other._engine) == engine_state(fresh._engine), (n, step)
