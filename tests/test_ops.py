"""Ops: pure semantics on one document state, inverses and derived write sets."""

from __future__ import annotations

import pytest

from txengine.exceptions import InvalidInput, ReservedCollection, UnknownOp
from txengine.ops import SELF, Delete, Insert, Update, apply_op, op_from_json, write_set

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
])
def test_op_from_json_refuses_malformed_ops(data, error, message) -> None:
    with pytest.raises(error, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        op_from_json(data)


def test_field_name_with_nul_is_refused_everywhere() -> None:
    """MongoDB cannot store a NUL in a field name, so no store accepts one."""
    with pytest.raises(InvalidInput, match="without '.', NUL or a leading"):
        op_from_json({"op": "insert", "collection": "c", "doc": {"_id": 1, "a\x00b": 1}})
