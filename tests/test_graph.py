"""Tests for txengine.graph: heads, ancestry, canonical order, targets and plans.

DAGs are drawn with parents on the left; ``(B)`` marks a barrier. Unless a
test says otherwise a revision's hlc is its position in the ``_graph`` call,
so hlc grows along every edge as DESIGN.md requires.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txengine.exceptions import (
    AmbiguousRevision,
    InvalidInput,
    InvalidTarget,
    MissingParent,
    MultipleHeads,
    RevisionNotFound,
)
from txengine.graph import Graph, Node


def _graph(*specs: tuple[Any, ...], **fields: dict[str, Any]) -> Graph:
    """Build a graph from ``(id, parents...)`` tuples; hlc = position; extra fields by id."""
    nodes = []
    for position, (rid, *parents) in enumerate(specs, start=1):
        extra = fields.get(rid, {})
        nodes.append(Node(rid, tuple(parents), hlc=(position, 0), origin="p", **extra))
    return Graph(nodes)


def _chain(n: int) -> Graph:
    graph = Graph()
    previous: tuple[str, ...] = ()
    for i in range(n):
        graph.add(Node(f"r{i}", previous, hlc=(i + 1, 0)))
        previous = (f"r{i}",)
    return graph


def _counting(calls: list[int], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        calls[0] += 1
        return fn(*args)

    return wrapper


# -- heads, bases, children ---------------------------------------------------


def test_heads_are_revisions_without_children_in_canonical_order() -> None:
    """
    a - b - c
         \\
          d
    """
    graph = _graph(("a",), ("b", "a"), ("d", "b"), ("c", "b"))
    assert graph.heads() == ["d", "c"]
    assert graph.children("b") == ("d", "c")
    assert graph.bases() == ["a"]


def test_child_added_before_its_parent_keeps_the_parent_off_the_heads() -> None:
    """A bulk load may come in any order: b arrives before its parent a."""
    graph = Graph([Node("b", ("a",), hlc=(2, 0))])
    assert graph.heads() == ["b"]
    graph.add(Node("a", hlc=(1, 0)))
    assert graph.heads() == ["b"]
    assert graph.children("a") == ("b",)


def test_depends_on_does_not_close_a_head() -> None:
    """
    a - b        (c depends on b, as Alembic's depends_on: b stays a head)
     \\
      c ..> b
    """
    graph = _graph(("a",), ("b", "a"), ("c", "a"), c={"depends_on": ("b",)})
    assert graph.heads() == ["b", "c"]
    assert graph.ancestors(["c"]) == {"a", "b", "c"}
    assert graph.descendants(["b"]) == {"b", "c"}


def test_readding_an_identical_node_is_a_no_op() -> None:
    graph = _graph(("a",))
    graph.add(Node("a", hlc=(1, 0), origin="p"))
    assert len(graph) == 1


def test_readding_an_id_with_other_fields_raises_invalid_input() -> None:
    graph = _graph(("a",))
    with pytest.raises(InvalidInput, match=r"^revision a is already in the graph with other"):
        graph.add(Node("a", hlc=(9, 0)))


def test_remove_makes_the_parent_a_head_again() -> None:
    """a - b: removing b leaves a as the only head."""
    graph = _graph(("a",), ("b", "a"))
    graph.remove("b")
    assert graph.heads() == ["a"]
    assert "b" not in graph and list(graph) == ["a"]


def test_get_unknown_revision_raises_revision_not_found() -> None:
    with pytest.raises(RevisionNotFound, match=re.escape("no revision 'zz': run `txengine")):
        Graph().get("zz")


# -- ancestry -----------------------------------------------------------------


def test_ancestors_follow_parents_and_depends_on() -> None:
    """
    a - b - d
    c ......^   (d depends on c)
    """
    graph = _graph(("a",), ("b", "a"), ("c",), ("d", "b"), d={"depends_on": ("c",)})
    assert graph.ancestors(["d"]) == {"a", "b", "c", "d"}
    assert graph.ancestors(["d"], inclusive=False) == {"a", "b", "c"}
    assert graph.descendants(["a"], inclusive=False) == {"b", "d"}


def test_exclusive_ancestors_keep_a_start_reached_from_another_start() -> None:
    """a - b: the strict ancestors of {a, b} hold a, since b needs it."""
    graph = _graph(("a",), ("b", "a"))
    assert graph.ancestors(["a", "b"], inclusive=False) == {"a"}


def test_ancestors_of_a_100k_deep_chain_do_not_recurse() -> None:
    graph = _chain(100_000)
    assert len(graph.ancestors(["r99999"])) == 100_000
    assert len(graph.descendants(["r0"])) == 100_000


def test_ancestors_of_an_unknown_revision_raise_revision_not_found() -> None:
    with pytest.raises(RevisionNotFound, match="no revision 'x'"):
        Graph().ancestors(["x"])


# -- canonical order ----------------------------------------------------------


def test_barrier_moves_its_ancestry_ahead_of_earlier_open_revisions() -> None:
    """
    a - x            x (hlc 2) is open: no barrier holds it
     \\
      s(B) - y       s (hlc 3) holds a; y follows s in the open segment
    """
    graph = _graph(("a",), ("x", "a"), ("s", "a"), ("y", "s"), s={"kind": "script"})
    assert graph.canonical_order() == ["a", "s", "x", "y"]
    assert graph.sort_key("a") == (0, 1, 0, "p", "a")
    assert graph.sort_key("x") == (1, 2, 0, "p", "x")


def test_revision_belongs_to_the_first_barrier_holding_it() -> None:
    """
    a - c1(B) - b - c2(B)     a is held by both barriers: segment 0
    """
    graph = _graph(
        ("a",),
        ("c1", "a"),
        ("b", "c1"),
        ("c2", "b"),
        c1={"kind": "checkpoint"},
        c2={"kind": "config"},
    )
    assert [graph.sort_key(r)[0] for r in ("a", "c1", "b", "c2")] == [0, 0, 1, 1]


def test_barriers_are_ordered_by_hlc_then_origin_then_id() -> None:
    """Three unrelated barriers with equal hlc: origin decides, then id."""
    graph = Graph(
        [
            Node("z", hlc=(5, 0), origin="a", kind="script"),
            Node("b", hlc=(5, 0), origin="b", kind="script"),
            Node("a", hlc=(5, 0), origin="b", kind="script"),
            Node("early", hlc=(1, 0), origin="z", kind="config"),
        ]
    )
    assert graph.canonical_order() == ["early", "z", "a", "b"]


def test_late_ancestor_of_a_barrier_joins_the_barrier_segment() -> None:
    """
    a - s(B)     s arrives first; a (hlc 1) arrives after x (hlc 0.5, open)
    x
    """
    graph = Graph([Node("s", ("a",), hlc=(3, 0), kind="script"), Node("x", hlc=(0, 5))])
    assert graph.canonical_order() == ["s", "x"]
    graph.add(Node("a", hlc=(1, 0)))
    assert graph.canonical_order() == ["a", "s", "x"]


def test_barrier_arriving_out_of_order_reassigns_segments() -> None:
    """
    a - s2(B, hlc 4)
    a - s1(B, hlc 3) arrives last but sorts first, so it takes a
    """
    graph = Graph([Node("a", hlc=(1, 0)), Node("s2", ("a",), hlc=(4, 0), kind="script")])
    assert graph.sort_key("a")[0] == 0
    graph.add(Node("s1", ("a",), hlc=(3, 0), kind="script"))
    assert [graph.sort_key(r)[0] for r in ("a", "s1", "s2")] == [0, 0, 1]


# -- validate -----------------------------------------------------------------


def test_validate_names_the_revision_with_a_missing_parent() -> None:
    graph = _graph(("b", "a"), ("c",), c={"depends_on": ("q",)})
    assert graph.validate() == [
        ("b", str(MissingParent("b", "a"))),
        (
            "c",
            "revision c depends on q, which this peer does not have:"
            " fetch it first (sync or bundle), then retry",
        ),
    ]


def test_validate_reports_each_cycle_once() -> None:
    """a -> b -> a is a cycle; c -> c is a self-loop; d is fine."""
    graph = Graph([Node("a", ("b",)), Node("b", ("a",)), Node("c", ("c",)), Node("d", ("a",))])
    findings = graph.validate()
    assert [rid for rid, _ in findings] == ["a", "c"]
    assert findings[0][1].startswith("revisions a, b form a cycle through their parents")
    assert findings[1][1].startswith("revisions c form a cycle")


def test_validate_reports_a_branch_label_on_two_revisions() -> None:
    graph = _graph(("a",), ("b",), a={"branch_labels": ("x",)}, b={"branch_labels": ("x",)})
    assert graph.validate() == [
        ("a", "branch label 'x' is on 2 revisions (a, b): a label must name one revision")
    ]


def test_validate_of_a_sound_graph_is_empty() -> None:
    assert _chain(10).validate() == []


# -- resolve and targets ------------------------------------------------------


def test_resolve_accepts_full_id_unique_prefix_and_branch_label() -> None:
    graph = _graph(("abc123",), ("abd456", "abc123"), abd456={"branch_labels": ("shop",)})
    assert graph.resolve("abc123") == "abc123"
    assert graph.resolve("abc") == "abc123"
    assert graph.resolve("shop") == "abd456"


def test_resolve_of_a_shared_prefix_raises_ambiguous_revision() -> None:
    graph = _graph(("abc123",), ("abd456",))
    with pytest.raises(AmbiguousRevision, match=re.escape("'ab' matches 2 revisions (abc123,")):
        graph.resolve("ab")


def test_resolve_of_an_unknown_prefix_raises_revision_not_found() -> None:
    with pytest.raises(RevisionNotFound, match="no revision 'q'"):
        _graph(("abc",)).resolve("q")


def test_head_with_two_heads_raises_multiple_heads() -> None:
    """
    a - b
     \\
      c
    """
    graph = _graph(("a",), ("b", "a"), ("c", "a"))
    message = "'head' needs a single head but there are 2 (b, c)"
    with pytest.raises(MultipleHeads, match=re.escape(message)):
        graph.upgrade_plan("head", [])
    assert graph.upgrade_plan("heads", []) == ["a", "b", "c"]


def test_upgrade_plan_applies_missing_ancestors_in_canonical_order() -> None:
    """
    a - b - d
     \\     /
      c ---
    """
    graph = _graph(("a",), ("b", "a"), ("c", "a"), ("d", "b", "c"))
    assert graph.upgrade_plan("d", ["a", "b"]) == ["c", "d"]
    assert graph.upgrade_plan("head", []) == ["a", "b", "c", "d"]
    assert graph.upgrade_plan("base", ["a"]) == []


def test_relative_upgrade_walks_up_from_the_applied_head() -> None:
    """r0 - r1 - r2 - r3 - r4, applied r0..r1."""
    graph = _chain(5)
    assert graph.upgrade_plan("+2", ["r0", "r1"]) == ["r2", "r3"]
    assert graph.upgrade_plan("+1", []) == ["r0"]
    assert graph.upgrade_plan("r1+2", []) == ["r0", "r1", "r2", "r3"]


def test_relative_upgrade_past_the_head_raises_invalid_target() -> None:
    with pytest.raises(InvalidTarget, match=re.escape("'+3': walked past a head after 2 of 3")):
        _chain(3).upgrade_plan("+3", ["r0"])


def test_relative_upgrade_at_a_fork_names_the_choices() -> None:
    """
    a - b
     \\
      c
    """
    graph = _graph(("a",), ("b", "a"), ("c", "a"))
    with pytest.raises(
        InvalidTarget, match=re.escape("'+1': step 1 from a has 2 choices (b, c): name one of them")
    ):
        graph.upgrade_plan("+1", ["a"])


def test_relative_upgrade_from_two_applied_heads_raises_multiple_heads() -> None:
    """a - b, a - c; both b and c applied."""
    graph = _graph(("a",), ("b", "a"), ("c", "a"))
    with pytest.raises(MultipleHeads, match=re.escape("'+1' needs a single head but there are 2")):
        graph.upgrade_plan("+1", ["a", "b", "c"])


def test_negative_relative_upgrade_raises_invalid_target() -> None:
    with pytest.raises(InvalidTarget, match="an upgrade moves forward: use \\+N"):
        _chain(3).upgrade_plan("-1", ["r0", "r1"])


def test_branch_label_at_head_picks_the_head_of_that_branch() -> None:
    """
    a - b(shop) - c
     \\
      d - e
    """
    graph = _graph(
        ("a",), ("b", "a"), ("c", "b"), ("d", "a"), ("e", "d"), b={"branch_labels": ("shop",)}
    )
    assert graph.upgrade_plan("shop@head", ["a"]) == ["b", "c"]
    assert graph.upgrade_plan("shop@+1", ["a", "d"]) == ["b"]
    assert graph.upgrade_plan("shop@c", []) == ["a", "b", "c"]
    message = "'shop@e': revision e is not on branch 'shop'"
    with pytest.raises(InvalidTarget, match=re.escape(message)):
        graph.upgrade_plan("shop@e", [])
    with pytest.raises(MultipleHeads, match=re.escape("'a@head' needs a single head but there")):
        graph.upgrade_plan("a@head", [])
    assert graph.upgrade_plan("a@heads", ["a"]) == ["b", "c", "d", "e"]


def test_unknown_target_raises_revision_not_found() -> None:
    with pytest.raises(RevisionNotFound, match="no revision 'nope'"):
        _chain(2).upgrade_plan("nope", [])


# -- downgrade ----------------------------------------------------------------


def test_downgrade_plan_undoes_descendants_of_the_target_latest_first() -> None:
    """
    a - b - c       applied: all; downgrade to b undoes c only;
     \\              downgrade to a undoes b, c, d, newest first.
      d
    """
    graph = _graph(("a",), ("b", "a"), ("c", "b"), ("d", "a"))
    applied = ["a", "b", "c", "d"]
    assert graph.downgrade_plan("b", applied) == ["c"]
    assert graph.downgrade_plan("a", applied) == ["d", "c", "b"]
    assert graph.downgrade_plan("base", applied) == ["d", "c", "b", "a"]
    # As Alembic: a downgrade goes back to one revision, so several heads are refused.
    with pytest.raises(MultipleHeads, match=re.escape("'heads' needs a single head")):
        graph.downgrade_plan("heads", applied)
    assert graph.downgrade_plan("c", applied) == []


def test_relative_downgrade_walks_down_from_the_applied_head() -> None:
    graph = _chain(4)
    applied = ["r0", "r1", "r2", "r3"]
    assert graph.downgrade_plan("-1", applied) == ["r3"]
    assert graph.downgrade_plan("-4", applied) == ["r3", "r2", "r1", "r0"]
    assert graph.downgrade_plan("r3-2", applied) == ["r3", "r2"]


def test_relative_downgrade_below_base_raises_invalid_target() -> None:
    message = "'-3': walked below base after 2 of 3 steps"
    with pytest.raises(InvalidTarget, match=re.escape(message)):
        _chain(2).downgrade_plan("-3", ["r0", "r1"])


def test_relative_downgrade_through_a_merge_names_the_parents() -> None:
    """
    a - b - d
     \\     /
      c ---
    """
    graph = _graph(("a",), ("b", "a"), ("c", "a"), ("d", "b", "c"))
    with pytest.raises(InvalidTarget, match=re.escape("step 1 from d has 2 choices (b, c)")):
        graph.downgrade_plan("-1", ["a", "b", "c", "d"])


def test_downgrade_with_nothing_applied_raises_invalid_target() -> None:
    with pytest.raises(InvalidTarget, match="nothing is applied, so there is nothing to undo"):
        _chain(2).downgrade_plan("-1", [])


def test_positive_relative_downgrade_raises_invalid_target() -> None:
    with pytest.raises(InvalidTarget, match="a downgrade moves back: use -N"):
        _chain(2).downgrade_plan("+1", ["r0"])


def test_downgrade_to_an_unapplied_revision_raises_invalid_target() -> None:
    with pytest.raises(InvalidTarget, match=re.escape("'r1': revision r1 is not applied")):
        _chain(2).downgrade_plan("r1", ["r0"])


def test_downgrade_plan_on_a_100k_chain_does_linear_work() -> None:
    """Alembic walks the ancestry once per undone step (quadratic); we expand each node once.

    r0 - r1 - ... - r99999: downgrading to r0 expands every revision once
    (descendants of r0, ancestors of r0); ``-1`` expands only r99999's edges.
    """
    n = 100_000
    graph = _chain(n)
    applied = [f"r{i}" for i in range(n)]
    calls = [0]
    graph._successors = _counting(calls, graph._successors)  # type: ignore[method-assign]
    graph._predecessors = _counting(calls, graph._predecessors)  # type: ignore[method-assign]
    plan = graph.downgrade_plan("r0", applied)
    assert len(plan) == n - 1 and plan[0] == "r99999"
    assert calls[0] <= n + 1
    calls[0] = 0
    assert graph.downgrade_plan("-1", applied) == ["r99999"]
    assert calls[0] <= 4


# -- properties ---------------------------------------------------------------


@st.composite
def _dags(draw: st.DrawFn) -> list[Node]:
    """Random DAGs whose hlc grows along every edge, with some barriers, in random order."""
    n = draw(st.integers(1, 18))
    nodes: list[Node] = []
    for i in range(n):
        earlier = list(range(i))
        parents = draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True)) if i else []
        deps = draw(st.lists(st.sampled_from(earlier), max_size=1, unique=True)) if i else []
        floor = max((nodes[j].hlc[0] for j in parents + deps), default=0)
        nodes.append(
            Node(
                f"r{i:02d}",
                tuple(f"r{j:02d}" for j in parents),
                tuple(f"r{j:02d}" for j in deps if j not in parents),
                hlc=(floor + draw(st.integers(1, 3)), 0),
                origin=draw(st.sampled_from(["a", "b"])),
                kind=draw(st.sampled_from(["data", "data", "data", "script", "checkpoint"])),
            )
        )
    return draw(st.permutations(nodes))


def _brute_ancestors(nodes: dict[str, Node], start: str) -> set[str]:
    found = {start}
    changed = True
    while changed:
        changed = False
        for rid in list(found):
            for p in nodes[rid].parents + nodes[rid].depends_on:
                if p not in found:
                    found.add(p)
                    changed = True
    return found


def _brute_order(nodes: dict[str, Node]) -> list[str]:
    barriers = sorted(
        (n for n in nodes.values() if n.kind != "data"), key=lambda n: (n.hlc, n.origin, n.id)
    )

    def segment(rid: str) -> int:
        for i, b in enumerate(barriers):
            if rid in _brute_ancestors(nodes, b.id):
                return i
        return len(barriers)

    return sorted(nodes, key=lambda r: (segment(r), nodes[r].hlc, nodes[r].origin, r))


@settings(max_examples=150, deadline=None)
@given(_dags())
def test_canonical_order_is_topological_and_independent_of_arrival(nodes: list[Node]) -> None:
    """Same set, same order: whatever the arrival order, with queries in between."""
    incremental = Graph()
    for node in nodes:
        incremental.add(node)
        incremental.heads()
    order = incremental.canonical_order()
    position = {rid: i for i, rid in enumerate(order)}
    for node in nodes:
        for before in node.parents + node.depends_on:
            assert position[before] < position[node.id]
    by_id = {n.id: n for n in nodes}
    assert order == Graph(sorted(nodes, key=lambda n: n.id)).canonical_order()
    assert order == _brute_order(by_id)


@settings(max_examples=150, deadline=None)
@given(_dags(), st.data())
def test_heads_ancestors_and_plans_agree_with_brute_force(
    nodes: list[Node], data: st.DataObject
) -> None:
    graph = Graph(nodes)
    by_id = {n.id: n for n in nodes}
    referenced = {p for n in nodes for p in n.parents}
    assert set(graph.heads()) == set(by_id) - referenced
    for rid in by_id:
        assert graph.ancestors([rid]) == _brute_ancestors(by_id, rid)
    target = data.draw(st.sampled_from(sorted(by_id)))
    applied = graph.ancestors([data.draw(st.sampled_from(sorted(by_id)))])
    expected = graph.canonical_order(_brute_ancestors(by_id, target) - applied)
    assert graph.upgrade_plan(target, applied) == expected
    if target in applied:
        undo = graph.downgrade_plan(target, applied)
        assert target not in undo
        kept = applied - set(undo)
        assert all(graph.ancestors([rid]) <= kept for rid in kept)
        assert undo == list(reversed(graph.canonical_order(undo)))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdefgh"), st.lists(st.sampled_from("abcdefghz"))))
def test_validate_finds_exactly_the_cycles_brute_force_finds(edges: dict[str, list[str]]) -> None:
    """Any parent edges at all (z is always missing): each cycle is reported once, whole."""
    graph = Graph(Node(rid, tuple(dict.fromkeys(parents))) for rid, parents in edges.items())

    def reaches(a: str, b: str) -> bool:
        return b in graph.ancestors(p for p in graph.get(a).parents if p in graph)

    on_cycle = {rid for rid in edges if reaches(rid, rid)}
    expected = sorted(
        {min(o for o in on_cycle if reaches(r, o) and reaches(o, r)) for r in on_cycle}
    )
    cycles = [rid for rid, message in graph.validate() if "form a cycle" in message]
    assert cycles == expected


def test_validate_of_a_100k_chain_with_a_cycle_at_its_base_is_iterative() -> None:
    """r0 <-> r1 - r2 - ... - r99999: one finding, no recursion."""
    graph = _chain(100_000)
    graph.remove("r0")
    graph.add(Node("r0", ("r1",), hlc=(1, 0)))
    assert [rid for rid, _ in graph.validate()] == ["r0"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3), st.booleans(),
                          st.integers(0, 3), st.booleans()), min_size=1, max_size=30),
       st.data())
def test_the_kept_canonical_order_equals_a_fresh_sort(specs, data) -> None:
    """Adds in any order (late parents, barriers, removals): the order kept across them is
    always the order a fresh sort of the same ids gives, for the whole graph and subsets."""
    graph = Graph()
    ids: list[str] = []
    for n, (ms, parent, barrier, counter, remove) in enumerate(specs):
        rid = f"r{n}"
        parents = (f"r{parent % n}",) if n and parent else ()
        graph.add(Node(rid, parents, hlc=(ms, counter), origin=f"o{counter}",
                       kind="checkpoint" if barrier and n % 5 == 4 else "data"))
        ids.append(rid)
        if remove and len(ids) > 2 and n % 3 == 0:
            graph.remove(ids.pop(0))
        fresh = sorted(ids, key=graph.sort_key)
        assert graph.canonical_order() == fresh
        subset = data.draw(st.lists(st.sampled_from(ids), unique=True))
        assert graph.canonical_order(subset) == [r for r in fresh if r in set(subset)]
        assert graph.canonical_order(set(subset)) == [r for r in fresh if r in set(subset)]
    with pytest.raises(RevisionNotFound):
        graph.canonical_order([*ids, "unknown"])
