"""The revision DAG: heads, ancestry, canonical order and target syntax.

The graph is pure data (ids and edges, no store), like Django's
MigrationGraph and Alembic's RevisionMap, so it can be built from a ledger,
a bundle or a ``versions/`` directory and tested without a database.

Two kinds of edge exist. ``parents`` is the chain: it decides children,
heads and bases, and relative walks (``+N``, ``REV-1``) follow it, as
Alembic's ``down_revision`` does. ``depends_on`` only orders: ancestry and
descendancy follow both, so a plan never applies a revision before what it
depends on, but depending on a head does not stop it being a head.

The write path calls :meth:`Graph.add` and :meth:`Graph.heads` on every
write, so both stay O(1) / O(#heads) for data revisions; the barrier
segments behind the canonical order are cached and only recomputed when a
barrier (or a late-arriving ancestor) changes them. Every traversal is an
explicit stack: chains are 100,000 revisions deep.
"""

from __future__ import annotations

import re
from bisect import insort
from collections.abc import Callable, Collection, Container, Iterable, Iterator
from dataclasses import dataclass

from txengine.exceptions import (
    AmbiguousRevision,
    CycleDetected,
    InvalidInput,
    InvalidTarget,
    MissingParent,
    MultipleHeads,
    RevisionNotFound,
)

#: ``[branch@][symbol](+|-)N``; ids never contain ``@ + -``, so this is unambiguous.
_RELATIVE = re.compile(r"(?:(?P<branch>[^@]+)@)?(?P<symbol>[^@+\-]+)?(?P<delta>[+-]\d+)")


SortKey = tuple[int, int, int, str, str]
"""The canonical sort key: (segment, hlc ms, hlc counter, origin, id)."""


@dataclass(frozen=True, slots=True)
class Node:
    """One revision as the graph sees it: its id, edges and ordering fields."""

    id: str
    parents: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    hlc: tuple[int, int] = (0, 0)
    origin: str = ""
    kind: str = "data"  # "data" | "script" | "checkpoint" | "config"; the last three are barriers
    branch_labels: tuple[str, ...] = ()

    @property
    def is_barrier(self) -> bool:
        """Say whether this revision is a barrier (anything but a data revision)."""
        return self.kind != "data"


def _barrier_key(node: Node) -> tuple[tuple[int, int], str, str]:
    return (node.hlc, node.origin, node.id)


def _short(ids: Iterable[str]) -> str:
    return ", ".join(i[:12] for i in ids)


def _unlink(index: dict[str, set[str]], key: str, rev_id: str) -> bool:
    """Drop ``rev_id`` from ``index[key]``; say whether ``key`` was left with nothing."""
    index[key].discard(rev_id)
    if index[key]:
        return False
    del index[key]
    return True


class Graph:
    """A DAG of revisions that tolerates parents arriving after their children.

    Missing parents are remembered (who referenced them) rather than refused,
    so a bulk load may come in any order and :meth:`validate` can name the
    revision that points at an unknown one.
    """

    def __init__(self, nodes: Iterable[Node] = ()) -> None:
        self._nodes: dict[str, Node] = {}
        self._children: dict[str, set[str]] = {}  # parent id -> child ids (parent may be missing)
        self._dependents: dict[str, set[str]] = {}  # depends_on id -> dependent ids
        self._heads: set[str] = set()
        self._labels: dict[str, set[str]] = {}
        self._barriers: list[str] = []  # sorted by (hlc, origin, id)
        self._segment: dict[str, int] | None = {}  # barrier-held id -> segment; None = stale
        self._order: list[str] | None = []  # every id in canonical order; None = stale
        self._last: SortKey | None = None  # the key of the last id in _order
        for node in nodes:
            self.add(node)

    # -- building --------------------------------------------------------

    def add(self, node: Node) -> None:
        """Add a revision in O(1) amortised time (a barrier costs its new ancestry).

        Re-adding an identical node is a no-op, so bulk loads may overlap.
        """
        rid = node.id
        known = self._nodes.get(rid)
        if known is not None:
            if known == node:
                return
            raise InvalidInput(
                f"revision {rid[:12]} is already in the graph with other edges or fields:"
                " remove it first, or refuse the incoming copy as forked"
            )
        referenced = bool(self._children.get(rid)) or bool(self._dependents.get(rid))
        self._nodes[rid] = node
        if not self._children.get(rid):
            self._heads.add(rid)
        for parent in node.parents:
            self._children.setdefault(parent, set()).add(rid)
            self._heads.discard(parent)
        for dep in node.depends_on:
            self._dependents.setdefault(dep, set()).add(rid)
        for label in node.branch_labels:
            self._labels.setdefault(label, set()).add(rid)
        if node.is_barrier:
            self._add_barrier(node, referenced)
            self._order = None
        elif referenced and self._barriers:
            # A late ancestor may belong to a barrier's segment: recompute lazily.
            self._segment = None
            self._order = None
        elif self._order is not None:
            # A data revision nothing held yet sorts in the open segment: most arrive
            # after everything known (writes, sync from a peer ahead) and are appended.
            key = (len(self._barriers), *node.hlc, node.origin, rid)
            if self._last is None or key > self._last:
                self._order.append(rid)
                self._last = key
            else:
                self._order = None

    def _add_barrier(self, node: Node, referenced: bool) -> None:
        """Extend the segment cache when the barrier sorts last, else invalidate it.

        The sequencer issues barriers in order, so the common case only walks
        the new barrier's not-yet-held ancestry: linear in total.
        """
        last = self._barriers[-1] if self._barriers else None
        appended = last is None or _barrier_key(self._nodes[last]) < _barrier_key(node)
        insort(self._barriers, node.id, key=lambda b: _barrier_key(self._nodes[b]))
        if self._segment is not None and appended and not referenced:
            self._hold(node.id, len(self._barriers) - 1, self._segment)
        else:
            self._segment = None

    def remove(self, rev_id: str) -> None:
        """Remove a revision; its children keep pointing at it (a missing parent)."""
        node = self.get(rev_id)
        del self._nodes[rev_id]
        self._heads.discard(rev_id)
        for parent in set(node.parents):
            if _unlink(self._children, parent, rev_id) and parent in self._nodes:
                self._heads.add(parent)
        for dep in set(node.depends_on):
            _unlink(self._dependents, dep, rev_id)
        for label in set(node.branch_labels):
            _unlink(self._labels, label, rev_id)
        if node.is_barrier:
            self._barriers.remove(rev_id)
        self._segment = None
        self._order = None

    # -- lookup ----------------------------------------------------------

    def __contains__(self, rev_id: object) -> bool:
        return rev_id in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def get(self, rev_id: str) -> Node:
        """Return the node for a full id, or raise RevisionNotFound."""
        try:
            return self._nodes[rev_id]
        except KeyError:
            raise RevisionNotFound(rev_id) from None

    def children(self, rev_id: str) -> tuple[str, ...]:
        """Return the revisions naming ``rev_id`` as a parent, in canonical order."""
        self.get(rev_id)
        return tuple(self.canonical_order(self._children.get(rev_id, ())))

    def any_child_in(self, rev_id: str, ids: Container[str]) -> bool:
        """Tell whether a child of ``rev_id`` is in ``ids``, without sorting the children
        (the applied-heads bookkeeping asks this once per revision applied or undone)."""
        return any(c in ids for c in self._children.get(rev_id, ()))

    def is_head(self, rev_id: str) -> bool:
        """Tell whether a revision has no children, in O(1)."""
        return rev_id in self._heads

    def heads(self) -> list[str]:
        """Return the revisions without children, in canonical order (kept incrementally)."""
        return self.canonical_order(self._heads)

    def barriers(self) -> list[str]:
        """Return the barriers (script, checkpoint and config revisions) in barrier order."""
        return list(self._barriers)

    def in_open_segment(self, rev_id: str) -> bool:
        """Say whether no barrier holds ``rev_id`` yet (it sorts after every barrier)."""
        return rev_id not in self._segments()

    def bases(self) -> list[str]:
        """Return the revisions without parents, in canonical order."""
        return self.canonical_order(i for i, n in self._nodes.items() if not n.parents)

    # -- ancestry --------------------------------------------------------

    def _predecessors(self, rev_id: str) -> Iterable[str]:
        node = self._nodes[rev_id]
        return node.parents + node.depends_on

    def _successors(self, rev_id: str) -> Iterable[str]:
        return (*self._children.get(rev_id, ()), *self._dependents.get(rev_id, ()))

    def _reach(
        self,
        ids: Iterable[str],
        step: Callable[[str], Iterable[str]],
        inclusive: bool,
        within: set[str] | None = None,
    ) -> set[str]:
        """Collect what ``step`` reaches from ``ids`` (inside ``within``), each node once.

        Without ``inclusive`` a start is still returned when another start reaches it.
        """
        starts = list(ids)
        for rid in starts:
            self.get(rid)
        seen: set[str] = set(starts) if inclusive else set()
        stack = starts
        nodes = self._nodes if within is None else within
        while stack:
            for nxt in step(stack.pop()):
                if nxt not in seen and nxt in nodes:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    def ancestors(self, ids: Iterable[str], inclusive: bool = True) -> set[str]:
        """Return everything ``ids`` needs first, through parents and depends_on."""
        return self._reach(ids, self._predecessors, inclusive)

    def descendants(self, ids: Iterable[str], inclusive: bool = True) -> set[str]:
        """Return everything that needs one of ``ids``, through children and dependents."""
        return self._reach(ids, self._successors, inclusive)

    # -- canonical order -------------------------------------------------

    def _hold(self, barrier: str, index: int, segment: dict[str, int]) -> None:
        """Put the barrier's inclusive ancestry not yet held into segment ``index``."""
        stack = [barrier]
        while stack:
            rid = stack.pop()
            if rid in segment or rid not in self._nodes:
                continue
            segment[rid] = index
            stack.extend(self._predecessors(rid))

    def _segments(self) -> dict[str, int]:
        """Return the barrier-held segments, recomputing them in linear time when stale."""
        if self._segment is None:
            segment: dict[str, int] = {}
            for index, barrier in enumerate(self._barriers):
                self._hold(barrier, index, segment)
            self._segment = segment
        return self._segment

    def _key(self) -> Callable[[str], SortKey]:
        """Bind the segment table once, so sorting pays one dict lookup per revision.

        The key is flat — (segment, hlc ms, hlc counter, origin, id) — because
        comparing flat tuples sorts 100,000 revisions in half the time of a
        nested hlc pair.
        """
        segment, open_segment, nodes = self._segments(), len(self._barriers), self._nodes

        def key(rev_id: str) -> SortKey:
            try:
                node = nodes[rev_id]
            except KeyError:
                raise RevisionNotFound(rev_id) from None
            ms, counter = node.hlc
            return (segment.get(rev_id, open_segment), ms, counter, node.origin, rev_id)

        return key

    def sort_key(self, rev_id: str) -> SortKey:
        """Return (segment, hlc ms, hlc counter, origin, id): topological, as hlc grows."""
        return self._key()(rev_id)

    def canonical_order(self, ids: Iterable[str] | None = None) -> list[str]:
        """Sort ``ids`` (default: all) canonically: same set, same order, on every peer.

        The order of the whole graph is kept (extended as revisions arrive in
        order, re-sorted only after one arrives out of order), so a plan over
        most of the graph — upgrade from base, a clone — filters it in linear
        time instead of sorting 100,000 keys again.
        """
        if ids is None:
            return list(self._ordered())
        items = ids if isinstance(ids, (set, frozenset, dict)) else list(ids)
        if 4 * len(items) >= len(self._nodes) > 0:
            want = items if isinstance(items, (set, frozenset, dict)) else set(items)
            if len(want) == len(items):
                out = [r for r in self._ordered() if r in want]
                if len(out) == len(want):  # else an unknown id: sorting names it
                    return out
        return sorted(items, key=self._key())

    def _ordered(self) -> list[str]:
        if self._order is None:
            key = self._key()
            self._order = sorted(self._nodes, key=key)
            self._last = key(self._order[-1]) if self._order else None
        return self._order

    # -- validation ------------------------------------------------------

    def validate(self, outside: Container[str] = ()) -> list[tuple[str, str]]:
        """Report (rev_id, message) for missing parents, dependencies and labels, and cycles.

        Findings name the revision that holds the bad reference, so the fix
        is obvious; nothing is raised, so a loader can report them all at once.
        ``outside`` holds ids known to exist though not in the graph (the
        revisions before a checkpoint a peer started from).
        """
        findings: list[tuple[str, str]] = []
        for rid, node in self._nodes.items():
            for parent in node.parents:
                if parent not in self._nodes and parent not in outside:
                    findings.append((rid, str(MissingParent(rid, parent))))
            for dep in node.depends_on:
                if dep not in self._nodes:
                    message = (
                        f"revision {rid[:12]} depends on {dep[:12]}, which this peer does not"
                        " have: fetch it first (sync or bundle), then retry"
                    )
                    findings.append((rid, message))
        for label, owners in self._labels.items():
            if len(owners) > 1:
                message = (
                    f"branch label {label!r} is on {len(owners)} revisions"
                    f" ({_short(sorted(owners))}): a label must name one revision"
                )
                findings.append((min(owners), message))
        for scc in self._cycles():
            findings.append((min(scc), str(CycleDetected(scc))))
        return sorted(findings)

    def _cycles(self) -> list[list[str]]:
        """Return the strongly connected components that form cycles (iterative Tarjan).

        Tarjan is linear, so a large bundle with a cycle low in the chain is
        reported as fast as a sound one is accepted.
        """
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        depth: dict[str, int] = {}  # position on ``stack`` while on it
        stack: list[str] = []
        work: list[tuple[str, Iterator[str]]] = []
        found: list[list[str]] = []

        def push(rid: str) -> None:
            index[rid] = low[rid] = len(index)
            depth[rid] = len(stack)
            stack.append(rid)
            work.append((rid, iter(self._predecessors(rid))))

        for root in self._nodes:
            if root not in index:
                push(root)
            while work:
                rid, edges = work[-1]
                for nxt in edges:
                    if nxt in self._nodes and nxt not in index:
                        push(nxt)
                        break
                    if nxt in depth:
                        low[rid] = min(low[rid], index[nxt])
                else:
                    work.pop()
                    if work:
                        low[work[-1][0]] = min(low[work[-1][0]], low[rid])
                    if low[rid] == index[rid]:
                        scc = stack[depth[rid] :]
                        del stack[depth[rid] :]
                        for member in scc:
                            del depth[member]
                        if len(scc) > 1 or rid in self._predecessors(rid):
                            found.append(sorted(scc))
        return found

    # -- targets ---------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """Resolve a full id, a branch label or a unique id prefix, in that order."""
        if ref in self._nodes:
            return ref
        owners = self._labels.get(ref)
        if owners:
            if len(owners) > 1:
                raise AmbiguousRevision(ref, owners)
            return next(iter(owners))
        matches = [rid for rid in self._nodes if rid.startswith(ref)] if ref else []
        if len(matches) > 1:
            raise AmbiguousRevision(ref, matches)
        if not matches:
            raise RevisionNotFound(ref)
        return matches[0]

    def _single(self, heads: list[str], argument: str) -> str:
        if len(heads) > 1:
            raise MultipleHeads(heads, argument)
        if not heads:
            raise InvalidTarget(argument, "the graph holds no revision")
        return heads[0]

    def _lineage(self, rev_id: str) -> set[str]:
        """Return Alembic's branch lineage: the labelled revision's ancestors and descendants.

        As Alembic's ``_shares_lineage`` (``include_dependencies=False``), only
        ``parents`` edges count: a revision that merely depends on a branch is
        not on it.
        """
        return self._chain_ancestors([rev_id]) | self._reach(
            [rev_id], lambda r: self._children.get(r, ()), True)

    def _chain_ancestors(self, ids: Iterable[str]) -> set[str]:
        """Return the inclusive ancestry of ``ids`` through ``parents`` only."""
        return self._reach(ids, lambda r: self._nodes[r].parents, True)

    def _resolve_on(self, ref: str, lineage: set[str]) -> str:
        """Resolve ``ref`` as Alembic's ``BRANCH@REV``: a prefix only counts on the branch."""
        if ref in self._nodes or ref in self._labels:
            return self.resolve(ref)
        matches = [rid for rid in self._nodes if rid.startswith(ref) and rid in lineage]
        if len(matches) > 1:
            raise AmbiguousRevision(ref, matches)
        return matches[0] if matches else self.resolve(ref)

    def _tips(self, subset: set[str]) -> list[str]:
        """Return the heads of the subgraph ``subset``: no child nor dependent in it.

        These are what Alembic's ``alembic_version`` would hold for an applied set.
        """
        children, dependents = self._children, self._dependents
        tips = [r for r in subset if not any(c in subset for c in children.get(r, ()))
                and not any(d in subset for d in dependents.get(r, ()))]
        return self.canonical_order(tips)

    def _resolve_target(self, target: str, applied: set[str], upward: bool) -> tuple[str, ...]:
        """Turn Alembic target syntax into revision ids; () means base."""
        if target == "heads":
            # Alembic's "real" heads: a head that another revision depends on is left
            # out (it comes along as a dependency); the upgrade plan is the same.
            return tuple(h for h in self.heads()
                         if not any(d in self._nodes for d in self._dependents.get(h, ())))
        if target == "head":
            return (self._single(self.heads(), target),)
        if target == "base":
            return ()
        match = _RELATIVE.fullmatch(target)
        if match:
            return self._resolve_relative(target, match, applied, upward)
        branch, at, rest = target.rpartition("@")
        if not at:
            return (self.resolve(target),)
        if not branch or not rest:
            raise InvalidTarget(target, "write BRANCH@head, BRANCH@+N or BRANCH@REV")
        labelled = self.resolve(branch)
        if rest == "base":
            return ()
        lineage = self._lineage(labelled)
        if rest in ("head", "heads"):
            heads = [h for h in self.heads() if h in lineage]
            return tuple(heads) if rest == "heads" else (self._single(heads, target),)
        if not upward:
            # Alembic's downgrade takes REV as is; BRANCH only narrows what is undone.
            return (self.resolve(rest),)
        rev = self._resolve_on(rest, lineage)
        if rev not in lineage:
            raise InvalidTarget(target, f"revision {rev[:12]} is not on branch {branch!r}")
        return (rev,)

    def _resolve_relative(
        self, target: str, match: re.Match[str], applied: set[str], upward: bool
    ) -> tuple[str, ...]:
        """Resolve ``[branch@][REV](+|-)N``: from REV, or from the applied heads."""
        branch, symbol, delta = match["branch"], match["symbol"], int(match["delta"])
        lineage = self._lineage(self.resolve(branch)) if branch else None
        start: str | None  # None stands for base
        if symbol is not None:
            start = self._single(self.heads(), target) if symbol == "head" else self.resolve(symbol)
            if lineage is not None and start not in lineage:
                raise InvalidTarget(target, f"revision {start[:12]} is not on branch {branch!r}")
        else:
            if delta > 0 and not upward:
                raise InvalidTarget(target, "a downgrade moves back: use -N or name a revision")
            if delta < 0 and upward:
                raise InvalidTarget(target, "an upgrade moves forward: use +N or name a revision")
            # Alembic: the applied heads on the branch, else the tips of what is
            # applied on it (the branch point the walk starts from).
            tips = self._tips(applied)
            if lineage is not None:
                tips = [t for t in tips if t in lineage] or self._tips(applied & lineage)
            if len(tips) > 1:
                raise MultipleHeads(tips, target)
            start = tips[0] if tips else None
            if start is None and delta < 0:
                raise InvalidTarget(target, "nothing is applied, so there is nothing to undo")
        return self._walk(target, start, delta, lineage)

    def _walk(
        self, target: str, start: str | None, steps: int, lineage: set[str] | None
    ) -> tuple[str, ...]:
        """Walk ``steps`` along children (up) or parents (down); every step must be unique."""
        current = start
        for taken in range(abs(steps)):
            if steps < 0 and current is None:
                raise InvalidTarget(target, f"walked below base after {taken} of {-steps} steps")
            choices = self._step(current, steps > 0, lineage)
            if steps > 0 and not choices:
                raise InvalidTarget(target, f"walked past a head after {taken} of {steps} steps")
            if len(choices) > 1:
                here = "base" if current is None else current[:12]
                raise InvalidTarget(
                    target,
                    f"step {taken + 1} from {here} has {len(choices)} choices"
                    f" ({_short(choices)}): name one of them",
                )
            current = choices[0] if choices else None
        return () if current is None else (current,)

    def _step(self, current: str | None, up: bool, lineage: set[str] | None) -> list[str]:
        """Return where one step goes: children (bases from base) up, parents down."""
        if not up:
            assert current is not None
            for parent in self._nodes[current].parents:
                if parent not in self._nodes:
                    raise MissingParent(current, parent)
            return self.canonical_order(self._nodes[current].parents)
        choices = self.bases() if current is None else self.children(current)
        return [c for c in choices if lineage is None or c in lineage]

    # -- plans -----------------------------------------------------------

    def upgrade_plan(self, target: str, applied: Collection[str]) -> list[str]:
        """Return the revisions to apply to reach ``target``, in canonical order."""
        done = set(applied)
        if target == "heads":  # every revision is an ancestor of a head: no walk needed
            return self.canonical_order(self._nodes.keys() - done)
        targets = self._resolve_target(target, done, upward=True)
        return self.canonical_order(self.ancestors(targets) - done)

    def downgrade_plan(self, target: str, applied: Collection[str]) -> list[str]:
        """Return the applied revisions to undo to go back to ``target``, latest first.

        Alembic's rule (``_collect_downgrade_revisions``): undo the applied
        descendants of the target's children, so the target stays and so does a
        revision that merely depends on it; ``BRANCH@...`` and ``-N`` limit the
        children to one branch. One walk up from those children, so the cost
        follows the revisions above the target (linear at worst), never one
        ancestry walk per undone step as Alembic's topological sort does.
        """
        done = set(applied)
        targets = self._resolve_target(target, done, upward=False)
        for rid in targets:
            if rid not in done:
                raise InvalidTarget(
                    target,
                    f"revision {rid[:12]} is not applied: downgrade moves back to an applied"
                    " revision; use upgrade to move forward",
                )
        if len(targets) > 1:  # Alembic: a downgrade goes back to one revision
            raise MultipleHeads(targets, target)
        scope = self._downgrade_scope(target, done)
        if targets:
            roots = [c for c in self._children.get(targets[0], ()) if c in self._nodes]
        elif scope is None:
            roots = []
        else:
            roots = [r for r, n in self._nodes.items() if not n.parents]
        if scope is not None and len(roots) > 1:
            keep = self._chain_ancestors([scope])
            roots = [r for r in roots if r in keep]
            if not roots:
                raise InvalidTarget(target, f"nothing above it is on branch {scope[:12]}")
        undo = self.descendants(roots) & done if targets or scope is not None else done
        plan = self.canonical_order(undo)
        plan.reverse()
        return plan

    def _downgrade_scope(self, target: str, done: set[str]) -> str | None:
        """Return the revision whose branch a downgrade is limited to, as Alembic does.

        ``BRANCH@...`` undoes only what lies on BRANCH above the target, and
        ``-N`` only what lies below the applied head it walked down from; the
        limit only matters where the target has several children (roots).
        """
        match = _RELATIVE.fullmatch(target)
        if match:
            if match["branch"]:
                return self.resolve(match["branch"])
            if match["symbol"] is None:
                tips = self._tips(done)
                return tips[0] if len(tips) == 1 else None
            return None
        branch, at, _ = target.rpartition("@")
        return self.resolve(branch) if at and branch else None
