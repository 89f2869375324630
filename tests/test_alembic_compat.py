"""txengine's revision graph against Alembic's own ``RevisionMap``.

hypothesis draws revision graphs (linear runs, branch points, merges, several
roots, branch labels, ``depends_on``) and short ids from a four-letter
alphabet, so prefixes are often shared. Each graph is loaded into Alembic's
in-memory ``alembic.script.revision.RevisionMap`` and into
:class:`txengine.graph.Graph` (hlc = position, so it grows along every edge;
kind ``script``), and every answer is compared: heads, bases, and, from
several applied states, what an upgrade or a downgrade to each target form
applies or undoes — Alembic's side computed exactly as ``alembic upgrade``
and ``alembic downgrade`` do (``ScriptDirectory._upgrade_revs`` /
``_downgrade_revs``: ``RevisionMap.iterate_revisions``). Where Alembic
raises, txengine must raise; where it answers, txengine must give the same
set, in a topological order (equal to Alembic's wherever the set is a chain,
the only case where Alembic's order is not an arbitrary pick).

The differences txengine keeps on purpose (docs/alembic.md) are skipped by
:func:`_intended_difference` and each is pinned by a test at the end.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from alembic.script.revision import Revision, RevisionMap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txengine.exceptions import InvalidTarget, MultipleHeads, TxEngineError
from txengine.graph import Graph, Node

EXAMPLES = int(os.environ.get("TXENGINE_ALEMBIC_EXAMPLES", "500"))
ALPHABET = "ab12"


@dataclass(frozen=True)
class Spec:
    """One drawn revision: id, parents, depends_on, branch labels (order = hlc)."""

    id: str
    parents: tuple[str, ...]
    depends_on: tuple[str, ...]
    labels: tuple[str, ...]


@st.composite
def graphs(draw: st.DrawFn) -> list[Spec]:
    """Draw a revision graph in topological order: parents always come earlier."""
    n = draw(st.integers(1, 10))
    ids = draw(st.lists(st.text(ALPHABET, min_size=4, max_size=5), min_size=n, max_size=n,
                        unique=True))
    specs: list[Spec] = []
    for i, rid in enumerate(ids):
        shape = draw(st.sampled_from(["linear"] * 5 + ["branch"] * 2 + ["merge", "root"]))
        if i == 0 or shape == "root":
            parents: tuple[str, ...] = ()
        elif shape == "linear":
            parents = (ids[i - 1],)
        elif shape == "branch":
            parents = (ids[draw(st.integers(0, i - 1))],)
        else:
            picked = draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=2, unique=True))
            parents = tuple(ids[j] for j in sorted(picked))
        depends: tuple[str, ...] = ()
        if i and draw(st.integers(0, 5)) == 0:
            dep = ids[draw(st.integers(0, i - 1))]
            depends = () if dep in parents else (dep,)
        labels = (f"L{i}",) if draw(st.integers(0, 4)) == 0 else ()
        specs.append(Spec(rid, parents, depends, labels))
    return specs


def alembic_map(specs: list[Spec]) -> RevisionMap:
    revisions = [Revision(s.id, s.parents or None, dependencies=s.depends_on or None,
                          branch_labels=s.labels or None) for s in specs]
    rmap = RevisionMap(lambda: revisions)
    rmap.heads  # noqa: B018 - build the map now
    return rmap


def txengine_graph(specs: list[Spec]) -> Graph:
    return Graph(Node(s.id, s.parents, s.depends_on, hlc=(i + 1, 0), origin="o", kind="script",
                      branch_labels=s.labels) for i, s in enumerate(specs))


def current_heads(graph: Graph, applied: set[str]) -> tuple[str, ...]:
    """What ``alembic_version`` holds for an applied set: its tips over both edge kinds."""
    inner = {p for r in applied for p in graph.get(r).parents + graph.get(r).depends_on}
    return tuple(graph.canonical_order(applied - inner))


def targets(specs: list[Spec], data: st.DataObject) -> list[str]:
    """Every target form of the issue, over ids, prefixes and labels drawn from this graph."""
    ids = [s.id for s in specs]
    labels = [label for s in specs for label in s.labels]
    some = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=3, unique=True))
    out = ["heads", "head", "base", "+1", "+2", "-1", "-2", *ids]
    out += sorted({i[:k] for i in ids for k in (1, 2, 3)})  # unique and ambiguous prefixes
    for rid in some:
        out += [f"{rid}+1", f"{rid}+2", f"{rid}-1", f"{rid}-2", f"{rid[:3]}+1"]
    for label in labels:
        out += [f"{label}@head", f"{label}@heads", f"{label}@+1", f"{label}@+2",
                f"{label}@base", *(f"{label}@{rid}" for rid in some),
                f"{label}@{some[0][:2]}"]
    return out


def alembic_upgrade(rmap: RevisionMap, target: str, current: tuple[str, ...]) -> list[str]:
    """What ``alembic upgrade TARGET`` runs (``ScriptDirectory._upgrade_revs``), in order."""
    revs = rmap.iterate_revisions(target, current, implicit_base=True)
    return [r.revision for r in reversed(list(revs))]


def alembic_downgrade(rmap: RevisionMap, target: str, current: tuple[str, ...]) -> list[str]:
    """What ``alembic downgrade TARGET`` runs (``ScriptDirectory._downgrade_revs``), in order."""
    revs = rmap.iterate_revisions(current, target, select_for_downgrade=True)
    return [r.revision for r in revs]


def _attempt(fn: Callable[..., list[str]], *args: object) -> list[str] | Exception:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args)
        except TxEngineError as exc:
            return exc
        except Exception as exc:  # Alembic raises RevisionError, ResolutionError, asserts
            if isinstance(exc, (TypeError, AttributeError, KeyError)) and "alembic" not in repr(
                    type(exc)):
                raise
            return exc


def _intended_difference(action: str, target: str, current: tuple[str, ...],
                         graph: Graph, applied: set[str]) -> bool:
    """Say whether docs/alembic.md lists this case as a difference on purpose."""
    if action == "downgrade" and target.startswith("-") and len(current) > 1:
        return True  # `downgrade -N` with several heads: Alembic picks the first head
    if action == "downgrade" and target.endswith(("@head", "@heads")):
        return True  # Alembic's downgrade drops BRANCH from BRANCH@head when resolving head
    return False


def _check_order(graph: Graph, plan: list[str], alembic: list[str], reverse: bool) -> None:
    """Check txengine's order is topological, and equal to Alembic's on a chain.

    Both lists are in execution order; a downgrade's is reversed to check it.
    """
    order = list(reversed(plan)) if reverse else plan
    position = {r: i for i, r in enumerate(order)}
    for rid in order:
        for before in graph.get(rid).parents + graph.get(rid).depends_on:
            if before in position:
                assert position[before] < position[rid], (order, rid, before)
    chain = all(len(graph.ancestors([r]) & position.keys()) == position[r] + 1 for r in order)
    if chain:
        assert plan == alembic


def compare(specs: list[Spec], data: st.DataObject) -> int:
    """Compare every answer for one graph; return how many comparisons were made."""
    rmap = alembic_map(specs)
    graph = txengine_graph(specs)
    assert set(graph.heads()) == set(rmap.heads)
    assert set(graph.bases()) == set(rmap.bases)
    ids = [s.id for s in specs]
    states = [set(), set(ids)]
    for rid in data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=2, unique=True)):
        states.append(graph.ancestors([rid]))
    states.append(graph.ancestors(data.draw(st.lists(st.sampled_from(ids), min_size=1,
                                                     max_size=3, unique=True))))
    compared = 0
    for target in targets(specs, data):
        for applied in states:
            current = current_heads(graph, applied)
            for action in ("upgrade", "downgrade"):
                if _intended_difference(action, target, current, graph, applied):
                    continue
                if action == "upgrade":
                    ours = _attempt(graph.upgrade_plan, target, applied)
                    theirs = _attempt(alembic_upgrade, rmap, target, current)
                else:
                    ours = _attempt(graph.downgrade_plan, target, applied)
                    theirs = _attempt(alembic_downgrade, rmap, target, current)
                where = (action, target, sorted(applied), current, specs)
                if isinstance(theirs, AssertionError):
                    continue  # Alembic trips its own assert (e.g. `REV-1` down to base): undefined
                if ours == [] and type(theirs).__name__ == "RangeNotAncestorError":
                    continue  # on purpose: "Nothing to drop" is a no-op here, not an error
                if "overlaps with other requested" in str(theirs) and not isinstance(
                        ours, Exception):
                    continue  # on purpose: targets needing one another are applied together
                if isinstance(theirs, Exception) or isinstance(ours, Exception):
                    assert isinstance(theirs, Exception) == isinstance(ours, Exception), (
                        *where, ours, theirs)
                    continue
                assert set(ours) == set(theirs), (*where, ours, theirs)
                _check_order(graph, ours, theirs, reverse=action == "downgrade")
                compared += 1
    return compared


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs(), st.data())
def test_graph_answers_as_alembic_revision_map(specs: list[Spec], data: st.DataObject) -> None:
    compare(specs, data)


# -- the differential test has teeth --------------------------------------------------


def test_a_wrong_plus_n_resolution_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break ``+N`` (one step too many) and the comparison fails on a plain chain."""
    from txengine import graph as graph_module

    walk = graph_module.Graph._walk

    def off_by_one(self: Graph, target: str, start: str | None, steps: int,
                   lineage: set[str] | None) -> tuple[str, ...]:
        return walk(self, target, start, steps + 1 if steps > 0 else steps, lineage)

    specs = [Spec("aaaa", (), (), ()), Spec("bbbb", ("aaaa",), (), ()),
             Spec("1111", ("bbbb",), (), ()), Spec("2222", ("1111",), (), ())]

    @settings(max_examples=5, deadline=None)
    @given(st.data())
    def check(data: st.DataObject) -> None:
        compare(specs, data)

    check()
    monkeypatch.setattr(graph_module.Graph, "_walk", off_by_one)
    with pytest.raises(AssertionError):
        check()


# -- differences on purpose (docs/alembic.md), pinned ---------------------------------


def _pair(*specs: Spec) -> tuple[RevisionMap, Graph]:
    return alembic_map(list(specs)), txengine_graph(list(specs))


FORK = (Spec("aaaa", (), (), ()), Spec("bbbb", ("aaaa",), (), ()), Spec("cccc", ("aaaa",), (), ()))


def test_difference_several_heads_upgrade_in_one_canonical_order() -> None:
    """Alembic orders unrelated branches by its own traversal; txengine by hlc.

    a - b(hlc 2)   upgrading heads applies b before c on every peer, whatever the
     \\             order the files are listed in; Alembic applies c first.
      c(hlc 3)
    """
    assert alembic_upgrade(alembic_map(list(FORK)), "heads", ()) == ["aaaa", "cccc", "bbbb"]
    assert txengine_graph(list(FORK)).upgrade_plan("heads", set()) == ["aaaa", "bbbb", "cccc"]
    nodes = list(txengine_graph(list(FORK))._nodes.values())
    assert Graph(reversed(nodes)).upgrade_plan("heads", set()) == ["aaaa", "bbbb", "cccc"]


def test_difference_downgrade_minus_one_with_several_heads_is_refused() -> None:
    """Alembic warns and walks down from whichever head comes first; txengine refuses."""
    rmap, graph = _pair(*FORK)
    applied = {"aaaa", "bbbb", "cccc"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        undone = [r.revision for r in rmap.iterate_revisions(("bbbb", "cccc"), "-1",
                                                             select_for_downgrade=True)]
    assert undone == ["bbbb"] and "ambiguous" in str(caught[0].message)
    with pytest.raises(MultipleHeads, match="'-1' needs a single head but there are 2"):
        graph.downgrade_plan("-1", applied)
    assert graph.downgrade_plan("bbbb-1", applied) == ["cccc", "bbbb"]


def test_difference_downgrade_is_linear_time() -> None:
    """Alembic's topological sort recomputes ancestor sets per step; txengine walks once.

    The count is of edge expansions: one per revision for a 20,000-deep downgrade.
    """
    n = 20_000
    graph = Graph(Node(f"r{i}", (f"r{i - 1}",) if i else (), hlc=(i + 1, 0), kind="script")
                  for i in range(n))
    calls = [0]
    successors = graph._successors

    def counting(rid: str) -> object:
        calls[0] += 1
        return successors(rid)

    graph._successors = counting  # type: ignore[method-assign]
    plan = graph.downgrade_plan("r0", {f"r{i}" for i in range(n)})
    assert len(plan) == n - 1 and plan[0] == f"r{n - 1}"
    assert calls[0] <= n + 1


def test_difference_revision_needs_a_head_choice_with_several_script_heads(
        tmp_path: object) -> None:
    """`alembic revision` with several heads fails the same way; txengine says how to choose."""
    from pathlib import Path

    from txengine.exceptions import InvalidInput
    from txengine.peer import Peer

    folder = Path(str(tmp_path))
    with Peer.open(f"sqlite:///{folder / 'db.sqlite'}", "p",
                   script_location=folder / "versions") as peer:
        peer.new_script("one", rev_id="aaaa")
        peer.new_script("two", rev_id="bbbb", head="base")
        with pytest.raises(InvalidInput, match="there are 2 script heads .* pass --head"):
            peer.new_script("three")


def test_heads_target_skips_a_head_closed_by_depends_on_as_alembic_does() -> None:
    """The `heads` target is Alembic's real heads; `heads()` lists all, as `alembic heads`.

    a - b      c depends on b: Alembic's `heads` resolves to (c,), txengine's to (b, c),
     \\         and both upgrade plans apply a, b, c.
      c ..> b
    """
    specs = [Spec("aaaa", (), (), ()), Spec("bbbb", ("aaaa",), (), ()),
             Spec("cccc", ("aaaa",), ("bbbb",), ())]
    rmap, graph = _pair(*specs)
    assert rmap.get_revisions("heads")[0].revision == "cccc"
    assert graph._resolve_target("heads", set(), upward=True) == ("cccc",)
    assert set(graph.heads()) == {"bbbb", "cccc"} == set(rmap.heads)
    assert set(graph.upgrade_plan("heads", set())) == {
        r.revision for r in rmap.iterate_revisions("heads", (), implicit_base=True)}


def test_difference_short_ids_and_unapplied_targets_get_specific_errors() -> None:
    """txengine names what failed (InvalidTarget) where Alembic's messages are generic."""
    rmap, graph = _pair(*FORK)
    with pytest.raises(InvalidTarget, match="revision cccc is not applied"):
        graph.downgrade_plan("cccc", {"aaaa", "bbbb"})


DEPENDS = (Spec("aaaa", (), (), ()), Spec("bbbb", ("aaaa",), (), ()),
           Spec("cccc", ("aaaa",), ("bbbb",), ("shop",)))


def test_difference_nothing_to_drop_is_a_no_op() -> None:
    """Downgrading to an applied revision that only a depends_on keeps below the heads.

    a - b      c depends on b; all applied. Alembic: "Nothing to drop" (an error);
     \\         txengine: nothing to undo, b stays because c still needs it.
      c ..> b
    """
    rmap, graph = _pair(*DEPENDS)
    with pytest.raises(Exception, match="Nothing to drop"):
        alembic_downgrade(rmap, "bbbb", ("cccc",))
    assert graph.downgrade_plan("bbbb", {"aaaa", "bbbb", "cccc"}) == []


def test_difference_downgrade_branch_at_head_resolves_head_on_the_branch() -> None:
    """Alembic's downgrade resolves BRANCH@head as plain `head` (MultipleHeads here)."""
    specs = (*FORK, Spec("dddd", ("cccc",), (), ("shop",)))
    rmap, graph = _pair(*specs)
    applied = {"aaaa", "bbbb", "cccc", "dddd"}
    with pytest.raises(Exception, match="Multiple heads"):
        alembic_downgrade(rmap, "shop@head", ("bbbb", "dddd"))
    assert graph.downgrade_plan("shop@head", applied) == []
    assert graph.downgrade_plan("shop@cccc", applied) == ["dddd"]


def test_difference_targets_that_need_one_another_are_applied_together() -> None:
    """Alembic refuses `shop@heads` when one head depends on another ("overlaps")."""
    specs = (Spec("aaaa", (), (), ("shop",)), Spec("bbbb", ("aaaa",), (), ()),
             Spec("cccc", ("aaaa",), ("bbbb",), ()))
    rmap, graph = _pair(*specs)
    with pytest.raises(Exception, match="overlaps with other requested revisions"):
        alembic_upgrade(rmap, "shop@heads", ())
    assert graph.upgrade_plan("shop@heads", set()) == ["aaaa", "bbbb", "cccc"]


def test_difference_relative_target_below_a_root_means_base() -> None:
    """`alembic upgrade REV-1` from a root trips an assert in Alembic; here it is base."""
    rmap, graph = _pair(*FORK)
    with pytest.raises(AssertionError):
        alembic_upgrade(rmap, "aaaa-1", ())
    assert graph.upgrade_plan("aaaa-1", set()) == []


def test_difference_every_apply_and_undo_is_audited(tmp_path: object) -> None:
    """alembic_version keeps only the heads (alembic#718); txengine audits every step."""
    from pathlib import Path

    from txengine.peer import Peer

    folder = Path(str(tmp_path))
    with Peer.open(f"sqlite:///{folder / 'db.sqlite'}", "p",
                   script_location=folder / "versions") as peer:
        peer.new_script("one", rev_id="aaaa")
        peer.new_script("two", rev_id="bbbb")
        peer.upgrade("heads")
        peer.downgrade("-1")
        steps = [(e.action, e.revision, e.peer_id) for e in peer.audit()
                 if e.action in ("apply", "undo")]
    assert steps == [("apply", "aaaa", "p"), ("apply", "bbbb", "p"), ("undo", "bbbb", "p")]
