"""Intake: every check a revision from outside must pass before anything is written.

A batch is checked whole — shape, checksum, digest, ops, declared collections,
forks, parents, hlc order, cycles, trust — and refused whole on the first
failure, so bad input changes nothing. Known ids and (origin, seq) slots are
looked up in bulk: intake runs on every sync, and a per-revision query would
make its cost follow the round trips, not the data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import orjson

from .exceptions import (
    ChecksumMismatch,
    CycleDetected,
    DigestMismatch,
    ForkedRevision,
    MalformedPayload,
    MissingParent,
    RevokedKey,
    UntrustedScript,
)
from .revision import (
    MAX_DESCRIPTOR_BYTES,
    MAX_PAYLOAD_BYTES,
    SIGNATURE_FIELDS,
    Revision,
    check_descriptor,
    verify_bytes,
)
from .values import loads, sha256

if TYPE_CHECKING:
    from .engine import Engine
    from .keys import Trust


def check_batch(engine: Engine, items: Sequence[tuple[dict[str, Any], bytes]],
                trusted: bool = False, trust: Trust | None = None) -> list[Revision]:
    """Return the new revisions of ``items``, parents first, or raise on the first bad one.

    Revisions already known with the same digest are skipped (re-applying a
    batch is idempotent). Script, checkpoint and config revisions are refused
    unless ``trusted`` (this peer's own ``versions/``) or, on a peer with a
    root key (``trust``), signed by the partition's sequencer; there, every
    new revision from outside must carry its origin's signature.
    """
    return check_new(engine, check_items(items, trusted or trust is not None), trusted, trust)


def check_items(items: Sequence[tuple[dict[str, Any], bytes]], code_allowed: bool
                ) -> dict[str, Revision]:
    """The checks each item passes alone — shape, checksum, digest, ops, declared
    collections — and forks within the batch; by id. They read no peer state, so a
    clone runs them while the previous batch commits."""
    batch: dict[str, Revision] = {}
    for descriptor, payload in items:
        rev = _check_one(check_descriptor(descriptor), payload, code_allowed)
        rev_id = descriptor["id"]
        other = batch.get(rev_id)
        if other is not None and other.descriptor["digest"] != descriptor["digest"]:
            raise ForkedRevision(f"revision {rev_id[:12]}", other.descriptor["digest"],
                                 descriptor["digest"])
        batch[rev_id] = rev
    return batch


def check_rows(rows: Sequence[Sequence[Any]]) -> dict[str, Revision] | None:
    """:func:`check_items` of data revisions read from a ledger, as rows of ``id``,
    :data:`~txengine.ledger.COPY_COLUMNS` and ``payload`` (a clone's batch), column by
    column; by id. Returns None, having decided nothing, when a row is not plain: the
    caller then runs :func:`check_items` on the rows' descriptors, which names the fault.

    A clone checks every revision of its source. What a column must hold in
    every row (a type, a range, the one kind) is tested on the whole column at
    once, in C (``set(map(type, ...))``, ``min``); each descriptor is built
    once, in canonical key order without ``id`` and ``digest``, which is the
    text its digest covers. A data revision's id is its digest, a hex string,
    which settles the id's syntax; the size limit follows from the same text.
    It mirrors :func:`~txengine.revision.check_descriptor` and
    :func:`~txengine.revision.verify_bytes`: a rule added there belongs here
    too (tests/test_clone.py holds the two to the same decisions).
    """
    if not rows:
        return {}
    columns = list(zip(*rows, strict=True))
    (ids, partitions, kinds, origins, seqs, ms, counters, parents, depends, messages,
     checksums, collections, labels, digests, signatures, payloads) = columns[:16]
    n = len(rows)
    if not (set(map(type, chain(partitions, origins, messages, parents, depends, collections,
                                labels))) == {str}
            and set(map(type, chain(seqs, ms, counters))) == {int}
            and set(map(type, payloads)) == {bytes} and set(kinds) == {"data"}
            and set(map(type, signatures)) <= {str, type(None)} and len(set(ids)) == n
            and min(seqs) >= 1 and min(ms) >= 0 and min(counters) >= 0
            and max(map(len, payloads)) <= MAX_PAYLOAD_BYTES):
        return None
    try:
        lists = [[[] if text == "[]" else loads(text) for text in column]
                 for column in (parents, depends, collections, labels)]
    except ValueError:
        return None
    if not all(set(map(type, column)) == {list}
               and set(map(type, chain.from_iterable(column))) <= {str} for column in lists):
        return None
    bodies = [{"branch_labels": lb, "checksum": ck, "collections": co, "depends_on": de,
               "hlc": [m, c], "kind": "data", "message": me, "origin": o, "parents": pa,
               "partition": pt, "seq": s}
              for lb, ck, co, de, m, c, me, o, pa, pt, s in zip(
                  lists[3], checksums, lists[2], lists[1], ms, counters, messages, origins,
                  lists[0], partitions, seqs, strict=True)]
    try:
        texts = list(map(orjson.dumps, bodies))
    except (orjson.JSONEncodeError, TypeError):  # integers beyond 64 bits, lone surrogates
        return None
    computed = tuple(map(sha256, texts))  # hex strings: what ids and digests must equal
    if (computed != ids or computed != digests
            or tuple(map(sha256, payloads)) != checksums
            or max(map(len, texts)) + _ID_AND_DIGEST > MAX_DESCRIPTOR_BYTES):
        return None
    batch: dict[str, Revision] = {}
    for body, rev_id, signature, payload in zip(bodies, ids, signatures, payloads,
                                                   strict=True):
        body["id"] = body["digest"] = rev_id
        if signature is not None:
            try:
                sig = loads(signature)
            except ValueError:
                return None
            if not (type(sig) is dict and sig.keys() == SIGNATURE_FIELDS
                    and all(type(v) is str and 0 < len(v) <= 200 for v in sig.values())):
                return None
            body["signature"] = sig
        batch[rev_id] = Revision(body, payload)
    for rev in batch.values():
        _check_ops(rev)
    return batch


_ID_AND_DIGEST = len(',"id":"","digest":""') + 2 * 64
"""What a data descriptor's ``id`` and ``digest`` (two hex digests) add to its encoded size."""


def check_new(engine: Engine, batch: dict[str, Revision], trusted: bool = False,
              trust: Trust | None = None) -> list[Revision]:
    """The checks against what ``engine`` holds — known ids and slots, signatures of the
    new, cycles, parents and hlc order — of a batch from :func:`check_items`; return its
    new revisions, parents first."""
    new = _check_known(engine, batch)
    if trust is not None and not trusted:
        for rev in new.values():
            trust.check(rev.descriptor)
    order = _topological(new)  # before the hlc check, which a cycle would always fail first
    _check_parents(engine, new)
    return order


def check_follows(batch: dict[str, Revision], seen: dict[str, list[int]],
                  slots: dict[tuple[str, str, int], str], coming: Container[str],
                  trust: Trust | None = None) -> list[Revision]:
    """The checks against what came before — new (partition, origin, seq) slots, parents
    and dependencies known with a lower hlc, signatures — of a batch from
    :func:`check_items` that comes in canonical order into an empty peer (a clone);
    return it in that order.

    Canonical order puts parents first, so a parent not yet ``seen`` is
    missing, or sorts after its child (one of ``coming``), which a cycle always
    does: the batch needs no sort, and no query of the peer. Takes the batch
    into ``seen`` (id: hlc) and ``slots`` (slot: id).
    """
    for rev in batch.values():
        d = rev.descriptor
        hlc = d["hlc"]
        slot = (d["partition"], d["origin"], d["seq"])
        known = slots.get(slot)
        if known is not None:
            raise ForkedRevision(f"(origin {slot[1]}, seq {slot[2]})", known, d["digest"])
        parents = d["parents"]
        for parent in [*parents, *d["depends_on"]] if d["depends_on"] else parents:
            above = seen.get(parent)
            if above is None:
                if parent not in coming:
                    raise MissingParent(rev.id, parent)
                raise MalformedPayload(f"revision {rev.id[:12]} (hlc {hlc}) sorts before its"
                                       f" parent {parent[:12]}: refused")
            if hlc <= above:
                raise MalformedPayload(_not_above(rev.id, hlc, parent, above))
        if trust is not None:
            trust.check(d)
        seen[d["id"]] = hlc
        slots[slot] = d["id"]
    return list(batch.values())


def _check_one(d: dict[str, Any], payload: bytes, trusted: bool,
               digest_checked: bool = False) -> Revision:
    rev = Revision(d, payload)
    kind = d["kind"]
    if kind != "data" and not trusted:
        raise UntrustedScript(
            f"revision {rev.id[:12]} is {kind} code from another peer and is not"
            " signed by the sequencer: refused; nothing was changed"
        )
    if digest_checked:
        actual = sha256(payload)
        if actual != d["checksum"]:
            raise ChecksumMismatch(rev.id, d["checksum"], actual)
    else:
        verify_bytes(d, payload)
    return _check_ops(rev) if kind == "data" else rev


def _check_ops(rev: Revision) -> Revision:
    """Decode a data revision's ops (refusing malformed ones) and check that it declares
    the collections they write."""
    ops = rev.ops
    derived = [ops[0].collection] if len(ops) == 1 else sorted({op.collection for op in ops})
    if derived != rev.descriptor["collections"]:
        raise MalformedPayload(
            f"revision {rev.id[:12]} declares collections {rev.descriptor['collections']} but"
            f" its ops write {derived}: refused"
        )
    return rev


def _check_known(engine: Engine, batch: dict[str, Revision]) -> dict[str, Revision]:
    """Refuse a known id or (origin, seq) slot with another digest; drop exact repeats."""
    known = engine.ledger.rows([r for r in batch if r in engine.graph], "digest")
    slots: dict[tuple[str, str], list[int]] = defaultdict(list)
    for rev in batch.values():
        slots[(rev.descriptor["origin"], rev.partition)].append(rev.descriptor["seq"])
    taken = {key: engine.ledger.slots(*key, seqs) for key, seqs in slots.items()}
    engine.store.rollback()
    new = {}
    for rev in batch.values():
        d = rev.descriptor
        row = known.get(rev.id)
        if row is not None and row.digest != d["digest"]:
            raise ForkedRevision(f"revision {rev.id[:12]}", row.digest, d["digest"])
        slot = taken[(d["origin"], rev.partition)].get(d["seq"])
        if slot is not None and slot[0] != rev.id:
            raise ForkedRevision(f"(origin {d['origin']}, seq {d['seq']})", slot[1],
                                 d["digest"])
        if row is None and not engine.covered(rev.partition, d["origin"], d["seq"]):
            new[rev.id] = rev  # within a checkpoint's vector: held already
    return new


def _check_parents(engine: Engine, new: dict[str, Revision]) -> None:
    """Every parent and dependency is known, and each hlc is above theirs."""
    for rev in new.values():
        for parent in [*rev.parents, *rev.descriptor["depends_on"]]:
            if parent in new:
                hlc = new[parent].hlc
            elif parent in engine.graph:
                hlc = engine.graph.get(parent).hlc
            elif parent in engine.stubs:
                hlc = engine.stubs[parent].hlc
            else:
                raise MissingParent(rev.id, parent)
            if tuple(rev.hlc) <= tuple(hlc):
                raise MalformedPayload(_not_above(rev.id, rev.hlc, parent, hlc))


def _not_above(rev_id: str, hlc: Sequence[int], parent: str, above: Sequence[int]) -> str:
    """The refusal of a revision whose hlc is not above its parent's."""
    return (f"revision {rev_id[:12]} has hlc {list(hlc)} not above its parent"
            f" {parent[:12]}'s {list(above)}: refused")


def _topological(new: dict[str, Revision]) -> list[Revision]:
    """Order a batch parents-first, or raise CycleDetected."""
    order: list[Revision] = []
    state: dict[str, int] = {}
    for start in new:
        if state.get(start):
            continue
        state[start] = 1
        stack = [(start, iter(new[start].parents))]
        while stack:
            rev_id, parents = stack[-1]
            for parent in parents:
                if parent not in new:
                    continue
                if state.get(parent) == 1:
                    raise CycleDetected([r for r, s in state.items() if s == 1])
                if not state.get(parent):
                    state[parent] = 1
                    stack.append((parent, iter(new[parent].parents)))
                    break
            else:
                stack.pop()
                state[rev_id] = 2
                order.append(new[rev_id])
    return order


# -- sync: descriptors first, payloads after, each revision on its own -------------------

@dataclass(frozen=True)
class Refusal:
    """A revision sync refused: recorded in the audit, reported, its slot left open."""

    revision: str
    reason: str
    origin: str | None = None
    code: str = "refused"
    """Stable, for programs: ``forbidden_partition`` makes the origin roll the revision back."""

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "reason": self.reason, "origin": self.origin,
                "code": self.code}


def _peer_of(origin: str) -> str:
    return origin.rpartition(":")[0] or origin


def _hlc_problem(engine: Engine, d: dict[str, Any], extra: dict[str, Any]) -> str | None:
    """Return why ``d``'s hlc is not above a known parent's, or None."""
    for parent in [*d["parents"], *d["depends_on"]]:
        node = engine.graph.get(parent) if parent in engine.graph else (
            engine.quarantined.get(parent) or engine.stubs.get(parent))
        hlc = tuple(node.hlc) if node is not None else (
            tuple(extra[parent]["hlc"]) if parent in extra else None)
        if hlc is not None and tuple(d["hlc"]) <= hlc:
            return _not_above(d["id"], d["hlc"], parent, hlc)
    return None


def check_announced(engine: Engine, descriptors: Sequence[Any],
                    sequencer: Callable[[str], str | None], trust: Trust | None = None
                    ) -> tuple[list[dict[str, Any]], list[Refusal]]:
    """Check descriptors from another peer; return (new ones to record as announced, refusals).

    Each is checked on its own: shape, digest (and id = digest for data),
    known id or (origin, seq) slot with another digest, hlc above known
    parents, and for barriers the sequencer and the barrier order. On a peer
    with a root key (``trust``) each new descriptor's signature is verified
    here, once, against a key enrolled for its origin (barriers: the
    sequencer's), before it can take its slot. Without one, scripts from
    another peer are refused (only the local ``versions/`` is trusted) and
    barriers are trusted by origin name. Exact repeats are dropped.
    """
    from .exceptions import TxEngineError
    from .revision import compute_digest

    fresh: dict[str, dict[str, Any]] = {}
    refused: list[Refusal] = []
    checked = []
    for raw in descriptors:
        rev_id = str(raw.get("id", "?")) if isinstance(raw, dict) else "?"
        try:
            d = check_descriptor(raw)
            digest = compute_digest(d)
            if digest != d["digest"] or (d["kind"] == "data" and d["id"] != digest):
                raise DigestMismatch(rev_id, str(d["digest"]), digest)
        except TxEngineError as exc:
            refused.append(Refusal(rev_id, str(exc), raw.get("origin") if isinstance(
                raw, dict) else None))
            continue
        checked.append(d)
    ids = [d["id"] for d in checked]
    known = engine.ledger.rows(ids, "digest", "state")
    slots: dict[tuple[str, str], list[int]] = defaultdict(list)
    for d in checked:
        slots[(d["origin"], d["partition"])].append(d["seq"])
    taken = {key: engine.ledger.slots(*key, seqs) for key, seqs in slots.items()}
    engine.store.rollback()
    barriers = engine.graph.barriers()
    last = max((engine.graph.get(b) for b in barriers), default=None,
               key=lambda n: (n.hlc, n.origin, n.id))
    for d in checked:
        rev_id = d["id"]
        row = known.get(rev_id)
        if row is not None:
            if row.digest != d["digest"]:
                refused.append(Refusal(rev_id, str(ForkedRevision(
                    f"revision {rev_id[:12]}", row.digest, d["digest"])), d["origin"]))
            continue
        if engine.covered(d["partition"], d["origin"], d["seq"]):
            continue  # held by a checkpoint's vector, like a known revision
        if rev_id in fresh:
            if fresh[rev_id]["digest"] != d["digest"]:
                refused.append(Refusal(rev_id, "two descriptors with one id: refused", d["origin"]))
            continue
        slot = taken[(d["origin"], d["partition"])].get(d["seq"])
        if slot is not None and slot[0] != rev_id:
            refused.append(Refusal(rev_id, str(ForkedRevision(
                f"(origin {d['origin']}, seq {d['seq']})", slot[1], d["digest"])), d["origin"]))
            continue
        problem = _hlc_problem(engine, d, fresh)
        code = "refused"
        if problem is None and trust is not None:
            try:
                trust.check(d)
            except TxEngineError as exc:
                problem, code = str(exc), getattr(exc, "code", code)
        elif problem is None and d["kind"] == "script":
            problem = (f"revision {rev_id[:12]} is script code from another peer: only this"
                       " peer's versions/ is trusted while no root key is installed; refused")
        elif problem is None and d["kind"] != "data":
            named = sequencer(d["partition"])
            if named is None or _peer_of(d["origin"]) != named:
                problem = (f"barrier {rev_id[:12]} comes from {_peer_of(d['origin'])!r}, which is"
                           f" not the sequencer of partition {d['partition']!r}"
                           f" ({'none is named' if named is None else repr(named)}): refused")
        if problem is None and d["kind"] != "data" and last is not None and (
                tuple(d["hlc"]), d["origin"], rev_id) < (last.hlc, last.origin, last.id):
            problem = (f"barrier {rev_id[:12]} sorts before the known barrier"
                       f" {last.id[:12]}: refused")
        if problem is not None:
            refused.append(Refusal(rev_id, problem, d["origin"], code))
            continue
        fresh[rev_id] = d
    return list(fresh.values()), refused


def check_fetched(engine: Engine, announced: dict[str, dict[str, Any]],
                  payloads: dict[str, bytes], horizon_ms: int, digest_checked: Container[str] = (),
                  trust: Trust | None = None
                  ) -> tuple[list[Revision], list[Revision], list[Refusal]]:
    """Check arrived payloads against their announced descriptors, each on its own.

    Return (fetched, quarantined, refused). A payload whose parent is still
    missing stays announced (neither fetched nor refused): the parent may
    come in a later batch. A revision whose physical time is beyond
    ``horizon_ms`` is quarantined; barriers, which only the sequencer issues,
    are exempt. ``digest_checked`` names descriptors whose digest the caller
    checked itself (sync, when it announced them in the same exchange): their
    payload is checked against the checksum only, which the digest covers.
    With ``trust``, a revision whose key was revoked after it was announced is
    refused (a key id lookup: its signature was verified at announce).
    """
    from .exceptions import TxEngineError
    from .policy import decode_config

    candidates: list[Revision] = []
    refused: list[Refusal] = []
    for rev_id, payload in payloads.items():
        d = announced.get(rev_id)
        if d is None:
            continue
        try:
            sig = d.get("signature")
            if trust is not None and sig is not None and sig["key"] in trust.enrolment.revoked:
                raise RevokedKey(rev_id, sig["key"], trust.enrolment.revoked[sig["key"]])
            rev = _check_one(d, payload, trusted=True, digest_checked=rev_id in digest_checked)
            if rev.kind == "config":
                decode_config(payload)
            candidates.append(rev)
        except TxEngineError as exc:
            refused.append(Refusal(rev_id, str(exc), d["origin"], getattr(exc, "code", "refused")))
    candidates.sort(key=lambda r: (r.hlc, r.descriptor["origin"], r.id))
    good: dict[str, Revision] = {}
    held: dict[str, Revision] = {}
    taken: dict[str, dict[str, Any]] = {}  # descriptors of good and held, for the hlc check
    for rev in candidates:
        d = rev.descriptor
        waiting = False
        for parent in [*d["parents"], *d["depends_on"]]:
            if parent not in engine.graph and parent not in good and parent not in held \
                    and parent not in engine.quarantined and parent not in engine.stubs:
                waiting = True
        if waiting:
            continue
        problem = _hlc_problem(engine, d, taken)
        if problem is not None:
            refused.append(Refusal(rev.id, problem, d["origin"]))
            continue
        parked = any(p in held or p in engine.quarantined for p in d["parents"])
        if rev.kind == "data" and (rev.hlc[0] > horizon_ms or parked):
            held[rev.id] = rev
        else:
            good[rev.id] = rev
        taken[rev.id] = d
    return list(good.values()), list(held.values()), refused
