"""The engine: plans (pure) and applies upgrade, downgrade, stamp and new writes.

Invariant: two integrated revisions that write a common key are applied in
canonical order, so the data always equals a fresh replay of the integrated
set. Upgrades on top of everything, and downgrades of a suffix, need no
extra work; otherwise the dirty-key walk of DESIGN.md rolls back only the
revisions whose writes meet the change and redoes them afterwards, so the
cost follows conflicts, not history.

Undo records hold what this peer actually saw at apply time (the prior
``(doc, incarnation)`` of each key), so undo is exact; bulk operations keep
document states in memory and write each key once per batch.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from .clock import Clock, Hlc
from .exceptions import (
    ChecksumMismatch,
    IntegrityError,
    TxEngineError,
    UntrustedScript,
)
from .graph import Graph, Node
from .intake import check_batch
from .ledger import (
    ANNOUNCED,
    APPLIED,
    BASE,
    CONFLICTED,
    FETCHED,
    INTEGRATED,
    NODE_COLUMNS,
    QUARANTINED,
    REFUSED,
    Applied,
    Ledger,
    descriptor_from_row,
    payload_of,
)
from .ops import Op, State, apply_op, write_key
from .policy import DEFAULT, REJECT, Policy, decode_config, resolver
from .revision import Revision, decode_ops
from .stores.base import Store
from .values import loads, sha256
from .vector import SeqIndex

if TYPE_CHECKING:
    from .keys import Trust

Key = tuple[str, str, str]
"""A document's identity: (partition, collection, key text)."""


class Step(NamedTuple):
    """One step of a plan: ``apply``, ``undo``, ``stamp`` or ``unstamp`` one revision.

    A named tuple, not a frozen dataclass: a plan makes one per revision, and
    100,000 of them cost a third of the time.
    """

    action: str
    revision: str


@dataclass(frozen=True)
class Progress:
    """A progress report, sent after each committed batch."""

    action: str
    done: int
    total: int
    revision: str | None = None


ProgressCallback = Callable[[Progress], None]
ScriptRunner = Callable[[Revision, str], "str | None"]


@dataclass
class _Batch:
    """One batch of a plan as it goes through :meth:`Engine._run`: read, computed, written."""

    steps: list[Step]
    rows: dict[str, Any]
    started: float
    ops_of: dict[str, list[Op]] = field(default_factory=dict)
    keys_of: dict[str, list[Key]] = field(default_factory=dict)
    applied: list[Applied] = field(default_factory=list)
    unapplied: list[str] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    audit: list[tuple[str, str | None, str, float, dict[str, Any]]] = field(
        default_factory=list)
    statements: list[Any] = field(default_factory=list)
    """Writes left for the commit to run (see :meth:`SqlStore.commit_in_background`)."""


@dataclass
class _Work:
    """Document states held in memory for the length of one operation."""

    store: Store
    states: dict[Key, State] = field(default_factory=dict)
    dirty: set[Key] = field(default_factory=set)

    def preload(self, keys: Iterable[Key]) -> None:
        grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
        for k in keys:
            if k not in self.states:
                grouped[(k[0], k[1])].append(k[2])
        for (partition, collection), texts in grouped.items():
            found = self.store.load_states(partition, collection, texts)
            for text in texts:
                self.states[(partition, collection, text)] = found.get(text, (None, None))

    def flush(self, defer: list[Any] | None = None) -> None:
        grouped: dict[tuple[str, str], dict[str, State]] = defaultdict(dict)
        for k in self.dirty:
            grouped[(k[0], k[1])][k[2]] = self.states[k]
        for (partition, collection), states in sorted(grouped.items()):
            self.store.write_states(partition, collection, states, defer)
        self.dirty.clear()


def _id_tuple(text: str) -> tuple[str, ...]:
    """Parse a stored JSON list of ids; most are empty or hold one parent."""
    return () if text == "[]" else tuple(loads(text))


def _row_node(rev_id: str, kind: str, origin: str, ms: int, counter: int, parents: str,
              depends_on: str, labels: str) -> Node:
    """Return the graph node of a ledger row (its :data:`NODE_COLUMNS`)."""
    return Node(rev_id, _id_tuple(parents), _id_tuple(depends_on), (ms, counter), origin, kind,
                _id_tuple(labels))


def node_of(descriptor: dict[str, Any]) -> Node:
    """Return the graph node of a descriptor."""
    ms, counter = descriptor["hlc"]
    return Node(descriptor["id"], tuple(descriptor["parents"]), tuple(descriptor["depends_on"]),
                (ms, counter), descriptor["origin"], descriptor["kind"],
                tuple(descriptor["branch_labels"]))


_REFRESHABLE = frozenset({
    "apply", "undo", "stamp", "unstamp", "receive", "announce", "fetch", "quarantine",
    "release", "refuse", "conflict", "skip", "pin", "unpin", "peers_add", "peers_grant",
    "peers_revoke_grant", "peers_remove",
})
"""Audit actions whose effect :meth:`Engine.refresh` takes from the revisions they name
(a batch row names its steps); any other action makes the process load the ledger again."""

_FREEZE_AT = 50_000
"""Graphs this big are frozen out of the cyclic collector's sight (see :meth:`Engine.load`)."""


class Engine:
    """Holds the revision graph and applied set of one peer, and changes them."""

    def __init__(self, store: Store, ledger: Ledger, origin: str,
                 scripts: ScriptRunner | None = None, batch_size: int = 2000) -> None:
        self.store = store
        self.ledger = ledger
        self.origin = origin
        self.run_script = scripts
        self.batch_size = batch_size
        self.load()

    # -- in-memory state -----------------------------------------------------
    def load(self) -> None:
        """(Re)load graph, applied set, clock and counters from the ledger.

        A big history's objects then live as long as the peer; they are moved
        out of the cyclic collector's sight (``gc.freeze``), or its first
        collections after the load, and every full one later, walk millions of
        them: at 1,000,000 revisions a write or sync now and then took seconds.
        They hold no cycles, so reference counting still frees them on reload.
        """
        with paused_gc():
            self._load()
        self.freeze()

    def freeze(self) -> None:
        """Move a big graph out of the cyclic collector's sight (see :meth:`load`); bulk
        operations that built it with the collector paused call this after."""
        if len(self.graph) >= _FREEZE_AT:
            gc.freeze()

    def _load(self) -> None:
        self.ledger.observe_lease()
        self._copied: _Work | None = None
        """The document states a copy (:meth:`begin_copied`) has written so far."""
        # Read first: whatever commits after it is taken again by the next refresh.
        self._audit_seen: int | None = (self.ledger.audit_seq()
                                        if hasattr(self.ledger, "audit_since") else None)
        self.graph = Graph()
        self.partition: dict[str, str] = {}
        self.messages: dict[str, str] = {}
        self.applied: dict[str, int] = {}
        self.clock = Clock()
        self.held = SeqIndex()
        self.conflicted: set[str] = set()
        self.quarantined: dict[str, Node] = {}
        self.stubs: dict[str, Node] = {}
        """Descriptors held by a checkpoint's vector, without payload but for the configs
        that carry trust (txengine.checkpoint)."""
        self.bases: dict[str, dict[str, Any]] = loads(self.ledger.get_state("bases") or "{}")
        """Per partition, the checkpoint this peer started from: id, vector, config."""
        self._configs: dict[str, dict[str, Any]] = {}
        add, hold = self.graph.add, self.held.add
        partition, messages, applied = self.partition, self.messages, self.applied
        top = self.clock.last
        for (rev_id, part, kind, origin, ms, counter, parents, depends_on, labels, position,
             message, seq, st) in self.ledger.nodes():
            if st == ANNOUNCED:
                continue
            try:
                node = _row_node(rev_id, kind, origin, ms, counter, parents, depends_on, labels)
            except (ValueError, TypeError) as exc:
                self.store.rollback()
                raise IntegrityError(
                    f"revision {str(rev_id)[:12]}: its ledger row's parents, depends_on or"
                    f" branch_labels is not a JSON list of ids ({exc}): the store was changed"
                    " behind txengine; restore it from a backup or clone a sound peer"
                ) from exc
            if st == BASE:
                self.stubs[rev_id] = node
                continue
            hold(part, origin, seq, rev_id)
            if st == REFUSED:  # its (origin, seq) stays taken; it is in no graph or vector
                continue
            if st == QUARANTINED:
                self.quarantined[rev_id] = node
                partition[rev_id] = part
                continue
            add(node)
            if st == CONFLICTED:
                self.conflicted.add(rev_id)
            partition[rev_id] = part
            messages[rev_id] = message
            if position is not None or origin == self.origin:
                if position is not None:
                    applied[rev_id] = position
                if node.hlc > top:
                    top = node.hlc
        self.clock.absorb(top)
        for part, base in self.bases.items():
            for origin, seq in base["vector"].items():
                self.held.raise_floor(part, origin, seq)
        self.next_position = max(self.applied.values(), default=0) + 1
        self.seqs = self.ledger.max_seq(self.origin)
        self.applied_heads: dict[str, set[str]] = defaultdict(set)
        nodes = self.graph._nodes
        covered = {p for rev_id in applied for p in nodes[rev_id].parents}
        for rev_id in applied.keys() - covered:  # applied, and no applied child
            self.applied_heads[partition[rev_id]].add(rev_id)
        self.pending: set[str] = {r for r in self.graph if r not in self.applied}
        """Known, not applied: kept as the applied set changes, so a sync of a few new
        revisions never scans the whole graph for them."""
        self.store.rollback()

    def refresh(self) -> bool:
        """Catch up with what other processes recorded since this one loaded; say whether
        it could (if not, :meth:`load` must run).

        Every change of a revision's local state writes an audit row naming it
        (a batch names its steps), and the audit is append-only: re-reading
        only those ledger rows brings the graph, the applied set and the heads
        up to date, at a cost that follows what changed, not the history. A
        full load takes seconds at a million revisions, and every process
        serving one store paid it after each write of another. What a refresh
        cannot take — code or barriers, a new epoch, a checkpoint, trust
        changes, a revision leaving the graph — returns False.
        """
        if self._audit_seen is None:
            return False
        self.ledger.observe_lease()
        entries = self.ledger.audit_since(self._audit_seen)
        touched: set[str] = set()
        for _seq, rev_id, action, detail in entries:
            if rev_id is not None:
                touched.add(rev_id)
            steps = loads(detail).get("steps") if '"steps"' in detail else None
            if steps:
                touched.update(step.revision for step in decode_steps(steps))
            elif action not in _REFRESHABLE:
                return False
        rows = self.ledger.rows(sorted(touched), *NODE_COLUMNS)
        self.store.rollback()
        changed: list[str] = []
        for rev_id in touched:
            row = rows.get(rev_id)
            known = rev_id in self.graph or rev_id in self.quarantined
            if row is not None and row.origin == self.origin:
                self.seqs[row.partition] = max(self.seqs.get(row.partition, 0), row.seq)
            if row is None or row.state in (ANNOUNCED, REFUSED):
                if known:  # left the graph: a refusal, a new epoch
                    return False
                if row is not None and row.state == REFUSED:
                    self.held.add(row.partition, row.origin, row.seq, rev_id)
                continue
            if row.kind != "data" or row.state == BASE:
                return False
            node = _row_node(rev_id, row.kind, row.origin, row.hlc_ms, row.hlc_c, row.parents,
                             row.depends_on, row.branch_labels)
            self.held.add(row.partition, row.origin, row.seq, rev_id)
            self.partition[rev_id] = row.partition
            if row.origin == self.origin:
                self.clock.absorb(node.hlc)
            if row.state == QUARANTINED:
                if rev_id in self.graph:
                    return False
                self.quarantined[rev_id] = node
                continue
            self.quarantined.pop(rev_id, None)
            if rev_id not in self.graph:
                self.graph.add(node)
            self.messages[rev_id] = row.message
            if row.state == CONFLICTED:
                self.conflicted.add(rev_id)
            else:
                self.conflicted.discard(rev_id)
            if row.position is None:
                self.applied.pop(rev_id, None)
                self.pending.add(rev_id)
            else:
                self.applied[rev_id] = row.position
                self.pending.discard(rev_id)
                self.clock.absorb(node.hlc)
                self.next_position = max(self.next_position, row.position + 1)
            changed.append(rev_id)
        graph, applied = self.graph, self.applied
        for rev_id in {r for c in changed for r in (c, *graph.get(c).parents)}:
            if rev_id in graph:
                heads = self.applied_heads[self.partition[rev_id]]
                if rev_id in applied and not graph.any_child_in(rev_id, applied):
                    heads.add(rev_id)
                else:
                    heads.discard(rev_id)
        if entries:
            self._audit_seen = entries[-1][0]
        return True

    def _mark_applied(self, rev_id: str, position: int) -> None:
        self.applied[rev_id] = position
        self.pending.discard(rev_id)
        heads = self.applied_heads[self.partition[rev_id]]
        heads.add(rev_id)
        heads.difference_update(self.graph.get(rev_id).parents)
        self.clock.absorb(self.graph.get(rev_id).hlc)

    def _mark_applied_many(self, positions: dict[str, int]) -> None:
        """:meth:`_mark_applied` for a committed batch, in order, with the lookups bound once.

        The heads are settled per partition once for the whole batch: a
        revision of the batch whose child is in it too never becomes a head.
        """
        applied, partition, get = self.applied, self.partition, self.graph.get
        top = self.clock.last
        self.pending.difference_update(positions)
        applied.update(positions)
        added: dict[str, set[str]] = defaultdict(set)
        covered: set[str] = set()
        for rev_id in positions:
            node = get(rev_id)
            added[partition[rev_id]].add(rev_id)
            covered.update(node.parents)
            if node.hlc > top:
                top = node.hlc
        for part, ids in added.items():
            heads = self.applied_heads[part]
            heads.update(ids)
            heads.difference_update(covered)
        self.clock.absorb(top)

    def _mark_unapplied(self, rev_id: str) -> None:
        del self.applied[rev_id]
        self.pending.add(rev_id)
        heads = self.applied_heads[self.partition[rev_id]]
        heads.discard(rev_id)
        for parent in self.graph.get(rev_id).parents:
            if parent in self.applied and not self.graph.any_child_in(parent, self.applied):
                self.applied_heads[self.partition[parent]].add(parent)

    def next_seq(self, partition: str) -> int:
        return self.seqs.get(partition, 0) + 1

    def parents_for(self, partition: str) -> list[str]:
        """Return the parents a new revision takes: this partition's applied heads."""
        return sorted(self.applied_heads.get(partition, ()))

    def hlc_for(self, parents: Sequence[str]) -> Hlc:
        return self.clock.tick(self.graph.get(p).hlc for p in parents)

    # -- the write path ------------------------------------------------------
    def commit_new(self, rev: Revision, ops: list[Op], preloaded: dict[Key, State]) -> None:
        """Apply and record a revision this peer just wrote, in one transaction."""
        self.ledger.check_lease()
        work = _Work(self.store, dict(preloaded))
        started = time.perf_counter()
        try:
            applied, conflicts = self._apply_data(work, rev.id, rev.partition, ops,
                                                  self.next_position)
            work.flush()
            self.ledger.insert(rev, APPLIED, applied)
            self.ledger.audit("apply", rev.id, duration_ms=_ms(started),
                              detail={"write": True, **_conflict_detail(conflicts)})
            self.store.commit()
        except BaseException:
            self.store.rollback()
            raise
        self.graph.add(node_of(rev.descriptor))
        self.partition[rev.id] = rev.partition
        self.messages[rev.id] = rev.message
        self.seqs[rev.partition] = rev.descriptor["seq"]
        self.held.add(rev.partition, rev.descriptor["origin"], rev.descriptor["seq"], rev.id)
        self.next_position += 1
        self._mark_applied(rev.id, applied.position)
        if applied.state == CONFLICTED:
            self.conflicted.add(rev.id)

    def _apply_data(self, work: _Work, rev_id: str, partition: str, ops: list[Op],
                    position: int, keys: list[Key] | None = None
                    ) -> tuple[Applied, list[dict[str, Any]]]:
        """Apply a data revision's ops to the work states; ``keys`` (each op's key) are
        given, already preloaded, by bulk callers, which computed them to preload."""
        if keys is None:
            keys = [(partition, *write_key(op)) for op in ops]
            work.preload(keys)
        undo: list[Any] = []
        seen: set[Key] | None = None if len(keys) == 1 else set()  # most write one key
        conflicts = []
        rejected = False
        states = work.states
        for op, k in zip(ops, keys, strict=True):
            state = states[k]
            if seen is None or k not in seen:
                if seen is not None:
                    seen.add(k)
                undo.append([k[1], k[2], state[0], state[1]])
            outcome = apply_op(op, state, rev_id)
            new_state = outcome.state
            if outcome.conflict:
                rule = self.policy_for(partition, rev_id).for_collection(k[1])
                if rule == REJECT:
                    rejected = True
                elif rule.startswith("resolver:"):
                    new_state = resolver(rule[9:])(op, state, rev_id, outcome.conflict)
                conflicts.append({"collection": k[1], "key": k[2], "reason": outcome.conflict,
                                  "op": op.to_json(), "current": state[0], "policy": rule,
                                  "result": new_state[0]})
            if new_state is not state:
                work.states[k] = new_state
                work.dirty.add(k)
        if rejected:
            # reject: the whole revision is integrated as a no-op, marked conflicted.
            self._undo_data(work, partition, undo)
            for c in conflicts:
                c["result"] = "rejected"
        return Applied(rev_id, position, undo, CONFLICTED if conflicts else APPLIED), conflicts

    # -- config ----------------------------------------------------------------
    def policy_for(self, partition: str, rev_id: str | None = None) -> Policy:
        """Return the policy in force for ``rev_id`` (default: after every known barrier).

        The fold of the partition's config revisions that sort before it in
        canonical order: the same set gives the same policy on every peer.
        """
        graph = self.graph
        configs = [b for b in graph.barriers() if graph.get(b).kind == "config"
                   and self.partition.get(b) == partition]
        base = self.bases.get(partition)
        start = DEFAULT.merged(base["config"]) if base else DEFAULT
        if not configs:
            return start
        if rev_id is not None and rev_id in graph:
            limit = graph.sort_key(rev_id)
            configs = [b for b in configs if graph.sort_key(b) < limit]
        missing = [b for b in configs if b not in self._configs]
        if missing:
            rows = self.ledger.rows(missing, "payload")
            for b in missing:
                self._configs[b] = decode_config(payload_of(rows[b]))
        policy = start
        for b in configs:
            policy = policy.merged(self._configs[b])
        return policy

    @staticmethod
    def _undo_data(work: _Work, partition: str, undo: list[Any]) -> None:
        for collection, text, doc, inc in reversed(undo):
            k = (partition, collection, text)
            work.states[k] = (doc, inc)
            work.dirty.add(k)

    # -- plans ---------------------------------------------------------------
    def plan_upgrade(self, target: str) -> list[Step]:
        """Return the steps that bring this peer up to ``target`` (pure)."""
        add = self.graph.upgrade_plan(target, self.applied)
        return self._with_redo(add=add, remove=[])

    def plan_downgrade(self, target: str) -> list[Step]:
        """Return the steps that take this peer back to ``target`` (pure)."""
        remove = self.graph.downgrade_plan(target, self.applied)
        return self._with_redo(add=[], remove=remove)

    def plan_stamp(self, target: str) -> list[Step]:
        """Return the ledger-only steps that make ``target`` the applied set."""
        if target == "base":
            want: set[str] = set()
        else:
            want = set(self.graph.upgrade_plan(target, ()))
        unstamp = [r for r in self.graph.canonical_order(self.applied) if r not in want]
        stamp = [r for r in self.graph.canonical_order(want) if r not in self.applied]
        return ([Step("unstamp", r) for r in reversed(unstamp)]
                + [Step("stamp", r) for r in stamp])

    def _with_redo(self, add: list[str], remove: list[str]) -> list[Step]:
        """Add the rollback and redo of revisions whose order the change would break.

        Walk the integrated revisions that sort after the earliest change in
        canonical order with a dirty set that starts as the change's writes;
        one that meets it is rolled back (in reverse applied order) and redone
        (in canonical order) around the change.
        """
        if not add and not remove:
            return []
        if remove:
            first = min(self.applied[r] for r in remove)
            removed = set(remove)
            later = [r for r, p in self.applied.items() if p > first and r not in removed]
            sequence = sorted([*later, *remove], key=self.applied.__getitem__)
        else:
            graph = self.graph
            start = graph.sort_key(add[0])
            if not set(graph.barriers()).isdisjoint(add):  # few barriers; many may be added
                return self._reordered(add, start)
            if not self.applied or (graph.in_open_segment(add[0])
                                      and (start[1], start[2]) > self.clock.last):
                return [Step("apply", r) for r in add]  # everything sorts after what is applied
            if not any(b in self.applied and graph.sort_key(b) > start
                       for b in graph.barriers()):
                redo = self._indexed_walk(add, start)
                undo = sorted(redo, key=self.applied.__getitem__, reverse=True)
                again = graph.canonical_order([*add, *redo]) if redo else add
                return [Step("undo", r) for r in undo] + [Step("apply", r) for r in again]
            later = [r for r in self.applied if graph.sort_key(r) > start]
            sequence = graph.canonical_order([*later, *add])
        redo = self._dirty_walk(sequence, set(remove) | set(add)) if later else []
        undo = sorted([*remove, *redo], key=self.applied.__getitem__, reverse=True)
        steps = [Step("undo", r) for r in undo]
        again = self.graph.canonical_order([*add, *redo]) if redo else add
        steps += [Step("apply", r) for r in again]
        return steps

    def _indexed_walk(self, add: list[str], start: tuple[Any, ...]) -> list[str]:
        """Return the integrated revisions to redo around ``add``, through the key index.

        The same result as :meth:`_dirty_walk` over every later revision, but
        only the writers of dirty keys are looked at: a key becomes dirty at
        the first added or redone revision that writes it, and an integrated
        writer of it that sorts after that point is redone (in canonical
        order, so each redo can only dirty keys for revisions after it).
        """
        graph = self.graph
        key = graph.sort_key
        added = set(add)
        rows = self.ledger.rows(add, "payload", "partition", "kind")
        dirty_from: dict[Key, tuple[Any, ...]] = {}
        for r in add:
            row = rows[r]
            for op in decode_ops(payload_of(row), trusted=True):
                dirty_from.setdefault((row.partition, *write_key(op)), key(r))
        heap: list[tuple[tuple[Any, ...], str]] = []
        queued: set[str] = set()
        self.walk_reads = len(add)

        def push(keys: list[Key], min_ms: int) -> None:
            by_partition: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for k in keys:
                by_partition[k[0]].append((k[1], k[2]))
            for partition, pairs in by_partition.items():
                found = self.ledger.writers(partition, pairs, min_ms)
                self.walk_reads += len(found)
                for collection, text, rev in found:
                    if rev in queued or rev in added or rev not in self.applied:
                        continue
                    s = key(rev)
                    if s > dirty_from[(partition, collection, text)]:
                        queued.add(rev)
                        heapq.heappush(heap, (s, rev))

        push(list(dirty_from), start[1])
        redo: list[str] = []
        while heap:
            s, r = heapq.heappop(heap)
            redo.append(r)
            row = self.ledger.rows([r], "undo", "partition")[r]
            self.walk_reads += 1
            fresh = [k for k in ((row.partition, u[0], u[1]) for u in json.loads(row.undo or "[]"))
                     if k not in dirty_from or dirty_from[k] > s]
            for k in fresh:
                dirty_from[k] = s
            if fresh:
                push(fresh, s[1])
        self.store.rollback()
        return redo

    def _reordered(self, add: list[str], start: tuple[Any, ...]) -> list[Step]:
        """Plan the arrival of a barrier: re-apply the open segment in the new order.

        A barrier moves the revisions of its ancestry ahead of the open
        segment's others. Everything up to the last integrated barrier stays;
        after it, roll back from the first position where the applied order
        and the new canonical order differ (or where ``add`` sorts in), then
        re-apply in the new order. Barriers are rare: correctness first.
        """
        graph = self.graph
        by_position = sorted(self.applied, key=self.applied.__getitem__)
        sealed = 0
        for i, r in enumerate(by_position):
            if graph.get(r).is_barrier:
                sealed = i + 1
        rest = by_position[sealed:]
        order = graph.canonical_order(rest)
        i = 0
        while i < len(rest) and rest[i] == order[i] and graph.sort_key(order[i]) < start:
            i += 1
        rollback = rest[i:]
        return ([Step("undo", r) for r in reversed(rollback)]
                + [Step("apply", r) for r in graph.canonical_order([*rollback, *add])])

    def _dirty_walk(self, sequence: list[str], changed: set[str]) -> list[str]:
        """Return the unchanged revisions of ``sequence`` that meet a changed one's writes."""
        rows = self.ledger.rows(sequence, "undo", "payload", "kind", "partition")
        self.store.rollback()

        def keys_of(rev_id: str) -> set[tuple[str, ...]]:
            row = rows[rev_id]
            if row.kind != "data":
                return {("*",)}
            if row.undo is not None:
                return {(row.partition, u[0], u[1]) for u in json.loads(row.undo)}
            return {(row.partition, *write_key(op)) for op in decode_ops(payload_of(row))}

        dirty: set[tuple[str, ...]] = set()
        redo = []
        for r in sequence:
            mine = keys_of(r)
            if r in changed:
                dirty |= mine
            elif dirty and (("*",) in dirty or ("*",) in mine or mine & dirty):
                redo.append(r)
                dirty |= mine
        return redo

    # -- execution -----------------------------------------------------------
    def run(self, steps: list[Step], action: str,
            progress: ProgressCallback | None = None) -> None:
        """Execute a plan in batches, one transaction each, reporting after each commit."""
        if not steps:
            return
        self.ledger.reclaim_lease()  # planning a long history can outlast it
        with paused_gc():
            self._run(steps, action, progress, _Work(self.store))

    def _run(self, steps: list[Step], action: str, progress: ProgressCallback | None,
             work: _Work) -> None:
        """Run the batches, each written and committed while the next one is computed.

        A batch's bulk writes and commit run on a helper thread
        (:meth:`SqlStore.commit_in_background`) while this thread applies the
        next batch in memory. That batch's reads were made before, in the same
        transaction; they see what a sequential run would: the ledger columns
        they read do not change, and every key the waiting batch writes is in
        the work states already. (Reads beside the helper would wait for it:
        both go through the one connection.) A batch that runs code, or may
        undo what the waiting batch applied, waits for that commit first
        (:meth:`_must_wait`). The in-memory graph learns of a batch once its
        commit returned; the lease is renewed only between commits, so a
        renewal never commits half a batch.
        """
        done = 0
        waiting: _Batch | None = None  # written; its commit runs beside the next batch
        try:
            for batch, runs_code in self._batches(steps):
                if waiting is not None and self._must_wait(batch, runs_code, waiting):
                    self.store.commit_in_background(waiting.statements)()
                    done = self._settle(waiting, action, done, len(steps), progress)
                    waiting = None
                read = self._read_batch(work, batch)
                if waiting is None:
                    result = self._compute_batch(work, read)
                else:
                    finish = self.store.commit_in_background(waiting.statements)
                    try:
                        result = self._compute_batch(work, read)
                    finally:
                        finish()  # never roll back under a commit still running
                    done = self._settle(waiting, action, done, len(steps), progress)
                self.ledger.renew_lease()
                self.ledger.check_lease()
                self._write_batch(work, result, action)
                waiting = result
            if waiting is not None:
                self.store.commit_in_background(waiting.statements)()
                self._settle(waiting, action, done, len(steps), progress)
        except BaseException:
            self.store.rollback()
            self.load()
            raise

    def _batches(self, steps: list[Step]) -> Iterable[tuple[list[Step], bool]]:
        """Cut the plan into batches, each with whether it runs code: a script revision
        (a barrier that is no config) applied or undone runs in a batch of its own."""
        barriers = set(self.graph.barriers())
        graph = self.graph
        batch: list[Step] = []
        for step in steps:
            alone = step.revision in barriers and step.action in ("apply", "undo")
            if batch and (alone or len(batch) >= self.batch_size):
                yield batch, False
                batch = []
            batch.append(step)
            if alone:
                yield batch, graph.get(step.revision).kind != "config"
                batch = []
        if batch:
            yield batch, False

    @staticmethod
    def _must_wait(batch: list[Step], runs_code: bool, waiting: _Batch) -> bool:
        """Say whether ``batch`` must wait for the commit of ``waiting``: it runs code, or it
        undoes, which reads undo records, and ``waiting`` wrote some."""
        return runs_code or bool(
            waiting.positions and any(s.action in ("undo", "unstamp") for s in batch))

    def _read_batch(self, work: _Work, batch: list[Step]) -> _Batch:
        """Read a batch's ledger rows, check and decode its payloads, preload its keys."""
        ids = [s.revision for s in batch]
        actions = {s.action for s in batch}
        columns = ["kind", "partition"]
        if "undo" in actions:
            columns.append("undo")
        if "apply" in actions:
            columns += ["payload", "checksum"]
        started = time.perf_counter()
        rows = self.ledger.rows(ids, *columns)
        read = _Batch(batch, rows, started)
        ops_of, keys_of = read.ops_of, read.keys_of
        for step in batch:
            row = rows[step.revision]
            if step.action in ("undo", "unstamp"):
                read.unapplied.append(step.revision)
            if step.action == "apply" and row.kind == "data":
                payload = payload_of(row)
                actual = sha256(payload)
                if actual != row.checksum:
                    raise ChecksumMismatch(row.id, row.checksum, actual)
                ops = ops_of[row.id] = decode_ops(payload, trusted=True)
                partition = row.partition
                keys_of[row.id] = [(partition, *write_key(op)) for op in ops]
        work.preload(k for keys in keys_of.values() for k in keys)
        return read

    def _compute_batch(self, work: _Work, read: _Batch) -> _Batch:
        """Apply and undo a batch in the work states (memory only, unless it runs code)."""
        rows, ops_of, keys_of = read.rows, read.ops_of, read.keys_of
        applied, positions = read.applied, read.positions
        audit = read.audit
        for step in read.steps:
            row = rows[step.revision]
            if step.action == "apply":
                position = self.next_position + len(positions)
                if row.kind == "data":
                    entry, conflicts = self._apply_data(work, row.id, row.partition,
                                                        ops_of[row.id], position,
                                                        keys_of[row.id])
                    if conflicts:
                        audit += [("conflict", row.id, "conflict", 0.0, c) for c in conflicts]
                elif row.kind == "config":
                    entry = Applied(row.id, position, [])
                else:
                    work.flush()
                    note = self._script(self._verified(row.id), "upgrade")
                    if note:
                        audit.append(("skip", row.id, "skipped", 0.0, {"reason": note}))
                    entry = Applied(row.id, position, [])
                applied.append(entry)
                positions[row.id] = position
            elif step.action == "undo":
                if row.kind == "data":
                    if row.undo is not None:
                        self._undo_data(work, row.partition, loads(row.undo))
                elif row.kind != "config":
                    work.flush()
                    note = self._script(self._verified(row.id), "downgrade")
                    if note:
                        audit.append(("skip", row.id, "skipped", 0.0, {"reason": note}))
            elif step.action == "stamp":
                position = self.next_position + len(positions)
                applied.append(Applied(step.revision, position, None))
                positions[step.revision] = position
        # The next batch numbers its positions after these, before this one settles.
        self.next_position += len(positions)
        return read

    def _write_batch(self, work: _Work, done: _Batch, action: str) -> None:
        """Write a computed batch's audit rows; leave its documents and ledger states to its
        commit (:attr:`_Batch.statements`) where the store can."""
        batch = done.steps
        work.flush(done.statements)
        self.ledger.mark_unapplied(done.unapplied, done.statements)
        self.ledger.mark_applied(done.applied, done.statements)
        duration = _ms(done.started)
        if len(batch) == 1:
            done.audit.append((batch[0].action, batch[0].revision, "ok", duration,
                               {"command": action}))
        else:
            done.audit.append((action, None, "ok", duration, {
                "count": len(batch), "first": batch[0].revision, "last": batch[-1].revision,
                "steps": encode_steps(batch)}))
        self.ledger.audit_many(done.audit)

    def _settle(self, done: _Batch, action: str, count: int, total: int,
                progress: ProgressCallback | None) -> int:
        """Take a committed batch into the in-memory graph; report it; return the count."""
        for rev_id in done.unapplied:
            self._mark_unapplied(rev_id)
            self.conflicted.discard(rev_id)
        for entry in done.applied:
            if entry.state == CONFLICTED:
                self.conflicted.add(entry.id)
        if done.positions:
            self._mark_applied_many(done.positions)
        count += len(done.steps)
        if progress:
            progress(Progress(action, count, total, done.steps[-1].revision))
        return count

    def _verified(self, rev_id: str) -> Revision:
        """Return a revision from the ledger after checking its checksum and digest."""
        row = self.ledger.row(rev_id)
        rev = Revision(descriptor_from_row(row), payload_of(row))
        rev.verify()
        return rev

    def _script(self, rev: Revision, direction: str) -> str | None:
        if rev.kind == "checkpoint":
            return None  # a checkpoint records the data; it changes nothing
        if self.run_script is None:
            raise UntrustedScript(
                f"revision {rev.id} is a {rev.kind} revision and this peer has no script"
                " location: set script_location in alembic.ini"
            )
        return self.run_script(rev, direction)

    # -- intake ----------------------------------------------------------------
    def receive(self, items: Sequence[tuple[dict[str, Any], bytes]],
                trusted: bool = False, trust: Trust | None = None,
                apply: bool = False) -> list[str]:
        """Check revisions from outside, record the new ones as fetched; return their ids.

        ``trust`` (a peer with a root key) verifies each new one's signature.
        With ``apply``, a batch that sorts after everything integrated (see
        :meth:`apply_arrived`) is applied as it is recorded, one INSERT a
        revision: how a clone replays a whole history in one pass.
        """
        with paused_gc():
            new = check_batch(self, items, trusted, trust)
        if new and not (apply and self.apply_arrived(new, recorded=False) is not None):
            self.record_fetched(new)
        return [rev.id for rev in new]

    def record_fetched(self, new: Sequence[Revision]) -> None:
        """Record checked revisions, payloads and all, to be integrated later."""
        self.ledger.insert_many([(rev, FETCHED, None) for rev in new])
        self.ledger.audit_many([("receive", r.id, "ok", 0.0, {}) for r in new])
        self.store.commit()
        self.add_fetched(new)

    def add_fetched(self, revs: Sequence[Revision], quarantined: Sequence[Revision] = ()
                    ) -> None:
        """Take revisions whose payloads were just recorded into the in-memory state."""
        for rev in revs:
            d = rev.descriptor
            self.graph.add(node_of(d))
            self.pending.add(rev.id)
            self.quarantined.pop(rev.id, None)
            self.partition[rev.id] = rev.partition
            self.messages[rev.id] = rev.message
            self.held.add(rev.partition, d["origin"], d["seq"], rev.id)
            if d["origin"] == self.origin:  # this peer's own, back from elsewhere
                self.seqs[rev.partition] = max(self.seqs.get(rev.partition, 0), d["seq"])
                self.clock.absorb(rev.hlc)
        for rev in quarantined:
            self.quarantined[rev.id] = node_of(rev.descriptor)
            self.partition[rev.id] = rev.partition
            self.held.add(rev.partition, rev.descriptor["origin"], rev.descriptor["seq"], rev.id)

    def integrate(self, progress: ProgressCallback | None = None) -> list[Step]:
        """Apply every fetched revision in canonical order, redoing what it must; return steps."""
        pending = self.fetched()
        if not pending:
            return []
        steps = self._with_redo(add=pending, remove=[])
        self.run(steps, "integrate", progress)
        return steps

    def apply_arrived(self, revs: Sequence[Revision], recorded: bool = True
                      ) -> list[Applied] | None:
        """Apply announced data revisions as their payloads arrive, when that is safe
        (:meth:`begin_arrived`, its commit waited for at once); return their entries."""
        finish = self.begin_arrived(revs, recorded)
        return None if finish is None else finish()

    def begin_arrived(self, revs: Sequence[Revision], recorded: bool = True
                      ) -> Callable[[], list[Applied]] | None:
        """Apply data revisions as their payloads arrive, when that is safe; start the
        commit and return the call that waits for it, takes the batch into memory and
        returns its entries (a clone checks its next batch meanwhile).

        Safe when nothing else waits to be integrated and the first of ``revs``
        (which come in canonical order) sorts after everything integrated: its
        hlc is above the clock, which bounds every integrated hlc, and a new
        data revision sorts in the open segment. Then integration could only
        append them, so they are applied now and stored with their payload and
        undo record in one UPDATE each (not store, read back, mark applied),
        under one audit row per batch. The common case of a clone, a bundle
        or a sync from a peer that is ahead. ``recorded`` says the descriptors
        are in the ledger already (announced by sync); if not, each revision
        is inserted whole. Returns None, having done nothing, when the general
        path (:meth:`integrate`) must run. Until the returned call, the caller
        runs no statement on this peer.
        """
        if (not revs or any(r.kind != "data" for r in revs) or self.pending
                or revs[0].hlc <= self.clock.last):
            return None
        started = time.perf_counter()
        self.ledger.check_lease()
        self.add_fetched(revs)

        def record(entries: list[Applied], keys_of: list[list[Key]], statements: list[Any]
                   ) -> None:
            if recorded:
                self.ledger.fill_applied(revs, entries)
            else:
                self.ledger.insert_many([(r, e.state, e) for r, e in
                                         zip(revs, entries, strict=True)], statements, keys_of)

        entries, wait = self._begin_batch(revs, record, started, _Work(self.store))

        def finish() -> list[Applied]:
            self._wait(wait)
            self.conflicted.update(e.id for e in entries if e.state == CONFLICTED)
            self._mark_applied_many({e.id: e.position for e in entries})
            self.next_position += len(entries)
            return entries

        return finish

    def begin_copied(self, revs: Sequence[Revision], rows: Sequence[Any],
                     held: list[list[Any]] | None = None) -> Callable[[], None]:
        """Apply and record data revisions that a clone copies, in canonical order, into
        this empty peer; start the commit and return the call that waits for it.

        As :meth:`begin_arrived` on its fast path, but the ledger rows are
        written from the source's ``rows`` (:meth:`Ledger.copy_many`), and nothing
        is taken into memory: the peer loads its graph from the ledger when it is next used
        (``Peer._unload``), which a clone that only writes never pays for. The
        document states stay in memory from one batch to the next, as through
        one upgrade: each batch reads only the keys no batch before it wrote.
        ``held``, when given, takes the batch's lists of keys and apply entries, for
        the caller to free when it chooses (a clone: while its last commit runs).
        """
        started = time.perf_counter()
        self.ledger.check_lease()
        if self._copied is None:
            self._copied = _Work(self.store)

        def record(entries: list[Applied], keys_of: list[list[Key]], statements: list[Any]
                   ) -> None:
            self.ledger.copy_many(rows, revs, entries, statements, keys_of)

        entries, wait = self._begin_batch(revs, record, started, self._copied, held)
        self.next_position += len(entries)
        return lambda: self._wait(wait)

    def _begin_batch(self, revs: Sequence[Revision],
                     record: Callable[[list[Applied], list[list[Key]], list[Any]], None],
                     started: float, work: _Work, held: list[list[Any]] | None = None
                     ) -> tuple[list[Applied], Callable[[], None]]:
        """Apply ``revs`` in memory from ``next_position`` on, write their documents, their
        ledger rows (``record``, given each revision's keys) and one audit row, and start
        the commit; ``held`` takes the lists of keys and entries (see :meth:`begin_copied`)."""
        statements: list[Any] = []
        try:
            with paused_gc():
                keys_of = [[(r.descriptor["partition"], *write_key(op)) for op in r.ops]
                           for r in revs]
                work.preload(k for keys in keys_of for k in keys)
                entries: list[Applied] = []
                audit: list[tuple[str, str | None, str, float, dict[str, Any]]] = []
                position = self.next_position
                for i, (rev, keys) in enumerate(zip(revs, keys_of, strict=True)):
                    entry, conflicts = self._apply_data(work, rev.id, rev.partition, rev.ops,
                                                        position + i, keys)
                    entries.append(entry)
                    if conflicts:
                        audit += [("conflict", rev.id, "conflict", 0.0, c) for c in conflicts]
                work.flush(statements)
                record(entries, keys_of, statements)
                audit.append(("integrate", None, "ok", _ms(started), {
                    "count": len(revs), "first": revs[0].id, "last": revs[-1].id,
                    "arrived": True, "steps": ",".join([_SIGN["apply"] + r.id for r in revs])}))
                self.ledger.audit_many(audit)
                if held is not None:
                    held += (keys_of, entries)
                return entries, self.store.commit_in_background(statements)
        except BaseException:
            self.store.rollback()
            self.load()
            raise

    def _wait(self, wait: Callable[[], None]) -> None:
        """Wait for a commit :meth:`_begin_batch` started; on failure, roll back and reload."""
        try:
            wait()
        except BaseException:
            self.store.rollback()
            self.load()
            raise

    # -- queries ---------------------------------------------------------------
    def is_integrated(self, rev_id: str) -> bool:
        return rev_id in self.applied

    def covered(self, partition: str, origin: str, seq: int) -> bool:
        """Say whether (origin, seq) lies within the partition's checkpoint base (by vector)."""
        base = self.bases.get(partition)
        return base is not None and seq <= base["vector"].get(origin, 0)

    def fetched(self) -> list[str]:
        """Return known revisions that are not applied, in canonical order."""
        return self.graph.canonical_order(self.pending)


_SIGN = {"apply": "+", "stamp": "*", "undo": "-", "unstamp": "~"}
_ACTION = {sign: action for action, sign in _SIGN.items()}


def encode_steps(steps: Iterable[Step]) -> str:
    """Encode a batch's steps compactly for its audit row: ``+id`` apply, ``-id`` undo.

    One string, not a JSON list: a 5,000-step batch's audit row then costs a
    join, not a list encoding, on the bulk path.
    """
    return ",".join(_SIGN[s.action] + s.revision for s in steps)


def decode_steps(text: str) -> list[Step]:
    """Decode :func:`encode_steps`."""
    return [Step(_ACTION[item[0]], item[1:]) for item in text.split(",") if item]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for one bulk operation.

    A bulk replay allocates millions of small containers while the graph
    holds hundreds of thousands of long-lived objects; every full collection
    walks all of them, which made replay slow down as history grew. Nothing
    a batch allocates forms cycles, so reference counting frees it anyway.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _conflict_detail(conflicts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"conflicts": conflicts} if conflicts else {}


__all__ = ["Engine", "Step", "Progress", "ProgressCallback", "TxEngineError", "INTEGRATED",
           "FETCHED"]
