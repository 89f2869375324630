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

Signatures are verified once, when a descriptor arrives (``intake``); replay,
upgrade and integration never verify again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
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

    def add(self, config_id: str, body: dict[str, Any]) -> None:
        """Fold one root-signed config payload in. Order does not matter: a revoked key
        stays revoked, so every peer holding the same configs agrees."""
        for peer_id, text in sorted(body.get("enroll", {}).items()):
            public = public_from_text(text)
            self.keys[key_id(public)] = (peer_id, public)
        for kid in body.get("revoke", []):
            self.revoked.setdefault(kid, config_id)


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
        rev = d["id"]
        sig = d.get("signature")
        origin_peer = peer_of(d["origin"])
        if sig is None:
            raise SignatureError(rev, "is not signed, and this peer has a root key installed",
                                 "unsigned")
        kid = sig["key"]
        if kid == self.root_id:
            signer, public = None, self.root
        elif kid in self.enrolment.keys:
            signer, public = self.enrolment.keys[kid]
        else:
            raise UnknownSigner(rev, kid, origin_peer)
        if kid in self.enrolment.revoked:
            raise RevokedKey(rev, kid, self.enrolment.revoked[kid])
        if d["kind"] == "data":
            if signer is not None and signer != origin_peer:
                raise UnknownSigner(rev, kid, origin_peer, signer)
        elif signer is not None:
            named = self.sequencer(d["partition"])
            if signer != named:
                raise UntrustedScript(
                    f"barrier {rev[:12]} ({d['kind']}) is signed by {signer!r}, not by the"
                    f" sequencer of partition {d['partition']!r}"
                    f" ({'none is named' if named is None else repr(named)}): refused;"
                    " nothing was changed")
        if not verify(public, d["digest"], sig):
            raise SignatureError(rev, f"signature by key {kid} does not verify", "bad_signature")
