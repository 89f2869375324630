"""Ops: pure semantics on one document state, inverses and derived write sets."""

from __future__ import annotations

import re

import pytest

from txengine.exceptions import InvalidInput, MalformedPayload, ReservedCollection, UnknownOp
from txengine.ops import (
    SELF,
    Delete,
    Insert,
    Update,
    apply_op,
    op_from_json,
    op_from_trusted,
    write_set,
)
from txengine.revision import encode_ops

REV = "r" * 64
OTHER = "o" * 64


def test_insert_creates_a_document_whose_incarnation_is_the_revision() -> None:
    outcome = apply_op(Insert("c", {"_id": 1, "a": 1}), (None, None), REV)
    assert outcome.state == ({"_id": 1, "a": 1}, REV) and outcome.conflict is None


def test_insert_over_an_existing_document_replaces_it_and_records_a_conflict() -> None:
    outcome = apply_op(Insert("c", {"_id": 1, "b": 2}), ({"_id": 1, "a": 1}, OTHER), REV)
    assert outcome.state == ({"_id": 1, "b": 2}, REV)
    assert outcome.conflict == "replaced an existing document"


def test_update_sets_unsets_and_increments_keeping_the_incarnation() -> None:
    op = Update("c", 1, set={"a": 5}, unset=("b",), inc={"n": 2}, expect=OTHER)
    outcome = apply_op(op, ({"_id": 1, "a": 1, "b": 2, "n": 40}, OTHER), REV)
    assert outcome.state == ({"_id": 1, "a": 5, "n": 42}, OTHER) and outcome.conflict is None


def test_inc_of_a_missing_field_starts_from_zero_and_big_results_become_number_long() -> None:
    outcome = apply_op(Update("c", 1, inc={"n": 2**53}), ({"_id": 1, "n": 2**53}, OTHER), REV)
    assert outcome.state[0]["n"] == {"$numberLong": str(2**54)}
    assert apply_op(Update("c", 1, inc={"m": 3}), ({"_id": 1}, OTHER), REV).state[0]["m"] == 3


def test_update_against_another_incarnation_does_nothing_and_is_a_conflict() -> None:
    state = ({"_id": 1, "a": 1}, OTHER)
    outcome = apply_op(Update("c", 1, set={"a": 2}, expect=REV), state, "x" * 64)
    assert outcome.state is state
    assert outcome.conflict == "written against another incarnation"


def test_expect_self_matches_the_document_created_in_the_same_revision() -> None:
    created = apply_op(Insert("c", {"_id": 1, "a": 1}), (None, None), REV).state
    assert apply_op(Update("c", 1, set={"a": 2}, expect=SELF), created, REV).conflict is None
    assert apply_op(Update("c", 1, set={"a": 2}, expect=SELF), created, OTHER).conflict


def test_delete_wins_over_a_concurrent_update() -> None:
    deleted = apply_op(Delete("c", 1, expect=OTHER), ({"_id": 1}, OTHER), REV)
    assert deleted.state == (None, None)
    late = apply_op(Update("c", 1, set={"a": 2}, expect=OTHER), deleted.state, "x" * 64)
    assert late.state == (None, None) and late.conflict == "update of a missing document"


def test_reinserted_document_is_a_new_incarnation_that_old_writes_miss() -> None:
    again = apply_op(Insert("c", {"_id": 1}), (None, None), REV).state
    assert apply_op(Delete("c", 1, expect=OTHER), again, "x" * 64).conflict == (
        "written against another incarnation")


def test_inc_of_a_non_numeric_field_is_a_conflict() -> None:
    outcome = apply_op(Update("c", 1, inc={"a": 1}), ({"_id": 1, "a": "x"}, OTHER), REV)
    assert outcome.conflict == "inc of non-numeric field 'a'"


def test_inverses_restore_the_before_values() -> None:
    doc = {"_id": 1, "a": 1, "b": 2, "n": 5}
    op = Update("c", 1, set={"a": 9, "z": 1}, unset=("b",), inc={"n": 3}, expect=OTHER,
                before={"a": 1, "b": 2})
    after = apply_op(op, (doc, OTHER), REV).state
    assert apply_op(op.inverse(), after, REV).state == (doc, OTHER)
    assert Insert("c", doc).inverse() == Delete("c", 1, expect=SELF, before=doc)
    assert Delete("c", 1, expect=OTHER, before=doc).inverse() == Insert("c", doc)
    with pytest.raises(InvalidInput, match="^delete of c/1 has no before image to restore"):
        Delete("c", 1).inverse()


def test_write_set_is_derived_from_the_ops_in_first_touch_order() -> None:
    ops = [Insert("c", {"_id": 1}), Update("d", "1", set={"a": 1}), Delete("c", 1),
           Insert("c", {"_id": {"$numberLong": str(2**60)}})]
    big = '{"$numberLong":"' + str(2**60) + '"}'
    assert write_set(ops) == [("c", "1"), ("d", '"1"'), ("c", big)]


@pytest.mark.parametrize("data, error, message", [
    ({"op": "merge", "collection": "c"}, UnknownOp, "unknown op 'merge'"),
    ({"op": "insert", "collection": "txengine_x", "doc": {"_id": 1}}, ReservedCollection,
     "collection 'txengine_x' is reserved"),
    ({"op": "update", "collection": "c", "key": 1}, InvalidInput,
     "an update needs at least one field in set, unset or inc"),
    ({"op": "update", "collection": "c", "key": 1, "set": {"a": 1}, "unset": ["a"]},
     InvalidInput, "an update may name each field once across set, unset and inc"),
    ({"op": "update", "collection": "c", "key": 1, "set": {"_id": 2}}, InvalidInput,
     "set cannot change _id: delete and insert instead"),
    ({"op": "update", "collection": "c", "key": 1, "inc": {"n": "1"}}, InvalidInput,
     "inc needs numbers"),
    ({"op": "delete", "collection": "c", "key": True}, InvalidInput, "invalid key True (bool)"),
    ({"op": "insert", "collection": "c", "doc": {"_id": 1}, "cas": 1}, MalformedPayload,
     "cas must be true or false, got 1: omit it for a plain op"),
    ({"op": "update", "collection": "c", "key": 1, "set": {"a": 1}, "cas": None},
     MalformedPayload, "cas must be true or false, got None: omit it for a plain op"),
    ({"op": "update", "collection": "c", "key": 1, "set": {"a": 1}, "cas": True},
     MalformedPayload, "a cas update needs before: the values it expects to find"),
    ({"op": "delete", "collection": "c", "key": 1, "cas": True}, MalformedPayload,
     "a cas delete needs before: the values it expects to find"),
    ({"op": "delete", "collection": "c", "key": 1, "before": {"_id": 1}, "cas": True,
      "if": 1}, MalformedPayload, "delete op has unknown fields ['if']"),
])
def test_op_from_json_refuses_malformed_ops(data, error, message) -> None:
    with pytest.raises(error, match="^" + re.escape(message)):
        op_from_json(data)


def test_field_name_with_nul_is_refused_everywhere() -> None:
    """MongoDB cannot store a NUL in a field name, so no store accepts one."""
    with pytest.raises(InvalidInput, match="without '.', NUL or a leading"):
        op_from_json({"op": "insert", "collection": "c", "doc": {"_id": 1, "a\x00b": 1}})


# -- compare-and-set ops (what revert writes) ---------------------------------------------

def test_cas_update_writes_only_the_fields_that_still_hold_their_before_values() -> None:
    """``a`` still holds 1 and is set; ``b`` was changed to 7 by someone else and stays."""
    state = ({"_id": 1, "a": 1, "b": 7, "n": 5}, OTHER)
    op = Update("c", 1, set={"a": 2, "b": 2}, inc={"n": -1}, expect=OTHER,
                before={"a": 1, "b": 1, "n": 5}, cas=True)
    outcome = apply_op(op, state, REV)
    assert outcome.state == ({"_id": 1, "a": 2, "b": 7, "n": 4}, OTHER)
    assert outcome.conflict == "compare-and-set: changed fields ['b'] were left in place"


def test_cas_update_whose_fields_all_hold_is_a_plain_update_without_conflict() -> None:
    state = ({"_id": 1, "a": 1, "b": 1}, OTHER)
    op = Update("c", 1, set={"a": 2}, unset=("b",), expect=OTHER, before={"a": 1, "b": 1},
                cas=True)
    plain = Update("c", 1, set={"a": 2}, unset=("b",), expect=OTHER, before={"a": 1, "b": 1})
    assert apply_op(op, state, REV) == apply_op(plain, state, REV)
    assert apply_op(op, state, REV).state == ({"_id": 1, "a": 2}, OTHER)


def test_cas_field_absent_from_before_must_be_missing() -> None:
    """Absent from ``before`` means "expected missing": a field someone added stays."""
    op = Update("c", 1, set={"a": 1}, unset=("b",), before={}, cas=True)
    assert apply_op(op, ({"_id": 1}, OTHER), REV).state == ({"_id": 1, "a": 1}, OTHER)
    added = apply_op(op, ({"_id": 1, "a": 9, "b": 3}, OTHER), REV)
    assert added.state == ({"_id": 1, "a": 9, "b": 3}, OTHER)
    assert added.conflict == "compare-and-set: changed fields ['a', 'b'] were left in place"


def test_cas_update_that_changes_nothing_returns_the_state_it_met() -> None:
    state = ({"_id": 1, "a": 5}, OTHER)
    outcome = apply_op(Update("c", 1, set={"a": 2}, before={"a": 1}, cas=True), state, REV)
    assert outcome.state is state and outcome.conflict


def test_cas_update_keeps_the_incarnation_and_missing_document_rules() -> None:
    op = Update("c", 1, set={"a": 2}, expect=OTHER, before={"a": 1}, cas=True)
    assert apply_op(op, (None, None), REV).conflict == "update of a missing document"
    assert apply_op(op, ({"_id": 1, "a": 1}, REV), "x" * 64).conflict == (
        "written against another incarnation")


def test_cas_update_with_an_inc_of_a_non_numeric_field_writes_nothing() -> None:
    state = ({"_id": 1, "a": 1, "n": "x"}, OTHER)
    op = Update("c", 1, set={"a": 2, "b": 2}, inc={"n": 1}, before={"a": 1}, cas=True)
    outcome = apply_op(op, state, REV)
    assert outcome.state is state and outcome.conflict == "inc of non-numeric field 'n'"


def test_cas_compares_numbers_by_value_and_booleans_apart_from_numbers() -> None:
    """Canonical JSON writes 1.0 as 1, so they must match; true is not 1."""
    op = Update("c", 1, set={"a": 2, "b": 2}, before={"a": 1, "b": [{"x": 1}]}, cas=True)
    as_float = apply_op(op, ({"_id": 1, "a": 1.0, "b": [{"x": 1.0}]}, OTHER), REV)
    assert as_float.state == ({"_id": 1, "a": 2, "b": 2}, OTHER) and as_float.conflict is None
    as_bool = apply_op(op, ({"_id": 1, "a": True, "b": [{"x": True}]}, OTHER), REV)
    assert as_bool.state[0] == {"_id": 1, "a": True, "b": [{"x": True}]}
    assert as_bool.conflict == "compare-and-set: changed fields ['a', 'b'] were left in place"


def test_cas_insert_creates_only_a_missing_document() -> None:
    created = apply_op(Insert("c", {"_id": 1, "a": 1}, cas=True), (None, None), REV)
    assert created.state == ({"_id": 1, "a": 1}, REV) and created.conflict is None
    state = ({"_id": 1, "b": 2}, OTHER)
    kept = apply_op(Insert("c", {"_id": 1, "a": 1}, cas=True), state, REV)
    assert kept.state is state
    assert kept.conflict == "compare-and-set: an existing document was left in place"


def test_cas_delete_removes_only_a_document_that_still_equals_before() -> None:
    doc = {"_id": 1, "a": 1}
    op = Delete("c", 1, expect=OTHER, before=doc, cas=True)
    assert apply_op(op, ({"_id": 1, "a": 1.0}, OTHER), REV) == apply_op(
        Delete("c", 1, expect=OTHER), (doc, OTHER), REV)
    changed = ({"_id": 1, "a": 2}, OTHER)
    kept = apply_op(op, changed, REV)
    assert kept.state is changed
    assert kept.conflict == "compare-and-set: a changed document was left in place"
    grown = apply_op(op, ({"_id": 1, "a": 1, "b": 0}, OTHER), REV)
    assert grown.conflict == "compare-and-set: a changed document was left in place"
    assert apply_op(op, (doc, REV), "x" * 64).conflict == "written against another incarnation"
    assert apply_op(op, (None, None), REV).conflict == "delete of a missing document"


def test_cas_flag_round_trips_through_json_and_is_omitted_when_false() -> None:
    ops = [Insert("c", {"_id": 1}, cas=True),
           Update("c", 1, set={"a": 1}, before={}, cas=True),
           Delete("c", 1, before={"_id": 1}, cas=True)]
    for op in ops:
        data = op.to_json()
        assert data["cas"] is True
        assert op_from_json(data) == op_from_trusted(data) == op
        plain = {k: v for k, v in data.items() if k != "cas"}
        assert op_from_json(plain) == op_from_trusted(plain)
        assert op_from_json(plain).cas is False
        assert "cas" not in op_from_json(plain).to_json()
        assert op_from_json({**plain, "cas": False}) == op_from_json(plain)
    assert encode_ops([Update("c", 1, set={"a": 1}, before={"a": 0})]) == (
        b'[{"before":{"a":0},"collection":"c","key":1,"op":"update","set":{"a":1}}]')


def test_inverse_of_a_cas_op_is_a_cas_op_that_undoes_only_what_it_wrote() -> None:
    """The rendered downgrade of a revert leaves alone what the revert left alone."""
    op = Update("c", 1, set={"a": 2, "z": 1}, unset=("b",), expect=OTHER,
                before={"a": 1, "b": 1}, cas=True)
    assert op.inverse() == Update("c", 1, set={"a": 1, "b": 1}, unset=("z",), expect=OTHER,
                                  before={"a": 2, "z": 1}, cas=True)
    doc = {"_id": 1, "a": 1, "b": 1}
    after = apply_op(op, (doc, OTHER), REV).state
    assert apply_op(op.inverse(), after, REV).state == (doc, OTHER)
    moved = apply_op(op.inverse(), ({"_id": 1, "a": 5, "z": 1}, OTHER), REV)
    assert moved.state == ({"_id": 1, "a": 5, "b": 1}, OTHER)
    assert Insert("c", doc, cas=True).inverse() == Delete("c", 1, expect=SELF, before=doc,
                                                          cas=True)
    assert Delete("c", 1, before=doc, cas=True).inverse() == Insert("c", doc, cas=True)
