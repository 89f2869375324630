"""The public Python API: one :class:`Peer` method per CLI command.

Methods return dataclasses and never print; long operations report through
a ``progress`` callback.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
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
from .ledger import AuditEntry, Ledger, descriptor_from_row, payload_of
from .ops import Delete, Insert, Op, Update, op_from_json
from .revision import DEFAULT_PARTITION, Revision, check_descriptor, verify_bytes
from .stores.sql import SqlStore, configure_engine, create_engine
from .transaction import Transaction, build_data_revision
from .values import from_ejson, key_text, to_ejson

_PEER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


@dataclass(frozen=True)
class RevisionInfo:
    """What the graph queries return about one revision (no payload)."""

    id: str
    parents: tuple[str, ...]
    kind: str
    message: str
    partition: str
    origin: str
    hlc: tuple[int, int]
    applied: bool
    is_head: bool
    branch_labels: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["parents"] = list(self.parents)
        out["hlc"] = list(self.hlc)
        out["branch_labels"] = list(self.branch_labels)
        out["depends_on"] = list(self.depends_on)
        return out


@dataclass(frozen=True)
class RevisionDetail:
    """One revision in full: descriptor, payload and rendered script."""

    info: RevisionInfo
    descriptor: dict[str, Any]
    payload: bytes
    script: str

    def to_json(self) -> dict[str, Any]:
        return {**self.info.to_json(), "descriptor": self.descriptor, "script": self.script}


@dataclass(frozen=True)
class OperationResult:
    """What an upgrade, downgrade or stamp did."""

    action: str
    applied: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Finding:
    """One problem that ``verify`` found."""

    revision: str | None
    problem: str
    collection: str | None = None
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class VerifyReport:
    """The findings of ``verify``; ``ok`` when there are none."""

    checked: int
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked,
                "findings": [f.to_json() for f in self.findings]}


@dataclass(frozen=True)
class NewScript:
    """An authored script revision written by ``new_script`` (``txengine revision``)."""

    id: str
    path: Path
    parents: tuple[str, ...]
    branch_labels: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": str(self.path), "parents": list(self.parents),
                "branch_labels": list(self.branch_labels), "depends_on": list(self.depends_on)}


class Peer:
    """A participant: a store, its ledger, and an identity.

    One Peer owns one database connection and is not thread-safe; open one
    Peer per thread or process. The apply lease is taken on the first write
    and held (renewed) until :meth:`close`.
    """

    def __init__(self, engine: sa.Engine | Any, peer_id: str | None = None,
                 script_location: str | Path | None = None, batch_size: int = 2000) -> None:
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
            self._engine = Engine(self._store, self._ledger, self.origin,
                                  scripts=self._run_script, batch_size=batch_size)
            self._scripts: dict[str, Any] = {}
            self._pinned: bool | None = None
            if self.script_location is not None:
                self._load_scripts()
        except BaseException:
            self._close_store()
            raise

    @classmethod
    def open(cls, store: str | sa.Engine | Any, peer_id: str | None = None, *,
             script_location: str | Path | None = None, batch_size: int = 2000) -> Peer:
        """Open a peer on a store URL or object.

        A URL: ``sqlite:///app.db``, a path, PostgreSQL, ``mongodb://host/db``
        (``mongomock://host/db`` for the in-memory test double); an object: a
        SQLAlchemy Engine or a pymongo (or mongomock) ``Database``.
        """
        from .stores.mongo import is_database, is_mongo_url, open_database

        if is_mongo_url(store):
            return cls(open_database(store), peer_id, script_location=script_location,
                       batch_size=batch_size)
        if is_database(store):
            return cls(store, peer_id, script_location=script_location, batch_size=batch_size)
        engine = create_engine(store) if isinstance(store, str) else store
        return cls(engine, peer_id, script_location=script_location, batch_size=batch_size)

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

    def _take_lease(self) -> None:
        """Hold the apply lease; reload what another process may have changed meanwhile."""
        if self._ledger.acquire_lease():
            self._engine.load()
            self._pinned = None

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
                if isinstance(data, dict) and data.get("op") in ("update", "delete"):
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
        return planner(target)

    def _execute(self, action: str, target: str, progress: ProgressCallback | None
                 ) -> OperationResult:
        self._take_lease()
        steps = self.plan(action, target)
        self._engine.run(steps, action, progress)
        undone = [s.revision for s in steps if s.action in ("undo", "unstamp")]
        done = [s.revision for s in steps if s.action in ("apply", "stamp")]
        return OperationResult(action, [r for r in done if r not in undone or True],
                               [r for r in undone if r not in done])

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
        if not self.pinned and self.plan("downgrade", target):
            # Pin before the first batch commits, so an interrupted downgrade stays pinned.
            self._set_pinned(True, {"target": target})
        return self._execute("downgrade", target, progress)

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
                    hlc=engine.hlc_for(parents), message=message)
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
                for undo_op in _revert_ops(tx, rev.id, op, prior):
                    tx.add_op(undo_op)
        return self.info(tx.revision.id) if tx.revision else None

    def receive(self, items: Sequence[tuple[dict[str, Any], bytes]]) -> list[str]:
        """Take revisions from another peer (checked, recorded as fetched, not applied)."""
        self._take_lease()
        return self._engine.receive(items)

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

    # -- verify -------------------------------------------------------------------
    def verify(self, replay: bool = False) -> VerifyReport:
        """Recompute every checksum and digest and check the chain; optionally replay."""
        findings: list[Finding] = []
        checked = 0
        for row in self._ledger.all_rows():
            checked += 1
            d = descriptor_from_row(row)
            try:
                verify_bytes(d, payload_of(row))
                if d["kind"] == "data":
                    Revision(d, payload_of(row)).ops  # noqa: B018 - parse to check
            except TxEngineError as exc:
                findings.append(Finding(row.id, str(exc)))
        self._store.rollback()
        for rev_id, problem in self._engine.graph.validate():
            findings.append(Finding(rev_id, problem))
        findings += self._verify_scripts()
        if replay:
            from .replay import replay_findings
            findings += replay_findings(self)
        return VerifyReport(checked, findings)

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
        self._engine.receive([(script.revision.descriptor, script.revision.payload)],
                             trusted=True)
        self._scripts[rev_id] = script
        return NewScript(rev_id, path, tuple(parents), tuple(branch_label), tuple(deps))

    def _load_scripts(self) -> None:
        from .scripts import load_versions

        assert self.script_location is not None
        if not self.script_location.is_dir():
            return
        scripts = {s.revision.id: s for s in load_versions(self.script_location)}
        self._scripts = scripts
        fresh = [(s.revision.descriptor, s.revision.payload) for r, s in scripts.items()
                 if r not in self._engine.graph]
        pending = [r for r in scripts if r in self._engine.graph and r not in self._engine.applied]
        stored = self._ledger.rows(pending, "digest") if pending else {}
        # Rewrite only what the file changed: opening a peer must not touch every row.
        changed = [scripts[r].revision for r in pending
                   if r in stored and stored[r].digest != scripts[r].revision.descriptor["digest"]]
        if fresh:
            self._take_lease()
            self._engine.receive(fresh, trusted=True)
        for rev in changed:
            self._ledger.update_payload(rev)
        if changed:
            self._store.commit()

    def _verify_scripts(self) -> list[Finding]:
        findings = []
        for rev_id, script in self._scripts.items():
            if rev_id not in self._engine.applied:
                continue
            row = self._ledger.row(rev_id)
            if row is not None and payload_of(row) != script.revision.payload:
                findings.append(Finding(rev_id, (
                    f"authored script {script.path} changed after it was applied (checksum"
                    f" {script.revision.descriptor['checksum'][:12]}, applied"
                    f" {row.checksum[:12]}): restore the file, or write a new revision")))
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


_MISSING = object()


def _revert_ops(tx: Transaction, rev_id: str, op: Op, prior: dict[Any, Any]) -> list[Op]:
    """Return compare-and-set ops that undo ``op`` of ``rev_id`` where it still holds."""
    doc = tx.get(op.collection, from_ejson(op.key))
    current = None if doc is None else to_ejson(doc)
    k = (op.collection, key_text(op.key))
    state_inc = tx._overlay.get((tx.partition, *k), (None, None))[1]
    if isinstance(op, Insert):
        if current is None or state_inc != rev_id:
            return []
        before = prior.get(k)
        if before is not None:
            return [Insert(op.collection, before)]
        return [Delete(op.collection, op.key, expect=rev_id, before=current)]
    if isinstance(op, Delete):
        if current is not None or op.before is None:
            return []
        return [Insert(op.collection, op.before)]
    if current is None:
        return []
    before = op.before or {}
    set_ = {f: before[f] for f in op.set if f in before and current.get(f, _MISSING) == op.set[f]}
    unset = [f for f in op.set if f not in before and current.get(f, _MISSING) == op.set[f]]
    set_.update({f: before[f] for f in op.unset if f in before and f not in current})
    inc = {f: to_ejson(-from_ejson(v)) for f, v in op.inc.items()}
    if not (set_ or unset or inc):
        return []
    touched = [*set_, *unset, *inc]
    return [Update(op.collection, op.key, set=set_, unset=tuple(unset), inc=inc,
                   expect=state_inc, before={f: current[f] for f in touched if f in current})]
