"""Peer keys and the trust anchor: Ed25519 key pairs, revision signatures, enrolment.

Each peer signs the digest of every revision it originates; the signature
travels beside the descriptor (``{"key": key id, "sig": base64}``), outside
the digest, so a relay (a hub, a bundle, a clone) passes it on untouched and
the receiver checks it against the *origin's* key, whoever relayed it.

A deployment has a root key. Once its public half is installed on a peer
(state row ``root_key``), that peer refuses unsigned revisions and
revisions whose signer is not enrolled for their origin's peer id. The root
enrolls and revokes peer keys through ``config`` revisions it signs
(``{"enroll": {peer id: public key}, "revoke": [key id]}``); a peer with no
root installed runs in open mode and checks no signature. See
docs/security.md.

Signatures are verified when a descriptor arrives (``intake``); replay,
upgrade and integration never verify again. ``verify`` checks every held
revision's signature once more (:meth:`Trust.held_fault`): the signature is
outside the digest, so nothing else would notice one edited in the ledger.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .exceptions import (
    ConfigError,
    InvalidInput,
    RevokedKey,
    SignatureError,
    UnknownSigner,
    UntrustedScript,
)

SIGNED_PREFIX = b"txengine-revision-v1\n"
"""Prepended to the digest before signing: a revision signature never means anything else."""

KEY_ID_CHARS = 16


def key_id(public: bytes) -> str:
    """Return a key's short id: the first 16 hex characters of SHA-256 of its raw public key."""
    return hashlib.sha256(public).hexdigest()[:KEY_ID_CHARS]


def public_from_text(text: str) -> bytes:
    """Decode a public key as printed by ``txengine keys show`` (base64 of 32 bytes)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise InvalidInput(f"{text!r} is not an Ed25519 public key: pass the base64 text"
                           " `txengine keys show` prints")
    return raw


def public_text(public: bytes) -> str:
    return base64.b64encode(public).decode("ascii")


@dataclass(frozen=True)
class KeyPair:
    """An Ed25519 key pair: a peer's own key, or the deployment's root key."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes, where: str) -> KeyPair:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where} is not a PEM Ed25519 private key ({exc}): restore it"
                              " from a backup, or remove it to make a new key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{where} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())

    @cached_property
    def public(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)

    @cached_property
    def id(self) -> str:
        return key_id(self.public)

    @property
    def public_text(self) -> str:
        return public_text(self.public)

    def sign(self, digest: str) -> dict[str, str]:
        """Return the signature field of a descriptor with this ``digest``."""
        sig = self.private.sign(SIGNED_PREFIX + digest.encode("ascii"))
        return {"key": self.id, "sig": base64.b64encode(sig).decode("ascii")}


_VERIFIED: OrderedDict[tuple[bytes, str, str], None] = OrderedDict()
"""Signatures that verified, most recent last (bounded): a server checks a request's
signatures before it takes the apply lease, then finds them here under the lease."""
_VERIFIED_MAX = 100_000


def verify(public: bytes, digest: str, signature: dict[str, Any]) -> bool:
    """Say whether ``signature`` is ``public``'s signature of ``digest``."""
    try:
        entry = (public, digest, str(signature["sig"]))
        if entry in _VERIFIED:
            return True
        sig = base64.b64decode(signature["sig"], validate=True)
        Ed25519PublicKey.from_public_bytes(public).verify(sig, SIGNED_PREFIX
                                                          + digest.encode("ascii"))
    except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError, KeyError,
            TypeError):
        return False
    _VERIFIED[entry] = None
    if len(_VERIFIED) > _VERIFIED_MAX:
        _VERIFIED.popitem(last=False)
    return True


def signed_by_root(root: bytes, d: dict[str, Any]) -> bool:
    """Say whether ``d`` carries the root's signature of its digest: the one thing that lets
    a config enroll or revoke keys. Used where configs are taken without intake (a
    checkpoint's ancestry at bootstrap or prune), so a signature in the root's name that
    does not verify is a forgery and raises instead of passing for unsigned.
    """
    sig = d.get("signature")
    if not isinstance(sig, dict) or sig.get("key") != key_id(root):
        return False
    if not verify(root, d["digest"], sig):
        raise SignatureError(d["id"], f"is a {d['kind']} signed in the name of root key"
                             f" {key_id(root)} whose signature does not verify, so the ledger"
                             " holding it was altered (`txengine verify` there names it)",
                             "bad_signature")
    return True


def write_key_file(path: str | Path, key: KeyPair) -> None:
    """Write a private key to a new file readable by its owner only (0600); never overwrite."""
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{target} already exists: a key is never overwritten; remove it"
                          " first if you really mean to replace it") from None
    with os.fdopen(fd, "wb") as out:
        out.write(key.to_pem())


def read_key_file(path: str | Path) -> KeyPair:
    target = Path(path)
    try:
        data = target.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {target} ({exc.strerror})") from None
    return KeyPair.from_pem(data, str(target))


def load_or_create(path: str | Path) -> KeyPair:
    """Return the key pair in ``path``, creating it (0600) at first use."""
    target = Path(path)
    if not target.exists():
        write_key_file(target, KeyPair.generate())
    return read_key_file(target)


@dataclass(frozen=True)
class KeyInfo:
    """A public key as the CLI shows it: whose, its id, the key, and what revoked it."""

    peer: str | None
    key: str
    public: str
    revoked_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "key": self.key, "public": self.public,
                "revoked_by": self.revoked_by}


def init_root(path: str | Path) -> KeyInfo:
    """Make the deployment's root key pair in a new file (0600); return its public half.

    Keep the file offline, with whoever enrolls peers; install the public key
    on every peer (``txengine keys install-root``, ``init --root-key``).
    """
    key = KeyPair.generate()
    write_key_file(path, key)
    return KeyInfo(None, key.id, key.public_text)


def peer_of(origin: str) -> str:
    """Return the peer id part of an origin (``phone:1`` -> ``phone``)."""
    return origin.rpartition(":")[0] or origin


@dataclass
class Enrolment:
    """What the root's config revisions say: enrolled keys by id, and revoked key ids."""

    keys: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    """key id -> (peer id, raw public key)."""
    revoked: dict[str, str] = field(default_factory=dict)
    """key id -> id of the config revision that revoked it."""
    revokers: dict[str, set[str]] = field(default_factory=dict)
    """key id -> every config revision that revokes it: ``verify`` judges a held revision
    by whether one of them is in its ancestry (see :meth:`Trust.held_fault`)."""

    def add(self, config_id: str, body: dict[str, Any]) -> None:
        """Fold one root-signed config payload in. Order does not matter: a revoked key
        stays revoked, so every peer holding the same configs agrees."""
        for peer_id, text in sorted(body.get("enroll", {}).items()):
            public = public_from_text(text)
            self.keys[key_id(public)] = (peer_id, public)
        for kid in body.get("revoke", []):
            self.revoked.setdefault(kid, config_id)
            self.revokers.setdefault(kid, set()).add(config_id)


@dataclass(frozen=True)
class Fault:
    """Why a revision's signature does not stand, before it is worded: as a refusal at
    arrival (:meth:`Trust.check`) or as a ``verify`` finding (:meth:`finding`)."""

    code: str
    """A refusal code: ``unsigned``, ``unknown_signer``, ``revoked_key``, ``untrusted_code``,
    ``bad_signature``."""
    key: str | None = None
    """The signing key's id (None: no signature, or a malformed one)."""
    owner: str | None = None
    """The peer the key is enrolled for (None: not enrolled, or the root's key)."""
    named: tuple[str | None, ...] = ()
    """``untrusted_code``: the sequencers the barrier's signer was checked against."""
    config: str | None = None
    """``revoked_key``: the config revision that revoked the key."""

    def finding(self, d: dict[str, Any], before_root: bool) -> str:
        """Word this fault of ``d``, a revision this peer holds, as a ``verify`` finding:
        one line naming the revision and ending with what to do.

        ``before_root``: it was stored before the root key was installed, so it was
        never checked and is likely older than signatures, not tampered with.
        """
        origin = peer_of(d["origin"])
        if self.code == "unsigned":
            problem = "is not signed"
        elif self.code == "unknown_signer" and self.owner is None:
            problem = f"is signed by key {self.key}, which the root has not enrolled"
        elif self.code == "unknown_signer":
            problem = (f"is signed by key {self.key}, enrolled for {self.owner!r}, not for its"
                       f" origin {origin!r}")
        elif self.code == "revoked_key":
            problem = (f"is signed by key {self.key}, which config {str(self.config)[:12]} in"
                       " its ancestry revoked, so rooted peers refuse it")
        elif self.code == "untrusted_code":
            named = ", ".join(repr(n) for n in self.named if n is not None) or "none is named"
            problem = (f"is a {d['kind']} signed by {self.owner!r}, neither the root nor a"
                       f" sequencer of partition {d['partition']!r} ({named})")
        elif self.key is None:
            problem = "has a malformed signature"
        else:
            problem = f"has a signature by key {self.key} that does not verify"
        if before_root:
            return (f"revision {d['id'][:12]} was stored before this peer's root key was"
                    f" installed, so it was never verified, and it {problem}: review it"
                    " (`txengine show`); if you do not trust it, clone this peer again from"
                    " a rooted peer")
        fix = ("the signature column was altered, or the row bypassed intake: restore the"
               " ledger from a backup, or clone this peer again from a rooted peer")
        if self.code == "unknown_signer" and self.owner is None:
            fix = (f"if that key belongs to {origin!r}, sync the config that enrolls it or"
                   f" have the root holder enroll it; else {fix}")
        elif self.code == "revoked_key":
            fix = f"if this peer wrote it, enroll a new key for this peer; else {fix}"
        return f"revision {d['id'][:12]} {problem}: {fix}"


@dataclass
class Trust:
    """A rooted peer's view: the root key, the enrolment, and who sequences each partition."""

    root: bytes
    enrolment: Enrolment
    sequencer: Callable[[str], str | None]

    @cached_property
    def root_id(self) -> str:
        return key_id(self.root)

    def check(self, d: dict[str, Any]) -> None:
        """Raise unless ``d`` is signed by a key enrolled for its origin (barriers: by the
        partition's sequencer), the signature verifies, and the key is not revoked.

        Called only for descriptors this peer does not hold yet, so a revoked key's
        revision that reaches it lies outside the revoking barrier's ancestry: that
        barrier's ancestry was complete before it could be taken.
        """
        fault = self._fault(d, lambda: (self.sequencer(d["partition"]),),
                            self.enrolment.revoked)
        if fault is None:
            return
        rev, kid = d["id"], fault.key
        if fault.code == "unsigned":
            raise SignatureError(rev, "is not signed, and this peer has a root key installed",
                                 "unsigned")
        if fault.code == "unknown_signer":
            raise UnknownSigner(rev, str(kid), peer_of(d["origin"]), fault.owner)
        if fault.code == "revoked_key":
            raise RevokedKey(rev, str(kid), str(fault.config))
        if fault.code == "untrusted_code":
            (named,) = fault.named
            raise UntrustedScript(
                f"barrier {rev[:12]} ({d['kind']}) is signed by {fault.owner!r}, not by the"
                f" sequencer of partition {d['partition']!r}"
                f" ({'none is named' if named is None else repr(named)}): refused;"
                " nothing was changed")
        raise SignatureError(rev, f"signature by key {kid} does not verify", "bad_signature")

    def held_fault(self, d: dict[str, Any], sequencers: Iterable[str | None],
                   revoker_above: Callable[[str], str | None]) -> Fault | None:
        """Return what is wrong with the signature of ``d``, a revision this peer holds
        (``verify``), or None: :meth:`check`'s rules, restated without the arrival time,
        which the ledger does not record trustworthily.

        A barrier may be signed by any peer in ``sequencers`` (every sequencer the
        partition has had: which one was named at its arrival is not known). A revoked
        key is a fault only where ``revoker_above(key id)`` names a config revoking it
        in the revision's ancestry: such a revision was written after the revocation,
        so it cannot have arrived before it; any other was taken before the revocation
        reached this peer, as a revocation allows, or was in its ancestry.
        """
        fault = self._fault(d, lambda: tuple(sequencers), {})
        if fault is not None:
            return fault
        kid = d["signature"]["key"]
        config = revoker_above(kid) if kid in self.enrolment.revoked else None
        return None if config is None else Fault("revoked_key", kid, config=config)

    def _fault(self, d: dict[str, Any], sequencers: Callable[[], tuple[str | None, ...]],
               revoked: Mapping[str, str]) -> Fault | None:
        """Judge ``d``'s signature: the one decision behind :meth:`check` and
        :meth:`held_fault`, in :meth:`check`'s order (a revoked key before its role and
        its signature). ``sequencers`` is called only for a barrier a peer key signed."""
        sig = d.get("signature")
        if sig is None:
            return Fault("unsigned")
        if not (isinstance(sig, dict) and isinstance(sig.get("key"), str)):
            return Fault("bad_signature")  # a held row only: intake checks the shape first
        kid = sig["key"]
        if kid == self.root_id:
            signer, public = None, self.root
        elif kid in self.enrolment.keys:
            signer, public = self.enrolment.keys[kid]
        else:
            return Fault("unknown_signer", kid)
        if kid in revoked:
            return Fault("revoked_key", kid, signer, config=revoked[kid])
        if signer is not None:
            if d["kind"] == "data":
                if signer != peer_of(d["origin"]):
                    return Fault("unknown_signer", kid, signer)
            else:
                named = sequencers()
                if signer not in named:
                    return Fault("untrusted_code", kid, signer, named)
        if not verify(public, d["digest"], sig):
            return Fault("bad_signature", kid)
        return None
