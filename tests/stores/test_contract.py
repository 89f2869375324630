"""The store contract: one suite, run on every backend, skipped by capability.

Each test names a behaviour the engine relies on. Store-level tests drive
``load_states``/``write_states`` directly; the Peer tests at the end drive
the same behaviour through writes, ``downgrade base`` and ``upgrade heads``.
"""

from __future__ import annotations

import datetime as dt
import decimal

import pytest
import sqlalchemy as sa
from bson import Binary, Decimal128, ObjectId

from txengine.exceptions import StoreError
from txengine.peer import Peer
from txengine.values import from_ejson, key_text, to_ejson

from .conftest import Requirements, StoreHarness, author_script

OID = ObjectId("64b7f0c2a1b2c3d4e5f60718")
REV = "r" * 64


def state(doc: dict, inc: str = REV) -> tuple[dict, str]:
    return to_ejson(doc), inc


# -- states --------------------------------------------------------------------------------


def test_written_states_load_back_with_their_incarnation(harness: StoreHarness) -> None:
    store = harness.store
    store.write_states("default", "customers", {"1": state({"_id": 1, "name": "Ada"})})
    harness.commit()
    assert store.load_states("default", "customers", ["1"]) == {
        "1": ({"_id": 1, "name": "Ada"}, REV)}


def test_missing_keys_and_collections_are_absent(harness: StoreHarness) -> None:
    store = harness.store
    assert store.load_states("default", "nowhere", ["1"]) == {}
    store.write_states("default", "customers", {"1": state({"_id": 1})})
    assert store.load_states("default", "customers", ["1", "2", '"1"']) == {
        "1": ({"_id": 1}, REV)}


def test_a_none_doc_deletes_the_document(harness: StoreHarness) -> None:
    store = harness.store
    store.write_states("default", "customers", {"1": state({"_id": 1}), "2": state({"_id": 2})})
    store.write_states("default", "customers", {"1": (None, None)})
    harness.commit()
    assert list(store.load_states("default", "customers", ["1", "2"])) == ["2"]


def test_deferred_writes_land_with_the_commit_run_in_the_background(
        harness: StoreHarness) -> None:
    """Bulk replay hands a batch's writes to ``commit_in_background``: what a store
    deferred runs there, upserts and deletes alike, and waiting makes it durable."""
    store = harness.store
    store.write_states("default", "customers", {"1": state({"_id": 1}), "2": state({"_id": 2})})
    harness.commit()
    deferred: list = []
    store.write_states("default", "customers", {"1": (None, None), "3": state({"_id": 3}),
                                                "2": state({"_id": 2, "n": 2}, "s")}, deferred)
    store.commit_in_background(deferred)()
    store.rollback()  # nothing is left uncommitted to drop
    assert store.load_states("default", "customers", ["1", "2", "3"]) == {
        "2": ({"_id": 2, "n": 2}, "s"), "3": ({"_id": 3}, REV)}


def test_a_failed_background_commit_raises_when_waited_for_and_keeps_nothing(
        harness: StoreHarness) -> None:
    store = harness.store
    deferred: list = []
    store.write_states("default", "customers", {"1": state({"_id": 1})}, deferred)
    if not hasattr(store, "conn"):
        pytest.skip("a MongoStore commits at once and defers no statements")
    wait = store.commit_in_background([*deferred, ("DELETE FROM no_such_table", [])])
    with pytest.raises(Exception, match="no_such_table"):
        wait()
    harness.rollback()
    assert store.load_states("default", "customers", ["1"]) == {}


def test_a_later_write_replaces_the_whole_state(harness: StoreHarness) -> None:
    store = harness.store
    store.write_states("default", "c", {"1": state({"_id": 1, "a": 1, "b": 2})})
    store.write_states("default", "c", {"1": state({"_id": 1, "a": 3}, "other")})
    assert store.load_states("default", "c", ["1"]) == {"1": ({"_id": 1, "a": 3}, "other")}


def test_partitions_isolate_the_same_key(harness: StoreHarness) -> None:
    store = harness.store
    store.write_states("default", "c", {"1": state({"_id": 1, "p": "default"})})
    store.write_states("user:42", "c", {"1": state({"_id": 1, "p": "user:42"}, "x")})
    store.write_states("user:42", "c", {"1": (None, None)})
    harness.commit()
    assert store.load_states("default", "c", ["1"]) == {"1": ({"_id": 1, "p": "default"}, REV)}
    assert store.load_states("user:42", "c", ["1"]) == {}


def test_key_types_stay_distinct(harness: StoreHarness) -> None:
    """The str "1", the int 1, an ObjectId and a $numberLong are four documents."""
    keys = [1, "1", OID, 2**60]
    texts = [key_text(to_ejson(k)) for k in keys]
    assert len(set(texts)) == 4
    harness.store.write_states("default", "c", {
        t: state({"_id": k, "kind": type(k).__name__}) for k, t in zip(keys, texts, strict=True)})
    harness.commit()
    loaded = harness.store.load_states("default", "c", texts)
    assert [from_ejson(loaded[t][0]["_id"]) for t in texts] == keys


VALUES = {
    "datetime_ms": dt.datetime(2024, 2, 29, 23, 59, 59, 999000, tzinfo=dt.UTC),
    "before_epoch": dt.datetime(1969, 7, 20, 20, 17, 40, 1000, tzinfo=dt.UTC),
    "decimal128": Decimal128("12345678901234567890.123456789"),
    "bytes": b"\x00\xffbytes",
    "binary_subtype": Binary(b"\x01\x02", 4),
    "nested": {"a": [1, {"b": [None, True, 2.5]}], "empty": {}},
    "unicode": "Grüße, 世界 🌍",
    "big_int": 2**62,
    "float": 0.1,
    "null": None,
    "object_id": OID,
}


@pytest.mark.parametrize("name", VALUES)
def test_extended_json_values_round_trip(harness: StoreHarness, name: str) -> None:
    doc = {"_id": name, "v": VALUES[name]}
    harness.store.write_states("default", "values", {key_text(name): state(doc)})
    harness.commit()
    (loaded, _inc), = harness.store.load_states("default", "values", [key_text(name)]).values()
    assert from_ejson(loaded) == doc
    assert loaded == to_ejson(doc)


def test_documents_and_snapshot_list_every_state(harness: StoreHarness) -> None:
    store = harness.store
    store.write_states("default", "a", {"1": state({"_id": 1}), '"x"': state({"_id": "x"})})
    store.write_states("other", "a", {"1": state({"_id": 1, "o": True}, "i2")})
    store.write_states("default", "b", {"2": state({"_id": 2})})
    harness.commit()
    assert sorted(map(str, (d["_id"] for d in store.documents("default", "a")))) == ["1", "x"]
    assert list(store.documents("other", "a")) == [{"_id": 1, "o": True}]
    assert list(store.documents("default", "missing")) == []
    assert store.snapshot() == {
        ("default", "a", "1"): ({"_id": 1}, REV),
        ("default", "a", '"x"'): ({"_id": "x"}, REV),
        ("other", "a", "1"): ({"_id": 1, "o": True}, "i2"),
        ("default", "b", "2"): ({"_id": 2}, REV),
    }
    assert store.collections() == ["a", "b"]


def test_a_table_created_in_a_rolled_back_transaction_is_created_again(
        harness: StoreHarness) -> None:
    store = harness.store
    store.write_states("default", "c", {"1": state({"_id": 1})})
    harness.rollback()
    store.write_states("default", "c", {"2": state({"_id": 2})})
    harness.commit()
    assert list(store.load_states("default", "c", ["1", "2"])) == ["2"]


# -- declared tables -----------------------------------------------------------------------

def customer_columns() -> list[sa.Column]:
    """Return fresh columns of the declared ``customers`` table (a Column has one table)."""
    return [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50)),
        sa.Column("score", sa.Float),
        sa.Column("joined", sa.DateTime),
        sa.Column("price", sa.Numeric),
        sa.Column("photo", sa.LargeBinary),
        sa.Column("meta", sa.JSON),
        sa.Column("vip", sa.Boolean),
        sa.Column("visits", sa.BigInteger),
    ]


def declare_customers(harness: StoreHarness, *extra: sa.Column) -> None:
    harness.requirements.require("declared_tables")
    harness.declare("customers", *customer_columns(), *extra)


ADA = {
    "_id": 1, "name": "Ada", "score": 2.5,
    "joined": dt.datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=dt.UTC),
    "price": Decimal128("12.5"), "photo": b"\x00\x01", "meta": {"tags": ["a", "ü"], "n": 1},
    "vip": True, "visits": 2**60,
}


def test_declared_table_keeps_documents_column_for_field(harness: StoreHarness) -> None:
    declare_customers(harness)
    harness.store.write_states("default", "customers", {"1": state(ADA)})
    harness.commit()
    assert harness.store.load_states("default", "customers", ["1"]) == {"1": state(ADA)}
    (row,) = harness.rows("customers")
    assert row[:3] == (1, "Ada", 2.5)
    assert row[-2:] in ((True, 2**60), (1, 2**60))
    assert harness.store.collections() == ["customers"]
    assert harness.store.snapshot() == {("default", "customers", "1"): state(ADA)}
    assert list(harness.store.documents("default", "customers")) == [to_ejson(ADA)]


def test_declared_table_reads_whole_floats_as_the_payload_has_them(
        harness: StoreHarness) -> None:
    """RFC 8785 writes 3.0 as 3: a Float column gives back the int the payload carries."""
    declare_customers(harness)
    harness.store.write_states("default", "customers", {"1": state({"_id": 1, "score": 3})})
    assert harness.store.load_states("default", "customers", ["1"])["1"][0] == {
        "_id": 1, "score": 3}


def test_missing_field_is_null_and_explicit_null_stays_a_field(harness: StoreHarness) -> None:
    declare_customers(harness)
    harness.store.write_states("default", "customers", {
        "1": state({"_id": 1, "name": None}), "2": state({"_id": 2})})
    loaded = harness.store.load_states("default", "customers", ["1", "2"])
    assert loaded["1"][0] == {"_id": 1, "name": None}
    assert loaded["2"][0] == {"_id": 2}
    harness.commit()
    assert [r[1] for r in harness.rows("customers")] == [None, None]


def test_field_without_a_column_is_refused_before_any_write(harness: StoreHarness) -> None:
    declare_customers(harness)
    with pytest.raises(StoreError) as err:
        harness.store.write_states("default", "customers", {
            "1": state({"_id": 1, "name": "Ada"}), "2": state({"_id": 2, "email": "x@y"})})
    assert str(err.value) == (
        "field 'email' of customers/2 has no column in declared table 'customers' (columns:"
        " name, score, joined, price, photo, meta, vip, visits): add the column with an"
        " authored revision, or drop the field")
    harness.commit()
    assert harness.rows("customers") == []


@pytest.mark.parametrize(("doc", "message"), [
    ({"_id": 1, "name": 5}, "field 'name' of customers/1: the value 5 needs a string"
                            " (customers.name is VARCHAR(50))"),
    ({"_id": 1, "name": "x" * 51}, "is longer than the column's 50 characters"),
    ({"_id": 1, "vip": 1}, "needs true or false"),
    ({"_id": 1, "visits": 1.5}, "needs an integer"),
    ({"_id": 1, "joined": "2024-01-01"}, "needs a datetime ($date)"),
    ({"_id": 1, "price": 1.5}, "needs a Decimal ($numberDecimal)"),
])
def test_value_a_column_cannot_hold_is_refused(harness: StoreHarness, doc: dict,
                                               message: str) -> None:
    declare_customers(harness)
    with pytest.raises(StoreError, match=None) as err:
        harness.store.write_states("default", "customers", {"1": state(doc)})
    assert message in str(err.value)


def test_not_null_column_refuses_a_missing_field(harness: StoreHarness) -> None:
    harness.requirements.require("declared_tables")
    harness.declare("tags", sa.Column("id", sa.String(20), primary_key=True),
                    sa.Column("label", sa.String(20), nullable=False))
    with pytest.raises(StoreError) as err:
        harness.store.write_states("default", "tags", {'"a"': state({"_id": "a"})})
    assert str(err.value) == ("field 'label' of tags/\"a\" is missing or null, but column"
                              " tags.label is NOT NULL")


def test_declared_key_column_takes_only_its_key_type(harness: StoreHarness) -> None:
    declare_customers(harness)
    for key in ("1", OID):
        text = key_text(to_ejson(key))
        with pytest.raises(StoreError) as err:
            harness.store.write_states("default", "customers", {text: state({"_id": key})})
        assert str(err.value) == (
            f"declared table 'customers' keys its documents by 'id' (INTEGER), which cannot"
            f" hold the key {text}: use int keys in collection 'customers'")
        assert harness.store.load_states("default", "customers", [text]) == {}


def test_declared_string_keys(harness: StoreHarness) -> None:
    harness.requirements.require("declared_tables")
    harness.declare("tags", sa.Column("id", sa.String(20), primary_key=True),
                    sa.Column("label", sa.Text))
    harness.store.write_states("default", "tags", {'"1"': state({"_id": "1", "label": "one"})})
    assert harness.store.load_states("default", "tags", ['"1"', "1"]) == {
        '"1"': state({"_id": "1", "label": "one"})}


def test_declared_table_holds_one_partition(harness: StoreHarness) -> None:
    declare_customers(harness)
    harness.store.write_states("user:1", "customers", {"1": state({"_id": 1})})
    harness.commit()
    with pytest.raises(StoreError) as err:
        harness.store.write_states("user:2", "customers", {"2": state({"_id": 2})})
    assert str(err.value) == (
        "declared table 'customers' holds the documents of partition 'user:1' and has no"
        " partition column, so partition 'user:2' cannot write to it: give that partition a"
        " collection of its own")
    assert harness.store.load_states("user:2", "customers", ["1"]) == {}
    assert list(harness.store.load_states("user:1", "customers", ["1"])) == ["1"]
    harness.store.write_states("user:1", "customers", {"1": (None, None)})
    harness.commit()
    harness.store.write_states("user:2", "customers", {"2": state({"_id": 2})})


def test_decimal_columns_refuse_values_they_would_change(harness: StoreHarness) -> None:
    declare_customers(harness)
    doc = {"_id": 1, "price": decimal.Decimal("19.90")}
    if harness.requirements.exact_decimal_columns:
        harness.store.write_states("default", "customers", {"1": state(doc)})
        assert harness.store.load_states("default", "customers", ["1"])["1"][0] == to_ejson(doc)
        return
    with pytest.raises(StoreError) as err:
        harness.store.write_states("default", "customers", {"1": state(doc)})
    assert "the value {\"$numberDecimal\": \"19.90\"} would be stored as 19.9" in str(err.value)


def test_rows_written_behind_txengines_back_have_no_incarnation(harness: StoreHarness) -> None:
    declare_customers(harness)
    harness.execute("INSERT INTO customers (id, name) VALUES (7, 'Eve')")
    assert harness.store.load_states("default", "customers", ["7"]) == {
        "7": ({"_id": 7, "name": "Eve"}, None)}


# -- coupling constraints --------------------------------------------------------------------

COUPLING = "couples documents, and an op's outcome must depend only on its own document"


def _trigger(harness: StoreHarness) -> None:
    if harness.dialect == "sqlite":
        harness.execute("CREATE TRIGGER customers_audit AFTER INSERT ON customers"
                        " BEGIN SELECT 1; END")
    else:
        harness.execute("CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS"
                        " $$ BEGIN RETURN NEW; END $$")
        harness.execute("CREATE TRIGGER customers_audit BEFORE INSERT ON customers"
                        " FOR EACH ROW EXECUTE FUNCTION noop()")


def _children(ondelete: str):
    def make(harness: StoreHarness) -> None:
        harness.declare("orders", sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("customer", sa.Integer, sa.ForeignKey(
                            "customers.id", name="orders_customer_fk", ondelete=ondelete)))
    return make


def _unique(harness: StoreHarness) -> None:
    harness.declare("customers", *customer_columns(),
                    sa.Column("email", sa.String(50)),
                    sa.UniqueConstraint("email", name="customers_email_key"))


def _unique_index(harness: StoreHarness) -> None:
    declare_customers(harness)
    harness.execute("CREATE UNIQUE INDEX customers_name ON customers (name)")


def _parent_cascade(harness: StoreHarness) -> None:
    harness.declare("regions", sa.Column("id", sa.Integer, primary_key=True))
    harness.declare("customers", *customer_columns(), sa.Column(
        "region", sa.Integer, sa.ForeignKey("regions.id", name="customers_region_fk",
                                            onupdate="SET NULL")))


@pytest.mark.parametrize(("setup", "found"), [
    (_unique, "UNIQUE constraint 'customers_email_key' on (email)"),
    (_unique_index, "unique index 'customers_name' on (name)"),
    (_parent_cascade,
     "foreign key 'customers_region_fk' (region) -> regions with ON UPDATE SET NULL"),
    (_children("CASCADE"), "foreign key 'orders_customer_fk' orders(customer) -> customers"
                           " with ON DELETE CASCADE"),
    (_children("SET NULL"), "foreign key 'orders_customer_fk' orders(customer) -> customers"
                            " with ON DELETE SET NULL"),
    (_trigger, "trigger 'customers_audit'"),
], ids=["unique", "unique_index", "fk_set_null", "inbound_cascade", "inbound_set_null",
        "trigger"])
def test_coupling_constraints_are_refused_before_anything_is_written(
        harness: StoreHarness, requirements: Requirements, setup, found: str) -> None:
    requirements.require("declared_tables", "coupling_checks")
    if setup in (_trigger,) or getattr(setup, "__name__", "") == "make":
        declare_customers(harness)
    setup(harness)
    with pytest.raises(StoreError) as err:
        harness.store.write_states("default", "customers", {"1": state({"_id": 1})})
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"table 'customers' is refused for sync: {found} {COUPLING};"
                       " drop it with an authored revision, or keep the table out of sync")
    harness.rollback()
    assert harness.rows("customers") == []


def test_plain_foreign_keys_and_unique_keys_are_accepted(harness: StoreHarness) -> None:
    declare_customers(harness)
    harness.declare("orders", sa.Column("id", sa.Integer, primary_key=True, unique=True),
                    sa.Column("customer", sa.Integer, sa.ForeignKey("customers.id")))
    harness.store.write_states("default", "customers", {"1": state({"_id": 1})})
    harness.store.write_states("default", "orders", {"5": state({"_id": 5, "customer": 1})})
    harness.commit()
    assert harness.rows("orders") == [(5, 1)]


# -- through Peer ----------------------------------------------------------------------------

CREATE_CUSTOMERS = '''
op.schema.create_table(
    "customers",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(50)),
    sa.Column("joined", sa.DateTime),
    sa.Column("price", sa.Numeric),
    sa.Column("photo", sa.LargeBinary),
    sa.Column("meta", sa.JSON),
)
'''
DROP_CUSTOMERS = 'op.schema.drop_table("customers")'

PEER_DOC = {
    "_id": 1, "name": "Ada", "joined": dt.datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=dt.UTC),
    "price": Decimal128("0.25"), "photo": b"\x00", "meta": {"k": [1, "ü", None]},
}


@pytest.mark.parametrize("declared", [False, True], ids=["json_table", "declared_table"])
def test_peer_write_downgrade_base_and_upgrade_heads(script_peer: Peer, harness: StoreHarness,
                                                     declared: bool) -> None:
    peer = script_peer
    if declared:
        harness.requirements.require("declared_tables")
        author_script(peer, "create customers", CREATE_CUSTOMERS, DROP_CUSTOMERS)
    peer.upgrade("heads")
    peer.write("add ada", [{"op": "insert", "collection": "customers", "doc": to_ejson(PEER_DOC)}])
    with peer.transaction("rename") as tx:
        tx.update("customers", 1, set={"name": "Ada L."}, unset=["meta"])
    expected = {**{k: v for k, v in PEER_DOC.items() if k != "meta"}, "name": "Ada L."}
    assert peer.get("customers", 1) == expected
    snapshot = peer.snapshot()
    assert peer.verify(replay=True).findings == []
    peer.downgrade("base")
    assert peer.snapshot() == {}
    assert peer.get("customers", 1) is None
    peer.upgrade("heads")
    assert peer.get("customers", 1) == expected
    assert peer.snapshot() == snapshot
    assert peer.verify(replay=True).ok


def test_peer_get_returns_the_same_values_from_json_and_declared_tables(
        script_peer: Peer, harness: StoreHarness) -> None:
    harness.requirements.require("declared_tables")
    author_script(script_peer, "create customers", CREATE_CUSTOMERS, DROP_CUSTOMERS)
    script_peer.upgrade("heads")
    with script_peer.transaction("both") as tx:
        tx.insert("customers", PEER_DOC)
        tx.insert("customers_json", PEER_DOC)
    declared = script_peer.get("customers", 1)
    assert declared == script_peer.get("customers_json", 1) == PEER_DOC
    assert [type(v) for v in declared.values()] == [type(v) for v in PEER_DOC.values()]


def test_peer_refuses_a_write_to_a_coupled_table_and_records_nothing(
        script_peer: Peer, harness: StoreHarness) -> None:
    harness.requirements.require("declared_tables", "coupling_checks")
    author_script(script_peer, "create customers", CREATE_CUSTOMERS + '''
op.schema.create_index("customers_name", "customers", ["name"], unique=True)
''', DROP_CUSTOMERS)
    script_peer.upgrade("heads")
    heads = [h.id for h in script_peer.heads()]
    with pytest.raises(StoreError, match="unique index 'customers_name' on \\(name\\)"):
        script_peer.write("add", [{"op": "insert", "collection": "customers",
                                   "doc": {"_id": 1, "name": "Ada"}}])
    assert [h.id for h in script_peer.heads()] == heads
    assert script_peer.snapshot() == {}
