"""The ledger: descriptors, payloads, local state, undo records and the audit.

It lives in the same SQL database as the data, so a revision's data, ledger
and audit rows commit in one transaction. This module is the only writer of
``txengine_revisions``, ``txengine_audit``, ``txengine_state`` and
``txengine_lock``. The audit is append-only: no code path updates or deletes
an audit row.
"""

from __future__ import annotations

import collections
import datetime as _dt
import functools
import getpass
import json
import os
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa

from .exceptions import LockTimeout, MalformedPayload, StaleLease
from .lease import LeaseHolder
from .ops import write_set
from .revision import Revision
from .stores.sql import (
    Statement,
    placeholder,
    raw_cursor,
    row_values,
    run_statements,
    values_statements,
)
from .values import dumps, loads

# Local states of a revision on this peer.
ANNOUNCED = "announced"
FETCHED = "fetched"
APPLIED = "applied"
CONFLICTED = "conflicted"
REFUSED = "refused"
QUARANTINED = "quarantined"
BASE = "base"
"""A descriptor without payload, held by a checkpoint's vector (see txengine.checkpoint)."""
INTEGRATED = (APPLIED, CONFLICTED)

metadata = sa.MetaData()

revisions = sa.Table(
    "txengine_revisions",
    metadata,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("partition", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("origin", sa.String(200), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hlc_ms", sa.BigInteger, nullable=False),
    sa.Column("hlc_c", sa.Integer, nullable=False),
    sa.Column("parents", sa.Text, nullable=False),
    sa.Column("depends_on", sa.Text, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("collections", sa.Text, nullable=False),
    sa.Column("branch_labels", sa.Text, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("signature", sa.Text, nullable=True),
    sa.Column("payload", sa.LargeBinary, nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("position", sa.BigInteger, nullable=True),
    sa.Column("undo", sa.Text, nullable=True),
    sa.Column("stored_at", sa.Float, nullable=False),
    sa.UniqueConstraint("origin", "partition", "seq", name="txengine_revisions_origin_seq"),
    # No index on position: the engine keeps the applied order in memory, and
    # every apply and undo would pay for one (about 1 µs of a ~7 µs UPDATE).
)

audit = sa.Table(
    "txengine_audit",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("revision", sa.String(80), nullable=True, index=True),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("peer_id", sa.String(200), nullable=False),
    sa.Column("os_user", sa.String(200), nullable=False),
    sa.Column("at", sa.String(32), nullable=False),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)

state = sa.Table(
    "txengine_state",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

writes = sa.Table(
    "txengine_writes",
    metadata,
    sa.Column("partition", sa.String(200), primary_key=True),
    sa.Column("collection", sa.String(100), primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("hlc_ms", sa.BigInteger, primary_key=True),
    sa.Column("revision", sa.String(80), primary_key=True),
    sqlite_with_rowid=False,
)
"""The key index: which data revision writes which key (derived from its ops at intake).

It never changes once written (a revision's write set is fixed by its
payload), so the dirty-key walk asks it for the writers of a key instead of
reading every later revision: the walk's cost follows conflicts, not history.
"""

lock = sa.Table(
    "txengine_lock",
    metadata,
    sa.Column("name", sa.String(50), primary_key=True),
    sa.Column("holder", sa.String(300), nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

_DESCRIPTOR_JSON = ("parents", "depends_on", "collections", "branch_labels")
_INSERT_COLUMNS = (
    "id", "partition", "kind", "origin", "seq", "hlc_ms", "hlc_c", "parents", "depends_on",
    "message", "checksum", "collections", "branch_labels", "digest", "signature", "payload",
    "state", "position", "undo", "stored_at",
)


_dumps = dumps


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def utc_now() -> str:
    """Return the current UTC time as ISO 8601 with microseconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@functools.cache
def _row_type(names: tuple[str, ...]) -> Any:
    return collections.namedtuple("LedgerRow", names)


COPY_COLUMNS = _INSERT_COLUMNS[1:15]
"""A ledger row's descriptor columns besides ``id``, in the order :meth:`Ledger.copy_many`
writes them: a clone reads its source's rows with these and ``payload``."""

DESCRIPTOR_COLUMNS = ("partition", "parents", "depends_on", "origin", "seq", "hlc_ms", "hlc_c",
                      "message", "kind", "checksum", "collections", "branch_labels", "digest",
                      "signature")
"""The columns :func:`descriptor_from_row` reads (besides ``id``): ``rows(ids, *these)``
skips the payload and undo record when only descriptors are needed."""


NODE_COLUMNS = ("partition", "kind", "origin", "hlc_ms", "hlc_c", "parents", "depends_on",
                "branch_labels", "position", "message", "seq", "state")
"""What the engine keeps of each revision in memory (besides ``id``): opening a peer reads
them for the whole history, a refresh for the rows another process changed."""


def descriptor_from_row(row: Any) -> dict[str, Any]:
    """Rebuild a descriptor from its ledger columns (so any tampered column shows).

    Attribute access and orjson: sync and clone rebuild every descriptor they send.
    The signature, when there is one, is passed on as it arrived (a relay never re-signs).
    """
    try:
        d = {
            "id": row.id,
            "partition": row.partition,
            "parents": _list(row.parents),
            "depends_on": _list(row.depends_on),
            "origin": row.origin,
            "seq": row.seq,
            "hlc": [row.hlc_ms, row.hlc_c],
            "message": row.message,
            "kind": row.kind,
            "checksum": row.checksum,
            "collections": _list(row.collections),
            "branch_labels": _list(row.branch_labels),
            "digest": row.digest,
        }
        if row.signature:
            d["signature"] = loads(row.signature)
    except (ValueError, TypeError) as exc:
        raise MalformedPayload(f"revision {str(row.id)[:12]}: a descriptor column of its"
                               f" ledger row is not JSON ({exc}): refused") from exc
    return d


def _list(text: str) -> Any:
    """Decode a stored JSON list: most are empty."""
    return [] if text == "[]" else loads(text)


def _list_text(value: list[Any]) -> str:
    """Encode a descriptor list for its column: most are empty."""
    return "[]" if not value else _dumps(value)


def write_rows(revs: Iterable[Revision]) -> list[tuple[str, str, str, int, str]]:
    """Return the key-index rows (partition, collection, key, hlc_ms, revision) of ``revs``."""
    out = []
    for rev in revs:
        if rev.payload and rev.kind == "data":
            d = rev.descriptor
            out += [(d["partition"], c, k, d["hlc"][0], d["id"]) for c, k in write_set(rev.ops)]
    return out


def signature_text(descriptor: dict[str, Any]) -> str | None:
    """Return the ledger text of a descriptor's signature (None when unsigned)."""
    sig = descriptor.get("signature")
    return None if sig is None else _dumps(sig)


def payload_of(row: Any) -> bytes:
    """Return a row's payload as bytes, even when someone stored it back as text."""
    value = row.payload
    if value is None:
        return b""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


@dataclass(frozen=True)
class AuditEntry:
    """One append-only audit row."""

    seq: int
    revision: str | None
    action: str
    peer_id: str
    os_user: str
    at: str
    duration_ms: float
    outcome: str
    detail: dict[str, Any]


class Applied(NamedTuple):
    """What applying one revision produced, for the ledger (a tuple: bulk work makes one
    a revision)."""

    id: str
    position: int
    undo: list[Any] | None
    state: str = APPLIED


_BY_ROWID = 200
"""Reads of at least this many ledger rows go by rowid on SQLite (bulk work only)."""


class Ledger(LeaseHolder):
    """Reads and writes the ledger tables on one SQLAlchemy connection."""

    def __init__(self, conn: sa.Connection, peer_id: str) -> None:
        self.conn = conn
        self.peer_id = peer_id
        self.os_user = _os_user()
        self._lease_token: int | None = None
        self.token_seen: int | None = None
        self._lease_expires = 0.0
        self.lease_seconds = 30.0
        ph = placeholder(conn)
        self._ph = f" = {ph}"
        self._sqlite = conn.dialect.name == "sqlite"
        self._rowids: dict[str, int] = {}
        self._rowid_of: dict[str, int] | None = None
        self._row_values = row_values(conn)
        self._sql = {
            "insert": f"INSERT INTO txengine_revisions ({', '.join(_INSERT_COLUMNS)})"
                      f" VALUES ({', '.join([ph] * len(_INSERT_COLUMNS))})",
            "applied": f"UPDATE txengine_revisions SET state = {ph}, position = {ph},"
                       f" undo = {ph} WHERE ",
            "unapplied": f"UPDATE txengine_revisions SET state = {ph}, position = NULL,"
                         " undo = NULL WHERE ",
            "applied_rows": "UPDATE txengine_revisions SET state = v.column1, position ="
                            " v.column2, undo = v.column3 FROM (VALUES",
            "applied_rows_where": ") AS v WHERE txengine_revisions.rowid = v.column4",
            "unapplied_rows": f"UPDATE txengine_revisions SET state = '{FETCHED}', position ="
                              " NULL, undo = NULL WHERE rowid IN (VALUES",
            "writes": "INSERT INTO txengine_writes (partition, collection, key, hlc_ms,"
                      f" revision) VALUES ({', '.join([ph] * 5)})",
            "fill": f"UPDATE txengine_revisions SET payload = {ph}, state = {ph} WHERE id = {ph}",
            "fill_applied": f"UPDATE txengine_revisions SET payload = {ph}, state = {ph},"
                            f" position = {ph}, undo = {ph} WHERE id = {ph}",
            "audit": "INSERT INTO txengine_audit (revision, action, peer_id, os_user, at,"
                     f" duration_ms, outcome, detail) VALUES ({', '.join([ph] * 8)})",
        }

    @staticmethod
    def create_tables(conn: sa.Connection) -> None:
        """Create the ledger tables where missing."""
        metadata.create_all(conn)

    # -- revisions ---------------------------------------------------------
    def insert(self, rev: Revision, state: str, applied: Applied | None = None) -> None:
        """Record a revision (descriptor and payload), optionally as already applied."""
        self.insert_many([(rev, state, applied)])

    def insert_many(self, rows: Sequence[tuple[Revision, str, Applied | None]],
                    defer: list[Statement] | None = None,
                    keys_of: Sequence[Sequence[tuple[str, str, str]]] | None = None) -> None:
        """Record several revisions; ``defer`` as in :meth:`mark_applied`. ``keys_of``:
        each revision's (partition, collection, key text) per op, when the caller has
        them (the engine computes them to apply), for the key index."""
        now = time.time()
        params = []
        for rev, st, applied in rows:
            d = rev.descriptor
            params.append((
                d["id"], d["partition"], d["kind"], d["origin"], d["seq"], d["hlc"][0],
                d["hlc"][1], _list_text(d["parents"]), _list_text(d["depends_on"]),
                d["message"], d["checksum"], _list_text(d["collections"]),
                _list_text(d["branch_labels"]),
                d["digest"], signature_text(d), rev.payload,
                applied.state if applied else st,
                applied.position if applied else None,
                _dumps(applied.undo) if applied and applied.undo is not None else None,
                now,
            ))
        self._record(params, [rev for rev, _st, _a in rows], defer, keys_of)

    def copy_many(self, rows: Sequence[Any], revs: Sequence[Revision],
                  entries: Sequence[Applied], defer: list[Statement] | None = None,
                  keys_of: Sequence[Sequence[tuple[str, str, str]]] | None = None) -> None:
        """Record revisions copied from another ledger as applied, as :meth:`insert_many`
        does, from ``rows`` read there with ``id`` and :data:`COPY_COLUMNS` (and checked
        by intake as ``revs``): their columns are written as read, not encoded again."""
        now = time.time()
        params = [(*row[:15], rev.payload, e.state, e.position, _dumps(e.undo), now)
                  for row, rev, e in zip(rows, revs, entries, strict=True)]
        self._record(params, revs, defer, keys_of)

    def _record(self, params: list[tuple[Any, ...]], revs: Sequence[Revision],
                defer: list[Statement] | None,
                keys_of: Sequence[Sequence[tuple[str, str, str]]] | None) -> None:
        """Insert ledger rows and their revisions' key-index rows."""
        if params:
            cur = raw_cursor(self.conn)
            self._insert(cur, "insert", params, defer)
            self._insert(cur, "writes", write_rows(revs) if keys_of is None else [
                (*key, rev.descriptor["hlc"][0], rev.descriptor["id"])
                for rev, keys in zip(revs, keys_of, strict=True)
                for key in (keys if len(keys) == 1 else dict.fromkeys(keys))], defer)

    def _insert(self, cur: Any, name: str, params: list[tuple[Any, ...]],
                defer: list[Statement] | None) -> None:
        """Insert rows: one multi-row statement per chunk where the driver allows."""
        if len(params) > 1 and self._row_values:
            head = self._sql[name].partition(" VALUES ")[0] + " VALUES"
            run_statements(cur, values_statements(head, params, "", self._row_values), defer)
        elif len(params) == 1:
            cur.execute(self._sql[name], params[0])
        elif params:
            cur.executemany(self._sql[name], params)

    def _index_writes(self, revs: Iterable[Revision], cur: Any = None) -> None:
        self._insert(cur or raw_cursor(self.conn), "writes", write_rows(revs), None)

    def announce_many(self, descriptors: Sequence[dict[str, Any]]) -> None:
        """Record descriptors whose payload has not arrived yet (state ``announced``)."""
        self.insert_many([(Revision(d, None), ANNOUNCED, None)  # type: ignore[arg-type]
                          for d in descriptors])

    def fill_payloads(self, revs: Sequence[tuple[Revision, str]]) -> None:
        """Store the checked payloads of announced revisions and set their state."""
        if revs:
            raw_cursor(self.conn).executemany(self._sql["fill"], [
                (rev.payload, st, rev.id) for rev, st in revs])
            self._index_writes([rev for rev, _st in revs])

    def fill_applied(self, revs: Sequence[Revision], entries: Sequence[Applied]) -> None:
        """Store the payloads of announced revisions applied as they arrived, with their
        apply state, position and undo record: one UPDATE a revision, not three writes."""
        if revs:
            raw_cursor(self.conn).executemany(self._sql["fill_applied"], [
                (rev.payload, e.state, e.position, _dumps(e.undo), rev.id)
                for rev, e in zip(revs, entries, strict=True)])
            self._index_writes(revs)

    def set_states(self, ids: Sequence[str], st: str) -> None:
        """Set the local state of revisions that are not applied (quarantine, release)."""
        if ids:
            ph = placeholder(self.conn)
            raw_cursor(self.conn).executemany(
                f"UPDATE txengine_revisions SET state = {ph} WHERE id = {ph}",
                [(st, i) for i in ids])

    def strip(self, ids: Sequence[str]) -> None:
        """Keep only the descriptors of revisions (state ``base``): payload, undo record and
        key-index rows go. Prune keeps so the parents that later revisions still name."""
        if ids:
            ph = placeholder(self.conn)
            cur = raw_cursor(self.conn)
            cur.executemany(f"UPDATE txengine_revisions SET state = {ph}, payload = NULL,"
                            f" undo = NULL, position = NULL WHERE id = {ph}",
                            [(BASE, i) for i in ids])
            cur.executemany(f"DELETE FROM txengine_writes WHERE revision = {ph}",
                            [(i,) for i in ids])

    def delete(self, ids: Sequence[str]) -> None:
        """Remove revisions that were never sent and are re-issued under a new epoch."""
        self._rowids = {}  # a deleted rowid may be reused
        self._rowid_of = None
        for i in range(0, len(ids), 500):
            chunk = list(ids[i:i + 500])
            self.conn.execute(revisions.delete().where(revisions.c.id.in_(chunk)))
            self.conn.execute(writes.delete().where(writes.c.revision.in_(chunk)))

    def writers(self, partition: str, keys: Sequence[tuple[str, str]], min_ms: int
                ) -> list[tuple[str, str, str]]:
        """Return (collection, key, revision) for the revisions writing ``keys`` at or after
        ``min_ms`` (applied or not: the caller filters)."""
        ph = placeholder(self.conn)
        cur = raw_cursor(self.conn)
        out: list[tuple[str, str, str]] = []
        by_collection: dict[str, list[str]] = collections.defaultdict(list)
        for collection, key in keys:
            by_collection[collection].append(key)
        for collection, texts in sorted(by_collection.items()):
            for i in range(0, len(texts), 400):
                chunk = texts[i:i + 400]
                cur.execute(
                    "SELECT collection, key, revision FROM txengine_writes WHERE partition ="
                    f" {ph} AND collection = {ph} AND hlc_ms >= {ph} AND key IN"
                    f" ({', '.join([ph] * len(chunk))})", [partition, collection, min_ms, *chunk])
                out += [tuple(r) for r in cur.fetchall()]
        return out

    def by_state(self, *states: str) -> list[Any]:
        """Return the full rows of revisions in ``states`` (announced, quarantined: few)."""
        return list(self.conn.execute(sa.select(revisions).where(revisions.c.state.in_(states))))

    def count_states(self) -> dict[str, int]:
        """Return ``{state: number of revisions}``."""
        q = sa.select(revisions.c.state, sa.func.count()).group_by(revisions.c.state)
        return {st: int(n) for st, n in self.conn.execute(q)}

    def backfill_writes(self) -> int | None:
        """Fill the key index for revisions recorded before it existed; return how many."""
        if self.get_state("writes_index") is not None:
            return None
        done = 0
        rows = self.conn.execute(sa.select(revisions.c.id).where(
            revisions.c.kind == "data", revisions.c.payload.is_not(None))).all()
        ids = [r[0] for r in rows]
        for i in range(0, len(ids), 500):
            found = self.full_rows(ids[i:i + 500])
            self._index_writes([Revision(descriptor_from_row(r), payload_of(r))
                                for r in found.values()])
            done += len(found)
        self.set_state("writes_index", "1")
        return done

    def update_payload(self, rev: Revision) -> None:
        """Replace a not-yet-applied revision's descriptor fields and payload (authored files)."""
        d = rev.descriptor
        self.conn.execute(
            revisions.update().where(revisions.c.id == d["id"]).values(
                payload=rev.payload, checksum=d["checksum"], digest=d["digest"],
                message=d["message"], signature=signature_text(d),
                **{name: _dumps(d[name]) for name in _DESCRIPTOR_JSON},
            )
        )

    def nodes(self) -> list[tuple[Any, ...]]:
        """Return the light columns of every revision (no payloads, no undo).

        (id, partition, kind, origin, hlc_ms, hlc_c, parents, depends_on,
        branch_labels, position, message, seq, state), on the driver's cursor: opening a
        peer reads this for the whole history.
        """
        cur = raw_cursor(self.conn)
        cur.execute(f"SELECT id, {', '.join(NODE_COLUMNS)} FROM txengine_revisions")
        return cur.fetchall()

    def ordered(self, states: Collection[str]) -> list[tuple[Any, ...]]:
        """Return (hlc_ms, hlc_c, origin, id, partition, kind, at) of the revisions in
        ``states``, sorted: the canonical order of a history without barriers.

        ``at`` is what :meth:`rows_at` reads the row by: its rowid on SQLite (the
        ids are digests, hit at random), else its id. A clone's read plan: a
        light scan, then each batch by address, in order.
        """
        cur = raw_cursor(self.conn)
        at = "rowid" if self._sqlite else "id"
        ph = ", ".join([placeholder(self.conn)] * len(states))
        cur.execute(f"SELECT hlc_ms, hlc_c, origin, id, partition, kind, {at}"
                    f" FROM txengine_revisions WHERE state IN ({ph})", list(states))
        found = cur.fetchall()
        found.sort()
        return found

    def rows_at(self, at: Sequence[Any], *columns: str) -> list[Any]:
        """Return the rows at the addresses ``at`` (from :meth:`ordered`), in that order,
        with ``id`` and ``columns`` (attribute access); a row gone since is left out."""
        if not self._sqlite:
            found = self.rows(at, *columns)
            return [found[i] for i in at if i in found]
        names = ("id", *columns, "rowid")
        head = f"SELECT {', '.join(names)} FROM txengine_revisions WHERE rowid IN ("
        selected = self._select_in(raw_cursor(self.conn), head, at)
        by_rowid = {row[-1]: row for row in map(_row_type(names)._make, selected)}
        return [by_rowid[r] for r in at if r in by_rowid]

    def row(self, rev_id: str) -> Any | None:
        """Return the full ledger row of one revision."""
        return self.conn.execute(sa.select(revisions).where(revisions.c.id == rev_id)).first()

    def rows(self, ids: Sequence[str], *columns: str) -> dict[str, Any]:
        """Return ``{id: row}`` for ``ids`` with the chosen columns (attribute access).

        On the driver's cursor: this feeds every bulk batch. On SQLite a big
        read goes by rowid (see :meth:`_rowid_index`): the ids are digests, so
        the text key is hit at random, and a rowid lookup costs about a third.
        There, each row also carries its ``rowid``, last.
        """
        sqlite = self._sqlite
        names = ("id", *columns, "rowid") if sqlite else ("id", *columns)
        make = _row_type(names)._make
        cur = raw_cursor(self.conn)
        out: dict[str, Any] = {}
        selected = ", ".join(names)
        rest: Sequence[str] = ids
        if sqlite and len(ids) >= _BY_ROWID:
            known = self._rowid_index()
            head = f"SELECT {selected} FROM txengine_revisions WHERE rowid IN ("
            wanted = [r for r in map(known.get, ids) if r is not None]
            out = {row[0]: row for row in map(make, self._select_in(cur, head, wanted))}
            if len(out) != len(ids) or not out.keys() <= set(ids):
                # a row inserted since the index was read, or a deleted row's rowid reused
                out = {i: out[i] for i in ids if i in out}
                rest = [i for i in ids if i not in out]
            else:
                rest = ()
        if rest:
            head = f"SELECT {selected} FROM txengine_revisions WHERE id IN ("
            fetched = [make(values) for values in self._select_in(cur, head, rest)]
            out.update((row[0], row) for row in fetched)
            if sqlite and self._rowid_of is not None:
                self._rowid_of.update((row[0], row[-1]) for row in fetched)
        self._rowids = {i: row[-1] for i, row in out.items()} if sqlite else {}
        return out

    def _select_in(self, cur: Any, head: str, keys: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
        ph = placeholder(self.conn)
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            cur.execute(head + ", ".join([ph] * len(chunk)) + ")", chunk)
            yield from cur.fetchall()

    def _rowid_index(self) -> dict[str, int]:
        """Return ``{id: rowid}`` of the SQLite ledger, read once per bulk-working process.

        Only a hint: :meth:`rows` checks each id it gets back and reads by id
        what the hint missed (rows inserted since, a rowid renumbered by VACUUM).
        """
        if self._rowid_of is None:
            cur = raw_cursor(self.conn)
            cur.execute("SELECT id, rowid FROM txengine_revisions")
            self._rowid_of = dict(cur.fetchall())
        return self._rowid_of

    def full_rows(self, ids: Sequence[str]) -> dict[str, Any]:
        """Return ``{id: full row}`` for ``ids``."""
        return self.rows(ids, *(c.name for c in revisions.c if c.name != "id"))

    def all_rows(self) -> Iterator[Any]:
        """Yield every full ledger row (for verify)."""
        yield from self.conn.execute(sa.select(revisions).order_by(revisions.c.hlc_ms,
                                                                   revisions.c.hlc_c))

    def slots(self, origin: str, partition: str, seqs: Sequence[int]
              ) -> dict[int, tuple[str, str]]:
        """Return ``{seq: (id, digest)}`` for the taken (origin, partition, seq) slots.

        On the driver's cursor: every intake batch asks, a chunk of 500 at a time.
        """
        ph = placeholder(self.conn)
        cur = raw_cursor(self.conn)
        out: dict[int, tuple[str, str]] = {}
        for i in range(0, len(seqs), 500):
            chunk = list(seqs[i:i + 500])
            cur.execute(f"SELECT seq, id, digest FROM txengine_revisions WHERE origin = {ph}"
                        f" AND partition = {ph} AND seq IN ({', '.join([ph] * len(chunk))})",
                        [origin, partition, *chunk])
            out.update({seq: (rid, digest) for seq, rid, digest in cur.fetchall()})
        return out

    def script_checksums(self) -> dict[str, str]:
        """Return ``{checksum: id}`` of every script revision (authored files it has seen)."""
        c = revisions.c
        q = sa.select(c.checksum, c.id).where(c.kind == "script")
        return {checksum: rev_id for checksum, rev_id in self.conn.execute(q)}

    def max_seq(self, origin: str) -> dict[str, int]:
        """Return ``{partition: highest seq}`` for one origin."""
        c = revisions.c
        q = sa.select(c.partition, sa.func.max(c.seq)).where(c.origin == origin).group_by(
            c.partition)
        return {p: int(s) for p, s in self.conn.execute(q)}

    def _where(self, ids: Sequence[str]) -> tuple[str, list[Any]]:
        """Address rows by SQLite rowid when the last ``rows()`` read them all.

        The ids are digests, so the text primary key is hit at random; the
        rowid read in the same transaction finds the row directly (about 40 %
        less time per UPDATE on a 100,000-row ledger).
        """
        rowids = self._rowids
        if rowids and all(i in rowids for i in ids):
            return "rowid", [rowids[i] for i in ids]
        return "id", list(ids)

    def mark_applied(self, entries: Sequence[Applied],
                     defer: list[Statement] | None = None) -> None:
        """Record revisions as applied (or conflicted) with their undo records.

        With ``defer``, on SQLite rows read by rowid, the statements are added
        there for the commit to run (see :meth:`SqlStore.commit_in_background`).
        """
        if entries:
            column, keys = self._where([e.id for e in entries])
            params = [(e.state, e.position, None if e.undo is None else _dumps(e.undo), key)
                      for e, key in zip(entries, keys, strict=True)]
            cur = raw_cursor(self.conn)
            if column == "rowid" and self._row_values:
                run_statements(cur, values_statements(
                    self._sql["applied_rows"], params, self._sql["applied_rows_where"],
                    self._row_values), defer)
            else:
                cur.executemany(self._sql["applied"] + column + self._ph, params)

    def mark_unapplied(self, ids: Sequence[str], defer: list[Statement] | None = None
                       ) -> None:
        """Record revisions as no longer applied (their payloads stay); ``defer`` as in
        :meth:`mark_applied`."""
        if ids:
            column, keys = self._where(ids)
            cur = raw_cursor(self.conn)
            if column == "rowid" and self._row_values:
                run_statements(cur, values_statements(
                    self._sql["unapplied_rows"], [(k,) for k in keys], ")",
                    self._row_values), defer)
            else:
                cur.executemany(self._sql["unapplied"] + column + self._ph,
                                [(FETCHED, key) for key in keys])

    # -- audit ---------------------------------------------------------------
    def audit(self, action: str, revision: str | None, *, outcome: str = "ok",
              duration_ms: float = 0.0, detail: dict[str, Any] | None = None) -> None:
        """Append one audit row."""
        self.audit_many([(action, revision, outcome, duration_ms, detail or {})])

    def audit_many(self, rows: Iterable[tuple[str, str | None, str, float, dict[str, Any]]]
                   ) -> None:
        """Append several audit rows (action, revision, outcome, duration_ms, detail)."""
        at = utc_now()
        params = [
            (rev, action, self.peer_id, self.os_user, at, round(duration, 3), outcome,
             _dumps(detail))
            for action, rev, outcome, duration, detail in rows
        ]
        if params:
            raw_cursor(self.conn).executemany(self._sql["audit"], params)

    def audit_seq(self) -> int:
        """Return the newest audit row's seq (0 when empty): where a refresh starts."""
        cur = raw_cursor(self.conn)
        cur.execute("SELECT max(seq) FROM txengine_audit")
        return int(cur.fetchone()[0] or 0)

    def audit_since(self, seq: int) -> list[tuple[int, str | None, str, str]]:
        """Return (seq, revision, action, detail JSON) of the audit rows after ``seq``."""
        cur = raw_cursor(self.conn)
        cur.execute("SELECT seq, revision, action, detail FROM txengine_audit WHERE seq >"
                    f" {placeholder(self.conn)} ORDER BY seq", (seq,))
        return [tuple(r) for r in cur.fetchall()]

    def audit_entries(self, revision: str | None = None) -> list[AuditEntry]:
        """Return audit rows, oldest first; with ``revision``, those that name it."""
        q = sa.select(audit).order_by(audit.c.seq)
        if revision is not None:
            q = q.where(audit.c.revision == revision)
        return [
            AuditEntry(r.seq, r.revision, r.action, r.peer_id, r.os_user, r.at,
                       r.duration_ms, r.outcome, json.loads(r.detail))
            for r in self.conn.execute(q)
        ]

    # -- state ---------------------------------------------------------------
    def get_state(self, name: str) -> str | None:
        return self.conn.execute(sa.select(state.c.value).where(state.c.name == name)).scalar()

    def set_state(self, name: str, value: str) -> None:
        if self.get_state(name) is None:
            self.conn.execute(state.insert().values(name=name, value=value))
        else:
            self.conn.execute(state.update().where(state.c.name == name).values(value=value))

    def create_state(self, name: str, value: str) -> str:
        """Set a state row only where it is missing, and commit; return the value that
        stands (the first writer's, if two raced)."""
        current = self.get_state(name)
        if current is None:
            self.conn.execute(state.insert().values(name=name, value=value))
            self.conn.commit()
            return value
        self.conn.rollback()
        return str(current)

    # -- the apply lease -----------------------------------------------------
    def observe_lease(self) -> None:
        """Remember the lease as it stands while this process loads the ledger.

        If no one holds it now, nothing can be written until it is taken
        again, so taking it next with the same token means the loaded state is
        still current (``acquire_lease`` returns False and the caller need not
        reload). A lease held by someone else right now forces a reload.
        """
        row = self.conn.execute(sa.select(lock).where(lock.c.name == "apply")).first()
        if row is None:
            self.token_seen = 0
        elif row.expires_at < time.time() or row.token == self._lease_token:
            self.token_seen = row.token
        else:
            self.token_seen = None

    def acquire_lease(self, wait: float = 10.0) -> bool:
        """Take (or renew) the apply lease; return True when another holder had it since.

        The lease has an expiry, so a killed process cannot hold it forever, and
        a fencing token that grows with each new holder, so a stale holder finds
        out before it writes. A holder on this host whose process is gone is
        replaced at once.
        """
        now = time.time()
        if self._lease_token is not None and now < self._lease_expires - 5.0:
            return False
        deadline = time.monotonic() + wait
        holder = self._holder()
        while True:
            row = self.conn.execute(sa.select(lock).where(lock.c.name == "apply")).first()
            now = time.time()
            if row is None:
                token = 1
                self.conn.execute(lock.insert().values(
                    name="apply", holder=holder, token=token, expires_at=now + self.lease_seconds))
                changed = self.token_seen != 0
            elif row.holder == holder and row.token == self._lease_token:
                token = row.token
                self.conn.execute(lock.update().where(
                    lock.c.name == "apply", lock.c.token == token).values(
                    expires_at=now + self.lease_seconds))
                changed = False
            elif row.expires_at < now or row.holder == holder or self._holder_dead(row.holder):
                token = row.token + 1
                result = self.conn.execute(lock.update().where(
                    lock.c.name == "apply", lock.c.token == row.token).values(
                    holder=holder, token=token, expires_at=now + self.lease_seconds))
                if result.rowcount != 1:
                    self.conn.rollback()
                    continue
                changed = self.token_seen != row.token
            else:
                self.conn.rollback()
                if time.monotonic() > deadline:
                    raise LockTimeout(row.holder, wait)
                time.sleep(0.05)
                continue
            self.conn.commit()
            self._lease_token = token
            self._lease_expires = now + self.lease_seconds
            if not changed:
                self.token_seen = token  # still current: no one else wrote since we loaded
            return changed

    def renew_lease(self) -> None:
        """Extend the lease between batches of a long operation; raise if it was lost.

        Call only between transactions: renewal commits.
        """
        if self._lease_token is None:
            raise StaleLease("no apply lease is held: take it before writing")
        now = time.time()
        if now < self._lease_expires - self.lease_seconds / 2:
            return
        result = self.conn.execute(lock.update().where(
            lock.c.name == "apply", lock.c.token == self._lease_token,
            lock.c.expires_at > now).values(expires_at=now + self.lease_seconds))
        if result.rowcount != 1:
            self.conn.rollback()
            self._lease_token = None
            raise self._lost()
        self.conn.commit()
        self._lease_expires = now + self.lease_seconds

    def lease_token(self) -> int:
        """Return the apply lease's fencing token (0 before the first holder): every
        process that writes takes the lease, so a new token means someone may have."""
        token = self.conn.execute(sa.select(lock.c.token).where(lock.c.name == "apply")).scalar()
        self.conn.rollback()
        return int(token or 0)

    def release_lease(self) -> None:
        """Give the lease back so another process need not wait for its expiry."""
        if self._lease_token is None:
            return
        try:
            self.conn.rollback()
            self.conn.execute(lock.update().where(
                lock.c.name == "apply", lock.c.token == self._lease_token).values(expires_at=0.0))
            self.conn.commit()
        finally:
            self._lease_token = None
