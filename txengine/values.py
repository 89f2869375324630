"""Values as bytes: relaxed Extended JSON and canonical JSON (RFC 8785).

Payloads hold MongoDB *relaxed* Extended JSON so that every store kind reads
the same bytes: plain JSON where JSON suffices (SQL stores can then filter it
natively), ``$oid``, ``$date``, ``$numberDecimal``, ``$binary`` and
``$numberLong`` (beyond ±2^53) otherwise.

Canonical bytes follow RFC 8785. ``json.dumps(sort_keys=True)`` produces the
same bytes whenever the value holds no float and no key outside the Basic
Multilingual Plane (Python sorts keys by code point, RFC 8785 by UTF-16 unit,
and the two orders agree inside the BMP); otherwise the ``rfc8785`` reference
encoder is used. A test checks byte equality with the reference.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import json
import math
import re
from typing import Any

import orjson
import rfc8785
from bson import Binary, Decimal128, ObjectId

from .exceptions import InvalidKey, MalformedPayload

MAX_SAFE_INT = 2**53 - 1
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_DUMPS = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


_NON_BMP = re.compile("[\U00010000-\U0010FFFF]")


def _needs_reference(value: Any) -> bool:
    """Return True when fast ``json.dumps`` could differ from RFC 8785."""
    kind = type(value)
    if kind is dict:
        for k, v in value.items():
            if not k.isascii() and _NON_BMP.search(k):
                return True
            vk = type(v)
            if vk is list:  # inline: descriptors hold several short lists of strings
                for x in v:
                    xk = type(x)
                    if xk is float or ((xk is dict or xk is list) and _needs_reference(x)):
                        return True
            elif vk is float or (vk is dict and _needs_reference(v)):
                return True
        return False
    if kind is list:
        for v in value:
            vk = type(v)
            if vk is float or ((vk is dict or vk is list) and _needs_reference(v)):
                return True
        return False
    return isinstance(value, float)


def _big_ints_as_floats(value: Any) -> Any:
    """Turn integers beyond ±(2^53-1) back into the floats they were decoded from.

    RFC 8785 writes a whole float such as 1e20 as bare digits, which JSON
    parsers read back as an integer; the reference encoder refuses integers
    that large, so give it the float, whose digits are the same.
    """
    kind = type(value)
    if kind is int and not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        as_float = float(value)
        if as_float != value:
            raise MalformedPayload(f"integer {value} is too large for JSON: use $numberLong")
        return as_float
    if kind is dict:
        return {k: _big_ints_as_floats(v) for k, v in value.items()}
    if kind is list:
        return [_big_ints_as_floats(v) for v in value]
    return value


def canonical(value: Any) -> bytes:
    """Encode a JSON value (already Extended JSON) as RFC 8785 canonical bytes."""
    if _needs_reference(value):
        try:
            return rfc8785.dumps(_big_ints_as_floats(value))
        except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
            raise MalformedPayload(f"value cannot be encoded as canonical JSON: {exc}") from exc
    try:
        # orjson writes what the json module does here (same escapes, keys in
        # code point order) at a tenth of the cost: every digest goes through it.
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        pass  # integers beyond 64 bits, lone surrogates: the json module decides
    try:
        return _DUMPS(value).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise MalformedPayload(f"value cannot be encoded as canonical JSON: {exc}") from exc


def encoded_size(value: Any) -> int:
    """Return the byte length of ``value``'s canonical JSON without sorting or checking it.

    Key order does not change the length, and for what a descriptor may hold
    (strings, integers, lists of strings) orjson writes the canonical bytes:
    a size limit need not pay for the canonical form twice.
    """
    try:
        return len(orjson.dumps(value))
    except (orjson.JSONEncodeError, TypeError):
        return len(canonical(value))


def dumps(value: Any) -> str:
    """Encode JSON for storage (undo records, documents): fast, not canonical.

    orjson is ten times faster than the json module on the bulk replay path;
    integers beyond 64 bits (whole floats such as 1e20, read back) fall back
    to the json module.
    """
    try:
        return orjson.dumps(value).decode("utf-8")
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def loads(data: bytes | str) -> Any:
    """Decode JSON (payloads, undo records, documents), falling back as :func:`dumps` does."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def sha256(data: bytes) -> str:
    """Return the hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _date_to_ejson(value: _dt.datetime) -> dict[str, Any]:
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.UTC)
    delta = value - _EPOCH
    millis = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    if 0 <= millis < 253402300800000:
        whole = _EPOCH + _dt.timedelta(milliseconds=millis)
        return {"$date": whole.strftime("%Y-%m-%dT%H:%M:%S.") + f"{millis % 1000:03d}Z"}
    return {"$date": {"$numberLong": str(millis)}}


def to_ejson(value: Any) -> Any:
    """Convert Python values to relaxed Extended JSON (plain JSON types only).

    Datetimes are truncated to milliseconds, as BSON keeps them, so the value a
    writer applies is the value every replica will apply.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            return value
        return {"$numberLong": str(value)}
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise MalformedPayload(f"{value!r} is not a JSON number: use null or a string")
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise MalformedPayload(f"field name {k!r} is not a string")
            out[k] = to_ejson(v)
        return out
    if isinstance(value, (list, tuple)):
        return [to_ejson(v) for v in value]
    if isinstance(value, ObjectId):
        return {"$oid": str(value)}
    if isinstance(value, _dt.datetime):
        return _date_to_ejson(value)
    if isinstance(value, Decimal128):
        return {"$numberDecimal": str(value)}
    if isinstance(value, decimal.Decimal):
        return {"$numberDecimal": str(Decimal128(value))}
    if isinstance(value, (bytes, bytearray, Binary)):
        subtype = value.subtype if isinstance(value, Binary) else 0
        return {
            "$binary": {
                "base64": base64.b64encode(bytes(value)).decode("ascii"),
                "subType": f"{subtype:02x}",
            }
        }
    raise MalformedPayload(
        f"cannot store a value of type {type(value).__name__}: use JSON types, ObjectId,"
        " datetime, Decimal or bytes"
    )


def _from_special(value: dict[str, Any]) -> Any:
    (tag,) = value
    inner = value[tag]
    if tag == "$oid":
        return ObjectId(inner)
    if tag == "$numberLong":
        return int(inner)
    if tag == "$numberDecimal":
        return Decimal128(inner)
    if tag == "$date":
        if isinstance(inner, dict):
            millis = int(inner["$numberLong"])
        else:
            parsed = _dt.datetime.strptime(inner, "%Y-%m-%dT%H:%M:%S.%fZ")
            return parsed.replace(tzinfo=_dt.UTC)
        return _EPOCH + _dt.timedelta(milliseconds=millis)
    if tag == "$binary":
        data = base64.b64decode(inner["base64"])
        subtype = int(inner["subType"], 16)
        return data if subtype == 0 else Binary(data, subtype)
    return None


_TAGS = {"$oid", "$numberLong", "$numberDecimal", "$date", "$binary"}


def document_to_ejson(value: Any) -> Any:
    """:func:`to_ejson` for document content, refusing field names that start with ``$``.

    ``{"$oid": ...}`` and the like are Extended JSON's type tags: a field so
    named would come back as another type on every replica. (Query filters
    use ``$`` operators, so the check is not in :func:`to_ejson` itself.)
    """
    _check_names(value)
    return to_ejson(value)


def _check_names(value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and k.startswith("$"):
                raise MalformedPayload(f"field name {k!r} starts with '$', which Extended JSON"
                                       " reserves for type tags: rename the field")
            _check_names(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_names(v)


def from_ejson(value: Any) -> Any:
    """Convert relaxed Extended JSON back to Python values."""
    if isinstance(value, dict):
        if len(value) == 1:
            (tag,) = value
            if tag in _TAGS:
                try:
                    return _from_special(value)
                except (KeyError, TypeError, ValueError) as exc:
                    raise MalformedPayload(f"bad Extended JSON {value!r}: {exc}") from exc
        return {k: from_ejson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_ejson(v) for v in value]
    return value


def check_key(key: Any) -> Any:
    """Return ``key`` as Extended JSON after checking it is a str, int or ObjectId."""
    kind = type(key)
    if kind is str or (kind is int and -MAX_SAFE_INT <= key <= MAX_SAFE_INT):
        return key  # the common case, as it is
    if isinstance(key, bool) or not isinstance(key, (str, int, ObjectId, dict)):
        raise InvalidKey(key)
    if isinstance(key, dict):
        if set(key) not in ({"$oid"}, {"$numberLong"}):
            raise InvalidKey(key)
        from_ejson(key)
        return key
    return to_ejson(key)


def key_text(key_ejson: Any) -> str:
    """Return the canonical text of an Extended JSON key, as stored in key columns."""
    kind = type(key_ejson)
    if kind is int:
        return str(key_ejson)
    if kind is str:
        return _DUMPS(key_ejson)
    return canonical(key_ejson).decode("utf-8")
