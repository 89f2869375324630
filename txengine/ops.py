"""The op vocabulary: intent only, with inverses, write sets and pure semantics.

An op's outcome depends only on its own document, so ops are applied as pure
functions from a document state ``(doc, incarnation)`` to the next state.
Stores only read and write whole states; the SQL and MongoDB stores, bulk
replay and the in-memory overlay of an open transaction all share
:func:`apply_op`, which is what makes every replica compute the same result.

Values inside ops are relaxed Extended JSON (see :mod:`txengine.values`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .exceptions import InvalidInput, MalformedPayload, ReservedCollection, UnknownOp
from .values import check_key, from_ejson, key_text, to_ejson

SELF = "self"
"""The incarnation a document has inside the revision that created it."""

_COLLECTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

State = tuple[dict[str, Any] | None, str | None]
"""A document state: (document or None when missing, incarnation or None)."""


def check_collection(name: Any) -> str:
    """Return ``name`` after refusing reserved or malformed collection names."""
    if name in _CHECKED:
        return name
    if not isinstance(name, str):
        raise MalformedPayload(f"collection name {name!r} is not a string")
    if name.lower().startswith("txengine_") or name.startswith("system."):
        raise ReservedCollection(name)
    if not _COLLECTION.match(name):
        raise InvalidInput(
            f"collection name {name!r} is not valid: use letters, digits and _,"
            " starting with a letter or _ (at most 63 characters)"
        )
    if len(_CHECKED) < 1024:
        _CHECKED.add(name)
    return name


_CHECKED: set[str] = set()
"""Collection names that passed :func:`check_collection`: an app has few, and every op
of every revision from outside names one."""


def _check_fields(fields: Any, what: str) -> None:
    for name in fields:
        if (type(name) is not str or not name or name[0] == "$" or "." in name
                or "\x00" in name or name == "_id"):
            if name == "_id":
                raise InvalidInput(f"{what} cannot change _id: delete and insert instead")
            raise InvalidInput(
                f"field name {name!r} in {what} is not valid: top-level names only,"
                " without '.', NUL or a leading '$'"
            )


@dataclass(frozen=True)
class Insert:
    """Insert ``doc`` (its ``_id`` is the key); over an existing document, replace it.

    With ``cas`` (compare-and-set) it only creates a missing document: an
    existing one is left in place and recorded as a conflict.
    """

    collection: str
    doc: dict[str, Any]
    cas: bool = False

    @property
    def key(self) -> Any:
        return self.doc["_id"]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": "insert", "collection": self.collection, "doc": self.doc}
        if self.cas:
            out["cas"] = True
        return out

    def inverse(self) -> Op:
        return Delete(self.collection, self.key, expect=SELF, before=self.doc, cas=self.cas)


@dataclass(frozen=True)
class Update:
    """Set, unset and increment fields of the document ``key``.

    ``expect`` names the incarnation the update was written against; on another
    incarnation, or a missing document, the update does nothing and is recorded
    as a conflict. ``before`` holds the touched fields' values at write time
    (absent fields were missing), which is what the rendered downgrade uses.

    With ``cas`` (compare-and-set) ``before`` is also a condition, checked
    when the op is applied: each field of ``set`` and ``unset`` is written
    only where the document still holds its ``before`` value (absent from
    ``before``: the field must be missing); the others are left as they are
    and recorded as a conflict. ``inc`` still adds: counters commute.
    """

    collection: str
    key: Any
    set: dict[str, Any] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    inc: dict[str, Any] = field(default_factory=dict)
    expect: str | None = None
    before: dict[str, Any] | None = None
    cas: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": "update", "collection": self.collection, "key": self.key}
        if self.set:
            out["set"] = self.set
        if self.unset:
            out["unset"] = list(self.unset)
        if self.inc:
            out["inc"] = self.inc
        if self.expect is not None:
            out["expect"] = self.expect
        if self.before is not None:
            out["before"] = self.before
        if self.cas:
            out["cas"] = True
        return out

    def inverse(self) -> Op:
        """Return the op that undoes this one; a cas op's inverse expects its after-values."""
        before = self.before or {}
        restore = {f: before[f] for f in [*self.set, *self.unset] if f in before}
        drop = tuple(f for f in self.set if f not in before)
        inc = {f: _negate(v) for f, v in self.inc.items()}
        return Update(self.collection, self.key, set=restore, unset=drop, inc=inc,
                      expect=self.expect, before=dict(self.set) if self.cas else None,
                      cas=self.cas)


@dataclass(frozen=True)
class Delete:
    """Delete the document ``key`` if it still has the incarnation ``expect``.

    With ``cas`` (compare-and-set) it also needs the document to equal
    ``before`` whole; a changed document is left in place, as a conflict.
    """

    collection: str
    key: Any
    expect: str | None = None
    before: dict[str, Any] | None = None
    cas: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": "delete", "collection": self.collection, "key": self.key}
        if self.expect is not None:
            out["expect"] = self.expect
        if self.before is not None:
            out["before"] = self.before
        if self.cas:
            out["cas"] = True
        return out

    def inverse(self) -> Op:
        if self.before is None:
            raise InvalidInput(
                f"delete of {self.collection}/{self.key!r} has no before image to restore"
            )
        return Insert(self.collection, self.before, cas=self.cas)


Op = Insert | Update | Delete


def _negate(value: Any) -> Any:
    return to_ejson(-from_ejson(value))


def _number(value: Any, what: str) -> int | float:
    number = from_ejson(value)
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise InvalidInput(f"inc needs numbers, got {value!r} for {what}")
    return number


def _cas(value: Any, name: str, before: Any) -> bool:
    if not isinstance(value, bool):
        raise MalformedPayload(f"cas must be true or false, got {value!r}: omit it for a plain op")
    if value and name != "insert" and before is None:
        raise MalformedPayload(f"a cas {name} needs before: the values it expects to find")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedPayload(f"{what} must be an object, got {value!r}")
    return value


_OP_FIELDS = {
    "insert": {"op", "collection", "doc", "cas"},
    "update": {"op", "collection", "key", "set", "unset", "inc", "expect", "before", "cas"},
    "delete": {"op", "collection", "key", "expect", "before", "cas"},
}


def op_from_json(data: Any) -> Op:
    """Build an op from its JSON form, refusing anything malformed or reserved.

    Every op of every revision from outside passes here (a clone, 100,000 at
    a time), so the common case is a few type tests; messages are built only
    on failure.
    """
    if type(data) is not dict:
        raise MalformedPayload(f"an op must be a JSON object, got {data!r}")
    name = data.get("op")
    if type(name) is not str or name not in _OP_FIELDS:
        raise UnknownOp(name)
    fields = _OP_FIELDS[name]
    if not fields.issuperset(data):
        raise MalformedPayload(f"{name} op has unknown fields {sorted(set(data) - fields)}")
    collection = check_collection(data.get("collection"))
    cas = data.get("cas", False)
    if cas is not False:
        cas = _cas(cas, name, data.get("before"))
    if name == "insert":
        doc = data.get("doc")
        if type(doc) is not dict or "_id" not in doc:
            raise MalformedPayload("an insert needs a doc object with an _id")
        _check_fields([k for k in doc if k != "_id"], "doc")
        key = doc["_id"]
        checked = check_key(key)
        return Insert(collection, doc if checked is key else {**doc, "_id": checked}, cas)
    if "key" not in data:
        raise MalformedPayload(f"a {name} op needs a key")
    key = check_key(data["key"])
    expect = data.get("expect")
    if expect is not None and type(expect) is not str:
        raise MalformedPayload(f"expect must be an incarnation id (a string), got {expect!r}")
    before = data.get("before")
    if before is not None and type(before) is not dict:
        raise MalformedPayload(f"{name} before must be an object")
    if name == "delete":
        return Delete(collection, key, expect, before, cas)
    set_ = _dict(data.get("set"), "set")
    inc = _dict(data.get("inc"), "inc")
    unset = data.get("unset") or []
    if type(unset) is not list:
        raise MalformedPayload(f"unset must be a list of field names, got {unset!r}")
    _check_fields(set_, "set")
    if unset:
        _check_fields(unset, "unset")
    if inc:
        _check_fields(inc, "inc")
        for f, v in inc.items():
            _number(v, f)
    touched = len(set_) + len(unset) + len(inc)
    if not touched:
        raise InvalidInput("an update needs at least one field in set, unset or inc")
    if touched > 1 and len({*set_, *unset, *inc}) != touched:
        raise InvalidInput("an update may name each field once across set, unset and inc")
    return Update(collection, key, set_, tuple(unset), inc, expect, before, cas)


def op_from_trusted(data: dict[str, Any]) -> Op:
    """Build an op from JSON that already passed :func:`op_from_json` (no checks)."""
    name = data["op"]
    if name == "insert":
        return Insert(data["collection"], data["doc"], data.get("cas", False))
    if name == "update":
        return Update(data["collection"], data["key"], data.get("set") or {},
                      tuple(data.get("unset") or ()), data.get("inc") or {},
                      data.get("expect"), data.get("before"), data.get("cas", False))
    return Delete(data["collection"], data["key"], data.get("expect"), data.get("before"),
                  data.get("cas", False))


def write_key(op: Op) -> tuple[str, str]:
    """Return the (collection, key text) an op writes: the unit of conflict."""
    return op.collection, key_text(op.key)


def write_set(ops: list[Op]) -> list[tuple[str, str]]:
    """Return the distinct keys ``ops`` write, in first-touch order (derived, never trusted)."""
    seen: dict[tuple[str, str], None] = {}
    for op in ops:
        seen.setdefault(write_key(op), None)
    return list(seen)


class Outcome(NamedTuple):
    """The result of one op on one document state (a tuple: made once per op replayed)."""

    state: State
    conflict: str | None = None


def _matches(expect: str | None, incarnation: str | None, revision: str) -> bool:
    if expect is None:
        return True
    return (revision if expect == SELF else expect) == incarnation


def apply_op(op: Op, state: State, revision: str) -> Outcome:
    """Apply ``op`` to a document state inside revision ``revision``.

    Pure: the same op on the same state gives the same outcome on every peer.
    A compare-and-set op is checked here too, never where it was written, so a
    concurrent change its writer had not seen yet is kept on every peer alike.
    """
    if op.cas:
        return _apply_cas(op, state, revision)
    doc, incarnation = state
    if isinstance(op, Insert):
        conflict = "replaced an existing document" if doc is not None else None
        return Outcome((dict(op.doc), revision), conflict)
    if doc is None:
        return Outcome(state, f"{type(op).__name__.lower()} of a missing document")
    if not _matches(op.expect, incarnation, revision):
        return Outcome(state, "written against another incarnation")
    if isinstance(op, Delete):
        return Outcome((None, None))
    new = dict(doc)
    new.update(op.set)
    for f in op.unset:
        new.pop(f, None)
    for f, amount in op.inc.items():
        current = from_ejson(new.get(f, 0))
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            return Outcome(state, f"inc of non-numeric field {f!r}")
        new[f] = to_ejson(current + from_ejson(amount))
    return Outcome((new, incarnation))


def _same(a: Any, b: Any) -> bool:
    """Compare JSON values: numbers by value (1 == 1.0), booleans never equal to numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def holds(doc: dict[str, Any], expected: dict[str, Any], name: str) -> bool:
    """Say whether field ``name`` of ``doc`` is as ``expected`` has it (absent: missing)."""
    if name not in expected:
        return name not in doc
    return name in doc and _same(doc[name], expected[name])


def _apply_cas(op: Op, state: State, revision: str) -> Outcome:
    """Apply a compare-and-set op: write only where the document holds what it expects.

    What is left alone is a conflict (audited with the op and the document it
    met, like any other); an update still writes the fields that do hold.
    """
    doc, incarnation = state
    if isinstance(op, Insert):
        if doc is not None:
            return Outcome(state, "compare-and-set: an existing document was left in place")
        return Outcome((dict(op.doc), revision))
    if doc is None:
        return Outcome(state, f"{type(op).__name__.lower()} of a missing document")
    if not _matches(op.expect, incarnation, revision):
        return Outcome(state, "written against another incarnation")
    if isinstance(op, Delete):
        if op.before is None or not _same(doc, op.before):
            return Outcome(state, "compare-and-set: a changed document was left in place")
        return Outcome((None, None))
    expected = op.before or {}
    changed = [f for f in (*op.set, *op.unset) if not holds(doc, expected, f)]
    kept = Update(op.collection, op.key, {f: v for f, v in op.set.items() if f not in changed},
                  tuple(f for f in op.unset if f not in changed), op.inc, op.expect)
    if not changed:
        return apply_op(kept, state, revision)
    reason = f"compare-and-set: changed fields {changed} were left in place"
    if not (kept.set or kept.unset or kept.inc):
        return Outcome(state, reason)
    outcome = apply_op(kept, state, revision)
    return outcome if outcome.conflict else Outcome(outcome.state, reason)
