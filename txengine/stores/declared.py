"""Declared SQL tables: a table the app declared, used as a collection as it is.

An authored revision may create a table named like a collection
(``op.schema.create_table("customers", sa.Column("id", sa.Integer,
primary_key=True), sa.Column("name", sa.String))``). The SQL store then
keeps that collection's documents in it, column for field: the single-column
primary key plays ``_id``, every other column is the field of the same name,
and NULL is a missing field.

What a row cannot say lives in the bookkeeping table ``txengine_keys``, one
small row per document, written in the same transaction: the document's
partition, its incarnation, and which fields hold an explicit ``null`` (so
``{"x": None}`` and ``{}`` stay different documents, as in a JSON table).

Checks come before changes. A table whose constraints couple documents
(UNIQUE beyond the key, cascading foreign keys in either direction, triggers,
PostgreSQL exclusion constraints) is refused when it is resolved, and a
document that a row cannot hold exactly (a field with no column, a value of
the wrong type, a decimal the column would round) is refused before any
statement of its group runs: every peer must read back the very value that
the payload carries, so that replay and convergence hold.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from bson import Decimal128
from sqlalchemy.engine.interfaces import ReflectedForeignKeyConstraint

from ..exceptions import StoreError
from ..values import MAX_SAFE_INT, from_ejson, key_text, to_ejson

KEYS_TABLE = "txengine_keys"
"""The bookkeeping table: (collection, _partition, _key) -> incarnation, nulls."""

_COUPLING = "an op's outcome must depend only on its own document"
_CASCADES = {"CASCADE", "SET NULL", "SET DEFAULT"}
_INT_RANGES = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}
_UTC = _dt.UTC


def keys_table(metadata: sa.MetaData) -> sa.Table:
    """Return the bookkeeping table's definition inside ``metadata``."""
    return sa.Table(
        KEYS_TABLE, metadata,
        sa.Column("collection", sa.String(200), primary_key=True),
        sa.Column("_partition", sa.String(200), primary_key=True),
        sa.Column("_key", sa.String(400), primary_key=True),
        sa.Column("incarnation", sa.String(80)),
        sa.Column("nulls", sa.Text),
    )


# -- column codecs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """How one column holds a field: Extended JSON value <-> driver value."""

    column: str
    sql_type: str
    nullable: bool
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]
    placeholder: str = "{}"
    """Wraps the driver placeholder (``CAST({} AS JSONB)`` for PostgreSQL JSON)."""


class _Refused(ValueError):
    """A value the column cannot hold exactly (becomes a StoreError naming the document)."""


def _int_codec(kind: str, is_pg: bool) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    low, high = _INT_RANGES[kind if is_pg else "bigint"]

    def encode(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"$numberLong"}:
            value = from_ejson(value)
        if type(value) is not int:
            raise _Refused("needs an integer")
        if not low <= value <= high:
            raise _Refused(f"is outside the column's range {low}..{high}")
        return value

    return encode, lambda v: to_ejson(int(v))


def _as_json_number(value: float) -> Any:
    """Return a float as the payload would carry it (RFC 8785 writes 2.0 as 2)."""
    if value.is_integer() and abs(value) <= MAX_SAFE_INT:
        return int(value)
    return value


def _float_codec(single: bool) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    def encode(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Refused("needs a number")
        number = float(value)
        if number != value:
            raise _Refused("cannot be held exactly by a floating-point column")
        if single and struct.unpack("f", struct.pack("f", number))[0] != number:
            raise _Refused("cannot be held exactly by a single-precision (REAL) column")
        return number

    return encode, lambda v: _as_json_number(float(v))


def _decimal_text(value: Any) -> str:
    if not (isinstance(value, dict) and set(value) == {"$numberDecimal"}):
        raise _Refused("needs a Decimal ($numberDecimal)")
    text = value["$numberDecimal"]
    if not decimal.Decimal(text).is_finite():
        raise _Refused("is not a finite decimal")
    return str(text)


def _decode_decimal(value: Any) -> Any:
    if isinstance(value, float):
        value = decimal.Decimal(repr(value))
    elif not isinstance(value, decimal.Decimal):
        value = decimal.Decimal(str(value))
    return {"$numberDecimal": str(Decimal128(value))}


def _numeric_codec(scale: int | None, is_pg: bool
                   ) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """Decimals: exact on PostgreSQL; on SQLite only what an INTEGER or REAL holds exactly.

    SQLite's NUMERIC affinity stores numbers as INTEGER or REAL, so "19.90"
    would come back as 19.9; such values are refused rather than changed.
    """

    def encode(value: Any) -> Any:
        text = _decimal_text(value)
        number = decimal.Decimal(text)
        stored: decimal.Decimal | int | float
        if is_pg:
            stored = number.quantize(decimal.Decimal(1).scaleb(-scale)) if scale is not None \
                else (number.quantize(decimal.Decimal(1)) if number.as_tuple().exponent > 0  # type: ignore[operator]
                      else number)
        elif number == number.to_integral_value() and abs(number) < 2**63:
            stored = int(number)
        else:
            stored = float(number)
        if _decode_decimal(stored)["$numberDecimal"] != text:
            raise _Refused(f"would be stored as {_decode_decimal(stored)['$numberDecimal']}"
                           " (use a String column, or a JSON document table, for exact decimals)")
        return stored

    return encode, _decode_decimal


def _datetime_codec(is_pg: bool, timezone: bool
                    ) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    def encode(value: Any) -> Any:
        if not (isinstance(value, dict) and set(value) == {"$date"}):
            raise _Refused("needs a datetime ($date)")
        try:
            moment = from_ejson(value)
        except (OverflowError, ValueError) as exc:
            raise _Refused(f"is not a representable datetime ({exc})") from exc
        if not isinstance(moment, _dt.datetime):
            raise _Refused("needs a datetime ($date)")
        naive = moment.astimezone(_UTC).replace(tzinfo=None)
        if not is_pg:  # SQLAlchemy's SQLite storage format, so the app reads it back
            return naive.strftime("%Y-%m-%d %H:%M:%S.%f")
        return moment.astimezone(_UTC) if timezone else naive

    def decode(value: Any) -> Any:
        if isinstance(value, str):
            value = _dt.datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = value.replace(tzinfo=_UTC)
        return to_ejson(value.astimezone(_UTC))

    return encode, decode


def _string_codec(length: int | None) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    def encode(value: Any) -> Any:
        if not isinstance(value, str):
            raise _Refused("needs a string")
        if length is not None and len(value) > length:
            raise _Refused(f"is longer than the column's {length} characters")
        return value

    return encode, str


def _bool_encode(value: Any) -> Any:
    if not isinstance(value, bool):
        raise _Refused("needs true or false")
    return value


def _binary_encode(value: Any) -> Any:
    if not (isinstance(value, dict) and set(value) == {"$binary"}):
        raise _Refused("needs bytes ($binary)")
    data = from_ejson(value)
    if not isinstance(data, bytes):
        raise _Refused("needs bytes of binary subtype 00")
    return data


def _json_decode(value: Any) -> Any:
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def codec_for(column: sa.Column[Any], is_pg: bool) -> Codec | None:
    """Return the codec of a reflected column, or None when its type has no JSON value."""
    kind = column.type
    wrap = "{}"
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]
    if isinstance(kind, sa.Boolean):
        encode, decode = _bool_encode, bool
    elif isinstance(kind, sa.Integer):
        size = ("smallint" if isinstance(kind, sa.SmallInteger) else
                "bigint" if isinstance(kind, sa.BigInteger) else "integer")
        encode, decode = _int_codec(size, is_pg)
    elif isinstance(kind, sa.Float):
        single = is_pg and (isinstance(kind, sa.REAL) or (kind.precision or 53) <= 24)
        encode, decode = _float_codec(single)
    elif isinstance(kind, sa.Numeric):
        encode, decode = _numeric_codec(kind.scale, is_pg)
    elif isinstance(kind, sa.DateTime):
        encode, decode = _datetime_codec(is_pg, bool(kind.timezone))
    elif isinstance(kind, sa.JSON):
        encode, decode = _dump_json, _json_decode
        if is_pg:
            wrap = f"CAST({{}} AS {'JSONB' if type(kind).__name__ == 'JSONB' else 'JSON'})"
    elif isinstance(kind, sa.String):
        encode, decode = _string_codec(kind.length)
    elif isinstance(kind, sa.LargeBinary):
        encode, decode = _binary_encode, lambda v: to_ejson(bytes(v))
    else:
        return None
    return Codec(column.name, str(kind), bool(column.nullable), encode, decode, wrap)


def _dump_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# -- the declared table ------------------------------------------------------------------


@dataclass
class DeclaredTable:
    """A declared table resolved for use as a collection."""

    name: str
    key: Codec
    key_kind: type
    fields: dict[str, Codec]
    refusal: str | None = None
    """Why the table may not be synced (one line), or None."""
    partition: str | None = None
    """The partition whose documents it holds, once known."""
    sql: dict[str, str] = field(default_factory=dict)

    def key_value(self, text: str) -> Any:
        """Return the primary-key value of a key text, refusing key types it cannot hold."""
        key = json.loads(text)
        if isinstance(key, dict) and set(key) == {"$numberLong"}:
            key = int(key["$numberLong"])
        if type(key) is not self.key_kind:
            raise StoreError(
                f"declared table {self.name!r} keys its documents by {self.key.column!r}"
                f" ({self.key.sql_type}), which cannot hold the key {text}: use"
                f" {self.key_kind.__name__} keys in collection {self.name!r}")
        try:
            return self.key.encode(to_ejson(key))
        except _Refused as exc:
            raise StoreError(f"key {text} of declared table {self.name!r} {exc}") from exc

    def key_text_of(self, value: Any) -> str:
        """Return the key text of a primary-key value read back from the table."""
        return key_text(self.key.decode(value))

    def encode(self, text: str, doc: dict[str, Any]) -> tuple[list[Any], str | None]:
        """Return the row values (fields in column order) and the explicit-null fields."""
        values: dict[str, Any] = {}
        nulls = []
        for name, value in doc.items():
            if name == "_id":
                continue
            codec = self.fields.get(name)
            if codec is None:
                raise StoreError(
                    f"field {name!r} of {self.name}/{text} has no column in declared table"
                    f" {self.name!r} (columns: {', '.join(self.fields) or 'none'}): add the"
                    " column with an authored revision, or drop the field")
            if value is None:
                nulls.append(name)
                continue
            try:
                values[name] = codec.encode(value)
            except _Refused as exc:
                raise StoreError(
                    f"field {name!r} of {self.name}/{text}: the value {json.dumps(value)}"
                    f" {exc} ({self.name}.{name} is {codec.sql_type})") from exc
        row = []
        for name, codec in self.fields.items():
            if name not in values and not codec.nullable:
                raise StoreError(
                    f"field {name!r} of {self.name}/{text} is missing or null, but column"
                    f" {self.name}.{name} is NOT NULL")
            row.append(values.get(name))
        return row, (_dump_json(nulls) if nulls else None)

    def decode(self, key: Any, row: tuple[Any, ...], nulls: str | None) -> dict[str, Any]:
        """Return the Extended JSON document of one row."""
        doc: dict[str, Any] = {"_id": self.key.decode(key)}
        explicit = json.loads(nulls) if nulls else ()
        for (name, codec), value in zip(self.fields.items(), row, strict=True):
            if value is not None:
                doc[name] = codec.decode(value)
            elif name in explicit:
                doc[name] = None
        return doc


def resolve(conn: sa.Connection, name: str) -> DeclaredTable:
    """Reflect the declared table ``name``; record why it may not be synced, if so."""
    is_pg = conn.dialect.name == "postgresql"
    inspector = sa.inspect(conn)
    table = sa.Table(name, sa.MetaData(), autoload_with=conn)
    pk = list(table.primary_key.columns)
    if len(pk) != 1:
        raise StoreError(
            f"table {name!r} is not a txengine document table and its primary key has"
            f" {len(pk)} columns: a declared table needs a single-column primary key to play"
            " _id")
    key = codec_for(pk[0], is_pg)
    if key is None or not isinstance(pk[0].type, (sa.Integer, sa.String)) \
            or isinstance(pk[0].type, sa.Boolean):
        raise StoreError(
            f"primary key {name}.{pk[0].name} is {pk[0].type}: a declared table's key must be"
            " an integer or string column")
    fields = {}
    for column in table.columns:
        if column is pk[0]:
            continue
        codec = codec_for(column, is_pg)
        if codec is None:
            raise StoreError(
                f"column {name}.{column.name} is {column.type}, which txengine cannot map to"
                " a JSON value: use Integer, Float, Numeric, String, Text, Boolean, DateTime,"
                " LargeBinary or JSON")
        fields[column.name] = codec
    declared = DeclaredTable(name, key, int if isinstance(pk[0].type, sa.Integer) else str,
                             fields)
    declared.refusal = coupling(conn, inspector, name, pk[0].name)
    return declared


def coupling(conn: sa.Connection, inspector: sa.Inspector, name: str, key: str) -> str | None:
    """Return a one-line reason when ``name`` has a constraint that couples documents."""
    found = _coupling_constraint(conn, inspector, name, key)
    if found is None:
        return None
    return (f"table {name!r} is refused for sync: {found} couples documents, and {_COUPLING};"
            " drop it with an authored revision, or keep the table out of sync")


def _coupling_constraint(conn: sa.Connection, inspector: sa.Inspector, name: str,
                         key: str) -> str | None:
    for unique in inspector.get_unique_constraints(name):
        if unique["column_names"] != [key]:
            return (f"UNIQUE constraint {_named(unique.get('name'))}on"
                    f" ({', '.join(unique['column_names'])})")
    for index in inspector.get_indexes(name):
        if index.get("unique") and list(index["column_names"]) != [key]:
            columns = ", ".join(str(c) for c in index["column_names"])
            return f"unique index {_named(index.get('name'))}on ({columns})"
    for fk in inspector.get_foreign_keys(name):
        rule = _cascade(fk)
        if rule:
            return (f"foreign key {_named(fk.get('name'))}({', '.join(fk['constrained_columns'])})"
                    f" -> {fk['referred_table']} with {rule}")
    for other in inspector.get_table_names():
        if other == name:
            continue
        for fk in inspector.get_foreign_keys(other):
            rule = _cascade(fk)
            if fk["referred_table"] == name and rule:
                return (f"foreign key {_named(fk.get('name'))}{other}"
                        f"({', '.join(fk['constrained_columns'])}) -> {name} with {rule}")
    if conn.dialect.name == "postgresql":
        regclass = conn.dialect.identifier_preparer.quote(name)
        trigger = conn.execute(sa.text(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND NOT tgisinternal"
            " ORDER BY tgname LIMIT 1"), {"t": regclass}).scalar()
        if trigger:
            return f"trigger {trigger!r}"
        exclusion = conn.execute(sa.text(
            "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(:t)"
            " AND contype = 'x' ORDER BY conname LIMIT 1"), {"t": regclass}).scalar()
        if exclusion:
            return f"exclusion constraint {exclusion!r}"
    elif conn.dialect.name == "sqlite":
        trigger = conn.execute(sa.text(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :t"
            " ORDER BY name LIMIT 1"), {"t": name}).scalar()
        if trigger:
            return f"trigger {trigger!r}"
    return None


def _named(name: str | None) -> str:
    return f"{name!r} " if name else ""


def _cascade(fk: ReflectedForeignKeyConstraint) -> str | None:
    options = fk.get("options") or {}
    for action in ("ondelete", "onupdate"):
        rule = str(options.get(action) or "").upper()
        if rule in _CASCADES:
            return f"ON {action[2:].upper()} {rule}"
    return None
