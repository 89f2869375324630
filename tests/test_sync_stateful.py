"""Convergence, property-tested: any schedule of writes and lossy syncs, then a full exchange.

A hypothesis state machine runs 3-5 peers (SQLite files and MongoDB through
mongomock; PostgreSQL in about one schedule in ten when
``TXENGINE_TEST_POSTGRES_URL`` is set). Rules write random transactions on
random peers and partitions, and sync random pairs through a channel that
drops, duplicates and reorders messages. At the end every peer syncs with
every other over a clean channel, and then (DESIGN.md's convergence
invariant): every peer holds the same revisions and equal data, that data
equals a fresh replay of the revision set, no revision written is lost, and
``verify`` passes on each.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

from conftest import POSTGRES_ENV, ledger_items, store_url_for, strict
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_reversibility import run

from txengine.ops import Insert
from txengine.peer import Peer
from txengine.policy import register_resolver


@register_resolver("stateful_union")
def union(op, state, revision, reason):
    doc, incarnation = state
    if isinstance(op, Insert) and doc is not None:
        return {**doc, **op.doc}, incarnation
    return state

PARTITIONS = ["default", "user:1"]
KINDS = ["sqlite", "mongo"]

# Few keys and fields, so concurrent writes meet often.
values = st.one_of(st.none(), st.integers(-5, 5), st.sampled_from(["x", "é\U0001f600", ""]),
                   st.lists(st.integers(0, 3), max_size=2))
fields = st.sampled_from(["a", "b", "c"])


@st.composite
def actions(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(["insert", "update", "update", "update", "delete"]))
    coll, key = draw(st.sampled_from(["items", "other"])), draw(st.sampled_from(["k", 1, 2]))
    if kind == "insert":
        return ("insert", coll, key, {**draw(st.dictionaries(fields, values, max_size=2)),
                                      "n": draw(st.integers(-9, 9))})
    if kind == "delete":
        return ("delete", coll, key)
    names = draw(st.lists(fields, max_size=2, unique=True))
    cut = draw(st.integers(0, len(names)))
    set_ = {f: draw(values) for f in names[:cut]}
    inc = {"n": draw(st.integers(-9, 9))} if draw(st.booleans()) or not names else None
    return ("update", coll, key, set_ or None, names[cut:] or None, inc)


def lossy(seed: int):
    """Return a channel that drops, duplicates and reorders a leg's messages."""
    rng = random.Random(seed)

    def channel(messages: list[bytes]) -> list[bytes]:
        out = []
        for m in messages:
            roll = rng.random()
            if roll < 0.2:
                continue
            out.append(m)
            if roll > 0.8:
                out.append(m)
        if rng.random() < 0.4:
            rng.shuffle(out)
        return out

    return channel


class Convergence(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="txengine-sync-"))
        self.stack = ExitStack()
        self.peers: list[Peer] = []
        self.written: set[str] = set()

    @initialize(kinds=st.lists(st.sampled_from(KINDS), min_size=3, max_size=5),
                postgres=st.integers(0, 9))
    def open_peers(self, kinds: list[str], postgres: int) -> None:
        if os.environ.get(POSTGRES_ENV) and postgres == 0:
            kinds = ["postgresql", *kinds[1:]]
        for n, kind in enumerate(kinds):
            if kind == "mongo":
                url = f"mongomock://sync-test/t_{secrets.token_hex(6)}"
            else:
                url = self.stack.enter_context(store_url_for(kind, self.tmp))
            peer = self.stack.enter_context(Peer.open(url, peer_id=f"p{n}"))
            peer.trust_sequencer("p0")  # p0 issues the config barriers
            peer.trust_sequencer("p0", "user:1")
            self.peers.append(peer)

    @rule(partition=st.sampled_from(PARTITIONS), collection=st.sampled_from(["items", "other"]),
          policy=st.sampled_from(["rules", "reject", "resolver:stateful_union"]))
    def configure(self, partition: str, collection: str, policy: str) -> None:
        if not self.peers[0].pinned:
            rev = self.peers[0].configure(partition, policies={collection: policy})
            self.written.add(rev.id)

    @rule(who=st.integers(0, 4), partition=st.sampled_from(PARTITIONS),
          acts=st.lists(actions(), min_size=1, max_size=3))
    def write(self, who: int, partition: str, acts: list) -> None:
        peer = self.peers[who % len(self.peers)]
        for rev_id, _partition, _snap in run(peer, [(partition, acts)]):
            self.written.add(rev_id)

    @rule(a=st.integers(0, 4), b=st.integers(0, 4), seed=st.integers(0, 2**32),
          clean=st.booleans())
    def sync(self, a: int, b: int, seed: int, clean: bool) -> None:
        first, second = self.peers[a % len(self.peers)], self.peers[b % len(self.peers)]
        if first is second:
            return
        first.sync(second, channel=None if clean else lossy(seed))

    @invariant()
    def integrated_sets_are_ancestor_closed(self) -> None:
        for peer in self.peers:
            applied = peer._engine.applied
            graph = peer._engine.graph
            for rev_id in applied:
                assert set(graph.get(rev_id).parents) <= set(applied)

    def teardown(self) -> None:
        try:
            if self.peers:
                self._exchange_everything()
        finally:
            self.stack.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _exchange_everything(self) -> None:
        peers = self.peers
        for _ in range(2):
            for i in range(len(peers)):
                peers[i].sync(peers[(i + 1) % len(peers)])
        sets = [set(p._engine.graph) for p in peers]
        assert all(s == sets[0] for s in sets), "every peer holds the same revisions"
        assert self.written <= sets[0], "no revision written is lost"
        for p in peers:
            assert set(p._engine.applied) == sets[0], f"{p.peer_id} integrated everything"
            status = p.status()
            assert (status.unsent, status.announced, status.fetched, status.quarantined) == (
                0, 0, 0, 0), status
        snapshots = [strict(p.snapshot()) for p in peers]
        assert all(s == snapshots[0] for s in snapshots), "every peer holds equal data"
        with store_url_for("sqlite", self.tmp / "replay") as url, \
                Peer.open(url, peer_id="replayer") as fresh:
            fresh._take_lease()  # config barriers are trusted here: they passed intake once
            fresh._engine.receive(ledger_items(peers[0]), trusted=True)
            fresh.upgrade("heads")
            assert strict(fresh.snapshot()) == snapshots[0], "equal to a fresh replay"
        for p in peers:
            report = p.verify()
            assert report.ok, report.findings


Convergence.TestCase.settings = settings(
    max_examples=int(os.environ.get("TXENGINE_SYNC_SCHEDULES", "200")),
    stateful_step_count=12, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large])
TestConvergence = Convergence.TestCase
