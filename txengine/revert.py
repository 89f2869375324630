"""Revert as compare-and-set ops, and re-pointing ``expect`` after an epoch change.

``revert REV`` is the distributed undo: each op restores REV's before-value
only where the document still holds REV's after-value, so later changes by
others are not wiped out. The ops carry ``cas``, so that condition is checked
again wherever they are applied (:func:`txengine.ops.apply_op`): a concurrent
change the reverting peer had not received yet survives on every peer alike.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .ops import Delete, Insert, Op, Update, holds
from .values import from_ejson, key_text, to_ejson

if TYPE_CHECKING:
    from .transaction import Transaction


def remap_expect(op: Op, mapping: dict[str, str]) -> Op:
    """Point an op's ``expect`` at the re-issued id of the revision it named."""
    if not isinstance(op, Insert) and op.expect in mapping:
        return dataclasses.replace(op, expect=mapping[op.expect])
    return op


def revert_ops(tx: Transaction, rev_id: str, op: Op, prior: dict[Any, Any]) -> list[Op]:
    """Return compare-and-set ops that undo ``op`` of ``rev_id`` where it still holds.

    What this peer already sees changed is left out, so reverting twice writes
    nothing; each op's ``before`` is what it expects to find when applied.
    ``inc`` is undone by the opposite ``inc``, unconditionally: counters commute.
    """
    tx.get(op.collection, from_ejson(op.key))
    k = (op.collection, key_text(op.key))
    current, state_inc = tx._overlay[(tx.partition, *k)]
    if isinstance(op, Insert):
        if current is None or state_inc != rev_id:
            return []
        remove = Delete(op.collection, op.key, expect=rev_id, before=current, cas=True)
        replaced = prior.get(k)
        return [remove] if replaced is None else [remove, Insert(op.collection, replaced, cas=True)]
    if isinstance(op, Delete):
        if current is not None or op.before is None:
            return []
        return [Insert(op.collection, op.before, cas=True)]
    if current is None:
        return []
    before = op.before or {}
    set_ = {f: before[f] for f in op.set if f in before and holds(current, op.set, f)}
    unset = [f for f in op.set if f not in before and holds(current, op.set, f)]
    set_.update({f: before[f] for f in op.unset if f in before and f not in current})
    inc = {f: to_ejson(-from_ejson(v)) for f, v in op.inc.items()}
    if not (set_ or unset or inc):
        return []
    touched = [*set_, *unset, *inc]
    return [Update(op.collection, op.key, set=set_, unset=tuple(unset), inc=inc,
                   expect=state_inc, before={f: current[f] for f in touched if f in current},
                   cas=True)]
