"""Signed revisions: keys, verification at arrival, the trust anchor, signed code.

A deployment in these tests: a root key; ``hub`` holds it and sequences the
default partition; ``alice``, ``bob`` and ``carol`` are enrolled devices.
Every refusal leaves the receiving store unchanged (data and ledger).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import write
from test_verify import tamper

from txengine import Peer
from txengine.exceptions import RevokedKey, SignatureError, UnknownSigner, UntrustedScript
from txengine.keys import KeyPair, key_id, verify
from txengine.ops import op_from_json
from txengine.policy import encode_config
from txengine.revision import build, compute_digest, encode_ops
from txengine.sync import Side, decode, encode, exchange

NAMES = ("hub", "alice", "bob", "carol")


@pytest.fixture
def root() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture
def peers(tmp_path: Path, root: KeyPair) -> Iterator[dict[str, Peer]]:
    """Four rooted peers; the hub enrolled every key and names itself the sequencer."""
    opened = {n: Peer.open(str(tmp_path / f"{n}.db"), peer_id=n) for n in NAMES}
    try:
        for peer in opened.values():
            peer.install_root(root.public_text)
        opened["hub"].enroll(root, {n: p.key.public_text for n, p in opened.items()},
                             sequencer="hub")
        yield opened
    finally:
        for peer in opened.values():
            peer.close()


def state(peer: Peer) -> tuple[Any, ...]:
    """What a refusal must leave unchanged: the documents and the ledger's revisions."""
    return peer.snapshot(), sorted(r.id for r in peer.history()), peer.status().announced


def data_descriptor(origin: str, signer: KeyPair | None, seq: int = 1, key: int = 99,
                    parents: tuple[str, ...] = ()) -> tuple[dict[str, Any], bytes]:
    ops = [op_from_json({"op": "insert", "collection": "items", "doc": {"_id": key}})]
    rev = build(kind="data", payload=encode_ops(ops), partition="default",
                parents=list(parents), origin=origin, seq=seq, hlc=(1_700_000_000_000, 0),
                message="forged?", collections=["items"], signer=signer)
    return rev.descriptor, rev.payload


def offer(peer: Peer, descriptor: dict[str, Any], payload: bytes) -> Side:
    """Hand ``peer`` one descriptor, then its payload if asked, as sync does; finish."""
    peer._take_lease()
    side = Side(peer)
    replies = side.handle([{"type": "descriptors", "items": [descriptor]}])
    if replies:
        side.handle([{"type": "payloads", "items": [[descriptor["id"], payload.decode()]]}])
    side.finish()
    return side


def codes(side: Side) -> list[str]:
    return [r.code for r in side.report.refused]


# -- keys ------------------------------------------------------------------------------------


def test_key_file_is_made_beside_the_sqlite_store_with_owner_only_permissions(tmp_path):
    """A SQLite peer's key lives in ``<db>.key`` (0600), made at the first write, and
    stays the same key across opens."""
    path = tmp_path / "app.db"
    with Peer.open(str(path), peer_id="p") as peer:
        assert not (tmp_path / "app.db.key").exists()
        write(peer, 1)
        first = peer.key.id
    key_file = tmp_path / "app.db.key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    with Peer.open(str(path)) as peer:
        assert peer.key.id == first == key_id(peer.key.public)


def test_key_of_a_server_store_lives_in_its_local_state(tmp_path):
    """Without a file next to the store, the key is a local state row, never synced."""
    with Peer.open(f"mongomock://localhost/keys_{uuid.uuid4().hex}", peer_id="m") as peer:
        write(peer, 1)
        assert peer._ledger.get_state("private_key").startswith("-----BEGIN PRIVATE KEY")
        peer._store.rollback()
        assert peer.revision(peer.heads()[0].id).descriptor["signature"]["key"] == peer.key.id


def test_every_revision_a_peer_originates_is_signed_outside_its_digest(tmp_path):
    with Peer.open(str(tmp_path / "a.db"), peer_id="a") as peer:
        rev = peer.revision(write(peer, 1))
        d = rev.descriptor
        assert d["signature"]["key"] == peer.key.id
        assert verify(peer.key.public, d["digest"], d["signature"])
        assert compute_digest({k: v for k, v in d.items() if k != "signature"}) == d["digest"]
        merged = peer.configure(sequencer="a")
        assert peer.revision(merged.id).descriptor["signature"]["key"] == peer.key.id


def test_open_mode_accepts_unsigned_revisions_as_before(tmp_path):
    """No root installed: nothing is verified, an unsigned revision is taken."""
    with Peer.open(str(tmp_path / "c.db"), peer_id="c") as carol:
        descriptor, payload = data_descriptor("alice:0", None)
        side = offer(carol, descriptor, payload)
        assert side.report.refused == [] and carol.get("items", 99) == {"_id": 99}


# -- verification at arrival -------------------------------------------------------------------


def test_relayed_revision_verifies_on_a_third_peer(peers):
    """alice -> hub -> carol: carol verifies alice's own signature (the hub never re-signs),
    and takes it in one exchange although the enrolment arrives in the same one."""
    alice, hub, carol = peers["alice"], peers["hub"], peers["carol"]
    rev = write(alice, 1, name="Ada")
    assert alice.sync(hub).remote.refused == []
    result = carol.sync(hub)
    assert result.local.refused == []
    assert carol.get("items", 1) == {"_id": 1, "name": "Ada"}
    assert carol.revision(rev).descriptor["signature"] == alice.revision(rev).descriptor[
        "signature"]


def test_relayed_revision_verifies_through_a_bundle(peers, tmp_path):
    """alice -> bundle -> carol, enrolment config included in the same bundle."""
    alice, hub, carol = peers["alice"], peers["hub"], peers["carol"]
    alice.sync(hub)
    write(alice, 2, name="Grace")
    alice.bundle_create(tmp_path / "a.bundle")
    report = carol.bundle_apply(tmp_path / "a.bundle")
    assert report.report.refused == []
    assert carol.get("items", 2) == {"_id": 2, "name": "Grace"}


def test_clone_installs_the_root_and_verifies_what_it_replays(peers, tmp_path):
    alice, hub = peers["alice"], peers["hub"]
    write(alice, 3)
    alice.sync(hub)
    with Peer.clone(str(tmp_path / "hub.db"), str(tmp_path / "new.db"), "newbie") as new:
        assert new.root_key() == hub.root_key()
        assert new.get("items", 3) == {"_id": 3}


def test_revision_signed_by_another_peers_key_is_refused(peers):
    """bob re-signs alice's descriptor in transit: carol refuses it, unchanged."""
    alice, bob, hub, carol = peers["alice"], peers["bob"], peers["hub"], peers["carol"]
    carol.sync(hub)
    write(alice, 4)
    before = state(carol)

    def resign(data: list[bytes]) -> list[bytes]:
        out = []
        for raw in data:
            message = decode(raw)
            for d in message.get("items", []) if message["type"] == "descriptors" else []:
                d["signature"] = bob.key.sign(d["digest"])
            out.append(encode(message))
        return out

    result = exchange(Side(carol), Side(alice), resign)
    (refusal,) = result.local.refused
    assert refusal.code == "unknown_signer"
    assert "belongs to peer 'bob', not to its origin 'alice'" in refusal.reason
    assert state(carol) == before


def test_spoofed_origin_is_refused(peers):
    """bob writes as 'alice' with his own (enrolled) key: refused at announce."""
    bob, carol = peers["bob"], peers["carol"]
    carol.sync(peers["hub"])
    before = state(carol)
    side = offer(carol, *data_descriptor("alice:0", bob.key))
    assert codes(side) == ["unknown_signer"]
    assert state(carol) == before
    with pytest.raises(UnknownSigner, match="belongs to peer 'bob', not to its origin 'alice'"):
        carol.receive([data_descriptor("alice:0", bob.key)])
    assert state(carol) == before


def test_unknown_key_and_unsigned_revision_are_refused(peers):
    carol = peers["carol"]
    carol.sync(peers["hub"])
    before = state(carol)
    stranger = KeyPair.generate()
    assert codes(offer(carol, *data_descriptor("alice:0", stranger))) == ["unknown_signer"]
    assert codes(offer(carol, *data_descriptor("alice:0", None))) == ["unsigned"]
    with pytest.raises(SignatureError, match="is not signed"):
        carol.receive([data_descriptor("alice:0", None)])
    assert state(carol) == before


def test_redigested_tampered_descriptor_fails_its_signature(peers):
    """Changing a field and recomputing the digest keeps the old signature: it fails."""
    alice, carol = peers["alice"], peers["carol"]
    carol.sync(peers["hub"])
    descriptor, payload = data_descriptor("alice:0", alice.key)
    descriptor["message"] = "tampered"
    descriptor["digest"] = descriptor["id"] = compute_digest(descriptor)
    before = state(carol)
    side = offer(carol, descriptor, payload)
    assert codes(side) == ["bad_signature"]
    assert "does not verify" in side.report.refused[0].reason
    assert state(carol) == before


def test_tampered_payload_is_refused_with_signatures_on(peers):
    alice, hub, carol = peers["alice"], peers["hub"], peers["carol"]
    carol.sync(hub)
    descriptor, payload = data_descriptor("alice:0", alice.key)
    before = state(carol)
    side = offer(carol, descriptor, payload.replace(b"99", b"98"))
    (refusal,) = side.report.refused
    assert "payload checksum" in refusal.reason
    assert carol.snapshot() == before[0] and carol.get("items", 98) is None
    side = offer(carol, descriptor, payload)  # the genuine payload still lands
    assert side.report.refused == [] and carol.get("items", 99) == {"_id": 99}


# -- code and barriers ----------------------------------------------------------------------------


def script_descriptor(origin: str, signer: KeyPair | None) -> tuple[dict[str, Any], bytes]:
    rev = build(kind="script", payload=b"def upgrade(op):\n    pass\n", partition="default",
                parents=[], origin=origin, seq=50, hlc=(4_000_000_000_000, 0),
                message="script", rev_id="evilscript", signer=signer)
    return rev.descriptor, rev.payload


def test_unsigned_script_is_refused(peers):
    carol = peers["carol"]
    carol.sync(peers["hub"])
    before = state(carol)
    assert codes(offer(carol, *script_descriptor("hub:0", None))) == ["unsigned"]
    assert state(carol) == before


def test_script_signed_by_a_non_sequencer_is_refused(peers):
    alice, carol = peers["alice"], peers["carol"]
    carol.sync(peers["hub"])
    before = state(carol)
    side = offer(carol, *script_descriptor("alice:0", alice.key))
    assert codes(side) == ["untrusted_code"]
    assert "signed by 'alice', not by the sequencer of partition 'default' ('hub')" in (
        side.report.refused[0].reason)
    with pytest.raises(UntrustedScript):
        carol.receive([script_descriptor("alice:0", alice.key)])
    assert state(carol) == before


def test_config_from_the_sequencer_is_accepted_signed(peers):
    hub, carol = peers["hub"], peers["carol"]
    info = hub.configure(policies={"items": "reject"})
    assert carol.sync(hub).local.refused == []
    assert carol.info(info.id).kind == "config"


def test_enrolment_not_signed_by_the_root_enrolls_no_one(peers, tmp_path):
    """A config carrying ``enroll`` but signed by a peer key (even the sequencer's)
    enrolls nothing: only the root enrolls."""
    hub, carol = peers["hub"], peers["carol"]
    with Peer.open(str(tmp_path / "eve.db"), peer_id="eve") as eve:
        hub._before_write()
        hub._issue_barrier("config", "default", encode_config(enroll={
            "eve": eve.key.public_text}), "sneaky")
        carol.sync(hub)
        before = state(carol)
        side = offer(carol, *data_descriptor("eve:0", eve.key))
        assert codes(side) == ["unknown_signer"]
        assert state(carol) == before


# -- revocation ---------------------------------------------------------------------------------


def test_revoked_key_is_refused_outside_the_revoking_barrier(peers, root):
    """alice's revision before the revocation stays; the one after is refused."""
    alice, hub, carol = peers["alice"], peers["hub"], peers["carol"]
    kept = write(alice, 5)
    alice.sync(hub)
    hub.revoke(root, [alice.key.id])
    late = write(alice, 6)
    before = state(hub)
    result = alice.sync(hub)
    (refusal,) = [r for r in result.remote.refused if r.revision == late]
    assert refusal.code == "revoked_key"
    assert "revoked by config_" in refusal.reason
    assert hub.get("items", 5) == {"_id": 5} and hub.get("items", 6) is None
    assert state(hub)[0] == before[0]
    carol.sync(hub)
    assert carol.get("items", 5) == {"_id": 5} and kept in [r.id for r in carol.history()]
    with pytest.raises(RevokedKey):
        carol.receive([(alice.revision(late).descriptor, alice.revision(late).payload)])


def test_revision_announced_before_its_key_was_revoked_is_refused_at_fetch(peers, root):
    """The descriptor was announced before the revocation arrived; its payload comes
    after: refused then (a key id lookup), and the store keeps no data of it."""
    alice, hub, carol = peers["alice"], peers["hub"], peers["carol"]
    carol.sync(hub)
    rev = alice.revision(write(alice, 8))
    carol._take_lease()
    side = Side(carol)
    assert side.handle([{"type": "descriptors", "items": [rev.descriptor]}])  # wanted
    assert carol.status().announced == 1
    hub.revoke(root, [alice.key.id])
    carol.sync(hub)
    carol._take_lease()
    side = Side(carol)
    side.handle([{"type": "payloads", "items": [[rev.id, rev.payload.decode()]]}])
    side.finish()
    assert [r.code for r in side.report.refused] == ["revoked_key"]
    assert carol.get("items", 8) is None


def test_relay_to_each_backend_keeps_and_verifies_the_signature(peers, store_url):
    """The signature survives the ledger of every store kind, and is passed on from it."""
    alice, hub = peers["alice"], peers["hub"]
    rev = write(alice, 9)
    alice.sync(hub)
    with Peer.open(store_url, peer_id="dave") as dave:
        dave.install_root(hub.root_key())
        assert dave.sync(hub).local.refused == []
        assert dave.revision(rev).descriptor["signature"] == alice.revision(rev).descriptor[
            "signature"]
        with Peer.open(f"mongomock://localhost/frank_{uuid.uuid4().hex}",
                       peer_id="frank") as frank, \
                Peer.open(str(Path(str(hub.sa_engine.url.database)).with_name("erin.db")),
                          peer_id="erin") as erin:
            for peer, source in ((frank, dave), (erin, frank)):  # dave -> MongoDB -> erin
                peer.install_root(hub.root_key())
                assert peer.sync(source).local.refused == []
            assert erin.get("items", 9) == {"_id": 9}


def test_root_key_cannot_be_replaced(peers):
    with pytest.raises(Exception, match="already trusts root key"):
        peers["carol"].install_root(KeyPair.generate().public_text)


def test_refusal_codes_are_reported_in_json(peers):
    carol = peers["carol"]
    carol.sync(peers["hub"])
    side = offer(carol, *data_descriptor("alice:0", None))
    assert json.loads(json.dumps(side.report.to_json()))["refused"][0]["code"] == "unsigned"


def test_script_signed_by_the_sequencer_runs_on_a_peer_without_its_file(peers, tmp_path):
    """Code from another peer runs only when the sequencer signed it: the hub authors a
    script, carol (no versions/ of her own) accepts and runs it from the payload."""
    hub, carol = peers["hub"], peers["carol"]
    hub.script_location = tmp_path / "versions"
    new = hub.new_script("add an index")
    hub.upgrade()
    assert hub.revision(new.id).descriptor["signature"]["key"] == hub.key.id
    result = carol.sync(hub)
    assert result.local.refused == []
    assert carol.info(new.id).applied
    assert [e.outcome for e in carol.audit(new.id) if e.action == "apply"] == ["ok"]


# -- the command line -------------------------------------------------------------------------


def cli_json(tmp: Path, *args: str, code: int = 0) -> Any:
    from click.testing import CliRunner

    from txengine.cli import cli

    result = CliRunner().invoke(cli, ["-c", str(tmp / "alembic.ini"), *args, "--json"])
    assert result.exit_code == code, (result.output, result.exception)
    return json.loads(result.stdout) if code == 0 else result


def test_cli_root_enrolment_and_revocation(tmp_path):
    """init-root, init --root-key, keys show, enroll, list, revoke: end to end."""
    from click.testing import CliRunner

    from txengine.cli import cli

    runner = CliRunner()
    root = cli_json(tmp_path, "keys", "init-root", str(tmp_path / "root.key"))
    assert stat.S_IMODE(os.stat(tmp_path / "root.key").st_mode) == 0o600
    hub_dir, phone_dir = tmp_path / "hub", tmp_path / "phone"
    for name, folder in (("hub", hub_dir), ("phone", phone_dir)):
        result = runner.invoke(cli, ["--peer-id", name, "init", str(folder), "--root-key",
                                     root["public"]])
        assert result.exit_code == 0, result.output
    phone = cli_json(phone_dir, "keys", "show")
    assert phone["peer"] == "phone" and len(phone["key"]) == 16
    cli_json(hub_dir, "keys", "enroll", "phone", phone["public"], "--root-key",
             str(tmp_path / "root.key"), "--sequencer", "hub")
    (listed,) = cli_json(hub_dir, "keys", "list")
    assert (listed["peer"], listed["key"], listed["revoked_by"]) == ("phone", phone["key"], None)
    cli_json(hub_dir, "keys", "revoke", phone["key"], "--root-key", str(tmp_path / "root.key"))
    (listed,) = cli_json(hub_dir, "keys", "list")
    assert listed["revoked_by"].startswith("config_")
    again = runner.invoke(cli, ["-c", str(phone_dir / "alembic.ini"), "keys", "install-root",
                                KeyPair.generate().public_text])
    assert again.exit_code == 1 and "already trusts root key" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    cli_json(tmp_path, "keys", "init-root", str(tmp_path / "root.key"), code=1)


# -- over HTTP ----------------------------------------------------------------------------------


def test_relay_through_the_http_server_verifies_and_refuses_a_forgery(tmp_path, root):
    """alice -> `txengine serve` (rooted hub) -> carol over HTTP; a descriptor bob signs
    for alice's origin is refused by the server with its code, and nothing is kept."""
    import httpx
    from test_http import Server

    devices = {n: Peer.open(str(tmp_path / f"{n}.db"), peer_id=n) for n in ("alice", "bob",
                                                                             "carol")}
    try:
        store = f"sqlite:///{tmp_path / 'hub.db'}"
        with Peer.open(store, "hub") as hub:
            hub.enroll(root, {n: p.key.public_text for n, p in devices.items()},
                       sequencer="hub")
            tokens = {n: hub.peers_add(n, ["*"], ["*"]).token for n in devices}
        for peer in devices.values():
            peer.install_root(root.public_text)
        server = Server(store, tmp_path / "server.log")
        server.start()
        try:
            alice, carol = devices["alice"], devices["carol"]
            rev = write(alice, 7, name="Ada")
            assert alice.sync(server.url, token=tokens["alice"]).remote.refused == []
            assert carol.sync(server.url, token=tokens["carol"]).local.refused == []
            assert carol.get("items", 7) == {"_id": 7, "name": "Ada"}
            assert carol.revision(rev).descriptor["signature"]["key"] == alice.key.id

            descriptor, _payload = data_descriptor("alice:0", devices["bob"].key, seq=40)
            response = httpx.post(f"{server.url}/v1/sync", json={"messages": [
                {"type": "descriptors", "items": [descriptor]}]},
                headers={"Authorization": f"Bearer {tokens['bob']}"})
            assert response.status_code == 200, response.text
            (refusal,) = response.json()["report"]["refused"]
            assert refusal["code"] == "unknown_signer"
            assert response.json()["report"]["announced"] == 0
        finally:
            server.stop()
    finally:
        for peer in devices.values():
            peer.close()


def test_precheck_verifies_signatures_so_intake_under_the_lease_need_not(peers, monkeypatch):
    """A server verifies a request's signatures before it takes the apply lease; under
    the lease the verified ones are not verified again, and a bad one still fails."""
    import txengine.keys as keys

    good = data_descriptor("alice:0", peers["alice"].key, key=7)
    forged = data_descriptor("bob:0", peers["alice"].key, key=8)
    hub = peers["hub"]
    Side(hub).precheck([{"type": "descriptors", "items": [good[0], forged[0]]}])

    class NoCrypto:
        @staticmethod
        def from_public_bytes(_public: bytes) -> Any:
            raise AssertionError("verified again under the lease")

    monkeypatch.setattr(keys, "Ed25519PublicKey", NoCrypto)
    assert codes(offer(hub, *good)) == [] and hub.get("items", 7) == {"_id": 7}
    before = state(hub)
    assert codes(offer(hub, *forged)) == ["unknown_signer"]
    assert state(hub) == before


# -- verify re-checks signatures ----------------------------------------------------------------
#
# Tampering goes straight into ``txengine_revisions.signature`` (a JSON text column) through a
# separate connection, as tests/test_verify.py does for the other columns.


def tamper_signature(peer: Peer, rev_id: str, signature: Any) -> None:
    tamper(str(peer.sa_engine.url), "UPDATE txengine_revisions SET signature = :v WHERE id = :id",
           v=None if signature is None else json.dumps(signature), id=rev_id)


def relayed(peers: dict[str, Peer]) -> str:
    """alice writes, the hub relays it to carol; return its id."""
    rev = write(peers["alice"], 1, name="Ada")
    peers["alice"].sync(peers["hub"])
    assert peers["carol"].sync(peers["hub"]).local.refused == []
    return rev


def forged_sig(signature: dict[str, str]) -> dict[str, str]:
    """The same key id with other (well-formed, 64-byte) signature bytes."""
    raw = bytearray(base64.b64decode(signature["sig"]))
    raw[0] ^= 0xFF
    return {"key": signature["key"], "sig": base64.b64encode(bytes(raw)).decode()}


@pytest.mark.parametrize("how, named", [
    ("stripped", "is not signed"),
    ("swapped", "is signed by key {bob}, enrolled for 'bob', not for its origin 'alice'"),
    ("forged", "has a signature by key {alice} that does not verify"),
])
def test_verify_names_a_revision_whose_signature_was_edited_in_the_ledger(peers, how, named):
    """The signature is outside the digest: only a signature check sees it edited."""
    alice, bob, carol = peers["alice"], peers["bob"], peers["carol"]
    rev = relayed(peers)
    assert carol.verify().ok
    genuine = carol.revision(rev).descriptor["signature"]
    digest = carol.revision(rev).descriptor["digest"]
    tamper_signature(carol, rev, {"stripped": None, "swapped": bob.key.sign(digest),
                                  "forged": forged_sig(genuine)}[how])
    report = carol.verify()
    assert not report.ok
    (finding,) = report.findings
    assert finding.revision == rev
    assert finding.problem.startswith(
        f"revision {rev[:12]} {named.format(alice=alice.key.id, bob=bob.key.id)}: ")
    assert finding.problem.endswith("clone this peer again from a rooted peer")
    assert "\n" not in finding.problem


def test_verify_names_a_barrier_signed_by_a_peer_that_is_no_sequencer(peers):
    """A config the hub (sequencer) signed, re-signed in the ledger by alice's genuine key."""
    alice, hub, carol = peers["alice"], peers["hub"], peers["carol"]
    config = hub.configure(policies={"items": "reject"}).id
    carol.sync(hub)
    assert carol.verify().ok
    tamper_signature(carol, config, alice.key.sign(carol.revision(config).descriptor["digest"]))
    (finding,) = carol.verify().findings
    assert finding.revision == config
    assert finding.problem.startswith(
        f"revision {config[:12]} is a config signed by 'alice', neither the root nor a"
        " sequencer of partition 'default' ('hub'): the signature column was altered")


def test_verify_survives_a_signature_column_that_is_not_json(peers):
    carol = peers["carol"]
    rev = relayed(peers)
    tamper(str(carol.sa_engine.url), "UPDATE txengine_revisions SET signature = :v WHERE id = :id",
           v="{not json", id=rev)
    (finding,) = carol.verify().findings
    assert finding.revision == rev
    assert finding.problem.startswith(f"revision {rev[:12]}: its ledger row does not decode (")


def test_clean_rooted_peers_verify_clean_having_checked_every_signature(peers, root,
                                                                        monkeypatch):
    """Enrolments, relayed revisions of several peers, a config, a revocation after some
    revisions, a revision of the revoked key held before the revocation reached this
    peer, and a sequencer handover: no finding anywhere, and every signature checked."""
    import txengine.keys as keys

    alice, bob, hub, carol = peers["alice"], peers["bob"], peers["hub"], peers["carol"]
    write(alice, 1)
    write(bob, 2)
    for peer in (alice, bob, carol):
        peer.sync(hub)
    hub.configure(policies={"items": "reject"})
    hub.revoke(root, [alice.key.id])
    late = write(alice, 3)  # before alice knows; carol takes it before she knows too
    assert carol.sync(alice).local.refused == []
    assert [r.code for r in carol.sync(hub).remote.refused] == ["revoked_key"]
    hub.configure(sequencer="bob")  # hand over: the hub's barriers stay good
    for peer in (bob, carol, alice):
        peer.sync(hub)
    handed = bob.configure(policies={"items": "rules"}).id
    assert carol.sync(bob).local.refused == []
    assert {late, handed} <= {r.id for r in carol.history()}

    checked: set[str] = set()
    real = keys.verify
    monkeypatch.setattr(keys, "verify", lambda public, digest, sig: (
        checked.add(digest) or real(public, digest, sig)))
    for name, peer in peers.items():
        report = peer.verify()
        assert report.ok, (name, report.findings)
        held = {peer.revision(r.id).descriptor["digest"] for r in peer.history()}
        assert held <= checked, name


def test_revision_written_after_its_keys_revocation_is_named(peers, root):
    """The revoking config is in its ancestry, so no rooted peer took it: named. What the
    key signed before (in that ancestry, or beside it) is not."""
    alice, hub = peers["alice"], peers["hub"]
    kept = write(alice, 1)
    alice.sync(hub)
    revoking = hub.revoke(root, [alice.key.id]).id
    beside = write(alice, 2)
    assert [r.code for r in alice.sync(hub).remote.refused] == ["revoked_key"]  # `beside`
    after = write(alice, 3)
    report = alice.verify()
    assert [f.revision for f in report.findings] == [after]
    assert report.findings[0].problem.startswith(
        f"revision {after[:12]} is signed by key {alice.key.id}, which config {revoking[:12]}"
        " in its ancestry revoked, so rooted peers refuse it: if this peer wrote it")
    assert {kept, beside} <= {r.id for r in alice.history()}


def test_open_mode_verify_is_unchanged_and_what_it_took_is_named_once_rooted(peers, root,
                                                                           tmp_path):
    """No root key: verify checks no signature (an unsigned revision passes). Once a root
    is installed, what was stored before is named only if its signature fails, worded
    apart, with what to do next."""
    hub = peers["hub"]
    signed = relayed(peers)
    with Peer.open(str(tmp_path / "late.db"), peer_id="late") as late:
        late.trust_sequencer("hub")
        assert late.sync(hub).local.refused == []
        unsigned_desc, payload = data_descriptor("mallory:0", None)
        assert codes(offer(late, unsigned_desc, payload)) == []
        genuine = late.revision(signed).descriptor["signature"]
        tamper_signature(late, signed, None)
        assert late.root_key() is None
        report = late.verify()
        assert report.ok and report.checked == len(late.history())

        tamper_signature(late, signed, genuine)
        late.install_root(root.public_text)
        own = write(late, 5)  # after the root, by a key the root has not enrolled yet
        problems = {f.revision: f.problem for f in late.verify().findings}
        assert problems.pop(own).startswith(
            f"revision {own[:12]} is signed by key {late.key.id}, which the root has not"
            " enrolled: if that key belongs to 'late', sync the config that enrolls it")
        hub.enroll(root, {"late": late.key.public_text})
        late.sync(hub)
        assert list(problems) == [unsigned_desc["id"]]
        (finding,) = late.verify().findings
        assert finding.revision == unsigned_desc["id"]
        assert finding.problem.startswith(
            f"revision {unsigned_desc['id'][:12]} was stored before this peer's root key was"
            " installed, so it was never verified, and it is not signed: review it")
