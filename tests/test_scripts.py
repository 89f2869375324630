"""Rendering revision scripts and loading them back (data scripts by ast, code by import)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txengine.exceptions import (
    ChecksumMismatch,
    InvalidInput,
    MalformedPayload,
    NonLiteralScript,
)
from txengine.ops import Delete, Insert, Update
from txengine.revision import Revision, build, encode_ops
from txengine.scripts import (
    DATA_MARKER,
    AuthoredScript,
    load_authored,
    load_data,
    load_versions,
    render_authored,
    render_data,
    script_filename,
    slug,
)

PARENT = "a" * 64


def data_revision(ops, parents=(PARENT,), message="m", depends_on=()) -> Revision:
    return build(
        kind="data", payload=encode_ops(ops), partition="default", parents=list(parents),
        origin="p1:0", seq=1, hlc=(1, 0), message=message,
        collections=[op.collection for op in ops], depends_on=list(depends_on),
    )


ADA = data_revision([
    Insert("customers", {"_id": 1, "name": "Ada"}),
    Update("customers", 1, set={"name": "Ada L."}, expect="self", before={"name": "Ada"}),
])


# -- strategies: relaxed Extended JSON values and ops -------------------------------------

safe_ints = st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1)
field_names = st.text(min_size=1, max_size=8).filter(
    lambda s: not s.startswith("$") and "." not in s and "\x00" not in s and s != "_id")
oids = st.binary(min_size=12, max_size=12).map(lambda b: {"$oid": b.hex()})
big_ints = st.integers(min_value=2**53 + 1, max_value=2**80).flatmap(
    lambda n: st.sampled_from([n, -n])).map(lambda n: {"$numberLong": str(n)})
scalars = st.one_of(
    st.none(), st.booleans(), safe_ints,
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12), oids, big_ints,
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(field_names, inner, max_size=3),
    max_leaves=8,
)
keys = st.one_of(safe_ints, st.text(max_size=8), oids)
collections = st.sampled_from(["customers", "orders", "_private"])
expects = st.none() | st.sampled_from(["self", "b" * 64])
docs = st.dictionaries(field_names, values, max_size=4)


@st.composite
def updates(draw):
    names = draw(st.lists(field_names, min_size=1, max_size=5, unique=True))
    split = sorted(draw(st.lists(st.integers(0, len(names)), min_size=2, max_size=2)))
    set_ = {n: draw(values) for n in names[: split[0]]}
    unset = tuple(names[split[0]: split[1]])
    inc = {n: draw(st.integers(-1000, 1000)) for n in names[split[1]:]}
    before = draw(st.none() | st.dictionaries(st.sampled_from(names), values, max_size=3))
    cas = before is not None and draw(st.booleans())  # a cas update needs its before
    return Update(draw(collections), draw(keys), set=set_, unset=unset, inc=inc,
                  expect=draw(expects), before=before, cas=cas)


inserts = st.builds(lambda c, k, d, cas: Insert(c, {"_id": k, **d}, cas=cas), collections, keys,
                    docs, st.booleans())
deletes = st.builds(
    lambda c, k, e, b, cas: Delete(c, k, expect=e, before=None if b is None else {"_id": k, **b},
                                   cas=cas and b is not None),
    collections, keys, expects, st.none() | docs, st.booleans())
op_lists = st.lists(st.one_of(inserts, updates(), deletes), min_size=1, max_size=5)


# -- data scripts ---------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(ops=op_lists, parents=st.lists(st.sampled_from(["a" * 64, "c" * 64, "d" * 64]),
                                      max_size=3, unique=True))
def test_rendered_data_script_loads_back_to_identical_bytes(ops, parents):
    """Any op list renders to a script whose literals re-encode to the same payload."""
    original = data_revision(ops, parents=parents, message="m\n\"two\" lines \\ \u2028")
    text = render_data(original)
    loaded = load_data(text, "rev.py")
    assert loaded.payload == original.payload
    assert loaded.descriptor == original.descriptor
    loaded.verify()
    assert render_data(loaded) == text


def test_render_is_deterministic_whatever_the_descriptor_order():
    """A descriptor read back in another key order renders to the same bytes."""
    shuffled = Revision(dict(sorted(ADA.descriptor.items())), ADA.payload)
    assert render_data(ADA) == render_data(shuffled)
    assert render_data(ADA) == render_data(ADA)


def test_render_reads_like_an_alembic_migration():
    text = render_data(ADA)
    assert text.startswith('"""m\n\nRevision ID: ' + ADA.id + "\nRevises: " + PARENT + "\n")
    assert DATA_MARKER in text.splitlines()
    assert f'revision = "{ADA.id}"\ndown_revision = "{PARENT}"\n' in text
    assert "branch_labels = None\ndepends_on = None\n" in text
    assert (
        "def upgrade(op):\n"
        '    op.insert("customers", {"_id": 1, "name": "Ada"})\n'
        '    op.update("customers", 1, set={"name": "Ada L."}, expect="self",'
        ' before={"name": "Ada"})\n'
    ) in text
    assert (
        "def downgrade(op):\n"
        '    op.update("customers", 1, set={"name": "Ada"}, expect="self")\n'
        '    op.delete("customers", 1, expect="self", before={"_id": 1, "name": "Ada"})\n'
    ) in text
    assert text.endswith("\n")


def test_down_revision_is_none_for_a_root_and_a_tuple_for_a_merge():
    root = data_revision([Insert("c", {"_id": 1})], parents=())
    merge = data_revision([Insert("c", {"_id": 1})], parents=("c" * 64, "b" * 64),
                          depends_on=("e" * 64,))
    assert "\ndown_revision = None\n" in render_data(root)
    text = render_data(merge)
    assert f'\ndown_revision = ("{"b" * 64}", "{"c" * 64}")\n' in text
    assert f'\ndepends_on = ("{"e" * 64}",)\n' in text
    assert load_data(text) == merge


def test_cas_ops_render_with_cas_and_their_downgrade_is_cas_too():
    """A revert's compare-and-set flag survives the script; its undo compares as well."""
    rev = data_revision([
        Update("customers", 1, set={"name": "Ada"}, expect="b" * 64,
               before={"name": "Ada L."}, cas=True),
        Delete("customers", 2, expect="b" * 64, before={"_id": 2}, cas=True),
        Insert("customers", {"_id": 3}, cas=True),
    ])
    text = render_data(rev)
    assert (
        "def upgrade(op):\n"
        f'    op.update("customers", 1, set={{"name": "Ada"}}, expect="{"b" * 64}",'
        ' before={"name": "Ada L."}, cas=True)\n'
        f'    op.delete("customers", 2, expect="{"b" * 64}", before={{"_id": 2}}, cas=True)\n'
        '    op.insert("customers", {"_id": 3}, cas=True)\n'
    ) in text
    assert (
        "def downgrade(op):\n"
        '    op.delete("customers", 3, expect="self", before={"_id": 3}, cas=True)\n'
        '    op.insert("customers", {"_id": 2}, cas=True)\n'
        f'    op.update("customers", 1, set={{"name": "Ada L."}}, expect="{"b" * 64}",'
        ' before={"name": "Ada"}, cas=True)\n'
    ) in text
    loaded = load_data(text, "rev.py")
    assert loaded == rev and [op.cas for op in loaded.ops] == [True, True, True]


def test_a_non_bool_cas_in_a_script_is_refused():
    text = render_data(data_revision([Insert("customers", {"_id": 3}, cas=True)]))
    with pytest.raises(MalformedPayload, match="^cas must be true or false, got 'yes'"):
        load_data(text.replace("cas=True", 'cas="yes"'), "rev.py")


def test_irreversible_downgrade_is_rendered_as_a_comment():
    """A delete without a before image has no inverse; the script says so and still loads."""
    rev = data_revision([Delete("customers", 1)])
    text = render_data(rev)
    assert "def downgrade(op):\n    # irreversible: delete of customers/1 has no before" in text
    assert load_data(text) == rev


def test_render_refuses_a_script_revision():
    script = build(kind="script", rev_id="abc123", payload=b"", partition="default",
                   parents=[], origin="p1:0", seq=1, hlc=(1, 0), message="m")
    with pytest.raises(InvalidInput, match="only data revisions render"):
        render_data(script)


def test_edited_payload_fails_verify_with_checksum_mismatch():
    text = render_data(ADA).replace('"name": "Ada"})', '"name": "Eve"})', 1)
    loaded = load_data(text, "rev.py")
    with pytest.raises(ChecksumMismatch, match=f"revision {ADA.id[:12]}: payload checksum"):
        loaded.verify()


def refusal(text: str) -> NonLiteralScript:
    with pytest.raises(NonLiteralScript) as info:
        load_data(text, "rev.py")
    return info.value


def test_import_statement_is_refused():
    error = refusal("import os\n" + render_data(ADA))
    assert (error.path, error.line) == ("rev.py", 1)
    assert str(error).startswith("rev.py:1: import statement; a data revision script may hold")


def test_call_other_than_an_op_is_refused():
    text = render_data(ADA).replace("def upgrade(op):\n", "def upgrade(op):\n    print(1)\n")
    assert "call to print is not an op call" in str(refusal(text))


def test_call_inside_an_argument_is_refused():
    text = render_data(ADA).replace('{"_id": 1, "name": "Ada"})', 'dict(_id=1))', 1)
    assert "call to dict is not a literal" in str(refusal(text))


def test_name_argument_is_refused():
    text = render_data(ADA).replace('"name": "Ada"})', '"name": ada})', 1)
    error = refusal(text)
    assert "name 'ada' is not a literal" in str(error)
    assert text.splitlines()[error.line - 1].startswith("    op.insert(")


def test_f_string_is_refused():
    text = render_data(ADA).replace('"name": "Ada"})', '"name": f"Ada"})', 1)
    assert "f-string is not a literal" in str(refusal(text))


def test_unknown_op_method_is_refused():
    text = render_data(ADA).replace("op.insert(", "op.upsert(", 1)
    assert "unknown op method op.upsert" in str(refusal(text))


def test_missing_descriptor_is_refused():
    text = render_data(ADA)
    start = text.index("descriptor = {")
    text = text[:start] + text[text.index("}\n", start) + 2:]
    assert str(refusal(text)).startswith("rev.py:1: missing descriptor;")


def test_non_literal_downgrade_is_refused():
    """The downgrade is derived and ignored, but it must still be literal op calls."""
    text = render_data(ADA).replace("def downgrade(op):\n", "def downgrade(op):\n    x = 1\n")
    assert "Assign statement is not an op call" in str(refusal(text))


def test_other_module_statements_are_refused():
    assert "assignment to x is not allowed" in str(refusal(render_data(ADA) + "x = 1\n"))
    assert "ClassDef statement" in str(refusal(render_data(ADA) + "class A:\n    pass\n"))


def test_header_that_disagrees_with_the_descriptor_is_refused():
    text = render_data(ADA).replace(f'down_revision = "{PARENT}"', 'down_revision = None')
    assert "header down_revision does not match the descriptor" in str(refusal(text))


def test_syntax_error_is_refused_with_its_line():
    error = refusal(render_data(ADA) + "def (\n")
    assert "syntax error" in str(error)


# -- authored script revisions -----------------------------------------------------------

AUTHORED = dict(
    rev_id="1975ea83b712", message="add account table", parents=["ae1027a6acf"],
    branch_labels=[], depends_on=[], hlc=(1700000000000, 2), origin="p1:0", seq=3,
    stores=["sql", "mongo"], create_date=dt.datetime(2024, 1, 2, 3, 4, 5),
)


def write_authored(tmp_path, **overrides) -> AuthoredScript:
    kwargs = {**AUTHORED, **overrides}
    path = tmp_path / script_filename(kwargs["rev_id"], kwargs["message"])
    path.write_text(render_authored(**kwargs), encoding="utf-8")
    return load_authored(path)


def test_authored_script_has_alembic_header_and_frozen_descriptor():
    text = render_authored(**AUTHORED)
    assert text.startswith('"""add account table\n\nRevision ID: 1975ea83b712\n'
                           "Revises: ae1027a6acf\nCreate Date: 2024-01-02 03:04:05\n")
    assert ('revision = "1975ea83b712"\ndown_revision = "ae1027a6acf"\n'
            "branch_labels = None\ndepends_on = None\n") in text
    assert ('txengine = {"hlc": [1700000000000, 2], "origin": "p1:0", "seq": 3,'
            ' "partition": "default", "stores": ["sql", "mongo"]}\n') in text
    assert "def upgrade(op):\n    # op.schema is Alembic's Operations" in text
    assert "def downgrade(op):\n    pass\n" in text


def test_authored_round_trip_gives_the_same_descriptor_twice(tmp_path):
    script = write_authored(tmp_path)
    again = load_authored(script.path)
    assert script.revision == again.revision
    d = script.revision.descriptor
    assert (d["id"], d["kind"], d["parents"], d["message"]) == (
        "1975ea83b712", "script", ["ae1027a6acf"], "add account table")
    assert (d["hlc"], d["origin"], d["seq"], d["partition"]) == ([1700000000000, 2], "p1:0", 3,
                                                                 "default")
    assert script.revision.payload == script.path.read_bytes()
    assert script.stores == ("sql", "mongo")
    script.revision.verify()


def test_authored_module_exposes_upgrade_and_downgrade(tmp_path):
    module = write_authored(tmp_path).module()
    assert module.upgrade(object()) is None
    assert module.downgrade(object()) is None
    assert module.revision == "1975ea83b712"


def test_listing_versions_executes_no_code(tmp_path):
    """Headers are read with ast: a script that raises on import still lists."""
    script = write_authored(tmp_path)
    script.path.write_text(script.text + "raise SystemExit('executed')\n", encoding="utf-8")
    (listed,) = load_versions(tmp_path)
    assert listed.revision.id == "1975ea83b712"


def test_load_versions_skips_data_scripts_helpers_and_init(tmp_path):
    write_authored(tmp_path)
    write_authored(tmp_path, rev_id="27c6a30d7c24", message="add index",
                   parents=["1975ea83b712"], branch_labels=["accounts"], stores=["mongo"])
    (tmp_path / "__init__.py").write_text("revision = 'x'\n")
    (tmp_path / "helpers.py").write_text("def helper():\n    pass\n")
    (tmp_path / "data.py").write_text(render_data(ADA))
    scripts = load_versions(tmp_path)
    assert [s.revision.id for s in scripts] == ["1975ea83b712", "27c6a30d7c24"]
    assert scripts[1].revision.descriptor["branch_labels"] == ["accounts"]
    assert load_versions(tmp_path / "missing") == []


def test_duplicate_revision_ids_are_refused(tmp_path):
    write_authored(tmp_path)
    write_authored(tmp_path, message="same id again")
    with pytest.raises(MalformedPayload, match="revision 1975ea83b712 is also defined in"):
        load_versions(tmp_path)


def test_non_literal_header_names_the_file(tmp_path):
    path = tmp_path / "x_bad.py"
    path.write_text(render_authored(**AUTHORED).replace('seq": 3', 'seq": SEQ'))
    match = r"x_bad\.py:\d+: header txengine must be a literal: name 'SEQ' is not a literal"
    with pytest.raises(MalformedPayload, match=match):
        load_versions(tmp_path)


def test_malformed_frozen_descriptor_names_the_file(tmp_path):
    path = tmp_path / "x_bad.py"
    path.write_text(render_authored(**AUTHORED).replace('"seq": 3', '"seq": 0'))
    with pytest.raises(MalformedPayload, match=r"x_bad\.py: descriptor seq must be a positive"):
        load_authored(path)


def test_malformed_txengine_header_names_the_file_and_line(tmp_path):
    path = tmp_path / "x_bad.py"
    path.write_text(render_authored(**AUTHORED).replace('"stores": ["sql", "mongo"]',
                                                        '"stores": []'))
    match = r"x_bad\.py:16: header txengine stores must be a non-empty list"
    with pytest.raises(MalformedPayload, match=match):
        load_authored(path)


def test_missing_txengine_header_is_refused(tmp_path):
    path = tmp_path / "x_alembic.py"
    path.write_text('revision = "abc"\ndown_revision = None\n')
    with pytest.raises(MalformedPayload, match="x_alembic.py: script revision has no txengine"):
        load_authored(path)


def test_authored_scripts_need_store_kinds():
    with pytest.raises(InvalidInput, match="must name the store kinds"):
        render_authored(**{**AUTHORED, "stores": []})


def test_slug_and_filename_follow_alembic():
    assert slug("Add account table!") == "add_account_table"
    assert script_filename("1975ea83b712", "create account table") == (
        "1975ea83b712_create_account_table.py")
    long = slug("one two three four five six seven eight nine ten")
    assert long == "one_two_three_four_five_six_seven_eight_"
    assert script_filename("abc", "") == "abc_.py"


def test_payload_json_is_what_the_script_shows():
    """Sanity: the loaded payload decodes to the ops the script names, in order."""
    loaded = load_data(render_data(ADA))
    assert [item["op"] for item in json.loads(loaded.payload)] == ["insert", "update"]


def test_big_integral_float_round_trips():
    """Canonical JSON writes 6.38e16 as bare digits; loading must not turn it into a bad int."""
    rev = data_revision([Insert("customers", {"_id": 1, "f": 6.38018990114013e16, "g": 0.5})])
    assert '"f": 63801899011401300' in render_data(rev)
    assert load_data(render_data(rev)) == rev
