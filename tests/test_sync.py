"""Sync between peers in one process: the exchange, status, refusals, epochs, clocks, cost."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import ledger_items, write

from txengine.ops import Insert
from txengine.peer import Peer
from txengine.revision import build, encode_ops
from txengine.sync import Side, SyncEvent, decode, encode


def only(kinds: set[str]):
    """A channel that lets through only messages of ``kinds``."""
    return lambda msgs: [m for m in msgs if decode(m)["type"] in kinds]


def tamper(kind: str, change):
    """A channel that rewrites every message of one kind with ``change(message)``."""
    def channel(msgs: list[bytes]) -> list[bytes]:
        out = []
        for m in msgs:
            message = decode(m)
            if message["type"] == kind:
                change(message)
                m = encode(message)
            out.append(m)
        return out
    return channel


# -- the exchange -----------------------------------------------------------------------


def test_sync_exchanges_both_ways_in_three_round_trips(pair) -> None:
    a, b = pair
    mine = [write(a, 1, n=1), write(a, 2, partition="user:1")]
    theirs = [write(b, 3)]
    assert a.status().unsent == 2 and b.status().unsent == 1
    result = a.sync(b)
    assert result.round_trips == 3
    assert sorted(result.remote.applied) == sorted(mine)
    assert result.local.applied == theirs
    assert result.local.sent == 2 and result.remote.sent == 1
    for peer in (a, b):
        assert peer.get("items", 1) == {"_id": 1, "n": 1}
        assert peer.get("items", 2, partition="user:1") == {"_id": 2}
        assert peer.get("items", 3) == {"_id": 3}
        status = peer.status()
        assert (status.unsent, status.announced, status.fetched) == (0, 0, 0)
    again = a.sync(b)
    assert again.round_trips == 1 and again.bytes < 1000, "nothing new: vectors only"


def test_descriptors_are_announced_before_payloads_arrive(pair) -> None:
    a, b = pair
    ids = [write(a, k) for k in range(3)]
    events: list[SyncEvent] = []
    a.sync(b, channel=only({"vector", "descriptors", "want", "ack"}), events=events.append)
    assert b.status().announced == 3 and b.get("items", 0) is None
    assert [e.revision for e in events if e.kind == "announced"] == ids
    a.sync(b, events=events.append)
    assert b.status().announced == 0 and b.get("items", 2) == {"_id": 2}
    assert [e.revision for e in events if e.kind == "fetched"] == ids
    assert [e.revision for e in events if e.kind == "applied"] == ids


def test_a_late_revision_rolls_back_only_what_it_conflicts_with(pair) -> None:
    a, b = pair
    """Canonical order: early (alice, x), other (bob, y), late (bob, x).

    Bob integrates ``early`` under his two revisions: ``late`` shares its key
    and is undone and redone; ``other`` is disjoint and stays. Alice gets
    both of Bob's after her own: nothing rolls back.
    """
    early = write(a, "x", v="alice")
    other = write(b, "y")
    late = write(b, "x", v="bob")
    result = b.sync(a)
    assert result.local.rolled_back == [late] and other not in result.local.rolled_back
    assert result.remote.rolled_back == []
    assert a.get("items", "x") == b.get("items", "x") == {"_id": "x", "v": "bob"}
    assert early in b._engine.applied and a.snapshot() == b.snapshot()


def test_a_pinned_peer_fetches_but_does_not_integrate(pair) -> None:
    a, b = pair
    write(b, 0)
    write(b, 1)
    b.sync(a)
    b.downgrade("-1")
    assert b.pinned
    new = write(a, 2)
    a.sync(b)
    assert new in b._engine.graph and new not in b._engine.applied
    assert b.status().fetched == 2 and b.get("items", 2) is None
    b.upgrade("heads")
    assert b.get("items", 2) == {"_id": 2} and not b.pinned


def test_sync_works_between_sqlite_and_mongodb(tmp_path: Path) -> None:
    with Peer.open(str(tmp_path / "a.db"), peer_id="alice") as a, \
            Peer.open("mongomock://sync/t_mixed", peer_id="cloud") as cloud:
        write(a, 1, n=1)
        write(cloud, 2, n=2)
        a.sync(cloud)
        assert a.snapshot() == cloud.snapshot()
        assert cloud.verify().ok


# -- refusals ----------------------------------------------------------------------------


def test_a_forged_payload_is_refused_and_the_genuine_one_still_lands(pair) -> None:
    a, b = pair
    rev = write(a, 1, n=1)

    def forge(message: dict) -> None:
        message["items"] = [[i, text.replace('"n":1', '"n":1000')]
                            for i, text in message["items"]]

    result = a.sync(b, channel=tamper("payloads", forge))
    [refusal] = result.remote.refused
    assert refusal.revision == rev
    assert re.fullmatch(rf"revision {rev[:12]}: payload checksum \w+ does not match the"
                        r" descriptor's \w+; the payload was altered, refetch it from a peer",
                        refusal.reason)
    assert b.get("items", 1) is None and b.status().announced == 1
    assert [e.outcome for e in b.audit(rev) if e.action == "refuse"] == ["refused"]
    a.sync(b)
    assert b.get("items", 1) == {"_id": 1, "n": 1}


def test_a_forged_descriptor_is_refused_and_the_genuine_one_still_lands(pair) -> None:
    a, b = pair
    rev = write(a, 1)

    def forge(message: dict) -> None:
        for d in message["items"]:
            d["message"] = "forged"

    result = a.sync(b, channel=tamper("descriptors", forge))
    [refusal] = result.remote.refused
    assert refusal.revision == rev and "digest" in refusal.reason
    assert b.status().announced == 0
    a.sync(b)
    assert b.get("items", 1) == {"_id": 1} and b.info(rev).message == "write 1"


def forged_fork(a: Peer, seq: int = 1, **changes) -> dict:
    """A revision claiming alice's (origin, seq) slot with other content."""
    return build(kind="data", payload=encode_ops([Insert("items", {"_id": 1, "evil": True})]),
                 partition="default", parents=[], origin="alice:0", seq=seq,
                 hlc=(int(time.time() * 1000), 0), message="fork", collections=["items"],
                 **changes).descriptor


def test_a_known_slot_or_id_with_another_digest_is_refused(pair) -> None:
    a, b = pair
    write(a, 1)
    a.sync(b)
    side = Side(b)
    assert side.handle([{"type": "descriptors", "items": [forged_fork(a)]}]) == []
    [refusal] = side.report.refused
    assert re.fullmatch(r"\(origin alice:0, seq 1\) is already known with digest \w+ but"
                        r" arrived with \w+: refused as forged or forked; nothing was changed",
                        refusal.reason)
    b.trust_sequencer("alice")
    config = a.configure(policies={"items": "reject"}, sequencer="alice")
    a.sync(b)
    d = dict(b.revision(config.id).descriptor, message="other")
    from txengine.revision import compute_digest

    d["digest"] = compute_digest(d)
    side.handle([{"type": "descriptors", "items": [d]}])
    assert side.report.refused[-1].reason.startswith(
        f"revision {config.id[:12]} is already known with digest")


def test_an_hlc_not_above_its_parents_is_refused(pair) -> None:
    a, b = pair
    parent = write(a, 1)
    a.sync(b)
    hlc = tuple(a.info(parent).hlc)
    bad = build(kind="data", payload=encode_ops([Insert("items", {"_id": 2})]),
                partition="default", parents=[parent], origin="mallory:0", seq=1,
                hlc=(hlc[0] - 1, 0), message="early", collections=["items"])
    side = Side(b)
    side.handle([{"type": "descriptors", "items": [bad.descriptor]}])
    [refusal] = side.report.refused
    assert "not above its parent" in refusal.reason
    assert b.status().announced == 0


def test_a_barrier_from_a_peer_that_is_not_the_sequencer_is_refused(pair) -> None:
    a, b = pair
    config = a.configure(policies={"items": "reject"})
    result = a.sync(b)
    [refusal] = result.remote.refused
    assert refusal.revision == config.id
    assert "not the sequencer of partition 'default' (none is named)" in refusal.reason
    b.trust_sequencer("alice")
    a.sync(b)
    assert config.id in b._engine.applied
    assert b._engine.policy_for("default").for_collection("items") == "reject"


def test_a_config_revision_hands_the_sequencer_role_over(pair, new_store) -> None:
    a, b = pair
    b.trust_sequencer("alice")
    a.configure(sequencer="bob")
    a.sync(b)
    assert b._sequencer("default") == "bob"
    handed = b.configure(policies={"items": "reject"})
    a.sync(b)
    assert handed.id in a._engine.applied


def test_a_barrier_reorders_the_open_segment_and_data_converges(pair, new_store) -> None:
    a, b = pair
    b.trust_sequencer("alice")
    write(a, "x", v=1)
    write(b, "x", v=2)  # concurrent with alice's; sorts later
    a.configure(policies={"items": "rules"})  # holds only alice's revision
    a.sync(b)
    assert a.snapshot() == b.snapshot()
    assert a.get("items", "x") == {"_id": "x", "v": 2}


def test_a_revision_from_a_clock_years_ahead_is_quarantined(pair) -> None:
    a, b = pair
    a._take_lease()  # taking the lease reloads the engine (and its clock): take it first
    real = a._engine.clock._wall
    a._engine.clock._wall = lambda: real() + 3 * 365 * 86_400_000
    rev = write(a, 1)
    a._engine.clock._wall = real
    result = a.sync(b)
    assert result.remote.quarantined == [rev]
    assert b.status().quarantined == 1 and b.get("items", 1) is None
    assert rev not in b._engine.graph
    write(b, 2)  # new local revisions do not take it as a parent
    assert rev not in b.info(b.heads()[-1].id).parents
    b.max_clock_skew_ms = 4 * 365 * 86_400_000  # the clock catches up
    a.sync(b)
    assert b.status().quarantined == 0 and b.get("items", 1) == {"_id": 1}


def test_a_restored_backup_that_wrote_offline_moves_to_a_new_epoch(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    a = Peer.open(str(path), peer_id="alice")
    b = Peer.open(str(tmp_path / "b.db"), peer_id="bob")
    write(a, 1)
    a.sync(b)
    a.close()
    shutil.copy(path, tmp_path / "backup.db")
    a = Peer.open(str(path), peer_id="alice")
    write(a, 2)
    write(a, 3)
    a.sync(b)
    a.close()
    shutil.copy(tmp_path / "backup.db", path)  # the device is restored from its backup
    a = Peer.open(str(path), peer_id="alice")
    offline = write(a, 4, note="offline")
    with a.transaction("more") as tx:
        tx.update("items", 4, set={"more": True})
    result = a.sync(b)
    assert a.origin == "alice:1" and offline in result.local.reissued
    for peer in (a, b):
        assert [d["_id"] for d in peer.find("items")] == [1, 2, 3, 4]
        assert peer.get("items", 4) == {"_id": 4, "note": "offline", "more": True}
        assert offline not in peer._engine.graph
    assert a.snapshot() == b.snapshot() and a.verify().ok and b.verify().ok
    assert a.status().unsent == 0
    a.close()
    b.close()


# -- cost -----------------------------------------------------------------------------------


def _bulk(peer: Peer, n: int, start_ms: int) -> None:
    items = []
    for i in range(n):
        rev = build(kind="data", payload=encode_ops([Insert("items", {"_id": i})]),
                    partition="default", parents=[], origin="writer:0", seq=i + 1,
                    hlc=(start_ms + i, 0), message="", collections=["items"])
        items.append((rev.descriptor, rev.payload))
    peer.receive(items)
    peer.upgrade("heads")


@pytest.mark.parametrize("history", [10_000, 100_000])
def test_a_revision_disjoint_from_later_ones_rolls_back_none_with_flat_reads(
        tmp_path: Path, history: int) -> None:
    """10,000 / 100,000 integrated revisions sort after the newcomer; none shares its key."""
    with Peer.open(str(tmp_path / "p.db"), peer_id="p") as peer:
        _bulk(peer, history, 1_700_000_000_000)
        late = build(kind="data", payload=encode_ops([Insert("items", {"_id": "new"})]),
                     partition="default", parents=[], origin="late:0", seq=1,
                     hlc=(1_600_000_000_000, 0), message="", collections=["items"])
        peer.receive([(late.descriptor, late.payload)])
        reads: list[int] = []
        ledger = peer._ledger
        rows, writers = ledger.rows, ledger.writers

        def counted_rows(ids, *columns):
            found = rows(ids, *columns)
            reads.append(len(found))
            return found

        def counted_writers(*args):
            found = writers(*args)
            reads.append(len(found))
            return found

        ledger.rows, ledger.writers = counted_rows, counted_writers
        steps = peer._integrate()
        assert [(s.action, s.revision) for s in steps] == [("apply", late.id)]
        # the newcomer's payload, its key's writers (itself only), the batch applying it:
        # the same three rows for 10,000 and for 100,000 later revisions
        assert reads == [1, 1, 1], f"ledger rows read: {reads}"
        assert peer.get("items", "new") == {"_id": "new"}


def test_bytes_moved_follow_what_is_new(pair) -> None:
    a, b = pair
    for k in range(20):
        write(a, k)
    a.sync(b)
    new = [write(a, 100 + k) for k in range(5)]
    items = ledger_items(a, new)
    size = sum(len(json.dumps(d, separators=(",", ":"))) + len(p) for d, p in items)
    result = a.sync(b)
    assert result.round_trips <= 3 and result.bytes <= 2 * size
    assert b.status().fetched == 0 and b._ledger.count_states()["applied"] == 25


def test_cli_sync_and_status(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from txengine.cli import cli

    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    with Peer.open(a, peer_id="alice") as peer:
        write(peer, 1)
    runner = CliRunner()
    before = runner.invoke(cli, ["--store", a, "status", "--json"])
    assert before.exit_code == 0 and json.loads(before.output)["unsent"] == 1
    synced = runner.invoke(cli, ["--store", a, "sync", b, "--json"])
    assert synced.exit_code == 0, synced.output
    assert json.loads(synced.output)["remote"]["applied"] and json.loads(
        synced.output)["round_trips"] == 3
    after = runner.invoke(cli, ["--store", a, "status"])
    assert after.output.splitlines()[1] == ("unsent 0, announced 0, fetched 0, conflicted 0,"
                                            " quarantined 0, refused 0")
    with Peer.open(b) as other:
        assert other.get("items", 1) == {"_id": 1}
