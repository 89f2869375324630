"""MongoDB store on a pymongo ``Database`` (mongomock's included).

Collections are used as they are: a document of the ``default`` partition
lives in the collection of its name with its key as ``_id``. Another
partition's documents live in ``<collection>@<partition>`` (collection
names never contain ``@``), so two partitions never share an ``_id``. The
incarnation rides in the document itself, in the hidden field
``_txengine_incarnation``, so a document and its incarnation change in one
single-document write.

Documents are real BSON: the Extended JSON of a payload is decoded
(``ObjectId``, ``datetime``, ``Decimal128``, binary) and encoded back to the
same Extended JSON when states are loaded. Two values BSON cannot hold keep
their Extended JSON form: an integer beyond 64 bits stays a nested
``{"$numberLong": "..."}`` document, and a bare integer beyond ±(2^53-1)
(RFC 8785's spelling of a whole float) is stored as the double it is.

Writes are buffered for one step (a revision or a batch) and reach the
server in :meth:`MongoStore.commit`: inside one multi-document transaction
where the server has them (replica set, sharded cluster); elsewhere
(standalone server, mongomock) after an *intent* record holding the
before-image of everything the step writes, written with ``j: true``.
:meth:`MongoStore.recover` undoes a step whose intent is still there, so a
crash at any point leaves the store as it was before the step. See
``docs/mongodb.md``.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import bson
from bson import Int64, ObjectId
from bson.codec_options import CodecOptions
from pymongo import DeleteOne, InsertOne, ReplaceOne, UpdateOne, WriteConcern

from ..exceptions import StaleLease, StoreError
from ..ops import State, check_collection
from ..revision import DEFAULT_PARTITION
from ..values import MAX_SAFE_INT, from_ejson, key_text, loads, to_ejson

INCARNATION = "_txengine_incarnation"
"""The hidden field holding a document's incarnation."""
PARTITION_SEP = "@"
INTENTS = "txengine_intents"
_INT64 = (-(2**63), 2**63 - 1)
_TAGS = {"$oid", "$numberLong", "$numberDecimal", "$date", "$binary"}
_INTENT_BYTES = 4 * 1024 * 1024
_MOCK_CLIENTS: dict[str, Any] = {}


# -- opening -------------------------------------------------------------------------------


def open_database(url: str) -> tuple[Any, Any]:
    """Return ``(database, client)`` for a MongoDB URL; the database is its path.

    ``mongomock://host/db`` opens mongomock's in-memory test double; one
    mock server per host lives as long as the process, so several peers and
    CLI invocations in one process see the same data.
    """
    path = urlsplit(url).path.lstrip("/").split("?")[0]
    if not path:
        raise StoreError(f"cannot open store {url!r}: name the database in the URL"
                         " (mongodb://host/dbname)")
    if url.startswith("mongomock://"):
        import mongomock

        host = urlsplit(url).netloc or "localhost"
        client = _MOCK_CLIENTS.setdefault(host, mongomock.MongoClient())
        return client[path], None
    try:
        from pymongo import MongoClient

        client = MongoClient(url, tz_aware=True)
        return client.get_database(path), client
    except Exception as exc:  # pymongo raises ConfigurationError, InvalidURI, ...
        raise StoreError(f"cannot open store {url!r}: {exc}") from exc


def _is_mock(db: Any) -> bool:
    """Tell whether ``db`` is mongomock's (or a wrapper's around it): no bulk_write, no sessions."""
    return type(getattr(db, "client", db)).__module__.startswith("mongomock")


def _supports_transactions(db: Any) -> bool:
    """Tell whether the server runs multi-document transactions (replica set, mongos)."""
    if _is_mock(db):
        return False
    try:
        hello = db.client.admin.command("hello")
    except Exception:  # noqa: BLE001 - an old server or a wrapper: no transactions
        return False
    return bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"


# -- values ----------------------------------------------------------------------------------


def to_bson(value: Any) -> Any:
    """Return the BSON value of an Extended JSON value (see the module docstring)."""
    kind = type(value)
    if kind is dict:
        if len(value) == 1:
            (tag,) = value
            if tag in _TAGS:
                if tag == "$numberLong":
                    number = int(value[tag])
                    if not _INT64[0] <= number <= _INT64[1]:
                        return dict(value)
                    return Int64(number)
                return from_ejson(value)
        return {k: to_bson(v) for k, v in value.items()}
    if kind is list:
        return [to_bson(v) for v in value]
    if kind is int and not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        return float(value)
    return value


def to_ejson_value(value: Any) -> Any:
    """Return the Extended JSON of a BSON value read back (the inverse of :func:`to_bson`)."""
    kind = type(value)
    if kind is dict:
        return {k: to_ejson_value(v) for k, v in value.items()}
    if kind is list:
        return [to_ejson_value(v) for v in value]
    if kind is str or kind is bool or kind is float or value is None:
        return value
    if isinstance(value, int):
        return to_ejson(int(value))
    if isinstance(value, _dt.datetime) and value.tzinfo is None:
        value = value.replace(tzinfo=_dt.UTC)
    if isinstance(value, Mapping):
        return {k: to_ejson_value(v) for k, v in value.items()}
    return to_ejson(value)


def key_value(text: str) -> Any:
    """Return the ``_id`` of a key text."""
    return to_bson(loads(text))


def text_of(_id: Any) -> str:
    """Return the key text of an ``_id`` read back."""
    return key_text(to_ejson_value(_id))


def collection_name(partition: str, collection: str) -> str:
    """Return the MongoDB collection holding ``collection`` of ``partition``."""
    if partition == DEFAULT_PARTITION:
        return collection
    if "$" in partition or "\x00" in partition or len(partition) > 100:
        raise StoreError(f"partition {partition!r} cannot name a MongoDB collection: use at"
                         " most 100 characters without '$'")
    return f"{collection}{PARTITION_SEP}{partition}"


def split_name(name: str) -> tuple[str, str]:
    """Return ``(partition, collection)`` of a MongoDB collection name."""
    collection, sep, partition = name.partition(PARTITION_SEP)
    return (partition if sep else DEFAULT_PARTITION), collection


# -- the store -------------------------------------------------------------------------------


class MongoStore:
    """Document states in MongoDB collections; writes buffered per step, then committed."""

    kind = "mongo"
    declared_tables = False
    exact_decimal_columns = False
    bulk_batch = 2000
    """A MongoDB transaction holds its writes in memory and is bounded in size and time."""

    def __init__(self, db: Any, client: Any = None, transactions: bool | None = None) -> None:
        if not _is_mock(db):
            db = db.with_options(codec_options=CodecOptions(tz_aware=True))
        self.db = db
        self.client = client
        self.transactional = (_supports_transactions(db) if transactions is None
                              else transactions)
        self.fence: tuple[Any, int] | None = None
        """(lock collection, token) of the held apply lease: commits are fenced by it."""
        self._requests: list[tuple[str, tuple[Any, ...]]] = []
        self._overlay: dict[tuple[str, str], tuple[Any, dict[str, Any] | None]] = {}
        self._audit: list[dict[str, Any]] = []
        self._bulk = not _is_mock(db)

    # -- the unit of work ----------------------------------------------------------
    def stage(self, collection: str, request: tuple[Any, ...]) -> None:
        """Buffer one write of the ledger: ``("insert", doc)``, ``("set", _id, fields)``,
        ``("replace", _id, doc)`` or ``("delete", _id)``."""
        self._requests.append((collection, request))

    def stage_audit(self, doc: dict[str, Any]) -> None:
        """Buffer one audit row; its ``seq`` is given at commit."""
        self._audit.append(doc)

    def pending(self) -> list[tuple[str, tuple[Any, ...]]]:
        return self._requests

    def rollback(self) -> None:
        """Drop the buffered writes of the step (reads never hold a snapshot)."""
        self._requests.clear()
        self._overlay.clear()
        self._audit.clear()

    def commit_in_background(self, statements: Sequence[Any] = ()) -> Callable[[], None]:
        """Commit now (the buffered step is written by this thread); nothing to wait for.

        A MongoStore never defers statements (:meth:`write_states`), so there are none."""
        self.commit()
        return _nothing

    def commit(self) -> None:
        """Write the step: one transaction, or intent, writes, intent removed."""
        if not self._requests and not self._audit:
            return
        try:
            if self._audit:
                self._number_audit()
            if self.transactional:
                self._commit_transaction()
            else:
                self._commit_with_intent()
        finally:
            self.rollback()

    def _number_audit(self) -> None:
        counter = self.db["txengine_state"].find_one_and_update(
            {"_id": "audit_seq"}, {"$inc": {"value": len(self._audit)}}, upsert=True,
            return_document=True)
        first = int(counter["value"]) - len(self._audit) + 1
        for i, doc in enumerate(self._audit):
            doc["_id"] = doc["seq"] = first + i
            self._requests.append(("txengine_audit", ("insert", doc)))
        self._audit.clear()

    def _check_fence(self, session: Any = None) -> None:
        if self.fence is None:
            return
        lock, token = self.fence
        now = time.time()
        kwargs = {"session": session} if session is not None else {}
        found = self.db[lock].update_one(
            {"_id": "apply", "token": token, "expires_at": {"$gt": now}},
            {"$set": {"fenced_at": now}}, **kwargs)
        if found.matched_count != 1:
            raise StaleLease(
                "the apply lease expired and another process took it: nothing of this step"
                " was written; run the command again")

    def _commit_transaction(self) -> None:
        def write(session: Any) -> None:
            self._check_fence(session)
            self._write(self._requests, session)

        with self.db.client.start_session() as session:
            session.with_transaction(write)

    def _commit_with_intent(self) -> None:
        self._check_fence()
        step = ObjectId()
        intents = self.db.get_collection(INTENTS, write_concern=WriteConcern(j=True))
        parts = self._before_images(step)
        token = self.fence[1] if self.fence else None
        for n, entries in enumerate(parts):
            intents.insert_one({"_id": f"{step}:{n}", "step": step, "part": n,
                                "token": token, "before": entries})
        try:
            self._write(self._requests)
        except Exception:
            self.recover()
            raise
        intents.delete_many({"step": step})

    def _before_images(self, step: ObjectId) -> list[list[dict[str, Any]]]:
        """Return the before-images of every document the step writes, cut into parts."""
        wanted: dict[str, dict[Any, set[str] | None]] = defaultdict(dict)
        for collection, request in self._requests:
            action = request[0]
            _id = request[1]["_id"] if action == "insert" else request[1]
            if action == "set":
                fields = wanted[collection].setdefault(_id, set())
                if fields is not None:
                    fields.update(request[2])
            else:
                wanted[collection][_id] = None
        entries = []
        for collection, ids in wanted.items():
            found = {d["_id"]: d for d in self.db[collection].find(
                {"_id": {"$in": list(ids)}})}
            for _id, fields in ids.items():
                doc = found.get(_id)
                if fields is None or doc is None:
                    entries.append({"c": collection, "i": _id, "d": doc})
                else:
                    entries.append({"c": collection, "i": _id,
                                    "f": {f: doc.get(f) for f in sorted(fields)}})
        parts: list[list[dict[str, Any]]] = [[]]
        size = 0
        for entry in entries:
            length = len(bson.encode(entry))
            if parts[-1] and size + length > _INTENT_BYTES:
                parts.append([])
                size = 0
            parts[-1].append(entry)
            size += length
        return parts

    def _write(self, requests: list[tuple[str, tuple[Any, ...]]], session: Any = None) -> None:
        kwargs = {"session": session} if session is not None else {}
        if self._bulk:
            grouped: dict[str, list[Any]] = defaultdict(list)
            for collection, request in requests:
                grouped[collection].append(_bulk_request(request))
            for collection, bulk in grouped.items():
                self.db[collection].bulk_write(bulk, ordered=True, **kwargs)
            return
        for collection, request in requests:
            target = self.db[collection]
            action = request[0]
            if action == "insert":
                target.insert_one(request[1], **kwargs)
            elif action == "set":
                target.update_one({"_id": request[1]}, {"$set": request[2]}, **kwargs)
            elif action == "replace":
                target.replace_one({"_id": request[1]}, request[2], upsert=True, **kwargs)
            else:
                target.delete_one({"_id": request[1]}, **kwargs)

    def recover(self) -> int:
        """Undo every step whose intent record is still there; return how many.

        Restoring before-images is idempotent, so a crash during recovery is
        recovered by the next open as well.
        """
        intents = self.db.get_collection(INTENTS, write_concern=WriteConcern(j=True))
        steps: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for intent in intents.find().sort("_id", -1):
            steps[intent["step"]] += intent["before"]
        for step, entries in sorted(steps.items(), key=lambda s: s[0], reverse=True):
            restore: list[tuple[str, tuple[Any, ...]]] = []
            for entry in entries:
                if "f" in entry:
                    restore.append((entry["c"], ("set", entry["i"], entry["f"])))
                elif entry["d"] is None:
                    restore.append((entry["c"], ("delete", entry["i"])))
                else:
                    restore.append((entry["c"], ("replace", entry["i"], entry["d"])))
            self._write(restore)
            intents.delete_many({"step": step})
        return len(steps)

    def has_intents(self) -> bool:
        return self.db[INTENTS].find_one({}, {"_id": 1}) is not None

    # -- states ----------------------------------------------------------------------
    def load_states(self, partition: str, collection: str,
                    keys: Iterable[str]) -> dict[str, State]:
        name = collection_name(partition, collection)
        out: dict[str, State] = {}
        ids = []
        for text in keys:
            staged = self._overlay.get((name, text))
            if staged is not None:
                if staged[1] is not None:
                    out[text] = _state_of(staged[1])
                continue
            ids.append(key_value(text))
        for i in range(0, len(ids), 1000):
            for doc in self.db[name].find({"_id": {"$in": ids[i:i + 1000]}}):
                out[text_of(doc["_id"])] = _state_of(doc)
        return out

    def write_states(self, partition: str, collection: str, states: Mapping[str, State],
                     defer: list[Any] | None = None) -> None:
        """Buffer final states for the commit (``defer`` is moot: nothing runs before it)."""
        check_collection(collection)
        name = collection_name(partition, collection)
        staged: list[tuple[str, Any, dict[str, Any] | None]] = []
        for text, (doc, inc) in states.items():
            _id = key_value(text)
            if doc is None:
                staged.append((text, _id, None))
                continue
            if INCARNATION in doc:
                raise StoreError(f"field {INCARNATION!r} of {collection}/{text} is reserved"
                                 " by txengine's MongoDB store: rename it")
            value = to_bson(doc)
            value.pop("_id", None)
            value = {"_id": _id, **value}
            if inc is not None:
                value[INCARNATION] = inc
            staged.append((text, _id, value))
        for text, _id, value in staged:
            self._overlay[(name, text)] = (_id, value)
            self.stage(name, ("delete", _id) if value is None else ("replace", _id, value))

    def forget_tables(self) -> None:
        """Nothing is cached about collections (the SQL store drops table metadata)."""

    def _names(self) -> list[str]:
        return [n for n in self.db.list_collection_names()
                if not n.startswith(("txengine_", "system."))]

    def collections(self) -> list[str]:
        return sorted({split_name(n)[1] for n in self._names()})

    def documents(self, partition: str, collection: str) -> Iterator[dict[str, Any]]:
        yield from self.find_documents(partition, collection, {})

    def find_documents(self, partition: str, collection: str,
                       query: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the documents matching a MongoDB filter, as Extended JSON, by key."""
        name = collection_name(partition, collection)
        found = [_state_of(d)[0] for d in self.db[name].find(query)]
        found.sort(key=lambda d: key_text(d["_id"]))
        return found

    def snapshot(self) -> dict[tuple[str, str, str], State]:
        out: dict[tuple[str, str, str], State] = {}
        for name in self._names():
            partition, collection = split_name(name)
            for doc in self.db[name].find():
                out[(partition, collection, text_of(doc["_id"]))] = _state_of(doc)
        return out

    def ordered_states(self, partition: str, collection: str
                       ) -> Iterator[tuple[str, dict[str, Any], str | None]]:
        """Yield (key text, doc, incarnation) of a partition's collection by key text.

        BSON orders ``_id`` by type first, so the documents are sorted here by
        key text (code points), as the SQL stores return them: one content
        digest for every store kind. Holds the collection's states in memory.
        """
        name = collection_name(partition, collection)
        states = [(text_of(d["_id"]), _state_of(d)) for d in self.db[name].find()]
        states.sort(key=lambda s: s[0])
        for text, (doc, inc) in states:
            yield text, doc, inc

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _state_of(doc: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    inc = doc.get(INCARNATION)
    return {k: to_ejson_value(v) for k, v in doc.items() if k != INCARNATION}, inc


def _bulk_request(request: tuple[Any, ...]) -> Any:
    action = request[0]
    if action == "insert":
        return InsertOne(request[1])
    if action == "set":
        return UpdateOne({"_id": request[1]}, {"$set": request[2]})
    if action == "replace":
        return ReplaceOne({"_id": request[1]}, request[2], upsert=True)
    return DeleteOne({"_id": request[1]})


def _nothing() -> None:
    """What :meth:`MongoStore.commit_in_background` returns: its commit is done."""
