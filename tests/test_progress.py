"""Progress of a sync: totals from the descriptors, 100 % only once the data is there."""

from __future__ import annotations

import io
from pathlib import Path

from click.testing import CliRunner
from conftest import write

from txengine import cli as cli_module
from txengine.cli import ProgressBar, cli
from txengine.engine import Progress
from txengine.peer import Peer
from txengine.sync import decode


def test_sync_progress_counts_the_announced_and_reaches_the_total_only_when_integrated(
        pair) -> None:
    a, b = pair
    for k in range(5):
        write(a, k)
    seen: list[tuple[str, int, int]] = []

    def progress(p: Progress) -> None:
        seen.append((p.action, p.done, p.total))
        if p.done == p.total:
            assert b.get("items", 4) == {"_id": 4}, "100 % before the data was integrated"
        else:
            assert b.get("items", 4) is None

    b.sync(a, progress=progress, batch_size=2)
    assert seen == [("fetch", 0, 5), ("fetch", 2, 5), ("fetch", 4, 5), ("fetch", 5, 5)]


def test_sync_progress_stays_short_of_the_total_when_payloads_are_lost(pair) -> None:
    """Descriptors arrive, payloads do not: the total is known, done stays 0."""
    a, b = pair
    for k in range(3):
        write(a, k)
    seen: list[tuple[int, int]] = []

    def no_payloads(msgs: list[bytes]) -> list[bytes]:
        return [m for m in msgs if decode(m)["type"] != "payloads"]

    b.sync(a, progress=lambda p: seen.append((p.done, p.total)), channel=no_payloads)
    assert seen == [(0, 3), (0, 3)]
    assert b.status().announced == 3
    seen.clear()
    b.sync(a, progress=lambda p: seen.append((p.done, p.total)))
    assert seen == [(0, 3), (3, 3)] and b.get("items", 2) == {"_id": 2}


def test_sync_with_nothing_new_reports_no_progress(pair) -> None:
    a, b = pair
    write(a, 1)
    a.sync(b)
    seen: list[Progress] = []
    b.sync(a, progress=seen.append)
    assert seen == []


def test_a_pinned_peer_reports_the_total_once_fetched(pair) -> None:
    """A pinned peer does not integrate: its data is there once fetched."""
    a, b = pair
    write(a, 1)
    write(a, 2)
    b.sync(a)
    b.downgrade("-1")
    write(a, 3)
    seen: list[tuple[int, int]] = []
    b.sync(a, progress=lambda p: seen.append((p.done, p.total)))
    assert seen == [(0, 1), (1, 1)] and b.status().fetched == 2


def test_progress_bar_follows_a_growing_total() -> None:
    stream = io.StringIO()
    bar = ProgressBar("sync", file=stream)
    bar(Progress("fetch", 0, 2))
    bar(Progress("fetch", 1, 4))
    assert bar._bar.length == 4 and bar._bar.pos == 1
    bar.close()


def test_cli_sync_draws_a_bar_on_a_terminal(tmp_path: Path, monkeypatch) -> None:
    """`txengine sync` hands the peer a ProgressBar when stderr is a terminal."""
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    with Peer.open(b, peer_id="bob") as other:
        for k in range(3):
            write(other, k)
    drawn: list[tuple[int, int]] = []

    class Recorder(ProgressBar):
        def __call__(self, progress: Progress) -> None:
            drawn.append((progress.done, progress.total))
            super().__call__(progress)

    monkeypatch.setattr(cli_module, "ProgressBar", Recorder)
    monkeypatch.setattr(cli_module.click, "get_text_stream",
                        lambda name: _Terminal() if name == "stderr" else io.StringIO())
    result = CliRunner().invoke(cli, ["--store", a, "--peer-id", "alice", "sync", b])
    assert result.exit_code == 0, result.output
    assert drawn == [(0, 3), (3, 3)]
    assert result.stdout.startswith("received 3, sent 0, applied 3,")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True
