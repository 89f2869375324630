"""Clone: a new peer bootstrapped by replay of another's revisions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from txengine.cli import cli
from txengine.engine import Progress
from txengine.exceptions import InvalidInput
from txengine.peer import Peer


def fill(peer: Peer, count: int, partitions: tuple[str, ...] = ("default",)) -> None:
    """Write ``count`` revisions: inserts, then updates of earlier keys, across partitions."""
    for n in range(count):
        partition = partitions[n % len(partitions)]
        with peer.transaction(f"rev {n}", partition=partition) as tx:
            if n < max(1, count // 2):
                tx.insert("items", {"_id": n, "n": n})
            else:
                key = n - count // 2
                tx.update("items", key, {"n": -n}) if partitions[key % len(partitions)] \
                    == partition else tx.insert("items", {"_id": n, "n": n})


def heads(peer: Peer) -> list[str]:
    return sorted(h.id for h in peer.heads())


def test_clone_gives_equal_data_heads_and_a_clean_replay(store_url: str, new_store) -> None:
    seen: list[Progress] = []
    with Peer.open(store_url, peer_id="source") as source:
        fill(source, 300, ("default", "user:1"))
        with Peer.clone(store_url, new_store(), "copy", progress=seen.append) as copy:
            assert copy.snapshot() == source.snapshot()
            assert heads(copy) == heads(source)
            assert len(copy.history()) == 300
            assert copy.verify(replay=True).ok
            assert copy.status().fetched == 0
        assert source.status().unsent == 0, "the source learns the clone holds its revisions"
    assert (seen[0].done, seen[-1].done, seen[-1].total) == (0, 300, 300)
    assert all(p.done < p.total for p in seen[:-1])


def test_clone_of_one_partition_takes_only_that_partition(store_url: str, new_store) -> None:
    with Peer.open(store_url, peer_id="source") as source:
        fill(source, 40, ("default", "user:1"))
        with Peer.clone(store_url, new_store(), "copy", partition="user:1") as copy:
            wanted = {k: v for k, v in source.snapshot().items() if k[0] == "user:1"}
            assert copy.snapshot() == wanted
            assert {h.partition for h in copy.heads()} == {"user:1"}
            assert copy.verify(replay=True).ok


def test_clone_into_a_store_with_revisions_is_refused(store_url: str, new_store) -> None:
    target = new_store()
    with Peer.open(target, peer_id="copy") as copy:
        fill(copy, 1)
    with Peer.open(store_url, peer_id="source") as source:
        fill(source, 2)
    with pytest.raises(InvalidInput) as info:
        Peer.clone(store_url, target, "copy")
    assert str(info.value) == (f"store {target!r} already holds 1 revisions: clone needs an"
                               " empty store")


def test_cli_clone(tmp_path: Path) -> None:
    source, target = str(tmp_path / "source.db"), str(tmp_path / "copy.db")
    with Peer.open(source, peer_id="source") as peer:
        fill(peer, 10)
        want = heads(peer)
    result = CliRunner().invoke(cli, ["--store", target, "--peer-id", "copy", "clone", source,
                                      "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["peer"], out["revisions"], sorted(out["heads"])) == ("copy", 10, want)
    again = CliRunner().invoke(cli, ["--store", target, "clone", source])
    assert again.exit_code == 1 and "clone needs an empty store" in again.output


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TXENGINE_SLOW_TESTS"),
                    reason="set TXENGINE_SLOW_TESTS=1 to clone 10,000 revisions")
def test_clone_of_ten_thousand_revisions(tmp_path: Path) -> None:
    source_url, target = str(tmp_path / "source.db"), str(tmp_path / "copy.db")
    with Peer.open(source_url, peer_id="source") as source:
        fill(source, 10_000, ("default", "user:1", "user:2"))
        with Peer.clone(source_url, target, "copy") as copy:
            assert copy.snapshot() == source.snapshot()
            assert heads(copy) == heads(source)
            assert copy.verify(replay=True).ok
