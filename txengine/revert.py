"""Revert as compare-and-set ops, and re-pointing ``expect`` after an epoch change.

``revert REV`` is the distributed undo: each op restores REV's before-value
only where the document still holds REV's after-value, so later changes by
others are not wiped out.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .ops import Delete, Insert, Op, Update
from .values import from_ejson, key_text, to_ejson

if TYPE_CHECKING:
    from .transaction import Transaction

_MISSING = object()


def remap_expect(op: Op, mapping: dict[str, str]) -> Op:
    """Point an op's ``expect`` at the re-issued id of the revision it named."""
    expect = getattr(op, "expect", None)
    if expect in mapping:
        return dataclasses.replace(op, expect=mapping[expect])  # type: ignore[type-var]
    return op


def revert_ops(tx: Transaction, rev_id: str, op: Op, prior: dict[Any, Any]) -> list[Op]:
    """Return compare-and-set ops that undo ``op`` of ``rev_id`` where it still holds."""
    doc = tx.get(op.collection, from_ejson(op.key))
    current = None if doc is None else to_ejson(doc)
    k = (op.collection, key_text(op.key))
    state_inc = tx._overlay.get((tx.partition, *k), (None, None))[1]
    if isinstance(op, Insert):
        if current is None or state_inc != rev_id:
            return []
        before = prior.get(k)
        if before is not None:
            return [Insert(op.collection, before)]
        return [Delete(op.collection, op.key, expect=rev_id, before=current)]
    if isinstance(op, Delete):
        if current is not None or op.before is None:
            return []
        return [Insert(op.collection, op.before)]
    if current is None:
        return []
    before = op.before or {}
    set_ = {f: before[f] for f in op.set if f in before and current.get(f, _MISSING) == op.set[f]}
    unset = [f for f in op.set if f not in before and current.get(f, _MISSING) == op.set[f]]
    set_.update({f: before[f] for f in op.unset if f in before and f not in current})
    inc = {f: to_ejson(-from_ejson(v)) for f, v in op.inc.items()}
    if not (set_ or unset or inc):
        return []
    touched = [*set_, *unset, *inc]
    return [Update(op.collection, op.key, set=set_, unset=tuple(unset), inc=inc,
                   expect=state_inc, before={f: current[f] for f in touched if f in current})]
