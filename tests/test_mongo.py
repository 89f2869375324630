"""MongoDB peers: the same revisions give the same documents as on SQLite, and back.

By default every test runs on mongomock (no MongoDB server can be installed
on the CI machines); with ``TXENGINE_TEST_MONGODB_URI`` set, the tests that
take ``mongo_url`` also run on that server. mongomock has no multi-document
transactions, so it exercises the intent-record path of atomicity.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mongomock
import pytest
from bson import Binary, Decimal128, ObjectId
from click.testing import CliRunner
from conftest import ledger_items, replayed_snapshot, strict
from hypothesis import given
from test_reversibility import SETTINGS, run, transactions

from txengine.cli import cli
from txengine.exceptions import LockTimeout, StaleLease, StoreError
from txengine.peer import Peer
from txengine.stores.mongo import INCARNATION, INTENTS, open_database

OID = ObjectId("64b7f0c2a1b2c3d4e5f60718")
WHEN = dt.datetime(2024, 2, 29, 23, 59, 59, 999000, tzinfo=dt.UTC)


@pytest.fixture
def mongo_url() -> Iterator[str]:
    """An empty MongoDB database: a real server with TXENGINE_TEST_MONGODB_URI, else mongomock."""
    name = f"t_{secrets.token_hex(6)}"
    base = os.environ.get("TXENGINE_TEST_MONGODB_URI")
    url = f"{base.rstrip('/')}/{name}" if base else f"mongomock://test-mongo/{name}"
    yield url
    db, client = open_database(url)
    db.client.drop_database(name)
    if client is not None:
        client.close()


def fresh_db() -> Any:
    return mongomock.MongoClient()[f"t_{secrets.token_hex(4)}"]


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / f'{secrets.token_hex(4)}.db'}"


def write_typed_chain(peer: Peer, tag: str) -> None:
    """Inserts, updates, incs and deletes with every BSON type txengine carries."""
    with peer.transaction(f"{tag}: insert") as tx:
        tx.insert("things", {"_id": OID, "when": WHEN, "price": Decimal128("19.90"),
                             "blob": b"\x00\xff", "uuid": Binary(b"0123456789abcdef", 4),
                             "nested": {"a": [1, {"b": [None, True, 2.5]}], "e": {}},
                             "tags": ["x", "y"], "n": 1, "big": 2**60, "huge": 2**80})
        tx.insert("things", {"_id": f"{tag}-s", "n": 0})
        tx.insert("other", {"_id": 7, "v": "ü 🌍"})
    with peer.transaction(f"{tag}: update") as tx:
        tx.update("things", OID, set={"nested": {"a": [2]}, "when": WHEN + dt.timedelta(days=1)},
                  unset=["tags"], inc={"n": 41})
        tx.update("things", f"{tag}-s", inc={"n": 2**53})
    with peer.transaction(f"{tag}: delete", partition="user:1") as tx:
        tx.insert("things", {"_id": OID, "p": "user:1"})
    with peer.transaction(f"{tag}: delete") as tx:
        tx.delete("other", 7)


def views(peer: Peer) -> dict[str, Any]:
    """What an app reads: ``find`` on every collection and partition, and ``get``."""
    out: dict[str, Any] = {}
    for partition in ("default", "user:1"):
        for collection in ("things", "other"):
            out[f"{partition}/{collection}"] = peer.find(collection, partition=partition)
    out["get"] = peer.get("things", OID)
    return out


# -- types and replicas ------------------------------------------------------------------------


def test_revisions_from_sqlite_apply_on_mongodb_with_equal_documents_and_back(
        tmp_path: Path, mongo_url: str) -> None:
    """SQLite -> MongoDB -> SQLite: get, find and snapshots (Extended JSON) are equal."""
    with Peer.open(sqlite_url(tmp_path), peer_id="device") as device:
        write_typed_chain(device, "device")
        with Peer.open(mongo_url, peer_id="cloud") as cloud:
            cloud.receive(ledger_items(device))
            cloud.upgrade("heads")
            assert strict(cloud.snapshot()) == strict(device.snapshot())
            assert views(cloud) == views(device)
            assert views(cloud)["get"]["huge"] == 2**80
            write_typed_chain(cloud, "cloud")
            assert cloud.verify(replay=True).ok
            device.receive(ledger_items(cloud))
            device.upgrade("heads")
            assert strict(device.snapshot()) == strict(cloud.snapshot())
            assert views(device) == views(cloud)


def test_collections_are_used_as_they_are_and_partitions_get_their_own(
        mongo_url: str) -> None:
    """Default partition: the collection itself, ``_id`` the key; others: ``coll@partition``."""
    db, _client = open_database(mongo_url)
    with Peer.open(mongo_url, peer_id="m") as peer:
        with peer.transaction("a") as tx:
            tx.insert("things", {"_id": 1, "when": WHEN})
        with peer.transaction("b", partition="user:1") as tx:
            tx.insert("things", {"_id": 1, "p": 2})
        rev = peer.current()[0].id
    (doc,) = db["things"].find()
    assert doc["_id"] == 1 and doc["when"].replace(tzinfo=dt.UTC) == WHEN
    assert set(doc) == {"_id", "when", INCARNATION}
    assert [d["p"] for d in db["things@user:1"].find()] == [2]
    assert rev in {doc[INCARNATION], db["things@user:1"].find_one()[INCARNATION]}
    names = db["txengine_revisions"].index_information()
    assert names["txengine_revisions_origin_seq"]["unique"]
    assert "txengine_revisions_position" in names


def test_reserved_incarnation_field_is_refused(mongo_url: str) -> None:
    with Peer.open(mongo_url, peer_id="m") as peer:
        with pytest.raises(StoreError, match=f"field '{INCARNATION}' of things/1 is reserved"):
            with peer.transaction("bad") as tx:
                tx.insert("things", {"_id": 1, INCARNATION: "x"})
        assert peer.snapshot() == {} and peer.heads() == []


# -- atomicity ------------------------------------------------------------------------------------


class Crash(BaseException):
    """The simulated death of the process at a write."""


class _CrashingCollection:
    _WRITES = {"insert_one", "insert_many", "replace_one", "update_one", "update_many",
               "delete_one", "delete_many", "find_one_and_update", "bulk_write"}

    def __init__(self, db: CrashingDatabase, collection: Any) -> None:
        self._db = db
        self._collection = collection

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._collection, name)
        if name not in self._WRITES:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:
            self._db.writes += 1
            if self._db.writes > self._db.budget:
                raise Crash(f"write {self._db.writes} dropped")
            return attr(*args, **kwargs)
        return write


class CrashingDatabase:
    """A Database whose every write after the ``budget``-th is dropped (the process died)."""

    def __init__(self, db: Any, budget: int) -> None:
        self._db = db
        self.budget = budget
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def __getitem__(self, name: str) -> _CrashingCollection:
        return _CrashingCollection(self, self._db[name])

    def get_collection(self, name: str, **kwargs: Any) -> _CrashingCollection:
        return _CrashingCollection(self, self._db.get_collection(name, **kwargs))


def _thirty_revisions(tmp_path: Path) -> tuple[list[tuple[dict, bytes]], str]:
    with Peer.open(sqlite_url(tmp_path), peer_id="writer") as writer:
        for n in range(30):
            key = n % 6
            with writer.transaction(f"step {n}") as tx:
                if tx.get("items", key) is None:
                    tx.insert("items", {"_id": key, "n": n, "at": WHEN, "d": Decimal128(str(n))})
                elif n % 7 == 3:
                    tx.delete("items", key)
                else:
                    tx.update("items", key, set={"tag": f"t{n}"}, inc={"n": n})
                if n % 4 == 0:
                    tx.insert("other", {"_id": OID if n == 8 else f"k{n}", "n": n},)
        return ledger_items(writer), strict(writer.snapshot())


def _seeded(items: list[tuple[dict, bytes]]) -> Any:
    db = fresh_db()
    with Peer.open(db, peer_id="cloud") as peer:
        peer.receive(items)
    return db


def test_a_crash_at_any_write_of_an_upgrade_leaves_a_peer_that_recovers_consistent(
        tmp_path: Path) -> None:
    """Drop every write after the k-th, for every k of a 30-revision upgrade; reopen each time.

    The reopened peer undoes the half-written step from its intent record:
    its applied set is ancestor-closed, its data equals a replay of that set
    into SQLite, no intent is left, and ``upgrade`` again gives the full result.
    """
    items, expected = _thirty_revisions(tmp_path)
    probe = CrashingDatabase(_seeded(items), budget=10**9)
    with Peer.open(probe, peer_id="cloud", batch_size=4) as peer:
        peer.upgrade("heads")
        assert strict(peer.snapshot()) == expected
    total = probe.writes
    assert total > 60
    for k in range(total):
        db = _seeded(items)
        with pytest.raises(Crash):
            with Peer.open(CrashingDatabase(db, budget=k), peer_id="cloud",
                           batch_size=4) as peer:
                peer.upgrade("heads")
        with Peer.open(db, peer_id="cloud", batch_size=4) as peer:
            assert db[INTENTS].count_documents({}) == 0, f"k={k}"
            applied = set(peer._engine.applied)
            for rev_id in applied:
                assert set(peer.info(rev_id).parents) <= applied, f"k={k}"
            assert strict(peer.snapshot()) == strict(
                replayed_snapshot(peer, sqlite_url(tmp_path))), f"k={k}"
            peer.upgrade("heads")
            assert strict(peer.snapshot()) == expected, f"k={k}"


def test_an_error_inside_write_states_writes_nothing(tmp_path: Path) -> None:
    """Writes are staged per step: a step that fails midway leaves no trace."""
    items, _expected = _thirty_revisions(tmp_path)
    db = _seeded(items)
    with Peer.open(db, peer_id="cloud", batch_size=10) as peer:
        real = peer._store.write_states
        calls = []

        def failing(partition: str, collection: str, states: Any, defer: Any = None) -> None:
            calls.append(collection)
            real(partition, collection, states, defer)
            if len(calls) == 2:
                raise RuntimeError("boom")

        peer._store.write_states = failing  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="boom"):
            peer.upgrade("heads")
    with Peer.open(db, peer_id="cloud") as peer:
        assert peer._engine.applied == {} and peer.snapshot() == {}
        assert [e.action for e in peer.audit()] == ["receive"] * 30


def test_the_lease_has_an_expiry_and_a_stale_holder_cannot_write() -> None:
    db = fresh_db()
    first = Peer.open(db, peer_id="p")
    second = Peer.open(db, peer_id="p")
    try:
        with first.transaction("one") as tx:
            tx.insert("items", {"_id": 1})
        second._ledger._holder = lambda: "p@elsewhere:1"  # type: ignore[method-assign]
        with pytest.raises(LockTimeout):
            second._ledger.acquire_lease(wait=0.1)
        db["txengine_lock"].update_one({"_id": "apply"}, {"$set": {"expires_at": 0.0}})
        assert second._ledger.acquire_lease(wait=0.1)
        with pytest.raises(StaleLease, match="nothing of this step was written"):
            with first.transaction("two") as tx:
                tx.insert("items", {"_id": 2})
        assert [d["_id"] for d in db["items"].find()] == [1]
        assert db["txengine_revisions"].count_documents({}) == 1
    finally:
        second.close()
        first.close()


class _Session:
    """Stands in for a pymongo ClientSession (mongomock has none): runs the callback once."""

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def with_transaction(self, callback: Any) -> Any:
        return callback(self)


class _SessionCollection:
    def __init__(self, collection: Any, sessions: list) -> None:
        self._collection = collection
        self._sessions = sessions

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._collection, name)
        if not callable(attr):
            return attr

        def call(*args: Any, session: Any = None, **kwargs: Any) -> Any:
            self._sessions.append((name, session is not None))
            return attr(*args, **kwargs)
        return call


class _TransactionalDatabase(CrashingDatabase):
    """mongomock with a stand-in session, recording which writes ran inside it."""

    def __init__(self, db: Any) -> None:
        super().__init__(db, budget=10**9)
        self.calls: list[tuple[str, bool]] = []

        class _Client:
            __module__ = "mongomock.stand_in"  # no bulk_write: write one by one, as on mongomock

            def __getattr__(self, name: str) -> Any:
                return getattr(db.client, name)

            def start_session(self) -> _Session:
                return _Session()

        self.client = _Client()

    def with_options(self, **_kwargs: Any) -> _TransactionalDatabase:
        return self

    def __getitem__(self, name: str) -> Any:  # type: ignore[override]
        return _SessionCollection(self._db[name], self.calls)

    def get_collection(self, name: str, **kwargs: Any) -> Any:  # type: ignore[override]
        return _SessionCollection(self._db.get_collection(name, **kwargs), self.calls)


def test_on_a_server_with_transactions_a_step_is_one_transaction_without_intents() -> None:
    """The transaction path: fence and every write of the step inside one session."""
    db = _TransactionalDatabase(fresh_db())
    with Peer(db, peer_id="rs") as peer:
        peer._store.transactional = True
        with peer.transaction("one") as tx:
            tx.insert("items", {"_id": 1})
        step = db.calls[db.calls.index(("update_one", True)):]
        assert [name for name, _ in step] == ["update_one", "replace_one", "insert_one",
                                              "insert_one"]
        assert all(inside for _, inside in step)
        assert peer.get("items", 1) == {"_id": 1}
        assert db[INTENTS].count_documents({}) == 0
        db["txengine_lock"].update_one({"_id": "apply"}, {"$set": {"token": 99}})
        with pytest.raises(StaleLease):
            with peer.transaction("two") as tx:
                tx.insert("items", {"_id": 2})
        assert peer.get("items", 2) is None


# -- authored scripts ------------------------------------------------------------------------------


def _author(peer: Peer, message: str, stores: list[str], upgrade: str, downgrade: str) -> str:
    new = peer.new_script(message, stores=stores)
    head = new.path.read_text("utf-8").split("\n\ndef upgrade(op):")[0].rstrip("\n")
    new.path.write_text(f"{head}\n\n\ndef upgrade(op):\n    {upgrade}\n\n\n"
                        f"def downgrade(op):\n    {downgrade}\n", "utf-8")
    return new.id


def test_scripts_get_op_db_on_mongodb_and_sql_only_scripts_are_skipped(tmp_path: Path) -> None:
    db = fresh_db()
    with Peer.open(db, peer_id="m", script_location=tmp_path / "versions") as peer:
        sql_only = _author(peer, "sql table", ["sql"],
                           'op.schema.create_table("t", __import__("sqlalchemy").Column('
                           '"id", __import__("sqlalchemy").Integer, primary_key=True))',
                           'op.schema.drop_table("t")')
        index = _author(peer, "index", ["mongo"], 'op.db["items"].create_index("name")',
                        'op.db["items"].drop_index("name_1")')
        peer.upgrade("heads")
        assert "name_1" in db["items"].index_information()
        skipped = [e for e in peer.audit() if e.action == "skip"]
        assert [e.revision for e in skipped] == [sql_only]
        assert skipped[0].detail == {"reason": "skipped: declared for sql, this store is mongo"}
        assert index in peer._engine.applied
        peer.downgrade("base")
        assert "name_1" not in db["items"].index_information()


# -- reversibility ------------------------------------------------------------------------------


@SETTINGS
@given(txs=transactions(["default", "user:1"]))
def test_reversibility_and_replay_equality_on_mongodb(tmp_path: Path, txs: list) -> None:
    """Random writes: base is empty again, heads is the same again, replay into SQLite equal."""
    with Peer.open(fresh_db(), peer_id="test") as peer:
        run(peer, txs)
        final = strict(peer.snapshot())
        assert strict(replayed_snapshot(peer, sqlite_url(tmp_path))) == final
        peer.downgrade("base")
        assert strict(peer.snapshot()) == "[]"
        peer.upgrade("heads")
        assert strict(peer.snapshot()) == final
        report = peer.verify(replay=True)
        assert report.ok, report.findings


# -- CLI --------------------------------------------------------------------------------------


def test_cli_commands_work_with_a_mongodb_store_url(mongo_url: str) -> None:
    runner = CliRunner()
    ops = [{"op": "insert", "collection": "customers",
            "doc": {"_id": 1, "name": "Ada", "at": {"$date": "2024-01-02T03:04:05.123Z"}}}]
    for args, stdin in [(["write", "-m", "add Ada", "-"], json.dumps(ops)),
                        (["get", "customers", "1"], None),
                        (["history"], None), (["verify", "--replay"], None),
                        (["downgrade", "base"], None), (["upgrade"], None),
                        (["audit"], None)]:
        result = runner.invoke(cli, ["--store", mongo_url, "--peer-id", "m", *args],
                               input=stdin)
        assert result.exit_code == 0, (args, result.output)
    result = runner.invoke(cli, ["--store", mongo_url, "get", "customers", "1"])
    assert json.loads(result.output)["name"] == "Ada"
