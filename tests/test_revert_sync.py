"""Distributed undo: a revert spreads like any revision; a pinned peer stays where it was."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import strict, write

from txengine.cli import cli
from txengine.exceptions import PinnedPeer
from txengine.peer import Peer
from txengine.sync import SyncEvent


@pytest.fixture
def trio(store_url: str, new_store: Any) -> Iterator[tuple[Peer, Peer, Peer]]:
    """Three empty peers: alice on the backend under test, bob and carol on others."""
    peers = [Peer.open(store_url, peer_id="alice"), Peer.open(new_store(), peer_id="bob"),
             Peer.open(new_store(), peer_id="carol")]
    try:
        yield peers[0], peers[1], peers[2]
    finally:
        for p in peers:
            p.close()


def update(peer: Peer, key: Any, **fields: Any) -> str:
    with peer.transaction(f"update {key}") as tx:
        tx.update("items", key, set=fields)
    assert tx.revision is not None
    return tx.revision.id


def relay(a: Peer, b: Peer, c: Peer) -> None:
    """Sync along a line, a - b - c and back: c hears a only through b."""
    a.sync(b)
    b.sync(c)
    a.sync(b)


def test_a_revert_on_one_peer_undoes_the_change_on_every_peer_after_sync(trio) -> None:
    a, b, c = trio
    write(a, 1, v="old")
    relay(a, b, c)
    with a.transaction("change") as tx:
        tx.update("items", 1, set={"v": "new"})
        tx.insert("items", {"_id": 2, "v": "added"})
    change = tx.revision.id
    relay(a, b, c)
    assert c.get("items", 1) == {"_id": 1, "v": "new"} and c.get("items", 2) is not None
    revert = a.revert(change)
    assert revert is not None and revert.origin == "alice:0"
    relay(a, b, c)
    for peer in (a, b, c):
        assert peer.get("items", 1) == {"_id": 1, "v": "old"}, peer.peer_id
        assert peer.get("items", 2) is None, peer.peer_id
        assert revert.id in peer._engine.applied and change in peer._engine.applied
        assert peer.verify(replay=True).ok, peer.peer_id
    assert strict(a.snapshot()) == strict(b.snapshot()) == strict(c.snapshot())


def test_a_revert_leaves_a_later_change_relayed_from_a_third_peer_in_place(trio) -> None:
    """Carol changes one field after the reverted change; it reaches alice through bob
    before she reverts: her revert restores only the field that still holds her value."""
    a, b, c = trio
    write(a, 1, v="old", w="old")
    change = update(a, 1, v="new", w="new")
    relay(a, b, c)
    update(c, 1, v="carol")
    relay(c, b, a)
    a.revert(change)
    relay(a, b, c)
    for peer in (a, b, c):
        assert peer.get("items", 1) == {"_id": 1, "v": "carol", "w": "old"}, peer.peer_id
        assert peer.verify(replay=True).ok
    assert strict(a.snapshot()) == strict(b.snapshot()) == strict(c.snapshot())


@pytest.mark.xfail(strict=True, reason="revert's compare-and-set is decided when the revert is"
                   " written: a concurrent change it did not see is overwritten, unaudited")
def test_a_revert_leaves_a_concurrent_change_by_a_third_peer_in_place(trio) -> None:
    """Carol's change sorts before alice's revert but alice has not seen it: DESIGN.md
    says the revert restores only where the document still holds the reverted value."""
    a, b, c = trio
    write(a, 1, v="old")
    change = update(a, 1, v="new")
    relay(a, b, c)
    update(c, 1, v="carol")
    time.sleep(0.005)  # the revert's hlc is above carol's: it sorts after her change
    a.revert(change)
    relay(a, b, c)
    relay(c, b, a)
    assert strict(a.snapshot()) == strict(c.snapshot())
    assert a.get("items", 1) == {"_id": 1, "v": "carol"}


def test_a_pinned_peer_stays_where_it_was_through_a_sync_until_upgrade(pair) -> None:
    a, b = pair
    write(a, 1, v=1)
    change = update(a, 1, v=2)
    a.sync(b)
    b.downgrade("-1")
    assert b.pinned and b.get("items", 1) == {"_id": 1, "v": 1}
    before, applied = strict(b.snapshot()), set(b._engine.applied)
    revert = a.revert(change)
    assert revert is not None
    extra = write(a, 2)
    events: list[SyncEvent] = []
    result = b.sync(a, events=events.append)
    assert strict(b.snapshot()) == before and set(b._engine.applied) == applied
    assert result.local.applied == [] and result.local.fetched == 2
    assert [e.kind for e in events if e.revision == revert.id] == ["announced", "fetched"]
    status = b.status()
    assert (status.pinned, status.announced, status.fetched) == (True, 0, 3)
    with pytest.raises(PinnedPeer):
        write(b, 3)
    b.upgrade("heads")
    assert not b.pinned
    assert b.get("items", 1) == {"_id": 1, "v": 1} and b.get("items", 2) == {"_id": 2}
    assert strict(b.snapshot()) == strict(a.snapshot())
    assert {revert.id, extra, change} <= set(b._engine.applied)
    assert b.verify(replay=True).ok


def test_status_shows_the_pin_in_text_and_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with Peer.open(url, peer_id="alice") as peer:
        write(peer, 1)
        write(peer, 2)
    runner = CliRunner()

    def status() -> tuple[str, dict[str, Any]]:
        text = runner.invoke(cli, ["--store", url, "status"])
        as_json = runner.invoke(cli, ["--store", url, "status", "--json"])
        assert text.exit_code == as_json.exit_code == 0, (text.output, as_json.output)
        return text.stdout.splitlines()[0], json.loads(as_json.stdout)

    assert status()[0] == "peer alice (origin alice:0)"
    assert status()[1]["pinned"] is False
    assert runner.invoke(cli, ["--store", url, "downgrade", "-1"]).exit_code == 0
    line, data = status()
    assert line == "peer alice (origin alice:0) pinned"
    assert data["pinned"] is True and data["fetched"] == 1
    assert runner.invoke(cli, ["--store", url, "upgrade"]).exit_code == 0
    line, data = status()
    assert line == "peer alice (origin alice:0)" and data["pinned"] is False
