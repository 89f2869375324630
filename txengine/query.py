"""The filter language of ``peer.find``: a small part of MongoDB's, the same on every store.

Accepted: equality on fields and dotted paths (``{"a.b": 1}``), and the
operators ``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte``, ``$in`` and
``$exists``. Everything else (``$or``, ``$regex``, equality with a whole
embedded document, whose field order JSONB does not keep, ...) raises
:class:`UnsupportedFilter`, one line naming what to use instead.

One parse, two executions: on MongoDB the filter passes through to the server
(values decoded from Extended JSON to BSON); on SQL stores it is evaluated
here, over the Extended JSON documents, with MongoDB's semantics:

- a path through an array looks into each element that is a document
  (and a numeric part also indexes the array); a leaf array matches when it
  equals the value or one of its elements does;
- ``{f: null}`` and ``$eq: null`` match a missing field; ``$ne`` is the
  negation of ``$eq``, so ``$ne`` matches a missing field;
- ``$gt`` and friends compare only values of the same type bracket
  (numbers with numbers, whatever their BSON type; strings by code point;
  dates; ObjectIds; binary by length, subtype, bytes; booleans): ``{"n":
  {"$gt": 1}}`` never matches a string;
- numbers compare exactly across int, double and Decimal128; booleans are
  not numbers.
"""

from __future__ import annotations

import datetime as _dt
import decimal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bson import Binary, Decimal128, ObjectId

from .exceptions import InvalidInput
from .values import from_ejson, key_text, to_ejson

OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$exists")
_RANGE = ("$gt", "$gte", "$lt", "$lte")
_TAGS = {"$oid", "$numberLong", "$numberDecimal", "$date", "$binary"}
_MISSING = object()


class UnsupportedFilter(InvalidInput):
    """A ``find`` filter outside the language every store can answer the same way."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(
            f"unsupported filter: {what}; use equality on fields or dotted paths and"
            f" {', '.join(OPERATORS)}")


@dataclass(frozen=True)
class Condition:
    """One test on one path: ``op`` is one of :data:`OPERATORS`; ``value`` is Extended JSON."""

    path: str
    op: str
    value: Any


def _is_tagged(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _TAGS


def _check_scalar(path: str, op: str, value: Any, arrays: bool) -> None:
    if isinstance(value, list):
        if not arrays:
            raise UnsupportedFilter(f"{op} on {path!r} takes a single value, not an array")
        for item in value:
            _check_scalar(path, op, item, arrays=False)
        return
    if isinstance(value, dict) and not _is_tagged(value):
        raise UnsupportedFilter(f"{op} on {path!r} with an embedded document (compare its"
                                " fields with dotted paths)")


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise UnsupportedFilter(f"field {path!r} is not a field name")
    if path.startswith("$"):
        raise UnsupportedFilter(f"operator {path!r} at the top level")
    parts = path.split(".")
    if any(not p or p.startswith("$") for p in parts):
        raise UnsupportedFilter(f"field path {path!r}")
    if parts[0].startswith("_txengine"):
        raise UnsupportedFilter(f"field {path!r} is txengine's own")
    return path


def parse(filter: Any) -> list[Condition]:
    """Return the conditions of a filter (Python values or Extended JSON), or raise."""
    if filter is None:
        return []
    wanted = to_ejson(filter)
    if not isinstance(wanted, dict):
        raise UnsupportedFilter(f"a filter must be a dict of field: condition, not {filter!r}")
    out = []
    for path, spec in wanted.items():
        _check_path(path)
        if isinstance(spec, dict) and not _is_tagged(spec):
            if not spec or not all(k.startswith("$") for k in spec):
                raise UnsupportedFilter(
                    f"equality of {path!r} with an embedded document (compare its fields"
                    " with dotted paths)")
            for op, value in spec.items():
                out.append(_condition(path, op, value))
        else:
            out.append(_condition(path, "$eq", spec))
    return out


def _condition(path: str, op: str, value: Any) -> Condition:
    if op not in OPERATORS:
        raise UnsupportedFilter(f"operator {op!r} on {path!r}")
    if op == "$exists":
        if not isinstance(value, bool):
            raise UnsupportedFilter(f"$exists on {path!r} takes true or false")
    elif op == "$in":
        if not isinstance(value, list):
            raise UnsupportedFilter(f"$in on {path!r} takes an array")
        for item in value:
            _check_scalar(path, op, item, arrays=False)
    elif op in _RANGE:
        _check_scalar(path, op, value, arrays=False)
        if value is None:
            raise UnsupportedFilter(f"{op} on {path!r} with null")
    else:
        _check_scalar(path, op, value, arrays=True)
    return Condition(path, op, value)


# -- MongoDB ---------------------------------------------------------------------------------


def to_mongo(conditions: list[Condition]) -> dict[str, Any]:
    """Return the MongoDB filter of parsed conditions (BSON values)."""
    from .stores.mongo import to_bson

    out: dict[str, dict[str, Any]] = {}
    for c in conditions:
        value = to_bson(c.value) if not isinstance(c.value, bool) else c.value
        out.setdefault(c.path, {})[c.op] = value
    return out


# -- evaluation in Python --------------------------------------------------------------------


def _bracket(value: Any) -> int:
    """Return MongoDB's comparison-order bracket of a (decoded) value."""
    if value is None:
        return 1
    if isinstance(value, bool):
        return 8
    if isinstance(value, (int, float, Decimal128, decimal.Decimal)):
        return 2
    if isinstance(value, str):
        return 3
    if isinstance(value, dict):
        return 4
    if isinstance(value, list):
        return 5
    if isinstance(value, bytes):
        return 6
    if isinstance(value, ObjectId):
        return 7
    if isinstance(value, _dt.datetime):
        return 9
    return 99


def _sort_value(value: Any) -> Any:
    if isinstance(value, Decimal128):
        return value.to_decimal()
    if isinstance(value, bytes):
        subtype = value.subtype if isinstance(value, Binary) else 0
        return (len(value), subtype, bytes(value))
    if isinstance(value, ObjectId):
        return value.binary
    return value


def _equal(a: Any, b: Any) -> bool:
    if _bracket(a) != _bracket(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    return bool(_sort_value(a) == _sort_value(b))


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": lambda a, b: a > b, "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b, "$lte": lambda a, b: a <= b,
}


def _compare(op: str, a: Any, b: Any) -> bool:
    if _bracket(a) != _bracket(b) or isinstance(a, (list, dict)):
        return False
    return _COMPARE[op](_sort_value(a), _sort_value(b))


def _walk(value: Any, parts: list[str], found: list[Any]) -> bool:
    """Collect the values a dotted path reaches, MongoDB style; return True if a branch misses.

    A document without the field is a missing branch (``{f: null}`` matches
    it); an array contributes its document elements only, so ``{"a.b": null}``
    does not match ``{"a": []}``, as on MongoDB.
    """
    if not parts:
        found.append(value)
        return False
    head, rest = parts[0], parts[1:]
    if isinstance(value, dict):
        if head in value:
            return _walk(value[head], rest, found)
        return True
    if isinstance(value, list):
        missing = False
        if head.isdigit() and int(head) < len(value):
            missing = _walk(value[int(head)], rest, found)
        for item in value:
            if isinstance(item, dict):
                missing = _walk(item, parts, found) or missing
        return missing
    return True


def _eq_any(found: list[Any], missing: bool, value: Any) -> bool:
    if value is None and missing:
        return True
    for x in found:
        if _equal(x, value):
            return True
        if isinstance(x, list) and any(_equal(e, value) for e in x):
            return True
    return False


def _holds(c: Condition, found: list[Any], missing: bool, value: Any) -> bool:
    if c.op == "$exists":
        return bool(found) == value
    if c.op == "$eq":
        return _eq_any(found, missing, value)
    if c.op == "$ne":
        return not _eq_any(found, missing, value)
    if c.op == "$in":
        return any(_eq_any(found, missing, v) for v in value)
    for x in found:
        items = x if isinstance(x, list) else [x]
        if any(_compare(c.op, e, value) for e in items):
            return True
    return False


def matcher(conditions: list[Condition]) -> Callable[[dict[str, Any]], bool]:
    """Return a predicate over Extended JSON documents with MongoDB's semantics."""
    decoded = [(c, c.path.split("."), from_ejson(c.value)) for c in conditions]

    def matches(doc: dict[str, Any]) -> bool:
        value = from_ejson(doc)
        for c, parts, wanted in decoded:
            found: list[Any] = []
            missing = _walk(value, parts, found)
            if not _holds(c, found, missing, wanted):
                return False
        return True

    return matches


def find(store: Any, partition: str, collection: str, filter: Any) -> list[dict[str, Any]]:
    """Return the Extended JSON documents of ``collection`` that match ``filter``, by key."""
    conditions = parse(filter)
    if store.kind == "mongo":
        docs = store.find_documents(partition, collection, to_mongo(conditions))
    else:
        matches = matcher(conditions)
        docs = [d for d in store.documents(partition, collection) if matches(d)]
    docs.sort(key=lambda d: key_text(d["_id"]))
    return docs
