"""Checkpoints: issued by the sequencer, proved by a snapshot, a start for new peers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ledger_items, write
from test_signatures import codes, data_descriptor, offer
from test_verify import tamper

from txengine.checkpoint import CheckpointInfo, ancestry_configs, bootstrap
from txengine.cli import cli
from txengine.exceptions import ConfigError, InvalidInput, SignatureError, SnapshotMismatch
from txengine.keys import KeyPair
from txengine.ledger import descriptor_from_row
from txengine.peer import Peer
from txengine.policy import encode_config
from txengine.revision import compute_digest
from txengine.values import sha256


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
        assert not result.remote.reissued and info.id in hub._engine.applied, (
            "carol's vector names hub seqs that were pruned, not lost: no new epoch")
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


# -- a rooted deployment: the trust in force at the checkpoint comes along ------------------


@dataclass
class Rooted:
    """hub (sequencer) enrolled hub, alice, bob and carol with the root key, then revoked
    carol's key; alice and bob wrote and synced to hub; hub issued ``checkpoint``."""

    root: KeyPair
    peers: dict[str, Peer]
    enrol: str
    revoke: str
    checkpoint: CheckpointInfo
    url: str


@pytest.fixture
def rooted(store_url: str, new_store) -> Iterator[Rooted]:
    root = KeyPair.generate()
    peers = {"hub": Peer.open(store_url, peer_id="hub")}
    try:
        peers.update({n: Peer.open(new_store(), peer_id=n) for n in ("alice", "bob", "carol")})
        for peer in peers.values():
            peer.install_root(root.public_text)
        hub = peers["hub"]
        enrol = hub.enroll(root, {n: p.key.public_text for n, p in peers.items()},
                           sequencer="hub").id
        revoke = hub.revoke(root, [peers["carol"].key.id]).id
        for name in ("alice", "bob"):
            write(peers[name], name)
            peers[name].sync(hub)
        yield Rooted(root, peers, enrol, revoke, hub.checkpoint(), store_url)
    finally:
        for peer in peers.values():
            peer.close()


def _enrolled(peer: Peer) -> dict[str, str | None]:
    return {k.peer: k.revoked_by for k in peer.enrolled() if k.peer is not None}


def _syncs_as_a_full_peer(peer: Peer, d: Rooted) -> None:
    """``peer`` takes alice's and bob's new revisions, refuses carol's (revoked), verifies."""
    assert _enrolled(peer) == {"hub": None, "alice": None, "bob": None, "carol": d.revoke}
    assert peer.verify().ok, peer.verify().findings
    for name in ("alice", "bob"):
        rev = write(d.peers[name], f"{name} after", partition="default")
        result = d.peers[name].sync(peer)
        assert not result.remote.reissued
        assert rev in result.remote.applied and not result.remote.refused
    write(d.peers["carol"], "carol after")
    refused = d.peers["carol"].sync(peer).remote.refused
    assert [r.code for r in refused] == ["revoked_key"]
    assert peer.get("items", "alice after") == {"_id": "alice after"}
    assert peer.get("items", "carol after") is None
    assert peer.verify().ok, peer.verify().findings


def test_clone_from_a_rooted_checkpoint_knows_the_enrolments_and_syncs(
        rooted: Rooted, new_store) -> None:
    """The configs that enroll and revoke lie before the checkpoint: the clone keeps them
    (root-signed, checked), so enrolled peers sync with it and its checkpoint verifies;
    a clone of that clone (``--checkpoint`` again) inherits them too."""
    copy_url = new_store()
    with Peer.clone(rooted.url, copy_url, "copy", from_checkpoint=True) as copy:
        assert [h.id for h in copy.history()] == [rooted.checkpoint.id]
        _syncs_as_a_full_peer(copy, rooted)
        rooted.peers["hub"].sync(copy)
        assert copy.snapshot() == rooted.peers["hub"].snapshot()
    with Peer.clone(copy_url, new_store(), "second", from_checkpoint=True) as second:
        assert _enrolled(second) == _enrolled(rooted.peers["hub"])
        write(rooted.peers["bob"], "bob again")
        result = rooted.peers["bob"].sync(second)
        assert not result.remote.refused and second.get("items", "bob again")
        assert second.verify().ok, second.verify().findings


def test_clone_takes_no_config_the_root_did_not_sign(rooted: Rooted, new_store) -> None:
    """A config before the checkpoint that enrolls mallory, signed by the sequencer's key
    (taken on the hub as a barrier, it enrolls no one there) or by no one, enrolls no one
    on the clone either: it keeps no payload, mallory stays refused, alice is taken."""
    hub, mallory = rooted.peers["hub"], KeyPair.generate()
    by_hub = hub._issue_barrier("config", "default",
                                encode_config(enroll={"mallory": mallory.public_text}),
                                "enroll mallory").id
    unsigned = hub._issue_barrier("config", "default",
                                  encode_config(enroll={"mallory": mallory.public_text}),
                                  "enroll mallory unsigned").id
    tamper(rooted.url, "UPDATE txengine_revisions SET signature = NULL WHERE id = :id",
           id=unsigned)
    info = hub.checkpoint()
    with Peer.clone(rooted.url, new_store(), "copy", from_checkpoint=True) as copy:
        assert copy.history()[-1].id == info.id
        assert "mallory" not in _enrolled(copy)
        rows = copy._ledger.rows([rooted.enrol, by_hub, unsigned], "payload")
        copy._store.rollback()
        assert rows[rooted.enrol].payload is not None
        assert all(r not in rows or rows[r].payload is None for r in (by_hub, unsigned))
        forged, payload = data_descriptor("mallory:0", mallory)
        assert codes(offer(copy, forged, payload)) == ["unknown_signer"]
        _syncs_as_a_full_peer(copy, rooted)


def test_clone_refuses_a_config_whose_root_signature_was_forged(
        rooted: Rooted, new_store) -> None:
    """The enrolment on the source is edited to add mallory, re-checksummed and
    re-digested: the root's signature no longer verifies, and the clone loads nothing."""
    hub, mallory = rooted.peers["hub"], KeyPair.generate()
    rev = hub.revision(rooted.enrol)
    body = json.loads(rev.payload)
    body["enroll"]["mallory"] = mallory.public_text
    payload = encode_config(enroll=body["enroll"], sequencer=body["sequencer"])
    d = {**rev.descriptor, "checksum": sha256(payload)}
    tamper(rooted.url, "UPDATE txengine_revisions SET payload = :p, checksum = :c,"
           " digest = :d WHERE id = :id", p=payload, c=d["checksum"], d=compute_digest(d),
           id=rooted.enrol)
    target = new_store()
    with pytest.raises(SignatureError) as err:
        Peer.clone(rooted.url, target, "copy", from_checkpoint=True)
    assert err.value.code == "bad_signature"
    assert str(err.value).startswith(f"revision {rooted.enrol[:12]} is a config signed in"
                                     " the name of root key")
    assert str(err.value).endswith("refused; nothing was changed")
    with Peer.open(target, peer_id="copy") as copy:
        assert copy.history() == [] and copy.snapshot() == {} and copy._engine.bases == {}


def test_bootstrap_refuses_a_config_outside_the_checkpoint(rooted: Rooted, new_store,
                                                          tmp_path: Path) -> None:
    """A source cannot pass off a config issued after the checkpoint (or of another
    partition) as part of its ancestry: the vector and partition must cover it."""
    hub = rooted.peers["hub"]
    later = hub.enroll(rooted.root, {"dave": KeyPair.generate().public_text}).id
    rev = hub.revision(rooted.checkpoint.id)
    rows = hub._ledger.full_rows([*rev.parents, later])
    hub._store.rollback()
    parents = [descriptor_from_row(rows[r]) for r in rev.parents]
    configs = ancestry_configs(hub, "default", {"hub:0": 10**6})
    assert later in [d["id"] for d, _payload in configs]
    hub.write_snapshot(rev.id, tmp_path / "snap.jsonl")
    with Peer.open(new_store(), peer_id="copy") as copy:
        copy.install_root(rooted.root.public_text)
        with pytest.raises(InvalidInput, match=f"revision {later[:12]} was sent as a config"
                                               f" of checkpoint {rev.id[:12]}'s ancestry"):
            bootstrap(copy, rev, parents, tmp_path / "snap.jsonl", configs=configs)
        assert copy.history() == [] and copy.snapshot() == {}


def test_verify_names_an_edited_config_kept_by_the_base(rooted: Rooted, new_store) -> None:
    """A config before the checkpoint keeps its payload on the clone, and it still
    enrolls: ``verify`` checks that payload against its descriptor."""
    copy_url = new_store()
    Peer.clone(rooted.url, copy_url, "copy", from_checkpoint=True).close()
    payload = encode_config(enroll={"mallory": KeyPair.generate().public_text})
    tamper(copy_url, "UPDATE txengine_revisions SET payload = :p WHERE id = :id"
           " AND state = 'base'", p=payload, id=rooted.enrol)
    with Peer.open(copy_url, peer_id="copy") as copy:
        found = {f.revision: f.problem for f in copy.verify().findings}
        assert "checksum" in found[rooted.enrol]


def test_prune_keeps_the_enrolments_before_the_checkpoint(rooted: Rooted, new_store) -> None:
    """The enrolling and revoking configs are pruned from the history, yet kept with
    their payload as base rows: the pruned hub (reopened) still knows every key, and a
    peer cloned from it with ``--checkpoint`` does too."""
    hub = rooted.peers["hub"]
    before = _enrolled(hub)
    pruned = hub.prune(rooted.checkpoint.id)
    parents = set(hub.revision(rooted.checkpoint.id).parents)
    assert pruned.kept == len(parents | {rooted.enrol, rooted.revoke})
    assert [h.id for h in hub.history()] == [rooted.checkpoint.id]
    hub.close()
    rooted.peers["hub"] = hub = Peer.open(rooted.url, peer_id="hub")
    assert _enrolled(hub) == before
    _syncs_as_a_full_peer(hub, rooted)
    assert rooted.checkpoint.id in hub._engine.applied, "alice's vector names pruned seqs"
    with Peer.clone(rooted.url, new_store(), "copy", from_checkpoint=True) as copy:
        assert _enrolled(copy) == before
        assert copy.verify().ok, copy.verify().findings
