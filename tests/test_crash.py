"""Crashes at every commit boundary of a bulk upgrade and downgrade.

50 revisions, batches of 5, so 10 commit boundaries each way. The progress
callback runs right after each commit; it raises (or SIGKILLs its process)
at boundary k. The reopened peer must be consistent — its applied set is
ancestor-closed and its data equals a replay of that set — and running the
same command again must finish the job with the uncrashed result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import fail_background_commit, strict

from txengine.engine import Progress
from txengine.peer import Peer

REVISIONS = 50
BATCH = 5
BOUNDARIES = list(range(1, REVISIONS // BATCH + 1))


class Crash(Exception):
    """Raised by the progress callback to simulate a crash after a commit."""


def build_history(url: str) -> tuple[list[str], list[str]]:
    """Write 50 revisions over 8 keys; return (ids in order, strict snapshot after each)."""
    ids, states = [], []
    with Peer.open(url, peer_id="test") as peer:
        for n in range(REVISIONS):
            key = n % 8
            with peer.transaction(f"step {n}") as tx:
                doc = tx.get("items", key)
                if doc is None:
                    tx.insert("items", {"_id": key, "n": n, "tag": f"t{n}"})
                elif n % 7 == 3:
                    tx.delete("items", key)
                else:
                    tx.update("items", key, set={"tag": f"t{n}"}, inc={"n": n})
                if n % 5 == 0:
                    tx.insert("other", {"_id": f"k{n}", "from": n})
            ids.append(tx.revision.id)
            states.append(strict(peer.snapshot()))
    return ids, states


def crash_at(k: int):
    def progress(report: Progress) -> None:
        if report.done == k * BATCH:
            raise Crash(f"boundary {k}")
    return progress


def assert_consistent(peer: Peer) -> None:
    applied = set(peer._engine.applied)
    for rev_id in applied:
        missing = [p for p in peer.info(rev_id).parents if p not in applied]
        assert not missing, f"{rev_id[:12]} is applied without its parents {missing}"
    report = peer.verify(replay=True)
    assert report.ok, report.findings


@pytest.fixture
def history(store_url: str) -> tuple[list[str], list[str]]:
    return build_history(store_url)


@pytest.mark.parametrize("k", BOUNDARIES)
def test_upgrade_interrupted_at_a_commit_boundary_reopens_consistent_and_finishes(
        store_url: str, history, k: int) -> None:
    ids, states = history
    with Peer.open(store_url, peer_id="test") as peer:
        peer.downgrade("base")
    with Peer.open(store_url, peer_id="test", batch_size=BATCH) as peer:
        with pytest.raises(Crash, match=f"^boundary {k}$"):
            peer.upgrade("heads", progress=crash_at(k))
    with Peer.open(store_url, peer_id="test", batch_size=BATCH) as peer:
        assert sorted(peer._engine.applied) == sorted(ids[:k * BATCH])
        assert strict(peer.snapshot()) == states[k * BATCH - 1]
        assert_consistent(peer)
        assert peer.pinned
        peer.upgrade("heads")
        assert strict(peer.snapshot()) == states[-1]
        assert not peer.pinned
        assert_consistent(peer)


@pytest.mark.parametrize("k", BOUNDARIES)
def test_downgrade_interrupted_at_a_commit_boundary_reopens_consistent_and_finishes(
        store_url: str, history, k: int) -> None:
    ids, states = history
    with Peer.open(store_url, peer_id="test", batch_size=BATCH) as peer:
        with pytest.raises(Crash, match=f"^boundary {k}$"):
            peer.downgrade("base", progress=crash_at(k))
    left = REVISIONS - k * BATCH
    with Peer.open(store_url, peer_id="test", batch_size=BATCH) as peer:
        assert sorted(peer._engine.applied) == sorted(ids[:left])
        assert strict(peer.snapshot()) == (states[left - 1] if left else "[]")
        assert_consistent(peer)
        assert peer.pinned, "an interrupted downgrade must leave the peer pinned"
        peer.downgrade("base")
        assert peer.snapshot() == {}
        assert peer._engine.applied == {}
        assert peer.pinned
        peer.upgrade("heads")
        assert strict(peer.snapshot()) == states[-1]


CHILD = textwrap.dedent("""
    import os, signal, sys
    from txengine.peer import Peer
    url, command, k, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    def progress(report):
        if report.done == k * batch:
            os.kill(os.getpid(), signal.SIGKILL)
    peer = Peer.open(url, peer_id="test", batch_size=batch)
    getattr(peer, command)("heads" if command == "upgrade" else "base", progress=progress)
    sys.exit(3)
""")


def run_killed_child(url: str, command: str, k: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CHILD, url, command, str(k), str(BATCH)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr


@pytest.mark.parametrize("command", ["upgrade", "downgrade"])
@pytest.mark.parametrize("k", BOUNDARIES)
def test_sigkill_at_a_commit_boundary_leaves_a_peer_that_reopens_and_finishes(
        store_url: str, history, command: str, k: int) -> None:
    """The killed holder's lease does not block the next process."""
    ids, states = history
    if command == "upgrade":
        with Peer.open(store_url, peer_id="test") as peer:
            peer.downgrade("base")
        expected_ids, target = ids[:k * BATCH], "heads"
    else:
        expected_ids, target = ids[:REVISIONS - k * BATCH], "base"
    run_killed_child(store_url, command, k)
    with Peer.open(store_url, peer_id="test", batch_size=BATCH) as peer:
        assert sorted(peer._engine.applied) == sorted(expected_ids)
        assert_consistent(peer)
        getattr(peer, command)(target)
        assert strict(peer.snapshot()) == (states[-1] if command == "upgrade" else "[]")
        if command == "downgrade":
            peer.upgrade("heads")
            assert strict(peer.snapshot()) == states[-1]
        assert_consistent(peer)


@pytest.mark.parametrize("command", ["upgrade", "downgrade"])
def test_a_commit_that_fails_beside_the_next_batch_leaves_the_batches_before_it(
        store_url: str, history, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch's writes and commit run on a helper thread while the next batch is
    computed; when they fail (here a statement the third commit runs), the command
    raises that error, the third batch is not committed, and the peer is as if it
    stopped after the second."""
    ids, states = history
    if command == "upgrade":
        with Peer.open(store_url, peer_id="test") as peer:
            peer.downgrade("base")
    calls = fail_background_commit(monkeypatch, 3)
    target = "heads" if command == "upgrade" else "base"
    with Peer.open(store_url, peer_id="test", batch_size=BATCH) as peer:
        with pytest.raises(Exception, match="no_such_table"):
            getattr(peer, command)(target)
        kept = ids[:2 * BATCH] if command == "upgrade" else ids[:REVISIONS - 2 * BATCH]
        assert sorted(peer._engine.applied) == sorted(kept), "memory follows the commits"
        if store_url.startswith("sqlite"):
            assert calls[:2] != [0, 0], "SQLite hands the batch's writes to the helper"
    monkeypatch.undo()
    with Peer.open(store_url, peer_id="test", batch_size=BATCH) as peer:
        assert sorted(peer._engine.applied) == sorted(kept)
        assert strict(peer.snapshot()) == states[len(kept) - 1]
        assert_consistent(peer)
        getattr(peer, command)(target)
        assert strict(peer.snapshot()) == (states[-1] if command == "upgrade" else "[]")
        assert_consistent(peer)
