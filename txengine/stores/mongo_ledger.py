"""The ledger on MongoDB: the same methods and return shapes as :class:`txengine.ledger.Ledger`.

One document per revision in ``txengine_revisions`` (``_id`` is the revision
id; the other fields are the SQL ledger's columns, with the same values, so
``descriptor_from_row`` and ``payload_of`` read both), append-only audit rows
in ``txengine_audit`` (``_id`` is the audit ``seq``, numbered from a counter
in ``txengine_state``), named values in ``txengine_state``, and the apply
lease in ``txengine_lock``. Writes are staged on the :class:`MongoStore` and
reach the server with the step's data in ``store.commit()``; the lease is
written at once, by compare-and-set on its fencing token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from ..exceptions import LockTimeout, StaleLease
from ..lease import LeaseHolder
from ..ledger import (
    ANNOUNCED,
    BASE,
    FETCHED,
    NODE_COLUMNS,
    Applied,
    AuditEntry,
    _os_user,
    _row_type,
    descriptor_from_row,
    payload_of,
    revisions,
    signature_text,
    utc_now,
    write_rows,
)
from ..revision import Revision
from ..values import dumps
from .mongo import MongoStore

REVISIONS = "txengine_revisions"
AUDIT = "txengine_audit"
STATE = "txengine_state"
LOCK = "txengine_lock"
_SEP = "\x1f"


def _write_keys(rev: Revision) -> list[str]:
    """Return the key index of a revision, kept in its own document (multikey-indexed):
    ``collection<US>key`` for each key its ops write."""
    return [f"{c}{_SEP}{k}" for _p, c, k, _ms, _r in write_rows([rev])]
COLUMNS = tuple(c.name for c in revisions.c)
_NODE_COLUMNS = ("id", *NODE_COLUMNS)
_DESCRIPTOR_JSON = ("parents", "depends_on", "collections", "branch_labels")


def _field(name: str) -> str:
    return "_id" if name == "id" else name


def _values(doc: dict[str, Any], names: Sequence[str]) -> tuple[Any, ...]:
    out = []
    for name in names:
        value = doc.get(_field(name))
        if name == "payload" and value is not None and not isinstance(value, (bytes, str)):
            value = bytes(value)
        out.append(value)
    return tuple(out)


class MongoLedger(LeaseHolder):
    """Reads and writes the ledger collections of one MongoDB database."""

    def __init__(self, store: MongoStore, peer_id: str) -> None:
        self.store = store
        self.db = store.db
        self.peer_id = peer_id
        self.os_user = _os_user()
        self._lease_token: int | None = None
        self.token_seen: int | None = None
        self._lease_expires = 0.0
        self.lease_seconds = 30.0

    @staticmethod
    def create_tables(store: MongoStore) -> None:
        """Create the indexes the ledger needs (idempotent)."""
        db = store.db
        db[REVISIONS].create_index([("origin", ASCENDING), ("partition", ASCENDING),
                                    ("seq", ASCENDING)], unique=True,
                                   name="txengine_revisions_origin_seq")
        db[REVISIONS].create_index([("position", ASCENDING)], name="txengine_revisions_position")
        db[AUDIT].create_index([("revision", ASCENDING)], name="txengine_audit_revision")
        db[REVISIONS].create_index([("partition", ASCENDING), ("w", ASCENDING),
                                    ("hlc_ms", ASCENDING)], name="txengine_revisions_writes")
        db["txengine_intents"].create_index([("step", ASCENDING)], name="txengine_intents_step")

    # -- revisions -------------------------------------------------------------------
    def insert(self, rev: Revision, state: str, applied: Applied | None = None) -> None:
        self.insert_many([(rev, state, applied)])

    def insert_many(self, rows: Sequence[tuple[Revision, str, Applied | None]],
                    defer: list[Any] | None = None,
                    keys_of: Sequence[Sequence[tuple[str, str, str]]] | None = None) -> None:
        """As :meth:`Ledger.insert_many`; the writes are staged for the commit either way,
        and the key index is derived from the ops."""
        now = time.time()
        for rev, st, applied in rows:
            d = rev.descriptor
            self.store.stage(REVISIONS, ("insert", {
                "_id": d["id"], "partition": d["partition"], "kind": d["kind"],
                "origin": d["origin"], "seq": d["seq"], "hlc_ms": d["hlc"][0],
                "hlc_c": d["hlc"][1], "parents": dumps(d["parents"]),
                "depends_on": dumps(d["depends_on"]), "message": d["message"],
                "checksum": d["checksum"], "collections": dumps(d["collections"]),
                "branch_labels": dumps(d["branch_labels"]), "digest": d["digest"],
                "signature": signature_text(d), "payload": rev.payload,
                "state": applied.state if applied else st,
                "position": applied.position if applied else None,
                "undo": dumps(applied.undo) if applied and applied.undo is not None else None,
                "stored_at": now, "w": _write_keys(rev),
            }))

    def copy_many(self, rows: Sequence[Any], revs: Sequence[Revision],
                  entries: Sequence[Applied], defer: list[Any] | None = None,
                  keys_of: Sequence[Sequence[tuple[str, str, str]]] | None = None) -> None:
        """As :meth:`Ledger.copy_many`: the documents are built from ``revs``."""
        self.insert_many([(rev, e.state, e) for rev, e in zip(revs, entries, strict=True)])

    def announce_many(self, descriptors: Sequence[dict[str, Any]]) -> None:
        self.insert_many([(Revision(d, None), ANNOUNCED, None)  # type: ignore[arg-type]
                          for d in descriptors])

    def fill_payloads(self, revs: Sequence[tuple[Revision, str]]) -> None:
        for rev, st in revs:
            self.store.stage(REVISIONS, ("set", rev.id, {"payload": rev.payload, "state": st,
                                                         "w": _write_keys(rev)}))

    def fill_applied(self, revs: Sequence[Revision], entries: Sequence[Applied]) -> None:
        for rev, e in zip(revs, entries, strict=True):
            self.store.stage(REVISIONS, ("set", rev.id, {
                "payload": rev.payload, "state": e.state, "position": e.position,
                "undo": dumps(e.undo), "w": _write_keys(rev)}))

    def set_states(self, ids: Sequence[str], st: str) -> None:
        for rev_id in ids:
            self.store.stage(REVISIONS, ("set", rev_id, {"state": st}))

    def strip(self, ids: Sequence[str]) -> None:
        for rev_id in ids:
            self.store.stage(REVISIONS, ("set", rev_id, {"state": BASE, "payload": None,
                                                         "undo": None, "position": None,
                                                         "w": []}))

    def delete(self, ids: Sequence[str]) -> None:
        for rev_id in ids:
            self.store.stage(REVISIONS, ("delete", rev_id))

    def writers(self, partition: str, keys: Sequence[tuple[str, str]], min_ms: int
                ) -> list[tuple[str, str, str]]:
        out: list[tuple[str, str, str]] = []
        by_collection: dict[str, list[str]] = {}
        for collection, key in keys:
            by_collection.setdefault(collection, []).append(key)
        for collection, texts in sorted(by_collection.items()):
            wanted = {f"{collection}{_SEP}{t}" for t in texts}
            chunks = sorted(wanted)
            for i in range(0, len(chunks), 1000):
                for doc in self.db[REVISIONS].find(
                        {"partition": partition, "w": {"$in": chunks[i:i + 1000]},
                         "hlc_ms": {"$gte": min_ms}}, {"w": 1}):
                    for w in doc["w"]:
                        if w in wanted:
                            c, _, k = w.partition(_SEP)
                            out.append((c, k, doc["_id"]))
        return out

    def by_state(self, *states: str) -> list[Any]:
        row_type = _row_type(COLUMNS)
        return [row_type(*_values(doc, COLUMNS))
                for doc in self.db[REVISIONS].find({"state": {"$in": list(states)}})]

    def count_states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for doc in self.db[REVISIONS].aggregate([{"$group": {"_id": "$state",
                                                             "n": {"$sum": 1}}}]):
            out[doc["_id"]] = int(doc["n"])
        return out

    def backfill_writes(self) -> int | None:
        if self.get_state("writes_index") is not None:
            return None
        done = 0
        for doc in self.db[REVISIONS].find({"kind": "data", "payload": {"$ne": None},
                                            "w": {"$exists": False}}):
            row = _row_type(COLUMNS)(*_values(doc, COLUMNS))
            rev = Revision(descriptor_from_row(row), payload_of(row))
            self.store.stage(REVISIONS, ("set", rev.id, {"w": _write_keys(rev)}))
            done += 1
        self.set_state("writes_index", "1")
        return done

    def update_payload(self, rev: Revision) -> None:
        d = rev.descriptor
        self.store.stage(REVISIONS, ("set", d["id"], {
            "payload": rev.payload, "checksum": d["checksum"], "digest": d["digest"],
            "message": d["message"], "signature": signature_text(d),
            **{name: dumps(d[name]) for name in _DESCRIPTOR_JSON}}))

    def nodes(self) -> list[tuple[Any, ...]]:
        projection = {_field(n): 1 for n in _NODE_COLUMNS}
        return [_values(doc, _NODE_COLUMNS) for doc in self.db[REVISIONS].find({}, projection)]

    def ordered(self, states: Collection[str]) -> list[tuple[Any, ...]]:
        names = ("hlc_ms", "hlc_c", "origin", "id", "partition", "kind")
        found = [(*_values(doc, names), doc["_id"]) for doc in self.db[REVISIONS].find(
            {_field("state"): {"$in": list(states)}}, {_field(n): 1 for n in names})]
        found.sort()
        return found

    def rows_at(self, at: Sequence[Any], *columns: str) -> list[Any]:
        found = self.rows(at, *columns)
        return [found[i] for i in at if i in found]

    def row(self, rev_id: str) -> Any | None:
        doc = self.db[REVISIONS].find_one({"_id": rev_id})
        return None if doc is None else _row_type(COLUMNS)(*_values(doc, COLUMNS))

    def rows(self, ids: Sequence[str], *columns: str) -> dict[str, Any]:
        names = ("id", *columns)
        row_type = _row_type(names)
        projection = {_field(n): 1 for n in names}
        out: dict[str, Any] = {}
        ids = list(ids)
        for i in range(0, len(ids), 1000):
            for doc in self.db[REVISIONS].find({"_id": {"$in": ids[i:i + 1000]}}, projection):
                out[doc["_id"]] = row_type(*_values(doc, names))
        return out

    def full_rows(self, ids: Sequence[str]) -> dict[str, Any]:
        return self.rows(ids, *COLUMNS[1:])

    def all_rows(self) -> Iterator[Any]:
        row_type = _row_type(COLUMNS)
        docs = self.db[REVISIONS].find().sort([("hlc_ms", ASCENDING), ("hlc_c", ASCENDING)])
        for doc in docs:
            yield row_type(*_values(doc, COLUMNS))

    def slots(self, origin: str, partition: str, seqs: Sequence[int]
              ) -> dict[int, tuple[str, str]]:
        out: dict[int, tuple[str, str]] = {}
        seqs = list(seqs)
        for i in range(0, len(seqs), 1000):
            for doc in self.db[REVISIONS].find(
                    {"origin": origin, "partition": partition, "seq": {"$in": seqs[i:i + 1000]}},
                    {"seq": 1, "digest": 1}):
                out[int(doc["seq"])] = (doc["_id"], doc["digest"])
        return out

    def script_checksums(self) -> dict[str, str]:
        return {doc["checksum"]: doc["_id"]
                for doc in self.db[REVISIONS].find({"kind": "script"}, {"checksum": 1})}

    def max_seq(self, origin: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for doc in self.db[REVISIONS].find({"origin": origin}, {"partition": 1, "seq": 1}):
            out[doc["partition"]] = max(out.get(doc["partition"], 0), int(doc["seq"]))
        return out

    def mark_applied(self, entries: Sequence[Applied], defer: list[Any] | None = None
                     ) -> None:
        """Stage applied states for the commit (``defer`` is moot: nothing runs before it)."""
        for e in entries:
            self.store.stage(REVISIONS, ("set", e.id, {
                "state": e.state, "position": e.position,
                "undo": None if e.undo is None else dumps(e.undo)}))

    def mark_unapplied(self, ids: Sequence[str], defer: list[Any] | None = None) -> None:
        for rev_id in ids:
            self.store.stage(REVISIONS, ("set", rev_id,
                                         {"state": FETCHED, "position": None, "undo": None}))

    # -- audit -----------------------------------------------------------------------
    def audit(self, action: str, revision: str | None, *, outcome: str = "ok",
              duration_ms: float = 0.0, detail: dict[str, Any] | None = None) -> None:
        self.audit_many([(action, revision, outcome, duration_ms, detail or {})])

    def audit_many(self, rows: Iterable[tuple[str, str | None, str, float, dict[str, Any]]]
                   ) -> None:
        at = utc_now()
        for action, rev, outcome, duration, detail in rows:
            self.store.stage_audit({
                "revision": rev, "action": action, "peer_id": self.peer_id,
                "os_user": self.os_user, "at": at, "duration_ms": round(duration, 3),
                "outcome": outcome, "detail": dumps(detail)})

    def audit_entries(self, revision: str | None = None) -> list[AuditEntry]:
        query = {} if revision is None else {"revision": revision}
        return [
            AuditEntry(int(r["seq"]), r["revision"], r["action"], r["peer_id"], r["os_user"],
                       r["at"], r["duration_ms"], r["outcome"], json.loads(r["detail"]))
            for r in self.db[AUDIT].find(query).sort("_id", ASCENDING)
        ]

    # -- state -----------------------------------------------------------------------
    def get_state(self, name: str) -> str | None:
        for collection, request in reversed(self.store.pending()):
            if collection == STATE and request[0] == "replace" and request[1] == name:
                return str(request[2]["value"])
        doc = self.db[STATE].find_one({"_id": name})
        return None if doc is None else str(doc["value"])

    def set_state(self, name: str, value: str) -> None:
        self.store.stage(STATE, ("replace", name, {"_id": name, "value": value}))

    def create_state(self, name: str, value: str) -> str:
        """As :meth:`Ledger.create_state`: one upsert outside any step, so a local-only
        value (a peer's key) never joins a revision's transaction."""
        self.db[STATE].update_one({"_id": name}, {"$setOnInsert": {"value": value}},
                                  upsert=True)
        return str(self.db[STATE].find_one({"_id": name})["value"])

    # -- the apply lease -------------------------------------------------------------
    def observe_lease(self) -> None:
        """As :meth:`Ledger.observe_lease`."""
        row = self.db[LOCK].find_one({"_id": "apply"})
        if row is None:
            self.token_seen = 0
        elif row["expires_at"] < time.time() or row["token"] == self._lease_token:
            self.token_seen = int(row["token"])
        else:
            self.token_seen = None

    def acquire_lease(self, wait: float = 10.0) -> bool:
        """Take (or renew) the apply lease; return True when another holder had it since.

        As :meth:`Ledger.acquire_lease`, by compare-and-set on the token. A new
        holder first recovers any step a crashed holder left half-written.
        """
        now = time.time()
        if self._lease_token is not None and now < self._lease_expires - 5.0:
            return False
        deadline = time.monotonic() + wait
        holder = self._holder()
        lock = self.db[LOCK]
        while True:
            row = lock.find_one({"_id": "apply"})
            now = time.time()
            expires = now + self.lease_seconds
            if row is None:
                try:
                    lock.insert_one({"_id": "apply", "holder": holder, "token": 1,
                                     "expires_at": expires})
                except DuplicateKeyError:
                    continue
                token, changed, taken = 1, self.token_seen != 0, True
            elif row["holder"] == holder and row["token"] == self._lease_token:
                token, changed, taken = int(row["token"]), False, False
                if lock.update_one({"_id": "apply", "token": token},
                                   {"$set": {"expires_at": expires}}).matched_count != 1:
                    continue
            elif row["expires_at"] < now or row["holder"] == holder \
                    or self._holder_dead(row["holder"]):
                token, changed, taken = (int(row["token"]) + 1,
                                         self.token_seen != row["token"], True)
                if lock.update_one({"_id": "apply", "token": row["token"]}, {"$set": {
                        "holder": holder, "token": token,
                        "expires_at": expires}}).matched_count != 1:
                    continue
            else:
                if time.monotonic() >= deadline:
                    raise LockTimeout(row["holder"], wait)
                time.sleep(0.05)
                continue
            self._lease_token = token
            self._lease_expires = expires
            self.store.fence = (LOCK, token)
            if taken:
                # A new holder undoes what a crashed one left half-written; if it
                # did, what this process loaded is stale.
                self.store.rollback()
                if self.store.recover():
                    changed = True
            if not changed:
                self.token_seen = token  # still current: no one else wrote since we loaded
            return changed

    def recover_on_open(self) -> None:
        """Recover a half-written step at open, when no live process holds the lease."""
        if not self.store.has_intents():
            return
        try:
            self.acquire_lease(wait=0.0)
        except LockTimeout:
            return  # its holder is alive and may still finish the step

    def renew_lease(self) -> None:
        if self._lease_token is None:
            raise StaleLease("no apply lease is held: take it before writing")
        now = time.time()
        if now < self._lease_expires - self.lease_seconds / 2:
            return
        found = self.db[LOCK].update_one(
            {"_id": "apply", "token": self._lease_token, "expires_at": {"$gt": now}},
            {"$set": {"expires_at": now + self.lease_seconds}})
        if found.matched_count != 1:
            self._lease_token = None
            self.store.fence = None
            raise self._lost()
        self._lease_expires = now + self.lease_seconds

    def lease_token(self) -> int:
        """Return the apply lease's fencing token (0 before the first holder)."""
        row = self.db[LOCK].find_one({"_id": "apply"})
        return 0 if row is None else int(row["token"])

    def release_lease(self) -> None:
        if self._lease_token is None:
            return
        try:
            self.store.rollback()
            self.db[LOCK].update_one({"_id": "apply", "token": self._lease_token},
                                     {"$set": {"expires_at": 0.0}})
        finally:
            self._lease_token = None
            self.store.fence = None
