"""verify() names the revision whose stored bytes were altered behind txengine's back.

Tampering goes through a separate SQLAlchemy connection straight into
``txengine_revisions`` (or a data table), then a freshly opened peer verifies.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from txengine.peer import Peer


def chain(url: str) -> list[str]:
    """Write three revisions on one chain; return their ids, oldest first."""
    ids = []
    with Peer.open(url, peer_id="test") as peer:
        for n in range(3):
            with peer.transaction(f"write {n}") as tx:
                if n == 0:
                    tx.insert("items", {"_id": 1, "n": 0})
                else:
                    tx.update("items", 1, inc={"n": 1})
            ids.append(tx.revision.id)
    return ids


def tamper(url: str, sql: str, **params) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            assert result.rowcount == 1
    finally:
        engine.dispose()


def findings(url: str, replay: bool = False):
    with Peer.open(url, peer_id="test") as peer:
        return peer.verify(replay=replay)


def test_untouched_ledger_verifies_clean(store_url: str) -> None:
    chain(store_url)
    report = findings(store_url, replay=True)
    assert report.ok and report.checked == 3


def test_changed_payload_is_named_as_a_checksum_mismatch(store_url: str) -> None:
    ids = chain(store_url)
    payload = b'[{"collection":"items","key":1,"op":"update","inc":{"n":100}}]'
    tamper(store_url, "UPDATE txengine_revisions SET payload = :p WHERE id = :id",
           p=payload, id=ids[1])
    report = findings(store_url)
    assert [f.revision for f in report.findings] == [ids[1]]
    assert report.findings[0].problem.startswith(f"revision {ids[1][:12]}: payload checksum ")
    assert "the payload was altered, refetch it from a peer" in report.findings[0].problem


@pytest.mark.parametrize("column, value", [
    ("message", "rewritten history"),
    ("hlc_ms", 1),
    ("origin", "mallory:0"),
    ("seq", 99),
    ("collections", '["other"]'),
])
def test_changed_descriptor_field_is_named_as_a_digest_mismatch(
        store_url: str, column: str, value: object) -> None:
    ids = chain(store_url)
    tamper(store_url, f"UPDATE txengine_revisions SET {column} = :v WHERE id = :id",
           v=value, id=ids[2])
    report = findings(store_url)
    assert ids[2] in [f.revision for f in report.findings]
    named = next(f for f in report.findings if f.revision == ids[2])
    assert named.problem.startswith(f"revision {ids[2][:12]}: descriptor digest ")
    assert "the descriptor was altered" in named.problem


def test_changed_parents_are_named_on_the_revision_that_holds_them(store_url: str) -> None:
    ids = chain(store_url)
    tamper(store_url, "UPDATE txengine_revisions SET parents = :v WHERE id = :id",
           v=json.dumps([ids[0]]), id=ids[2])
    report = findings(store_url)
    assert [f.revision for f in report.findings] == [ids[2]]
    assert report.findings[0].problem.startswith(f"revision {ids[2][:12]}: descriptor digest ")


def test_changed_ancestor_descriptor_is_named_even_when_the_heads_are_intact(
        store_url: str) -> None:
    ids = chain(store_url)
    tamper(store_url, "UPDATE txengine_revisions SET message = :v WHERE id = :id",
           v="forged", id=ids[0])
    report = findings(store_url)
    assert [f.revision for f in report.findings] == [ids[0]]


def test_renamed_ancestor_is_named_and_so_is_the_child_that_lost_its_parent(
        store_url: str) -> None:
    ids = chain(store_url)
    forged = "f" * 64
    tamper(store_url, "UPDATE txengine_revisions SET id = :v WHERE id = :id", v=forged, id=ids[0])
    report = findings(store_url)
    named = {f.revision: f.problem for f in report.findings}
    assert named[forged].startswith(f"revision {forged[:12]}: descriptor digest ")
    assert named[ids[1]].startswith(
        f"revision {ids[1][:12]} names parent {ids[0][:12]}, which this peer does not have")


def test_replay_names_the_collection_and_key_of_drifted_data(store_url: str) -> None:
    chain(store_url)
    tamper(store_url, "UPDATE items SET doc = :d WHERE _key = '1'",
           d='{"_id":1,"n":41}')
    assert findings(store_url).ok, "the ledger itself is intact"
    report = findings(store_url, replay=True)
    assert [(f.revision, f.collection, f.key) for f in report.findings] == [(None, "items", "1")]
    assert report.findings[0].problem.startswith("default/items/1: live ")
    assert "differs from replay" in report.findings[0].problem


def test_replay_names_a_deleted_document(store_url: str) -> None:
    chain(store_url)
    tamper(store_url, "DELETE FROM items WHERE _key = '1'")
    report = findings(store_url, replay=True)
    assert [(f.collection, f.key) for f in report.findings] == [("items", "1")]
    assert "missing from the live data" in report.findings[0].problem
