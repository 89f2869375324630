"""Values: canonical JSON equals RFC 8785 byte for byte; Extended JSON round trips."""

from __future__ import annotations

import datetime as dt
import decimal
import json

import pytest
import rfc8785
from bson import Binary, Decimal128, ObjectId
from hypothesis import given, settings
from hypothesis import strategies as st

from txengine.exceptions import MalformedPayload
from txengine.values import canonical, document_to_ejson, from_ejson, to_ejson

keys = st.text(max_size=6) | st.sampled_from(["\U0001f600", "\ue000", "a\U00010000", "\u20ac"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=1500, deadline=None)
@given(value=json_values)
def test_canonical_equals_the_rfc8785_reference_byte_for_byte(value) -> None:
    assert canonical(value) == rfc8785.dumps(value)


def test_canonical_sorts_non_bmp_keys_by_utf16_units_as_rfc8785_does() -> None:
    value = {"\U0001f600": 1, "\ue000": 2}
    assert canonical(value) == rfc8785.dumps(value) == '{"\U0001f600":1,"\ue000":2}'.encode()


python_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.text(max_size=8)
    | st.binary(min_size=12, max_size=12).map(ObjectId) | st.binary(max_size=6)
    | st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31))
    .map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000, tzinfo=dt.UTC))
    | st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-(10**9),
                  max_value=10**9).map(Decimal128),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=4).filter(lambda k: not k.startswith("$")), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=800, deadline=None)
@given(value=python_values)
def test_extended_json_round_trips_and_is_canonical(value) -> None:
    encoded = to_ejson(value)
    assert from_ejson(encoded) == value
    assert from_ejson(json.loads(canonical(encoded))) == value


def test_relaxed_extended_json_keeps_safe_integers_plain_and_tags_the_rest() -> None:
    assert to_ejson(2**53 - 1) == 2**53 - 1
    assert to_ejson(2**60) == {"$numberLong": str(2**60)}
    assert to_ejson(ObjectId("5f1d7c9e8b3a4c2d1e0f9a8b")) == {"$oid": "5f1d7c9e8b3a4c2d1e0f9a8b"}
    assert to_ejson(decimal.Decimal("1.10")) == {"$numberDecimal": "1.10"}
    assert to_ejson(b"\x00\xff") == {"$binary": {"base64": "AP8=", "subType": "00"}}
    assert from_ejson(to_ejson(Binary(b"x", 4))) == Binary(b"x", 4)


def test_datetimes_are_truncated_to_milliseconds_and_naive_ones_read_as_utc() -> None:
    naive = dt.datetime(2024, 5, 6, 7, 8, 9, 987654)
    assert to_ejson(naive) == {"$date": "2024-05-06T07:08:09.987Z"}
    assert from_ejson(to_ejson(naive)) == dt.datetime(2024, 5, 6, 7, 8, 9, 987000, tzinfo=dt.UTC)
    old = dt.datetime(1900, 1, 1, 0, 0, 0, 999, tzinfo=dt.UTC)
    assert to_ejson(old) == {"$date": {"$numberLong": "-2208988800000"}}
    assert from_ejson(to_ejson(old)) == old.replace(microsecond=0)


def test_a_field_named_like_an_extended_json_tag_is_refused() -> None:
    with pytest.raises(MalformedPayload, match=r"'\$oid' starts with '\$'"):
        document_to_ejson({"a": {"$oid": None}})
