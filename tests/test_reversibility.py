"""Reversibility, property-tested: every write undoes exactly and replays identically.

DESIGN.md's invariants: upgrade to heads then downgrade to base leaves the
store exactly as it started; upgrade heads gives the same state back; and the
data always equals a fresh replay of the ledger into an empty store. Snapshots
are compared as strict text (``strict``), so ``1`` and ``1.0`` differ.
"""

from __future__ import annotations

import datetime as dt
import decimal
from pathlib import Path

import pytest
from bson import ObjectId
from conftest import replayed_snapshot, store_url_for, strict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txengine.exceptions import PinnedPeer
from txengine.peer import Peer

SETTINGS = settings(max_examples=20, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------

text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=10)
field_names = st.one_of(
    st.sampled_from(["a", "b", "n", "é", "\U0001f600k"]),
    text.filter(bool).map(lambda s: s[:5]),
# MongoDB refuses NUL in field names, so ops do everywhere (test_ops pins the refusal).
).filter(lambda s: not s.startswith("$") and "." not in s and "\x00" not in s and s != "_id")
nested_names = st.text(alphabet="abcxyzé\U0001f600 ", min_size=1, max_size=4)
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.integers(min_value=2**53 + 1, max_value=2**90).flatmap(lambda n: st.sampled_from([n, -n])),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
    st.binary(min_size=12, max_size=12).map(ObjectId),
    st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1)),
    st.decimals(allow_nan=False, allow_infinity=False, places=3,
                min_value=-(10**12), max_value=10**12),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nested_names, inner, max_size=3),
    max_leaves=6,
)
doc_keys = st.sampled_from(["a", "b", "é\U0001f600", 1, 2, -7, 2**60,
                            ObjectId("5f1d7c9e8b3a4c2d1e0f9a8b")])
collections = st.sampled_from(["items", "other"])
counts = st.integers(min_value=-(2**54), max_value=2**54)


@st.composite
def actions(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(["insert", "update", "update", "delete"]))
    coll, key = draw(collections), draw(doc_keys)
    if kind == "insert":
        doc = draw(st.dictionaries(field_names, values, max_size=3))
        return ("insert", coll, key, {**doc, "n": draw(counts)})
    if kind == "delete":
        return ("delete", coll, key)
    names = draw(st.lists(field_names.filter(lambda f: f != "n"), max_size=3, unique=True))
    cut = draw(st.integers(0, len(names)))
    set_ = {f: draw(values) for f in names[:cut]}
    unset = names[cut:]
    inc = {"n": draw(counts)} if draw(st.booleans()) or not names else None
    return ("update", coll, key, set_ or None, unset or None, inc)


def transactions(partitions: list[str]) -> st.SearchStrategy:
    return st.lists(
        st.tuples(st.sampled_from(partitions), st.lists(actions(), min_size=1, max_size=4)),
        min_size=1, max_size=8)


def run(peer: Peer, txs: list) -> list[tuple[str, str, dict]]:
    """Write ``txs``; return (revision id, partition, snapshot after it) per revision."""
    out = []
    for number, (partition, acts) in enumerate(txs):
        with peer.transaction(f"tx {number} \u00e9\U0001f600", partition=partition) as tx:
            for act in acts:
                kind, coll, key = act[:3]
                exists = tx.get(coll, key) is not None
                if kind == "insert" or not exists:
                    tx.insert(coll, {"_id": key, **(act[3] if kind == "insert" else {"n": 0})})
                elif kind == "delete":
                    tx.delete(coll, key)
                else:
                    tx.update(coll, key, set=act[3], unset=act[4], inc=act[5])
        assert tx.revision is not None
        out.append((tx.revision.id, partition, peer.snapshot()))
    return out


def in_partition(snapshot: dict, partition: str, inside: bool = True) -> dict:
    return {k: v for k, v in snapshot.items() if (k[0] == partition) == inside}


# -- properties ---------------------------------------------------------------------------


@SETTINGS
@given(txs=transactions(["default", "user:1"]))
def test_downgrade_base_restores_the_initial_store_and_upgrade_heads_restores_the_data(
        backend: str, tmp_path: Path, txs: list) -> None:
    """Random writes over two partitions: base is empty again, heads is the same again."""
    with store_url_for(backend, tmp_path) as url, store_url_for(backend, tmp_path) as other:
        with Peer.open(url, peer_id="test") as peer:
            initial = strict(peer.snapshot())
            run(peer, txs)
            final = strict(peer.snapshot())
            assert strict(replayed_snapshot(peer, other)) == final

            peer.downgrade("base")
            assert strict(peer.snapshot()) == initial == "[]"
            assert peer.current() == []
            assert peer.pinned
            assert peer.verify(replay=True).ok

            peer.upgrade("heads")
            assert strict(peer.snapshot()) == final
            assert not peer.pinned
            report = peer.verify(replay=True)
            assert report.ok, report.findings


@SETTINGS
@given(txs=transactions(["default"]), data=st.data())
def test_relative_downgrade_and_upgrade_round_trip_through_every_intermediate_state(
        backend: str, tmp_path: Path, txs: list, data: st.DataObject) -> None:
    """On one chain, ``-N`` goes back to the state after revision len-N, ``+N`` forward again."""
    with store_url_for(backend, tmp_path) as url:
        with Peer.open(url, peer_id="test") as peer:
            history = run(peer, txs)
            final = strict(peer.snapshot())
            steps = data.draw(st.integers(1, len(history)), label="N")
            peer.downgrade(f"-{steps}")
            left = len(history) - steps
            expected = strict(history[left - 1][2]) if left else "[]"
            assert strict(peer.snapshot()) == expected
            assert sorted(peer._engine.applied) == sorted(r for r, _, _ in history[:left])
            assert peer.verify(replay=True).ok

            back = data.draw(st.integers(1, steps), label="M")
            peer.upgrade(f"+{back}")
            assert strict(peer.snapshot()) == strict(history[left + back - 1][2])
            assert peer.verify(replay=True).ok

            peer.upgrade("heads")
            assert strict(peer.snapshot()) == final


@SETTINGS
@given(txs=transactions(["default", "user:1", "user:2"]), data=st.data())
def test_downgrade_to_a_revision_undoes_only_its_partitions_descendants(
        backend: str, tmp_path: Path, txs: list, data: st.DataObject) -> None:
    """Downgrading to a revision id rewinds its partition to it and leaves the others alone."""
    with store_url_for(backend, tmp_path) as url, store_url_for(backend, tmp_path) as other:
        with Peer.open(url, peer_id="test") as peer:
            history = run(peer, txs)
            final = peer.snapshot()
            rev_id, partition, after = data.draw(st.sampled_from(history), label="target")
            undone = peer.downgrade(rev_id[:10]).undone
            expected = {**in_partition(after, partition), **in_partition(final, partition, False)}
            assert strict(peer.snapshot()) == strict(expected)
            assert strict(replayed_snapshot(peer, other)) == strict(expected)
            assert peer.verify(replay=True).ok
            assert peer.pinned == bool(undone), "only a downgrade that undid something pins"
            if undone:
                with pytest.raises(PinnedPeer, match="^this peer is pinned by a local downgrade"):
                    with peer.transaction("refused") as tx:
                        tx.insert("items", {"_id": "late"})

            peer.upgrade(rev_id)
            assert strict(peer.snapshot()) == strict(expected)
            peer.upgrade("heads")
            assert strict(peer.snapshot()) == strict(final)
            with peer.transaction("accepted") as tx:
                tx.insert("items", {"_id": "late"})


@SETTINGS
@given(txs=transactions(["default", "user:1"]))
def test_repeated_round_trips_leave_data_ledger_and_ids_unchanged(
        backend: str, tmp_path: Path, txs: list) -> None:
    """Downgrade base / upgrade heads twice: same data, same applied set, same revision ids."""
    with store_url_for(backend, tmp_path) as url:
        with Peer.open(url, peer_id="test") as peer:
            run(peer, txs)
            final = strict(peer.snapshot())
            ids = sorted(r.id for r in peer.history())
            for _ in range(2):
                peer.downgrade("base")
                assert peer.snapshot() == {}
                peer.upgrade("heads")
                assert strict(peer.snapshot()) == final
            assert sorted(r.id for r in peer.history()) == ids
            assert sorted(peer._engine.applied) == ids


def test_writer_applies_the_decoded_payload_not_the_callers_objects(store_url: str,
                                                                    new_store) -> None:
    """A float that canonical JSON writes as an integer is stored as that integer, as replay
    stores it; a datetime keeps milliseconds only; a naive datetime is taken as UTC."""
    with Peer.open(store_url, peer_id="test") as peer:
        with peer.transaction("values") as tx:
            tx.insert("items", {"_id": 1, "f": 1.0, "z": -0.0, "big": 1e20,
                                "when": dt.datetime(2024, 5, 6, 7, 8, 9, 987654),
                                "dec": decimal.Decimal("0.10")})
        live = peer.snapshot()
        assert strict(live) == strict(replayed_snapshot(peer, new_store()))
        doc = peer.get("items", 1)
        assert doc["when"] == dt.datetime(2024, 5, 6, 7, 8, 9, 987000, tzinfo=dt.UTC)
        assert str(doc["dec"]) == "0.10"


def test_nul_character_round_trips_on_every_store(store_url: str) -> None:
    """A string holding U+0000 is valid JSON and must be stored like any other string.

    (PostgreSQL's jsonb refuses it, which is why document columns there are json.)
    """
    with Peer.open(store_url, peer_id="test") as peer:
        with peer.transaction("nul") as tx:
            tx.insert("items", {"_id": 1, "s": "a\x00b"})
        assert peer.get("items", 1)["s"] == "a\x00b"
