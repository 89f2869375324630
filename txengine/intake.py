"""Intake: every check a revision from outside must pass before anything is written.

A batch is checked whole — shape, checksum, digest, ops, declared collections,
forks, parents, hlc order, cycles, trust — and refused whole on the first
failure, so bad input changes nothing. Known ids and (origin, seq) slots are
looked up in bulk: intake runs on every sync, and a per-revision query would
make its cost follow the round trips, not the data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .exceptions import (
    CycleDetected,
    ForkedRevision,
    MalformedPayload,
    MissingParent,
    UntrustedScript,
)
from .revision import Revision, check_descriptor, verify_bytes

if TYPE_CHECKING:
    from .engine import Engine


def check_batch(engine: Engine, items: Sequence[tuple[dict[str, Any], bytes]],
                trusted: bool = False) -> list[Revision]:
    """Return the new revisions of ``items``, parents first, or raise on the first bad one.

    Revisions already known with the same digest are skipped (re-applying a
    batch is idempotent). Script, checkpoint and config revisions are refused
    unless ``trusted`` (this peer's own ``versions/``).
    """
    batch: dict[str, Revision] = {}
    for descriptor, payload in items:
        rev = _check_one(check_descriptor(descriptor), payload, trusted)
        other = batch.get(rev.id)
        if other is not None and other.descriptor["digest"] != rev.descriptor["digest"]:
            raise ForkedRevision(f"revision {rev.id[:12]}", other.descriptor["digest"],
                                 rev.descriptor["digest"])
        batch[rev.id] = rev
    new = _check_known(engine, batch)
    order = _topological(new)  # before the hlc check, which a cycle would always fail first
    _check_parents(engine, new)
    return order


def _check_one(d: dict[str, Any], payload: bytes, trusted: bool) -> Revision:
    rev = Revision(d, payload)
    if rev.kind != "data" and not trusted:
        raise UntrustedScript(
            f"revision {rev.id[:12]} is {rev.kind} code from another peer and is not"
            " signed by the sequencer: refused; nothing was changed"
        )
    verify_bytes(d, payload)
    if rev.kind == "data":
        derived = sorted({op.collection for op in rev.ops})
        if derived != d["collections"]:
            raise MalformedPayload(
                f"revision {rev.id[:12]} declares collections {d['collections']} but"
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
        if row is None:
            new[rev.id] = rev
    return new


def _check_parents(engine: Engine, new: dict[str, Revision]) -> None:
    """Every parent and dependency is known, and each hlc is above theirs."""
    for rev in new.values():
        for parent in [*rev.parents, *rev.descriptor["depends_on"]]:
            if parent in new:
                hlc = new[parent].hlc
            elif parent in engine.graph:
                hlc = engine.graph.get(parent).hlc
            else:
                raise MissingParent(rev.id, parent)
            if tuple(rev.hlc) <= tuple(hlc):
                raise MalformedPayload(
                    f"revision {rev.id[:12]} has hlc {list(rev.hlc)} not above its parent"
                    f" {parent[:12]}'s {list(hlc)}: refused"
                )


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
