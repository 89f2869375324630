"""Revisions: a light descriptor plus a payload, and the digests that bind them.

* ``checksum`` is the SHA-256 of the payload bytes;
* ``digest`` is the SHA-256 of the canonical descriptor without ``digest``
  (and, for a data revision, without ``id``): it covers the parents' ids, so
  the graph is a Merkle chain, as in git;
* a data revision's ``id`` is its digest. Script, checkpoint and config
  revisions keep the id they were authored with (frozen into their file);
* ``signature`` (optional, ``{"key": key id, "sig": base64}``) is the
  origin's signature of the digest: it travels beside the descriptor and is
  not part of the digest, so a relay passes it on unchanged (see keys.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from .exceptions import ChecksumMismatch, DigestMismatch, MalformedPayload, OversizePayload
from .ops import Op, op_from_json, op_from_trusted
from .values import canonical, encoded_size, loads, sha256


class Signer(Protocol):
    """What signs a digest (a :class:`txengine.keys.KeyPair`)."""

    def sign(self, digest: str) -> dict[str, str]: ...


KINDS = ("data", "script", "checkpoint", "config")
BARRIER_KINDS = frozenset({"script", "checkpoint", "config"})
DEFAULT_PARTITION = "default"
MAX_PAYLOAD_BYTES = 1_048_576
MAX_DESCRIPTOR_BYTES = 4096
RESERVED_ID_CHARS = frozenset("@+-:, \t\n")
_RESERVED = re.compile("[" + re.escape("".join(sorted(RESERVED_ID_CHARS))) + "]")

FIELDS = (
    "id", "partition", "parents", "depends_on", "origin", "seq", "hlc", "message", "kind",
    "checksum", "collections", "branch_labels", "digest",
)
OPTIONAL_FIELDS = ("signature",)
SIGNATURE_FIELDS = frozenset({"key", "sig"})


def compute_digest(descriptor: dict[str, Any]) -> str:
    """Return the digest of a descriptor: SHA-256 of its canonical form without ``digest``
    (nor ``signature``, which signs the digest).

    A descriptor holds strings, integers and lists of them under ASCII keys,
    where orjson's sorted output is the RFC 8785 form, so the float and key
    order scan :func:`canonical` does for any value is skipped (every
    revision from outside passes here). A tampered descriptor holding a
    float cannot match a digest that way: orjson never writes a float as an
    integer's digits. orjson refuses lone surrogates; :func:`canonical`
    decides those.
    """
    body = dict(descriptor)
    body.pop("digest", None)
    body.pop("signature", None)
    if body.get("kind") == "data":
        body.pop("id", None)
    try:
        text = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        text = canonical(body)
    return sha256(text)


def check_id(rev_id: Any) -> str:
    """Refuse ids that are empty or hold characters the target syntax reserves."""
    if type(rev_id) is not str or not rev_id or _RESERVED.search(rev_id):
        raise MalformedPayload(
            f"revision id {rev_id!r} is not valid: use letters, digits and _ (no @ + - : ,)"
        )
    return rev_id


def encode_ops(ops: list[Op]) -> bytes:
    """Return the canonical payload bytes of a data revision."""
    return canonical([op.to_json() for op in ops])


def decode_ops(payload: bytes, limit: int = MAX_PAYLOAD_BYTES, trusted: bool = False
               ) -> list[Op]:
    """Parse and check a data payload; refuse anything malformed, unknown or too big.

    ``trusted`` skips the per-op checks for a payload that passed them at intake
    and whose checksum the caller has just verified (bulk replay's hot path).
    """
    if trusted:
        return [op_from_trusted(item) for item in loads(payload)]
    if len(payload) > limit:
        raise OversizePayload(len(payload), limit)
    try:
        data = loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedPayload(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise MalformedPayload("a data payload must be a JSON list of ops")
    return list(map(op_from_json, data))


class _Ops:
    """:attr:`Revision.ops`: decoded on first use into the instance's ``__dict__``, where
    every later read finds it as a plain attribute (this is a non-data descriptor).
    ``functools.cached_property`` does the same but takes a lock each first time: a
    microsecond a revision in bulk intake."""

    def __get__(self, rev: Revision | None, owner: type | None = None) -> list[Op]:
        if rev is None:
            return self  # type: ignore[return-value]
        ops = decode_ops(rev.payload) if rev.descriptor["kind"] == "data" else []
        rev.__dict__["ops"] = ops
        return ops


@dataclass(frozen=True)
class Revision:
    """An immutable unit of change: descriptor + payload."""

    descriptor: dict[str, Any]
    payload: bytes

    @property
    def id(self) -> str:
        return self.descriptor["id"]

    @property
    def kind(self) -> str:
        return self.descriptor["kind"]

    @property
    def parents(self) -> tuple[str, ...]:
        return tuple(self.descriptor["parents"])

    @property
    def hlc(self) -> tuple[int, int]:
        ms, counter = self.descriptor["hlc"]
        return ms, counter

    @property
    def partition(self) -> str:
        return self.descriptor["partition"]

    @property
    def message(self) -> str:
        return self.descriptor["message"]

    ops = _Ops()
    """The op list of a data revision (empty for other kinds), decoded on first use."""

    def verify(self) -> None:
        """Raise unless checksum, digest and (for data) id match the bytes."""
        verify_bytes(self.descriptor, self.payload)


def verify_bytes(descriptor: dict[str, Any], payload: bytes) -> None:
    """Check a descriptor against its payload; raise naming the revision on mismatch."""
    actual = sha256(payload)
    if actual != descriptor.get("checksum"):
        raise ChecksumMismatch(str(descriptor.get("id", "?")), str(descriptor.get("checksum")),
                               actual)
    check_digest(descriptor)


def check_digest(descriptor: dict[str, Any]) -> dict[str, Any]:
    """Check a descriptor alone (its digest, and for data its id); return it or raise."""
    digest = compute_digest(descriptor)
    if digest != descriptor.get("digest") or (descriptor.get("kind") == "data"
                                              and descriptor.get("id") != digest):
        rev_id = str(descriptor.get("id", "?"))
        known = descriptor.get("digest") if digest != descriptor.get("digest") else rev_id
        raise DigestMismatch(rev_id, str(known), digest)
    return descriptor


_REQUIRED = frozenset(FIELDS)
_ALLOWED = _REQUIRED | frozenset(OPTIONAL_FIELDS)


_LISTS = ("parents", "depends_on", "collections", "branch_labels")
_STRINGS = ("partition", "origin", "message", "checksum", "digest")


def check_descriptor(descriptor: Any) -> dict[str, Any]:
    """Check the shape of a descriptor that arrived from outside; return it.

    Every revision from outside passes here, so the common case is a few set
    and type tests; the messages are built only on failure.
    """
    if not isinstance(descriptor, dict):
        raise MalformedPayload("a descriptor must be a JSON object")
    keys = descriptor.keys()
    if not _REQUIRED <= keys <= _ALLOWED:
        missing = [f for f in FIELDS if f not in descriptor]
        raise MalformedPayload(
            f"descriptor fields wrong: missing {missing}, unexpected {sorted(keys - _ALLOWED)}"
        )
    d = descriptor
    if d["kind"] not in KINDS:
        raise MalformedPayload(f"unknown revision kind {d['kind']!r}: use one of {KINDS}")
    check_id(d["id"])
    for name in _LISTS:
        value = d[name]
        if type(value) is not list or (value and any(type(x) is not str for x in value)):
            raise MalformedPayload(f"descriptor {name} must be a list of strings")
    hlc = d["hlc"]
    if not (type(hlc) is list and len(hlc) == 2 and type(hlc[0]) is int
            and type(hlc[1]) is int and hlc[0] >= 0 and hlc[1] >= 0):
        raise MalformedPayload(f"descriptor hlc must be [ms, counter], got {hlc!r}")
    if type(d["seq"]) is not int or d["seq"] < 1:
        raise MalformedPayload(f"descriptor seq must be a positive integer, got {d['seq']!r}")
    if not (type(d["partition"]) is str and type(d["origin"]) is str
            and type(d["message"]) is str and type(d["checksum"]) is str
            and type(d["digest"]) is str):
        name = next(n for n in _STRINGS if type(d[n]) is not str)
        raise MalformedPayload(f"descriptor {name} must be a string")
    sig = d.get("signature")
    if sig is not None:
        if not (isinstance(sig, dict) and set(sig) == SIGNATURE_FIELDS
                and all(isinstance(v, str) and 0 < len(v) <= 200 for v in sig.values())):
            raise MalformedPayload('descriptor signature must be {"key": key id, "sig": base64}')
    body = d if sig is None else {k: v for k, v in d.items() if k != "signature"}
    if encoded_size(body) > MAX_DESCRIPTOR_BYTES:  # the signature beside it not counted
        raise MalformedPayload(f"descriptor exceeds {MAX_DESCRIPTOR_BYTES} bytes")
    return d


def build(
    *,
    kind: str,
    payload: bytes,
    partition: str,
    parents: list[str],
    origin: str,
    seq: int,
    hlc: tuple[int, int],
    message: str,
    collections: list[str] = (),  # type: ignore[assignment]
    depends_on: list[str] = (),  # type: ignore[assignment]
    branch_labels: list[str] = (),  # type: ignore[assignment]
    rev_id: str | None = None,
    signer: Signer | None = None,
) -> Revision:
    """Assemble a revision and compute its checksum, digest, (for data) id and, with
    ``signer``, the signature of its digest."""
    descriptor: dict[str, Any] = {
        "id": rev_id or "",
        "partition": partition,
        "parents": sorted(parents),
        "depends_on": sorted(depends_on),
        "origin": origin,
        "seq": seq,
        "hlc": [hlc[0], hlc[1]],
        "message": message,
        "kind": kind,
        "checksum": sha256(payload),
        "collections": sorted(set(collections)),
        "branch_labels": sorted(branch_labels),
    }
    descriptor["digest"] = compute_digest(descriptor)
    if kind == "data":
        descriptor["id"] = descriptor["digest"]
    else:
        check_id(descriptor["id"])
    if signer is not None:
        descriptor["signature"] = signer.sign(descriptor["digest"])
    return Revision(descriptor, payload)
