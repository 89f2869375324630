"""The public Python API: one :class:`Peer` method per CLI command.

Methods return dataclasses and never print; long operations report through
a ``progress`` callback.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .engine import Engine, ProgressCallback, Step, decode_steps, paused_gc
from .exceptions import (
    ConfigError,
    InvalidInput,
    IrreversibleRevision,
    MalformedPayload,
    PinnedPeer,
    StoreError,
    TxEngineError,
)
from .keys import KeyInfo, KeyPair, Trust
from .ledger import REFUSED, AuditEntry, Ledger, descriptor_from_row, payload_of
from .ops import Delete, Op, Update, op_from_json
from .results import (
    Finding,
    NewScript,
    OperationResult,
    RevisionDetail,
    RevisionInfo,
    Status,
    VerifyReport,
)
from .revert import remap_expect, revert_ops
from .revision import (
    DEFAULT_PARTITION,
    Revision,
    Signer,
    check_descriptor,
)
from .stores.sql import SqlStore, configure_engine, create_engine
from .transaction import Transaction, build_data_revision
from .values import from_ejson, key_text, sha256, to_ejson

_PEER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class Peer:
    """A participant: a store, its ledger, and an identity.

    One Peer owns one database connection and is not thread-safe; open one
    Peer per thread or process. The apply lease is taken on the first write
    and held (renewed) until :meth:`close`.
    """

    def __init__(self, engine: sa.Engine | Any, peer_id: str | None = None,
                 script_location: str | Path | None = None, batch_size: int | None = None,
                 key_file: str | Path | None = None) -> None:
        self._conn: sa.Connection | None = None
        self.sa_engine: sa.Engine | None = None
        self._store: Any
        if isinstance(engine, sa.Engine):
            configure_engine(engine)
            self.sa_engine = engine
            self._conn = conn = engine.connect()
            self._new_ledger: Any = lambda pid: Ledger(conn, pid)
            self._store = SqlStore(conn)
        else:
            from .stores.mongo import MongoStore
            from .stores.mongo_ledger import MongoLedger

            db, client = engine if isinstance(engine, tuple) else (engine, None)
            self._store = store = MongoStore(db, client)
            self._new_ledger = lambda pid: MongoLedger(store, pid)
        try:
            if self._conn is not None:
                Ledger.create_tables(self._conn)
                self._conn.commit()
            else:
                type(self._new_ledger("?")).create_tables(self._store)
            self.peer_id = self._identity(peer_id)
            self._ledger = self._new_ledger(self.peer_id)
            if self._conn is None:
                self._ledger.recover_on_open()
            epoch = int(self._ledger.get_state("epoch") or 0)
            self.origin = f"{self.peer_id}:{epoch}"
            self.script_location = Path(script_location) if script_location else None
            self._batch_size = batch_size or self._store.bulk_batch
            self._loaded: Engine | None = None
            self._script_paths: dict[str, Path] = {}
            self._authored: dict[str, Any] = {}
            self._pinned: bool | None = None
            self._key_file = Path(key_file) if key_file else None
            self._key: KeyPair | None = None
            self._root: bytes | None = None
            self._root_read = False
            self._enrolments: dict[str, dict[str, Any] | None] = {}
            self._trust_cache: tuple[Any, Trust] | None = None
            self.max_clock_skew_ms = 5 * 60 * 1000
            """Revisions whose hlc is further ahead of this peer's clock are quarantined."""
            if self._ledger.backfill_writes() is not None:
                self._store.commit()
            self._store.rollback()
            if self.script_location is not None:
                self._load_scripts()
        except BaseException:
            self._close_store()
            raise

    @property
    def _engine(self) -> Engine:
        """The graph, applied set and counters, loaded from the ledger on first use: a
        peer opened only to read rows (a clone's source) or documents never pays for
        loading every descriptor, about 1 s per 100,000 revisions."""
        if self._loaded is None:
            self._loaded = Engine(self._store, self._ledger, self.origin,
                                  scripts=self._run_script, batch_size=self._batch_size)
        return self._loaded

    def _unload(self) -> None:
        """Drop the in-memory graph: the next use loads it from the ledger again (after a
        clone wrote the ledger without it)."""
        self._loaded = None

    @classmethod
    def open(cls, store: str | sa.Engine | Any, peer_id: str | None = None, *,
             script_location: str | Path | None = None, batch_size: int | None = None,
             key_file: str | Path | None = None) -> Peer:
        """Open a peer on a store URL or object.

        A URL: ``sqlite:///app.db``, a path, PostgreSQL, ``mongodb://host/db``
        (``mongomock://host/db`` for the in-memory test double); an object: a
        SQLAlchemy Engine or a pymongo (or mongomock) ``Database``. ``key_file``
        holds this peer's private key (see :attr:`key`). ``batch_size`` is how
        many revisions a bulk upgrade or downgrade commits together (default:
        the store's ``bulk_batch``, 20,000 on SQL, 2,000 on MongoDB).
        """
        from .stores import is_database, is_mongo_url

        if is_mongo_url(store):
            from .stores.mongo import open_database

            return cls(open_database(store), peer_id, script_location=script_location,
                       batch_size=batch_size, key_file=key_file)
        if is_database(store):
            return cls(store, peer_id, script_location=script_location, batch_size=batch_size,
                       key_file=key_file)
        engine = create_engine(store) if isinstance(store, str) else store
        return cls(engine, peer_id, script_location=script_location, batch_size=batch_size,
                   key_file=key_file)

    def _identity(self, peer_id: str | None) -> str:
        ledger = self._new_ledger("?")
        stored = ledger.get_state("peer_id")
        if peer_id is not None and not _PEER_ID.match(peer_id):
            raise ConfigError(
                f"peer id {peer_id!r} is not valid: use 1-100 letters, digits, '.', '_' or '-'"
            )
        if stored is None:
            stored = peer_id or f"peer-{secrets.token_hex(4)}"
            ledger.set_state("peer_id", stored)
            self._store.commit()
        elif peer_id is not None and peer_id != stored:
            raise ConfigError(
                f"this store belongs to peer {stored!r}, not {peer_id!r}: drop --peer-id,"
                " or open another store"
            )
        self._store.rollback()
        return stored

    def _close_store(self) -> None:
        if self._conn is not None:
            self._conn.close()
            assert self.sa_engine is not None
            self.sa_engine.dispose()
        else:
            self._store.close()

    def close(self) -> None:
        """Release the apply lease and the connection."""
        try:
            self._ledger.release_lease()
        finally:
            self._close_store()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- writes -----------------------------------------------------------------
    @property
    def pinned(self) -> bool:
        """True after a local downgrade, until ``upgrade heads``: writes are refused."""
        if self._pinned is None:
            self._pinned = self._ledger.get_state("pinned") == "1"
            self._store.rollback()
        return self._pinned

    def _set_pinned(self, value: bool, detail: dict[str, Any]) -> None:
        self._ledger.set_state("pinned", "1" if value else "0")
        self._ledger.audit("pin" if value else "unpin", None, detail=detail)
        self._store.commit()
        self._pinned = value

    def _before_write(self) -> None:
        self._take_lease()
        if self.pinned:
            raise PinnedPeer()
        self.key  # noqa: B018 - made or read before the write's transaction, not inside it

    def _take_lease(self) -> None:
        """Hold the apply lease; take in what another process may have changed meanwhile."""
        if self._ledger.acquire_lease():
            self._catch_up()

    def _catch_up(self) -> None:
        """Take in what other processes recorded: from the audit when the engine can
        (:meth:`Engine.refresh`), else by loading the ledger again."""
        if not self._engine.refresh():
            self._engine.load()
        self._pinned = None
        self._root_read = False

    def transaction(self, message: str, partition: str = DEFAULT_PARTITION) -> Transaction:
        """Start a write: every op inside the ``with`` block becomes one data revision."""
        return Transaction(self, message, partition)

    def _commit_ops(self, message: str, partition: str, ops: list[Op],
                    original: dict[Any, Any]) -> Revision:
        rev = build_data_revision(self, message, partition, ops)
        # Apply the decoded payload, exactly what every replica applies (1.0 is 1 there).
        self._engine.commit_new(rev, rev.ops, original)
        return rev

    def write(self, message: str, ops: Sequence[dict[str, Any]],
              partition: str = DEFAULT_PARTITION) -> RevisionInfo:
        """Write a list of ops in JSON form (as ``txengine write`` reads them)."""
        if not isinstance(ops, list) or not ops:
            raise MalformedPayload("write needs a non-empty JSON list of ops")
        with self.transaction(message, partition) as tx:
            for data in ops:
                if (isinstance(data, dict) and data.get("op") in ("update", "delete")
                        and data.get("cas") is not True):
                    # expect and before are filled from what is read now; a
                    # compare-and-set op carries its own, so it goes as written.
                    self._write_checked(tx, data)
                else:
                    tx.add_op(op_from_json(data))
        assert tx.revision is not None
        return self.info(tx.revision.id)

    @staticmethod
    def _write_checked(tx: Transaction, data: dict[str, Any]) -> None:
        op = op_from_json(data)
        key = from_ejson(op.key)
        if isinstance(op, Delete):
            tx.delete(op.collection, key)
        else:
            assert isinstance(op, Update)
            tx.update(op.collection, key, set=from_ejson(op.set) or None,
                      unset=list(op.unset) or None, inc=from_ejson(op.inc) or None)

    # -- reads ------------------------------------------------------------------
    def get(self, collection: str, key: Any, partition: str = DEFAULT_PARTITION
            ) -> dict[str, Any] | None:
        """Return one document (Python values) or None."""
        probe = op_from_json({"op": "delete", "collection": collection, "key": to_ejson(key)})
        text = key_text(probe.key)
        found = self._store.load_states(partition, collection, [text])
        self._store.rollback()
        doc = found.get(text, (None, None))[0]
        return None if doc is None else from_ejson(doc)

    def find(self, collection: str, filter: dict[str, Any] | None = None,
             partition: str = DEFAULT_PARTITION) -> list[dict[str, Any]]:
        """Return the documents matching a MongoDB-style ``filter``, ordered by key.

        The filter language (see :mod:`txengine.query`) means the same on every
        store kind; anything outside it raises :class:`~txengine.query.UnsupportedFilter`.
        """
        from .query import find

        try:
            docs = find(self._store, partition, collection, filter or {})
        finally:
            self._store.rollback()
        return [from_ejson(d) for d in docs]

    # -- graph queries ------------------------------------------------------------
    def info(self, rev_id: str) -> RevisionInfo:
        """Return what the graph knows of one revision."""
        graph = self._engine.graph
        node = graph.get(rev_id)
        return RevisionInfo(
            id=node.id, parents=node.parents, kind=node.kind,
            message=self._message(node.id), partition=self._engine.partition[node.id],
            origin=node.origin, hlc=node.hlc, applied=node.id in self._engine.applied,
            is_head=graph.is_head(node.id), branch_labels=node.branch_labels,
            depends_on=node.depends_on,
        )

    def _message(self, rev_id: str) -> str:
        return self._engine.messages.get(rev_id, "")

    def resolve(self, ref: str) -> str:
        """Return the full id of a revision named by id, prefix, branch label or ``head``."""
        graph = self._engine.graph
        if ref in ("head", "heads") or ref.endswith("@head"):
            plan = graph.upgrade_plan("head" if ref == "heads" else ref, ())
            return plan[-1]
        return graph.resolve(ref)

    def heads(self) -> list[RevisionInfo]:
        """Return the revisions with no children, in canonical order."""
        return [self.info(r) for r in self._engine.graph.heads()]

    def current(self) -> list[RevisionInfo]:
        """Return the applied heads (what this peer's data reflects)."""
        heads = set().union(*self._engine.applied_heads.values()) if self._engine.applied else []
        return [self.info(r) for r in self._engine.graph.canonical_order(heads)]

    def branches(self) -> list[RevisionInfo]:
        """Return branch points: revisions with more than one child."""
        graph = self._engine.graph
        return [self.info(r) for r in graph.canonical_order(
            r for r in graph if len(graph.children(r)) > 1)]

    def history(self, rev_range: str | None = None) -> list[RevisionInfo]:
        """Return revisions newest first; ``A:B`` limits to B's ancestry after A."""
        graph = self._engine.graph
        if rev_range:
            lower, _, upper = rev_range.partition(":")
            top = graph.upgrade_plan(upper or "heads", ())
            ids: Iterable[str] = top
            if lower and lower != "base":
                low = graph.resolve(lower)
                ids = [r for r in top if r not in graph.ancestors([low], inclusive=False)]
        else:
            ids = graph
        with paused_gc():
            return [self.info(r) for r in reversed(graph.canonical_order(ids))]

    def revision(self, ref: str) -> Revision:
        """Return a revision (descriptor + payload) from the ledger."""
        rev_id = self.resolve(ref)
        row = self._ledger.row(rev_id)
        self._store.rollback()
        return Revision(descriptor_from_row(row), payload_of(row))

    def show(self, ref: str) -> RevisionDetail:
        """Return a revision with its rendered script."""
        from .scripts import render_data

        rev = self.revision(ref)
        script = render_data(rev) if rev.kind == "data" else rev.payload.decode("utf-8")
        return RevisionDetail(self.info(rev.id), rev.descriptor, rev.payload, script)

    def audit(self, revision: str | None = None) -> list[AuditEntry]:
        """Return the audit trail, oldest first; with ``revision``, what concerns it."""
        if revision and revision not in self._engine.graph and len(revision) == 64:
            rev_id: str | None = revision  # announced or refused: not in the graph
        else:
            rev_id = self.resolve(revision) if revision else None
        entries = self._ledger.audit_entries()
        self._store.rollback()
        if rev_id is None:
            return entries
        return [e for e in entries if e.revision == rev_id or (
            e.revision is None and rev_id in e.detail.get("steps", "")
            and any(s.revision == rev_id for s in decode_steps(e.detail["steps"])))]

    # -- engine commands ------------------------------------------------------------
    def plan(self, action: str, target: str) -> list[Step]:
        """Return the steps ``upgrade``/``downgrade``/``stamp`` would run, without running."""
        planner = {"upgrade": self._engine.plan_upgrade,
                   "downgrade": self._engine.plan_downgrade,
                   "stamp": self._engine.plan_stamp}[action]
        with paused_gc():  # planning walks and sorts the whole graph
            return planner(target)

    def _execute(self, action: str, target: str, progress: ProgressCallback | None,
                 steps: list[Step] | None = None) -> OperationResult:
        """Run a plan; report what it applied and undid, net of the redone revisions."""
        self._take_lease()
        if steps is None:
            steps = self.plan(action, target)
        self._engine.run(steps, action, progress)
        undone = [s.revision for s in steps if s.action in ("undo", "unstamp")]
        done = [s.revision for s in steps if s.action in ("apply", "stamp")]
        redone = set(undone).intersection(done) if undone and done else set()
        if redone:
            done = [r for r in done if r not in redone]
            undone = [r for r in undone if r not in redone]
        return OperationResult(action, done, undone)

    def upgrade(self, target: str = "heads", progress: ProgressCallback | None = None
                ) -> OperationResult:
        """Apply the revisions up to ``target`` in canonical order; unpin when complete."""
        if self.script_location is not None:
            self._load_scripts()
        result = self._execute("upgrade", target, progress)
        if self.pinned and not self._engine.fetched():
            self._set_pinned(False, {"target": target})
        return result

    def downgrade(self, target: str, progress: ProgressCallback | None = None
                  ) -> OperationResult:
        """Undo applied revisions back to ``target``; the peer stays pinned there."""
        self._take_lease()
        steps = self.plan("downgrade", target)
        if steps and not self.pinned:
            # Pin before the first batch commits, so an interrupted downgrade stays pinned.
            self._set_pinned(True, {"target": target})
        return self._execute("downgrade", target, progress, steps)

    def stamp(self, target: str) -> OperationResult:
        """Mark ``target`` and its ancestry as applied (only those), running nothing."""
        return self._execute("stamp", target, None)

    def adopt(self, table: str = "alembic_version") -> OperationResult:
        """Stamp what Alembic already applied to this store: its version table's heads.

        The heads in Alembic's ``alembic_version`` and their whole ancestry are
        marked applied, running nothing and unstamping nothing, so the next
        ``upgrade`` continues exactly where Alembic stopped. The adopted scripts
        must be in the script location (``txengine init --from-alembic`` does it).
        """
        from .adopt import alembic_version_heads
        from .engine import Step

        if self.script_location is not None:
            self._load_scripts()
        if self._conn is None:
            raise StoreError("adopt reads Alembic's version table, which only SQL stores have")
        heads = alembic_version_heads(self._conn, table)
        self._store.rollback()
        graph = self._engine.graph
        want = graph.ancestors([graph.resolve(h) for h in heads]) if heads else set()
        steps = [Step("stamp", r) for r in graph.canonical_order(want - set(self._engine.applied))]
        if steps:
            self._take_lease()
            self._engine.run(steps, "stamp", None)
        return OperationResult("stamp", [s.revision for s in steps], [])

    def merge(self, revisions: Sequence[str] = ("heads",), message: str = "merge",
              partition: str = DEFAULT_PARTITION) -> RevisionInfo:
        """Write an empty data revision whose parents are the given heads."""
        graph = self._engine.graph
        if list(revisions) == ["heads"]:
            parents = self._engine.parents_for(partition)
        else:
            parents = sorted({graph.resolve(r) for r in revisions})
        if len(parents) < 2:
            raise InvalidInput(f"merge needs two or more heads, got {len(parents)}")
        self._before_write()
        missing = [p for p in parents if p not in self._engine.applied]
        if missing:
            raise InvalidInput(f"merge parent {missing[0][:12]} is not applied: upgrade first")
        engine = self._engine
        from .revision import build, encode_ops
        rev = build(kind="data", payload=encode_ops([]), partition=partition, parents=parents,
                    origin=engine.origin, seq=engine.next_seq(partition),
                    hlc=engine.hlc_for(parents), message=message, signer=self.key)
        engine.commit_new(rev, [], {})
        return self.info(rev.id)

    def revert(self, ref: str, message: str | None = None) -> RevisionInfo | None:
        """Write a revision that undoes ``ref`` where its values still stand.

        Each op restores ``ref``'s before-value only where the document still
        holds ``ref``'s after-value, so later changes by others survive.
        Returns None when nothing is left to revert.
        """
        rev = self.revision(ref)
        if rev.kind != "data":
            raise IrreversibleRevision(rev.id, f"{rev.kind} revisions cannot be reverted")
        if rev.id not in self._engine.applied:
            raise IrreversibleRevision(rev.id, "it is not applied on this peer: upgrade first")
        row = self._ledger.row(rev.id)
        self._store.rollback()
        prior = {(c, k): doc for c, k, doc, _inc in json.loads(row.undo or "[]")}
        with self.transaction(message or f"Revert {rev.id[:12]}: {rev.message}",
                              rev.partition) as tx:
            for op in reversed(rev.ops):
                for undo_op in revert_ops(tx, rev.id, op, prior):
                    tx.add_op(undo_op)
        return self.info(tx.revision.id) if tx.revision else None

    def receive(self, items: Sequence[tuple[dict[str, Any], bytes]]) -> list[str]:
        """Take revisions from another peer (checked, recorded as fetched, not applied)."""
        self._take_lease()
        return self._engine.receive(items, trust=self._trust())

    def receive_json(self, lines: Iterable[str]) -> list[str]:
        """Take revisions as JSON lines ``{"descriptor": ..., "payload": "<utf-8 text>"}``."""
        items = []
        for number, line in enumerate(lines, 1):
            try:
                data = json.loads(line)
                items.append((check_descriptor(data["descriptor"]),
                              data["payload"].encode("utf-8")))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise MalformedPayload(f"line {number}: not a revision record ({exc})") from exc
        return self.receive(items)

    # -- sync ---------------------------------------------------------------------
    def sync(self, other: Peer | str, *, token: str | None = None, channel: Any = None,
             events: Any = None, batch_size: int = 500,
             progress: ProgressCallback | None = None) -> Any:
        """Exchange revisions with ``other`` in this process, both ways, and integrate.

        ``other`` may also be the URL of a sync server (``http(s)://host:port``,
        ``txengine serve``), reached with ``token``: the same exchange over
        HTTP, with retries (see :mod:`txengine.transport.client`).

        ``progress`` receives this peer's ``Progress("fetch", done, total)``:
        the total is the payloads it asked for after the descriptors arrived,
        and ``done == total`` comes only once they are integrated.

        Version vectors first, then descriptors (recorded as announced), then
        payloads in batches (checked, fetched), then integration in canonical
        order on both peers (a pinned peer only announces and fetches).
        ``channel`` may drop, duplicate or reorder messages (see
        :mod:`txengine.sync`); ``events`` receives a :class:`~txengine.sync.SyncEvent`
        for each revision announced, fetched, applied, rolled back, conflicted,
        refused or quarantined. Returns a :class:`~txengine.sync.SyncResult`.
        """
        from .sync import Side, exchange

        if isinstance(other, str):
            from .transport import client

            if not other.startswith(("http://", "https://")):
                raise InvalidInput(f"{other!r} is not a sync server URL (http:// or https://):"
                                   " open another store with Peer.open and pass the Peer")
            return client.sync(self, other, token, batch_size=batch_size, events=events,
                               progress=progress)
        self._take_lease()
        other._take_lease()
        return exchange(Side(self, batch_size, events, progress), Side(other, batch_size, events),
                        channel)

    def watch(self, url: str, *, token: str | None = None, interval: float = 30.0,
              max_rounds: int | None = None, stop: Any = None, batch_size: int = 500
              ) -> Iterator[Any]:
        """Keep syncing with the server at ``url``: after each local write and on an interval.

        What a device's background task runs. Yields a
        :class:`~txengine.transport.client.WatchEvent` per round; backs off
        while the server is unreachable (see :func:`txengine.transport.client.watch`).
        """
        from .transport import client

        return client.watch(self, url, token, interval=interval, max_rounds=max_rounds,
                            stop=stop, batch_size=batch_size)

    @contextlib.contextmanager
    def leased(self) -> Iterator[Peer]:
        """Hold the apply lease for one unit of work, then give it back.

        Taking it reloads what other processes wrote since; giving it back lets
        them write. Several server processes share one store this way, and a
        background sync lets the app keep writing between rounds.
        """
        self._take_lease()
        try:
            yield self
        finally:
            self._ledger.release_lease()

    def refresh(self) -> None:
        """Reload what other processes wrote since this peer loaded, without taking the lease.

        Costs one read of the lease row when nothing changed: its token moves
        whenever a process takes the lease to write. A reader (a server
        answering vectors and payload requests) need not hold the lease, and
        by not taking it leaves the other processes' memory current.
        """
        if self._ledger.lease_token() != self._ledger.token_seen:
            self._catch_up()

    def lease_token(self) -> int:
        """Return the apply lease's fencing token: it grows whenever a process takes the
        lease (every write does), so polling it notices local writes cheaply."""
        return int(self._ledger.lease_token())

    # -- credentials ----------------------------------------------------------------
    def credentials(self) -> Any:
        """Return the :class:`~txengine.credentials.Credentials` of this store."""
        from .credentials import Credentials

        return Credentials(self._conn, None if self._conn is not None else self._store.db)

    def peers_add(self, name: str, read: Sequence[str] = (), write: Sequence[str] = ()
                  ) -> Any:
        """Let peer ``name`` sync with this store over HTTP; return its token (shown once).

        It may read and write the partitions ``read`` and ``write`` cover, and
        none until granted: a token alone opens nothing.
        """
        from .credentials import check_pattern

        for pattern in (*read, *write):
            check_pattern(pattern)
        credentials = self.credentials()
        new = credentials.add(name)
        if read or write:
            credentials.grant(name, read, write)
        self._ledger.audit("peers_add", None, detail={"name": name, "read": list(read),
                                                      "write": list(write)})
        self._store.commit()
        return new

    def peers_grant(self, name: str, read: Sequence[str] = (), write: Sequence[str] = ()
                    ) -> Any:
        """Let peer ``name`` read and write more partitions (patterns such as ``user:*``);
        return its :class:`~txengine.credentials.Credential`."""
        credential = self.credentials().grant(name, read, write)
        self._ledger.audit("peers_grant", None, detail={"name": name, "read": list(read),
                                                        "write": list(write)})
        self._store.commit()
        return credential

    def peers_revoke_grant(self, name: str, read: Sequence[str] = (), write: Sequence[str] = ()
                           ) -> Any:
        """Take grants back from peer ``name``: its next request sees only what is left."""
        credential = self.credentials().revoke_grant(name, read, write)
        self._ledger.audit("peers_revoke_grant", None, detail={
            "name": name, "read": list(read), "write": list(write)})
        self._store.commit()
        return credential

    def peers_list(self) -> list[Any]:
        """Return the peers that hold a token for this store, with their grants."""
        return list(self.credentials().list())

    def peers_remove(self, name: str) -> None:
        """Revoke peer ``name``'s token: its next request is refused."""
        self.credentials().remove(name)
        self._ledger.audit("peers_remove", None, detail={"name": name})
        self._store.commit()

    def bundle_create(self, path: str | Path, since: str | Path | dict[str, Any] | None = None,
                      partition: str | None = None, batch_size: int = 500) -> Any:
        """Write the revisions the other side lacks to a bundle file (JSON Lines).

        ``since`` is the other side's version vector (a file: a vector, or a
        bundle it made; or the dict :func:`txengine.transport.bundle.read_vector`
        returns); without it, every revision. ``partition`` limits the bundle
        to one partition. Returns a :class:`~txengine.transport.bundle.BundleInfo`.
        """
        from .sync import Side
        from .transport import bundle

        vector = bundle.read_vector(since) if isinstance(since, (str, Path)) else since
        header, messages = bundle.outgoing(Side(self, batch_size), vector, partition)
        size = bundle.write(path, header, messages)
        return bundle.BundleInfo(str(path), header["descriptors"], tuple(header["partitions"]),
                                 size)

    def bundle_vector(self, path: str | Path) -> Any:
        """Write this peer's version vector to ``path``, for the other side's ``--since``."""
        from .sync import Side, encode

        message = Side(self).vector()
        Path(path).write_bytes(encode(message) + b"\n")
        return message

    def bundle_apply(self, path: str | Path, partition: str | None = None,
                     progress: ProgressCallback | None = None, events: Any = None) -> Any:
        """Apply a bundle: check it whole, then announce, fetch and integrate its revisions.

        A truncated or tampered bundle (or one holding partitions other than
        ``partition``) is refused before the first write; applying a bundle
        twice changes nothing the second time. Returns a
        :class:`~txengine.transport.bundle.BundleReport`.
        """
        from .sync import Side
        from .transport import bundle

        self._take_lease()
        return bundle.run(Side(self, events=events), path, partition, progress)

    @classmethod
    def clone(cls, source: str | Any, store: str | Any, peer_id: str | None = None, *,
              partition: str | None = None, source_peer_id: str | None = None,
              progress: ProgressCallback | None = None, batch_size: int | None = None,
              from_checkpoint: bool = False, key_file: str | Path | None = None) -> Peer:
        """Bootstrap a new peer on the empty ``store`` by replay of ``source``'s revisions.

        The source's revisions (those of ``partition`` only, when given) go
        through the same messages as a sync — descriptors, then payloads —
        and are integrated in canonical order; the source learns they were
        sent. With ``from_checkpoint``, each partition starts from the
        source's newest checkpoint instead: its snapshot is loaded (checked
        against the checkpoint's digest) and only what follows is replayed
        (see :mod:`txengine.checkpoint`). A history of data revisions only is
        replayed in one pass instead, each batch checked as any intake and
        applied as it is recorded (see :mod:`txengine.clone`). Payloads move
        ``batch_size`` at a time (default: the new store's ``bulk_batch`` in one
        pass, 2,000 through sync), each batch one commit. The new peer installs
        the source's root key, if it has one, before the first descriptor
        arrives, so what it replays is verified as any sync would. Returns the
        new, open peer (close it).
        """
        from .clone import clone

        return clone(cls, source, store, peer_id, partition=partition,
                     source_peer_id=source_peer_id, progress=progress, batch_size=batch_size,
                     from_checkpoint=from_checkpoint, key_file=key_file)

    def status(self) -> Status:
        """Return the sync badge counts: unsent, announced, fetched, conflicted, quarantined."""
        engine = self._engine
        counts = self._ledger.count_states()
        unsent = 0
        held, graph = engine.held, engine.graph
        for partition in held.partitions():
            top = held.highest(partition, self.origin)
            if top:
                sent = int(self._ledger.get_state(f"sent:{self.origin}:{partition}") or 0)
                unsent += sum(1 for seq in range(sent + 1, top + 1)  # refused ones never go
                              if held.get(partition, self.origin, seq) in graph)
        self._store.rollback()
        return Status(self.peer_id, self.origin, unsent, counts.get("announced", 0),
                      len(engine.graph) - len(engine.applied), len(engine.conflicted),
                      counts.get("quarantined", 0), self.pinned, counts.get(REFUSED, 0))

    def trust_sequencer(self, peer_id: str, partition: str = DEFAULT_PARTITION) -> None:
        """Name the peer whose barriers this peer accepts from sync for ``partition``.

        A local stand-in for the trust anchor (signatures come later): a
        ``config`` revision from that sequencer may hand the role over.
        """
        self._ledger.set_state(f"sequencer:{partition}", peer_id)
        self._ledger.audit("trust", None, detail={"partition": partition, "sequencer": peer_id})
        self._store.commit()

    def _sequencer(self, partition: str) -> str | None:
        named = self._engine.policy_for(partition).sequencer
        if named is None:
            named = self._ledger.get_state(f"sequencer:{partition}")
            self._store.rollback()
        return named

    # -- keys and trust -----------------------------------------------------------------
    @property
    def key(self) -> KeyPair:
        """This peer's Ed25519 key pair, made at first use; it signs every revision this
        peer originates.

        It lives in ``key_file`` when one is given (alembic.ini ``key_file``), else
        next to a SQLite database file (``app.db.key``, mode 0600), else (PostgreSQL,
        MongoDB, in-memory SQLite) in the store's local ``txengine_state`` table,
        which is never synced: the trade-off is that a database backup holds it.
        """
        if self._key is None:
            self._key = self._load_key()
        return self._key

    def _load_key(self) -> KeyPair:
        from .keys import load_or_create

        path = self._key_file or self._key_beside_store()
        if path is not None:
            return load_or_create(path)
        pem = self._ledger.create_state("private_key", KeyPair.generate().to_pem().decode())
        return KeyPair.from_pem(pem.encode("ascii"), "this store's private_key state row")

    def _key_beside_store(self) -> Path | None:
        if self.sa_engine is None or self.sa_engine.dialect.name != "sqlite":
            return None
        database = self.sa_engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        path = Path(database)
        return path.with_name(path.name + ".key")

    def root_key(self) -> str | None:
        """Return the deployment's root public key installed here (base64), or None: the
        peer then runs in open mode and checks no signature."""
        from .keys import public_text

        root = self._root_public()
        return None if root is None else public_text(root)

    def key_info(self) -> KeyInfo:
        """Return this peer's key id and public key (what the root enrolls)."""
        return KeyInfo(self.peer_id, self.key.id, self.key.public_text)

    def enrolled(self) -> list[KeyInfo]:
        """Return the keys the root enrolled, as this peer knows them (none in open mode)."""
        from .keys import public_text

        trust = self._trust()
        if trust is None:
            return []
        enrolment = trust.enrolment
        return [KeyInfo(peer, kid, public_text(public), enrolment.revoked.get(kid))
                for kid, (peer, public) in sorted(enrolment.keys.items(),
                                                  key=lambda item: (item[1][0], item[0]))]

    def _root_public(self) -> bytes | None:
        if not self._root_read:
            from .keys import public_from_text

            text = self._ledger.get_state("root_key")
            self._store.rollback()
            self._root = None if text is None else public_from_text(text)
            self._root_read = True
        return self._root

    def install_root(self, public: str) -> None:
        """Install the deployment's root public key (the trust anchor).

        From then on this peer refuses, on arrival, unsigned revisions and those
        whose signer the root has not enrolled for their origin. Installing the
        same key again does nothing; another one is refused, since every
        enrolment hangs on it.
        """
        from .keys import key_id, public_from_text, public_text

        raw = public_from_text(public)
        current = self._root_public()
        if current == raw:
            return
        if current is not None:
            raise ConfigError(f"this peer already trusts root key {key_id(current)}, not"
                              f" {key_id(raw)}: a root key is installed once, at init or clone")
        self._ledger.set_state("root_key", public_text(raw))
        self._ledger.audit("install_root", None, detail={"key": key_id(raw)})
        self._store.commit()
        self._root, self._root_read = raw, True
        self._enrolments.clear()

    def enroll(self, root: KeyPair, keys: dict[str, str], partition: str = DEFAULT_PARTITION,
               message: str = "enroll", sequencer: str | None = None) -> RevisionInfo:
        """Enroll peer keys (``{peer id: public key}``) in a config revision signed by the
        root key, optionally naming the partition's ``sequencer``; installs the root
        here when no root is installed yet."""
        from .keys import public_from_text

        for text in keys.values():
            public_from_text(text)
        return self._root_config(root, {"enroll": dict(keys), "sequencer": sequencer},
                                 partition, message)

    def revoke(self, root: KeyPair, key_ids: Sequence[str], partition: str = DEFAULT_PARTITION,
               message: str = "revoke") -> RevisionInfo:
        """Revoke peer keys by id in a config revision signed by the root key: their
        revisions outside this barrier's ancestry are refused from then on."""
        return self._root_config(root, {"revoke": list(key_ids)}, partition, message)

    def _root_config(self, root: KeyPair, body: dict[str, Any], partition: str,
                     message: str) -> RevisionInfo:
        from .keys import public_text
        from .policy import encode_config

        named = self._sequencer(partition)
        if named is not None and named != self.peer_id:
            raise ConfigError(f"only the sequencer of partition {partition!r} ({named!r}) may"
                              " write config revisions: run this there")
        self.install_root(public_text(root.public))
        self._before_write()
        payload = encode_config(enroll=body.get("enroll"), revoke=body.get("revoke"),
                                sequencer=body.get("sequencer"))
        return self.info(self._issue_barrier("config", partition, payload, message, root).id)

    def _trust(self) -> Trust | None:
        """Return this peer's trust view, or None in open mode (no root key installed).

        Rebuilt only when the set of config revisions changes; each config is
        decoded, and its root signature verified, once per process.
        """
        root = self._root_public()
        if root is None:
            return None
        from .checkpoint import base_configs

        graph = self._engine.graph
        configs = (*base_configs(self._engine),  # before a checkpoint: held as base rows
                   *(b for b in graph.barriers() if graph.get(b).kind == "config"))
        if self._trust_cache is None or self._trust_cache[0] != (root, configs):
            self._trust_cache = ((root, configs),
                                 Trust(root, self._enrolment(root, configs), self._sequencer))
        return self._trust_cache[1]

    def _enrolment(self, root: bytes, configs: Sequence[str]) -> Any:
        from .keys import Enrolment, key_id, verify
        from .policy import decode_config
        from .values import loads

        missing = [c for c in configs if c not in self._enrolments]
        if missing:
            rows = self._ledger.rows(missing, "payload", "signature", "digest")
            self._store.rollback()
            for c in missing:
                row = rows[c]
                try:
                    body = decode_config(payload_of(row))
                except TxEngineError:  # refused at intake; never enrolls anyone
                    body = {}
                sig = loads(row.signature) if row.signature else None
                by_root = (sig is not None and sig["key"] == key_id(root)
                           and verify(root, row.digest, sig))
                self._enrolments[c] = body if by_root and (
                    "enroll" in body or "revoke" in body) else None
        enrolment = Enrolment()
        for c in configs:
            enrolled = self._enrolments[c]
            if enrolled is not None:
                enrolment.add(c, enrolled)
        return enrolment

    def configure(self, partition: str = DEFAULT_PARTITION, *,
                  policies: dict[str, str] | None = None, default: str | None = None,
                  sync: Sequence[str] | None = None, sequencer: str | None = None,
                  message: str = "config") -> RevisionInfo:
        """Write a ``config`` revision (a barrier): conflict policies, synced collections,
        sequencer. Only the partition's sequencer may, or anyone while none is named."""
        from .policy import encode_config

        named = self._sequencer(partition)
        if named is not None and named != self.peer_id:
            raise ConfigError(f"only the sequencer of partition {partition!r} ({named!r}) may"
                              " write config revisions")
        self._before_write()
        payload = encode_config(policies, default, list(sync) if sync is not None else None,
                                sequencer)
        return self.info(self._issue_barrier("config", partition, payload, message).id)

    def _issue_barrier(self, kind: str, partition: str, payload: bytes, message: str,
                       signer: Signer | None = None) -> Revision:
        """Record and integrate a barrier of this peer (config, checkpoint).

        Its parents are the partition's integrated heads and its hlc is above
        every known barrier, so it never sorts before one (intake refuses that).
        """
        from .revision import build

        engine = self._engine
        graph = engine.graph
        parents = engine.parents_for(partition)
        above = [graph.get(p).hlc for p in parents] + [graph.get(b).hlc
                                                       for b in graph.barriers()]
        rev = build(kind=kind, payload=payload, partition=partition, parents=parents,
                    origin=engine.origin, seq=engine.next_seq(partition),
                    hlc=engine.clock.tick(above), message=message,
                    rev_id=f"{kind}_{secrets.token_hex(8)}", signer=signer or self.key)
        engine.receive([(rev.descriptor, rev.payload)], trusted=True)
        self._integrate()
        return rev

    def _integrate(self) -> list[Step]:
        self._take_lease()
        return self._engine.integrate()

    def _take_ack(self, vectors: dict[str, dict[str, int]]) -> None:
        """Record how far another peer holds this peer's own revisions, by its vectors."""
        for partition, vector in vectors.items():
            self._mark_sent(partition, int(vector.get(self.origin, 0)))

    def _mark_sent(self, partition: str, seq: int) -> None:
        name = f"sent:{self.origin}:{partition}"
        if seq > int(self._ledger.get_state(name) or 0):
            self._ledger.set_state(name, str(seq))
            self._store.commit()
        else:
            self._store.rollback()

    def _promote(self, ids: Sequence[str], reason: str) -> None:
        """Move quarantined revisions to fetched (parents first)."""
        if not ids:
            return
        from .ledger import FETCHED

        rows = self._ledger.full_rows(list(ids))
        revs = sorted((Revision(descriptor_from_row(r), payload_of(r)) for r in rows.values()),
                      key=lambda r: r.hlc)
        self._ledger.set_states([r.id for r in revs], FETCHED)
        self._ledger.audit_many([("release", r.id, "ok", 0.0, {"reason": reason}) for r in revs])
        self._store.commit()
        self._engine.add_fetched(revs)

    def _release_quarantine(self) -> None:
        """Release quarantined revisions the clock has caught up with."""
        engine = self._engine
        if not engine.quarantined:
            return
        from .clock import wall_ms

        horizon = max(wall_ms(), engine.clock.last[0]) + self.max_clock_skew_ms
        ready: list[str] = []
        for node in sorted(engine.quarantined.values(), key=lambda n: n.hlc):
            if node.hlc[0] <= horizon and all(
                    p in engine.graph or p in ready for p in node.parents):
                ready.append(node.id)
        self._promote(ready, "clock caught up")

    def _admit_quarantined(self, barriers: Sequence[Revision]) -> None:
        """Release the quarantined ancestry of barriers the sequencer issued."""
        engine = self._engine
        admit: set[str] = set()
        stack = [p for b in barriers for p in b.parents]
        while stack:
            rev_id = stack.pop()
            if rev_id in engine.quarantined and rev_id not in admit:
                admit.add(rev_id)
                stack.extend(engine.quarantined[rev_id].parents)
        self._promote(sorted(admit), "admitted by a barrier")

    def _refused_by_remote(self, reasons: dict[str, str]) -> list[str]:
        """Roll back revisions a server refused (no write grant), with what depends on
        them, and keep them as refused; return their ids in canonical order.

        Device and server must never silently disagree: data the server will
        not take must not stay here as if it were shared. The rows stay, in
        state ``refused`` (``status().refused``, the audit says why), so their
        (origin, seq) slots are never reused for other revisions; they leave
        the graph, so they are neither sent again nor parents of new writes.
        """
        engine, graph = self._engine, self._engine.graph
        self._take_lease()
        known = [r for r in reasons if r in graph]
        if not known:
            return []
        refused = graph.canonical_order(graph.descendants(known))
        engine.run(engine._with_redo(add=[], remove=[r for r in refused if r in engine.applied]),
                   "refuse")
        self._ledger.set_states(refused, REFUSED)
        from .sync import DEPENDS_ON_REFUSED

        self._ledger.audit_many([("refused", r, "refused", 0.0,
                                  {"reason": reasons.get(r, DEPENDS_ON_REFUSED)})
                                 for r in refused])
        self._store.commit()
        engine.load()
        return refused

    def _reissue(self, kept: set[str]) -> dict[str, str]:
        """Move to a new epoch and re-issue this origin's revisions the other side lacks.

        Called when another peer holds (origin, seq) values this store does not
        (it was restored from a backup and wrote offline): those revisions
        were never sent, so they are undone, removed and written again — same
        ops, new origin, seq and ids — and nothing is lost.
        """
        engine, graph = self._engine, self._engine.graph
        self._take_lease()
        mine = [r for r in graph if graph.get(r).origin == self.origin and r not in kept]
        unsent = graph.canonical_order(graph.descendants(mine)) if mine else []
        rows = self._ledger.full_rows(unsent)
        revs = [Revision(descriptor_from_row(rows[r]), payload_of(rows[r])) for r in unsent]
        self._store.rollback()
        engine.run(engine._with_redo(add=[], remove=[r for r in unsent if r in engine.applied]),
                   "reissue")
        epoch = int(self._ledger.get_state("epoch") or 0) + 1
        self._ledger.delete(unsent)
        self._ledger.set_state("epoch", str(epoch))
        self._ledger.audit("epoch", None, detail={"from": self.origin, "epoch": epoch,
                                                  "reissue": unsent})
        self._store.commit()
        self.origin = engine.origin = f"{self.peer_id}:{epoch}"
        engine.load()
        mapping: dict[str, str] = {}
        for rev in revs:
            if rev.kind != "data":
                continue
            ops = [remap_expect(op, mapping) for op in rev.ops]
            new = self._commit_ops(rev.message, rev.partition, ops, {})
            mapping[rev.id] = new.id
        return mapping

    # -- verify -------------------------------------------------------------------
    def verify(self, replay: bool = False) -> VerifyReport:
        """Recompute every checksum and digest and check the chain; optionally replay.

        On a rooted peer, also check each revision's signature as intake did at
        arrival (see :mod:`txengine.verify`).
        """
        from .verify import report

        return report(self, replay)

    # -- authored scripts ------------------------------------------------------------
    def new_script(self, message: str, *, head: str | None = None, splice: bool = False,
                   branch_label: Sequence[str] = (), rev_id: str | None = None,
                   depends_on: Sequence[str] = (), stores: Sequence[str] = ("sql",),
                   partition: str = DEFAULT_PARTITION) -> NewScript:
        """Write a new authored script revision into the script location (``revision -m``).

        Parents are the head of the authored scripts (or ``head``; ``"base"``
        starts a new branch), never a data revision, which other peers may
        lack: every peer has ``versions/``. The descriptor (id, parents, hlc,
        origin, seq) is frozen into the file header, so every peer that loads
        the file gets the same revision; the hlc is above every known revision,
        so the new barrier never sorts before a known one.
        """
        import datetime as _dt

        from .scripts import load_authored, render_authored, script_filename

        if self.script_location is None:
            raise ConfigError("no script_location configured: set it in alembic.ini"
                              " (`txengine init` does)")
        graph = self._engine.graph
        barriers = [r for r in graph if graph.get(r).kind != "data"]
        heads = sorted(r for r in barriers
                       if not any(graph.get(c).kind != "data" for c in graph.children(r)))
        if head is None:
            if len(heads) > 1:
                raise InvalidInput(f"there are {len(heads)} script heads ({', '.join(heads)}):"
                                   " pass --head to choose one, or --head base for a new branch")
            parents = heads
        elif head == "base":
            parents = []
        else:
            target = graph.upgrade_plan(head, ())[-1] if "@" in head else graph.resolve(head)
            if target not in heads and not splice:
                raise InvalidInput(f"revision {target[:12]} is not a script head: pass --splice"
                                   " to branch from it")
            parents = [target]
        rev_id = rev_id or secrets.token_hex(6)
        if rev_id in graph:
            raise InvalidInput(f"revision id {rev_id!r} already exists: choose another --rev-id")
        deps = [graph.resolve(d) for d in depends_on]
        text = render_authored(
            rev_id=rev_id, message=message, parents=parents, branch_labels=list(branch_label),
            depends_on=deps, hlc=self._engine.clock.tick(graph.get(r).hlc for r in graph),
            origin=self.origin, seq=self._engine.next_seq(partition), stores=list(stores),
            partition=partition,
            create_date=_dt.datetime.now(_dt.UTC).replace(microsecond=0, tzinfo=None),
        )
        self.script_location.mkdir(parents=True, exist_ok=True)
        path = self.script_location / script_filename(rev_id, message)
        path.write_text(text, "utf-8")
        script = load_authored(path)
        self._take_lease()
        signed = self._signed_script(script.revision)
        self._engine.receive([(signed.descriptor, signed.payload)], trusted=True)
        self._script_paths[rev_id] = path
        self._authored[rev_id] = script
        return NewScript(rev_id, path, tuple(parents), tuple(branch_label), tuple(deps))

    def _load_scripts(self) -> None:
        """Record new authored files; refresh the text of changed, unapplied ones.

        Files the ledger already knows by checksum are not parsed (see
        ``scripts.scan_versions``); they are loaded when a script runs.
        """
        from .scripts import load_authored, scan_versions

        assert self.script_location is not None
        known = self._ledger.script_checksums()
        self._store.rollback()
        graph, applied = self._engine.graph, self._engine.applied
        paths: dict[str, Path] = {}
        fresh, changed = [], []
        for path, data in scan_versions(self.script_location):
            rev_id = known.get(sha256(data))
            if rev_id is not None:
                paths[rev_id] = path
                continue
            script = load_authored(path)
            rev = script.revision
            if rev.id in paths:
                raise MalformedPayload(f"{path}: revision {rev.id} is also defined in"
                                       f" {paths[rev.id]}; give one of them a new id")
            paths[rev.id] = path
            self._authored[rev.id] = script
            if rev.id not in graph:
                signed = self._signed_script(rev)
                fresh.append((signed.descriptor, signed.payload))
            elif rev.id not in applied:
                changed.append(self._signed_script(rev))
        self._script_paths = paths
        if fresh:
            self._take_lease()
            self._engine.receive(fresh, trusted=True)
        for rev in changed:
            self._ledger.update_payload(rev)
        if changed:
            self._store.commit()

    def _signed_script(self, rev: Revision) -> Revision:
        """Sign an authored script this peer wrote, or one it loads as the sequencer of its
        partition: other peers run code only when the sequencer signed it."""
        from .keys import peer_of

        d = rev.descriptor
        if self.peer_id not in (peer_of(d["origin"]), self._sequencer(d["partition"])):
            return rev
        return Revision({**d, "signature": self.key.sign(d["digest"])}, rev.payload)

    def authored(self, rev_id: str) -> Any | None:
        """Return the authored script of ``rev_id`` from the script location, or None."""
        from .scripts import load_authored

        script = self._authored.get(rev_id)
        if script is None and rev_id in self._script_paths:
            script = self._authored[rev_id] = load_authored(self._script_paths[rev_id])
        return script

    def _verify_scripts(self) -> list[Finding]:
        findings = []
        for rev_id, path in self._script_paths.items():
            if rev_id not in self._engine.applied:
                continue
            row = self._ledger.row(rev_id)
            text = path.read_bytes()
            if row is not None and payload_of(row) != text:
                findings.append(Finding(rev_id, (
                    f"authored script {path} changed after it was applied (checksum"
                    f" {sha256(text)[:12]}, applied {row.checksum[:12]}): restore the file,"
                    " or write a new revision")))
        self._store.rollback()
        return findings

    def _run_script(self, rev: Revision, direction: str) -> str | None:
        from .runner import run_authored

        return run_authored(self, rev, direction)

    def documents(self, collection: str, partition: str = DEFAULT_PARTITION
                  ) -> Iterator[dict[str, Any]]:
        """Yield a collection's documents as stored (Extended JSON)."""
        yield from list(self._store.documents(partition, collection))
        self._store.rollback()

    def snapshot(self) -> dict[tuple[str, str, str], Any]:
        """Return every document state (partition, collection, key) -> (doc, incarnation)."""
        snap = self._store.snapshot()
        self._store.rollback()
        return snap

    # -- checkpoints ------------------------------------------------------------------
    def content_digest(self, partition: str | None = None) -> str:
        """Return the content digest of one partition's data, or of every partition's.

        Equal on every peer holding the same documents, whatever the arrival
        order and the store kind (see :mod:`txengine.digest`).
        """
        from .digest import content_digest

        engine = self._engine
        partitions = partition if partition is not None else sorted(
            set(engine.partition.values()) | set(engine.bases))
        try:
            return content_digest(self._store, partitions)
        finally:
            self._store.rollback()

    def checkpoint(self, partition: str = DEFAULT_PARTITION, message: str = "checkpoint"
                   ) -> Any:
        """Issue a checkpoint of ``partition`` (its sequencer only): a barrier whose payload
        holds the content digest, the version vector of its ancestry and the policy in force.

        Returns a :class:`~txengine.checkpoint.CheckpointInfo`.
        """
        from .checkpoint import issue

        return issue(self, partition, message)

    def prune(self, before: str, archive: str | Path | None = None) -> Any:
        """Drop the history before checkpoint ``before`` from the ledger, archiving it
        first to the bundle file ``archive`` when given.

        The peer then holds the partition as a peer cloned from that
        checkpoint does: data, audit and everything after the checkpoint stay;
        it still syncs, and accepts revisions written offline before the
        checkpoint (their parents stay as descriptor-only rows). Returns a
        :class:`~txengine.checkpoint.PruneInfo`.
        """
        from .checkpoint import prune

        self._before_write()
        return prune(self, before, archive)

    def write_snapshot(self, checkpoint: str, path: str | Path,
                       progress: ProgressCallback | None = None) -> Any:
        """Write the snapshot of a checkpoint (its partition's documents then) to ``path``.

        Rebuilt from the live data and the undo records of what came after it,
        and checked against the checkpoint's digest before the file appears.
        Returns a :class:`~txengine.snapshot.SnapshotInfo`.
        """
        from .checkpoint import write_snapshot

        return write_snapshot(self, checkpoint, path, progress)


