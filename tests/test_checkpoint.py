"""Checkpoints: issued by the sequencer, proved by a snapshot, a start for new peers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ledger_items, write

from txengine.checkpoint import CheckpointInfo, bootstrap
from txengine.cli import cli
from txengine.exceptions import ConfigError, InvalidInput, SnapshotMismatch
from txengine.ledger import descriptor_from_row
from txengine.peer import Peer


def _history(hub: Peer) -> None:
    for n in range(12):
        write(hub, n, n=n)
    with hub.transaction("edit") as tx:
        tx.update("items", 3, set={"n": 33})
        tx.delete("items", 4)


def _checkpoint_after_an_offline_write(store_url: str, new_store
                                       ) -> tuple[Peer, Peer, str, CheckpointInfo]:
    """hub: h1..h12 -> edit -> CHECKPOINT; carol synced before it and wrote offline
    (parent: edit), not yet sent. Returns (hub, carol, carol's revision, checkpoint)."""
    hub = Peer.open(store_url, peer_id="hub")
    carol = Peer.open(new_store(), peer_id="carol")
    hub.trust_sequencer("hub")
    carol.trust_sequencer("hub")
    _history(hub)
    carol.sync(hub)
    with carol.transaction("offline") as tx:
        tx.update("items", 5, set={"n": 55})
        tx.insert("items", {"_id": 100, "n": 100})
    time.sleep(0.005)
    return hub, carol, tx.revision.id, hub.checkpoint()


def test_checkpoint_digest_equals_a_fresh_replay(store_url: str, new_store) -> None:
    with Peer.open(store_url, peer_id="hub") as hub:
        hub.trust_sequencer("hub")
        _history(hub)
        info = hub.checkpoint()
        assert info.documents == 11
        assert info.vector == {"hub:0": 13}
        data = [i for i in ledger_items(hub) if i[0]["kind"] == "data"]
        with Peer.open(new_store(), peer_id="replayer") as fresh:
            fresh.receive(data)
            fresh.upgrade("heads")
            assert fresh.content_digest("default") == info.digest
        assert hub.content_digest("default") == info.digest
        assert hub.info(info.id).kind == "checkpoint" and hub.info(info.id).applied


def test_checkpoint_from_a_non_sequencer_is_refused(tmp_path: Path) -> None:
    store = str(tmp_path / "p.db")
    with Peer.open(store, peer_id="phone") as phone:
        write(phone, 1)
        with pytest.raises(ConfigError) as info:
            phone.checkpoint()
        assert str(info.value) == (
            "only the sequencer of partition 'default' may issue checkpoints (none is named):"
            " run it there, or name this peer with configure --sequencer")
        phone.trust_sequencer("hub")
        with pytest.raises(ConfigError, match="it is 'hub'"):
            phone.checkpoint()
        assert len(phone.history()) == 1
    result = CliRunner().invoke(cli, ["--store", store, "checkpoint"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "only the sequencer" in result.output


def test_clone_from_checkpoint_then_syncs_even_a_revision_written_before_it(
        store_url: str, new_store) -> None:
    """hub: h1..h12 -> edit -> CHECKPOINT -> h12..h16 -> edit2
    carol (offline, parent: edit, before the checkpoint): X; arrives after it."""
    hub, carol, offline, info = _checkpoint_after_an_offline_write(store_url, new_store)
    try:
        for n in range(12, 16):
            write(hub, n, n=n)
        with hub.transaction("edit2") as tx:
            tx.update("items", 3, set={"n": 333})
            tx.delete("items", 6)
        with Peer.clone(store_url, new_store(), "copy", from_checkpoint=True) as copy:
            assert copy.snapshot() == hub.snapshot()
            assert copy.content_digest() == hub.content_digest()
            assert len(copy.history()) == 6, "the checkpoint and the five after it"
            assert hub.status().unsent == 0
            result = carol.sync(copy)
            assert offline in result.remote.applied
            assert not result.remote.refused and not result.local.refused
            hub.sync(copy)
            assert offline in hub._engine.applied
            with copy.transaction("from the copy") as tx:
                tx.insert("items", {"_id": 200})
            hub.sync(copy)
            carol.sync(hub)
            digests = {p.content_digest() for p in (hub, copy, carol)}
            assert len(digests) == 1
            assert copy.snapshot() == hub.snapshot() == carol.snapshot()
            assert copy.get("items", 5) == {"_id": 5, "n": 55}
            assert copy.verify().ok, copy.verify().findings
            assert info.id in {h.id for h in copy.history()}
    finally:
        hub.close()
        carol.close()


def test_snapshot_rebuilds_the_checkpoint_state_after_later_writes(tmp_path: Path) -> None:
    with Peer.open(str(tmp_path / "hub.db"), peer_id="hub") as hub:
        hub.trust_sequencer("hub")
        _history(hub)
        info = hub.checkpoint()
        with hub.transaction("later") as tx:
            tx.update("items", 1, set={"n": -1})
            tx.delete("items", 2)
            tx.insert("items", {"_id": 4, "back": True})
        written = hub.write_snapshot(info.id[:14], tmp_path / "snap.jsonl")
        assert (written.digest, written.documents) == (info.digest, 11)
        lines = (tmp_path / "snap.jsonl").read_text().splitlines()
        assert json.loads(lines[0])["checkpoint"] == info.id
        assert json.loads(lines[2])[:2] == ["items", "1"]
        assert json.loads(lines[2])[3] == {"_id": 1, "n": 1}


def test_tampered_snapshot_is_refused_and_loads_nothing(tmp_path: Path) -> None:
    with Peer.open(str(tmp_path / "hub.db"), peer_id="hub") as hub:
        hub.trust_sequencer("hub")
        _history(hub)
        info = hub.checkpoint()
        path = tmp_path / "snap.jsonl"
        hub.write_snapshot(info.id, path)
        rev = hub.revision(info.id)
        rows = hub._ledger.full_rows(list(rev.parents))
        parents = [descriptor_from_row(r) for r in rows.values()]
    text = path.read_text().replace('"n":7', '"n":8')
    path.write_text(text)
    with Peer.open(str(tmp_path / "copy.db"), peer_id="copy") as copy:
        with pytest.raises(SnapshotMismatch) as err:
            bootstrap(copy, rev, parents, path)
        assert str(err.value).startswith(f"snapshot {path} does not match checkpoint"
                                         f" {info.id[:12]}: its documents hash to")
        assert str(err.value).endswith("nothing was loaded, fetch the snapshot again from"
                                       " the source")
        assert copy.snapshot() == {} and len(copy.history()) == 0
        assert copy._engine.bases == {}


def test_cli_checkpoint_and_clone_from_it(tmp_path: Path) -> None:
    source, target = str(tmp_path / "hub.db"), str(tmp_path / "copy.db")
    with Peer.open(source, peer_id="hub") as hub:
        hub.trust_sequencer("hub")
        _history(hub)
    runner = CliRunner()
    made = runner.invoke(cli, ["--store", source, "checkpoint", "--json"])
    assert made.exit_code == 0, made.output
    ckpt = json.loads(made.stdout)
    assert ckpt["documents"] == 11
    cloned = runner.invoke(cli, ["--store", target, "--peer-id", "copy", "clone", source,
                                 "--checkpoint", "--json"])
    assert cloned.exit_code == 0, cloned.output
    assert json.loads(cloned.stdout)["heads"] == [ckpt["id"]]
    digest = runner.invoke(cli, ["--store", target, "digest", "--partition", "default"])
    assert digest.stdout.strip() == ckpt["digest"]
    missing = runner.invoke(cli, ["--store", str(tmp_path / "x.db"), "clone", target,
                                  "--checkpoint", "--partition", "other"])
    assert missing.exit_code == 1
    assert "the source has no checkpoint in partition 'other'" in missing.output


def test_prune_keeps_data_and_audit_and_the_peer_still_syncs(
        store_url: str, new_store, tmp_path: Path) -> None:
    """hub prunes before its checkpoint; carol's offline revision (parent before the
    checkpoint) still lands on the pruned hub, and the archive replays the history."""
    hub, carol, offline, info = _checkpoint_after_an_offline_write(store_url, new_store)
    try:
        write(hub, 20, n=20)
        before = (hub.snapshot(), hub.content_digest(), len(hub.audit()))
        archive = tmp_path / "before.jsonl"
        pruned = hub.prune(info.id, archive=archive)
        assert pruned.removed == 13 and pruned.kept == 1, "edit stays: the checkpoint's parent"
        assert hub.snapshot() == before[0] and hub.content_digest() == before[1]
        assert len(hub.audit()) == before[2] + 1 and hub.audit()[-1].action == "prune"
        assert [h.message for h in hub.history()] == ["write 20", "checkpoint"]
        assert hub.verify().ok, hub.verify().findings
        hub.close()
        hub = Peer.open(store_url, peer_id="hub")  # the base survives a reopen
        result = carol.sync(hub)
        assert offline in result.remote.applied and not result.remote.refused
        assert hub.get("items", 5) == {"_id": 5, "n": 55}
        assert hub.snapshot() == carol.snapshot()
        with Peer.open(new_store(), peer_id="auditor") as auditor:
            report = auditor.bundle_apply(archive)
            assert report.revisions == 13
            assert len(auditor.history()) == 13
    finally:
        hub.close()
        carol.close()


def test_prune_refuses_what_is_not_an_integrated_checkpoint(tmp_path: Path) -> None:
    with Peer.open(str(tmp_path / "p.db"), peer_id="hub") as hub:
        hub.trust_sequencer("hub")
        write(hub, 1)
        first = hub.history()[0].id
        with pytest.raises(InvalidInput, match="not a checkpoint"):
            hub.prune(first)
        info = hub.checkpoint()
        hub.prune(info.id)
        with pytest.raises(InvalidInput, match="nothing lies before"):
            hub.prune(info.id)
    result = CliRunner().invoke(cli, ["--store", str(tmp_path / "p.db"), "prune", "--before",
                                      first[:12]])
    assert result.exit_code == 1 and result.output.count("\n") == 1
