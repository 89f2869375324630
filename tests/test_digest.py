"""Content digests: equal data gives equal bytes, whatever the arrival order or store kind."""

from __future__ import annotations

import json
import random
import secrets
from pathlib import Path

import mongomock
from bson import ObjectId
from click.testing import CliRunner
from conftest import write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txengine.cli import cli
from txengine.digest import EMPTY, content_digest
from txengine.peer import Peer
from txengine.values import key_text, to_ejson


def _concurrent(alice: Peer, bob: Peer) -> None:
    """Alice and Bob write offline over the same keys, in two partitions."""
    for n in range(6):
        write(alice, n, n=n, by="alice")
        write(bob, n + 3, n=-n, by="bob")
    with alice.transaction("alice edits") as tx:
        tx.update("items", 1, set={"x": 1.5}, inc={"n": 10})
        tx.delete("items", 2)
    with bob.transaction("bob edits", partition="user:1") as tx:
        tx.insert("items", {"_id": ObjectId("64b7f0c2a1b2c3d4e5f60718"), "tags": ["a", "é"]})
        tx.insert("items", {"_id": "1", "note": "the str key, not the int"})


def test_same_revisions_in_different_orders_give_one_digest_on_sqlite_and_mongodb(
        tmp_path: Path) -> None:
    alice = Peer.open(str(tmp_path / "alice.db"), peer_id="alice")
    bob = Peer.open(str(tmp_path / "bob.db"), peer_id="bob")
    lite = Peer.open(str(tmp_path / "lite.db"), peer_id="lite")
    mongo = Peer.open(mongomock.MongoClient()[f"t_{secrets.token_hex(4)}"], peer_id="mongo")
    try:
        _concurrent(alice, bob)
        lite.sync(alice)
        lite.sync(bob)
        mongo.sync(bob)
        mongo.sync(alice)
        alice.sync(bob)
        digests = {p.peer_id: p.content_digest() for p in (alice, bob, lite, mongo)}
        assert len(set(digests.values())) == 1, digests
        assert lite.content_digest("user:1") == mongo.content_digest("user:1")
        assert lite.content_digest("user:1") != lite.content_digest("default")
        assert lite.content_digest("nowhere") == EMPTY
    finally:
        for p in (alice, bob, lite, mongo):
            p.close()


def test_a_changed_document_changes_the_digest(store_url: str) -> None:
    with Peer.open(store_url, peer_id="p") as peer:
        write(peer, 1, n=1)
        write(peer, 2, n=2)
        before = peer.content_digest()
        with peer.transaction("edit") as tx:
            tx.update("items", 2, set={"n": 3})
        edited = peer.content_digest()
        with peer.transaction("edit back") as tx:
            tx.update("items", 2, set={"n": 2})
        assert len({before, edited}) == 2
        assert peer.content_digest() == before, "same documents and incarnations, same digest"
        with peer.transaction("re-insert") as tx:
            tx.delete("items", 2)
        with peer.transaction("re-insert") as tx:
            tx.insert("items", {"_id": 2, "n": 2})
        assert peer.content_digest() != before, "a new incarnation is a new document"


def test_cli_digest_prints_the_digest(tmp_path: Path) -> None:
    store = str(tmp_path / "p.db")
    with Peer.open(store, peer_id="p") as peer:
        write(peer, 1, n=1)
        want = peer.content_digest("default")
    result = CliRunner().invoke(cli, ["--store", store, "digest", "--partition", "default",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"partition": "default", "digest": want}


_keys = st.one_of(st.integers(-10**6, 10**6), st.text(max_size=6),
                  st.binary(min_size=12, max_size=12).map(ObjectId))
_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**60, 2**60), st.text(max_size=8),
              st.floats(allow_nan=False, allow_infinity=False)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(alphabet="abé_\U0001f600", min_size=1, max_size=4), inner,
        max_size=3),
    max_leaves=6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.dictionaries(_keys, _values, min_size=1, max_size=8), seed=st.integers(0, 99))
def test_digest_ignores_write_order_and_store_kind(tmp_path_factory, docs, seed) -> None:
    """The same document states, written in any order into SQLite or MongoDB, hash alike."""
    states = {}
    for key, value in docs.items():
        ejson_key = to_ejson(key)
        states[key_text(ejson_key)] = ({"_id": ejson_key, "v": to_ejson(value)}, "inc")
    items = list(states.items())
    digests = []
    for target in ("sqlite", "mongo"):
        random.Random(seed).shuffle(items)
        url = (str(tmp_path_factory.mktemp("d") / "s.db") if target == "sqlite"
               else mongomock.MongoClient()[f"t_{secrets.token_hex(4)}"])
        with Peer.open(url, peer_id="p") as peer:
            for text, state in items:
                peer._store.write_states("default", "things", {text: state})
            peer._store.commit()
            digests.append(content_digest(peer._store, "default"))
            peer._store.rollback()
    assert digests[0] == digests[1]
