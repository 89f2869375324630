"""The declared-table mapping without a database: codecs, keys, refusals."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from txengine.exceptions import StoreError
from txengine.stores.declared import DeclaredTable, codec_for
from txengine.values import to_ejson


def codec(column_type: sa.types.TypeEngine, is_pg: bool = False, nullable: bool = True):
    found = codec_for(sa.Column("c", column_type, nullable=nullable), is_pg)
    assert found is not None
    return found


def table(key_type: sa.types.TypeEngine = sa.Integer(), **fields) -> DeclaredTable:
    key = codec(key_type)
    return DeclaredTable("t", key, int if isinstance(key_type, sa.Integer) else str,
                         {name: codec(kind) for name, kind in fields.items()})


@pytest.mark.parametrize(("column_type", "is_pg", "value", "stored"), [
    (sa.Integer(), True, {"$numberLong": "9007199254740993"}, None),
    (sa.BigInteger(), True, {"$numberLong": "9007199254740993"}, 9007199254740993),
    (sa.Float(), False, 3, 3.0),
    (sa.Numeric(), False, {"$numberDecimal": "12.5"}, 12.5),
    (sa.Numeric(), False, {"$numberDecimal": "7"}, 7),
    (sa.Numeric(), True, {"$numberDecimal": "19.90"}, decimal.Decimal("19.90")),
    (sa.Numeric(), False, {"$numberDecimal": "19.90"}, None),
    (sa.Numeric(10, 2), True, {"$numberDecimal": "19.9"}, None),
    (sa.DateTime(), False, {"$date": "2024-01-02T03:04:05.123Z"}, "2024-01-02 03:04:05.123000"),
    (sa.DateTime(timezone=True), True, {"$date": "2024-01-02T03:04:05.123Z"},
     dt.datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=dt.UTC)),
    (sa.JSON(), False, {"a": [1]}, '{"a":[1]}'),
    (sa.LargeBinary(), False, to_ejson(b"\x00"), b"\x00"),
])
def test_codec_encodes_what_the_column_holds_exactly(column_type, is_pg, value, stored) -> None:
    """``None`` in ``stored`` means the value is refused (the column would change it)."""
    c = codec(column_type, is_pg)
    if stored is None:
        with pytest.raises(ValueError):
            c.encode(value)
        return
    assert c.encode(value) == stored
    assert c.decode(stored) == value


def test_postgresql_numeric_keeps_scale_and_real_refuses_what_float4_rounds() -> None:
    numeric = codec(sa.Numeric(10, 2), is_pg=True)
    assert str(numeric.encode({"$numberDecimal": "19.90"})) == "19.90"
    real = codec(postgresql.REAL(), is_pg=True)
    assert real.encode(0.5) == 0.5
    with pytest.raises(ValueError, match="single-precision"):
        real.encode(0.1)


def test_json_columns_cast_on_postgresql() -> None:
    assert codec(postgresql.JSONB(), is_pg=True).placeholder == "CAST({} AS JSONB)"
    assert codec(sa.JSON(), is_pg=True).placeholder == "CAST({} AS JSON)"
    assert codec(sa.JSON()).placeholder == "{}"


def test_unmappable_column_types_have_no_codec() -> None:
    assert codec_for(sa.Column("c", sa.Interval()), False) is None


def test_encode_keeps_explicit_nulls_apart_from_missing_fields() -> None:
    t = table(a=sa.String(), b=sa.String(), c=sa.String())
    row, nulls = t.encode("1", {"_id": 1, "a": "x", "b": None})
    assert row == ["x", None, None]
    assert nulls == '["b"]'
    assert t.decode(1, tuple(row), nulls) == {"_id": 1, "a": "x", "b": None}


def test_key_value_refuses_keys_the_column_cannot_hold() -> None:
    assert table().key_value("5") == 5
    assert table().key_value('{"$numberLong":"9007199254740993"}') == 9007199254740993
    assert table(sa.String(10)).key_value('"5"') == "5"
    with pytest.raises(StoreError, match="use str keys"):
        table(sa.String(10)).key_value("5")
    with pytest.raises(StoreError, match="longer than the column's 10 characters"):
        table(sa.String(10)).key_value('"' + "x" * 11 + '"')
