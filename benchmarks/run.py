"""The benchmark suite: every scenario beside its baseline, one table of medians and ratios.

Run: python benchmarks/run.py [--quick | --full]

Builds its own data in a temporary folder. ``--quick`` (CI) runs small sizes
in under a minute; the default runs the sizes docs/performance.md quotes;
``--full`` adds the graph at 1,000,000 revisions and bootstrap at 1,000,000
documents (3,000,000 revisions: long). Scenarios reuse the code of
benchmarks/core.py, sync.py and alembic_side_by_side.py.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import alembic_side_by_side  # noqa: E402
import core  # noqa: E402
import sync as sync_bench  # noqa: E402

from txengine import Peer  # noqa: E402
from txengine.checkpoint import bootstrap  # noqa: E402
from txengine.ledger import descriptor_from_row  # noqa: E402
from txengine.ops import Insert, Update  # noqa: E402
from txengine.revision import Revision, build, encode_ops  # noqa: E402
from txengine.values import dumps  # noqa: E402

Row = tuple[str, str, str, str, str]
"""scenario, size, baseline, txengine, ratio (or a note)."""


def _median(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _s(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 0.01 else f"{seconds:.2f} s"


def _row(name: str, size: str, base: float, ours: float) -> Row:
    return (name, size, _s(base), _s(ours), f"{ours / base:.2f}x")


def executemany_rows(path: str, rows: list[tuple[str, str, str, str]]) -> float:
    """Time a raw executemany of document rows into a fresh table shaped like txengine's."""
    engine = core.baseline_setup(path)[0]
    raw = engine.raw_connection()
    cur = raw.cursor()
    t = time.perf_counter()
    cur.executemany("INSERT INTO data (_partition, _key, doc, _incarnation) VALUES (?, ?, ?, ?)",
                    rows)
    raw.commit()
    elapsed = time.perf_counter() - t
    raw.close()
    engine.dispose()
    return elapsed


def live_rows(peer: Peer) -> list[tuple[str, str, str, str]]:
    return [(p, k, dumps(doc), inc) for (p, _c, k), (doc, inc) in peer.snapshot().items()]


# -- scenarios ------------------------------------------------------------------------------


def write(tmp: Path, n: int) -> list[Row]:
    base, ours = core.bench_write(n)
    rows = [_row("write: 1 insert/transaction vs bare SQLAlchemy (SQLite)", f"{n:,} interleaved",
                 base, ours)]
    if os.environ.get("TXENGINE_TEST_POSTGRES_URL"):
        rows.append(("write on PostgreSQL", "-", "-", "-", "not measured yet (core.py baseline"
                     " is SQLite-only)"))
    return rows


def replay(tmp: Path, n: int, runs: int) -> list[Row]:
    """upgrade heads / downgrade base of n revisions vs executemany of the rows they leave."""
    path = str(tmp / f"chain-{n}.db")
    peer = Peer.open(path, peer_id="bench")
    core.make_chain(peer, n, max(10, n // 10))
    ups, downs = [], []
    for _ in range(runs):
        ups.append(_timed(lambda: peer.upgrade("heads")))
        rows = live_rows(peer)
        downs.append(_timed(lambda: peer.downgrade("base")))
    peer.close()
    # One row per revision: what a replay writes at the least, with no history kept.
    rows = [(p, f"{k}.{i}", doc, inc) for i in range(n // len(rows) + 1)
            for p, k, doc, inc in rows][:n]
    base = _median(lambda: executemany_rows(str(tmp / f"rows-{time.time_ns()}.db"), rows), runs)
    size = f"{n:,} revisions"
    return [_row("replay: upgrade heads vs executemany of one resulting row per revision", size,
                 base,
                 statistics.median(ups)),
            _row("rollback: downgrade base vs executemany of the same rows", size, base,
                 statistics.median(downs))]


def _open_and_load(path: str) -> None:
    """Open a peer and use its graph once (it loads on first use), then close it."""
    with Peer.open(path, peer_id="bench") as peer:
        peer.heads()


def graph(tmp: Path, n: int) -> list[Row]:
    """Open, heads and history at n revisions (no baseline: the flat-cost check is 10k vs n)."""
    path = str(tmp / f"graph-{n}.db")
    with Peer.open(path, peer_id="bench") as peer:
        core.make_chain(peer, n, max(10, n // 10))
    opened = _timed(lambda: _open_and_load(path))
    with Peer.open(path, peer_id="bench") as peer:
        heads = _median(lambda: _timed(peer.heads), 5)
        history = _timed(peer.history)
        write_one = _median(lambda: _timed(lambda: core_write(peer)), 21)
    size = f"{n:,} revisions"
    return [("graph: open (load graph)", size, "-", _s(opened), ""),
            ("graph: heads", size, "-", _s(heads), ""),
            ("graph: history", size, "-", _s(history), ""),
            ("graph: one write on top", size, "-", _s(write_one), "")]


def core_write(peer: Peer) -> None:
    with peer.transaction("one more") as tx:
        tx.insert("extra", {"_id": time.perf_counter_ns()})


def sync(tmp: Path, shared: int, new: int) -> list[Row]:
    """k new over N shared: bytes moved against the new descriptors + payloads, round trips."""
    items = sync_bench.shared_history(shared)
    peers = []
    for name in ("alice", "bob"):
        peer = Peer.open(str(tmp / f"sync-{name}-{shared}.db"), peer_id=name)
        peer.receive(items)
        peer.upgrade("heads")
        peers.append(peer)
    a, b = peers
    size = 0
    for i in range(new):
        with a.transaction(f"edit {i}") as tx:
            tx.update("customers", i, set={"email": f"new{i}@example.com"})
        size += len(dumps(tx.revision.descriptor)) + len(tx.revision.payload)
    t = time.perf_counter()
    result = a.sync(b)
    elapsed = time.perf_counter() - t
    for peer in peers:
        peer.close()
    return [("sync: bytes moved vs new descriptors + payloads", f"{new} new / {shared:,} shared",
             f"{size:,} B", f"{result.bytes:,} B", f"{result.bytes / size:.2f}x"),
            ("sync: round trips, time", f"{new} new / {shared:,} shared", "3",
             f"{result.round_trips} ({_s(elapsed)})", "")]


def history_items(documents: int, per_document: int) -> Iterator[tuple[dict, bytes]]:
    """An insert per document, then ``per_document - 1`` updates of each, on one chain.

    Yielded one at a time: as a list, 3,000,000 revisions would take 16 GB.
    """
    parents: list[str] = []
    incarnation: dict[int, str] = {}
    start = int(time.time() * 1000) - documents * per_document - 10_000
    for seq in range(1, documents * per_document + 1):
        n, k = divmod(seq - 1, documents)
        if n == 0:
            op = Insert("customers", {"_id": k, "name": f"customer {k}",
                                      "email": f"c{k}@example.com", "n": 0})
        else:
            op = Update("customers", k, set={"n": n}, expect=incarnation[k], before={})
        rev = build(kind="data", payload=encode_ops([op]), partition="default",
                    parents=parents, origin="seed:0", seq=seq, hlc=(start + seq, 0),
                    message=f"r{seq}", collections=["customers"])
        if n == 0:
            incarnation[k] = rev.id
        parents = [rev.id]
        yield rev.descriptor, rev.payload


@dataclass
class BootstrapSource:
    """A source peer with a checkpoint and its snapshot, and the rows the baseline inserts."""

    path: str
    rev: Revision
    parents: list[dict]
    snapshot: Path
    snapshot_s: float
    rows: list[tuple[str, str, str, str]]


def bootstrap_source(tmp: Path, documents: int, per_document: int) -> BootstrapSource:
    """Build the source: ``documents`` x ``per_document`` revisions, then a checkpoint."""
    source = str(tmp / f"boot-source-{documents}.db")
    t = time.perf_counter()
    with Peer.open(source, peer_id="hub") as hub:
        hub.trust_sequencer("hub")
        items = history_items(documents, per_document)
        while chunk := list(itertools.islice(items, 20_000)):
            hub.receive(chunk)
        hub.upgrade("heads")
        info = hub.checkpoint()
        snap = tmp / f"snapshot-{documents}.jsonl"
        snapshot_s = _timed(lambda: hub.write_snapshot(info.id, snap))
        rev = hub.revision(info.id)
        parents = [descriptor_from_row(r) for r in hub._ledger.full_rows(
            list(rev.parents)).values()]
        rows = live_rows(hub)
    print(f"  bootstrap source: {documents:,} documents, {documents * per_document:,} revisions"
          f" built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return BootstrapSource(source, rev, parents, snap, snapshot_s, rows)


def load_checkpoint(tmp: Path, src: BootstrapSource) -> float:
    """Time opening a new SQLite peer and bootstrapping it from the source's snapshot."""
    target = str(tmp / f"boot-{time.time_ns()}.db")
    started = time.perf_counter()
    with Peer.open(target, peer_id="copy") as copy:
        bootstrap(copy, src.rev, src.parents, src.snapshot)
    return time.perf_counter() - started


def bootstrap_rows(tmp: Path, src: BootstrapSource, documents: int, per_document: int,
                   full_replay: bool, runs: int, clone: bool = True) -> list[Row]:
    """The bootstrap rows of the table, from a built source (loads interleaved, medians)."""
    bases, loads = [], []
    for _ in range(runs):
        bases.append(executemany_rows(str(tmp / f"raw-{time.time_ns()}.db"), src.rows))
        loads.append(load_checkpoint(tmp, src))
    base, ours = statistics.median(bases), statistics.median(loads)
    print(f"  bootstrap runs: executemany {', '.join(map(_s, bases))};"
          f" load {', '.join(map(_s, loads))}", file=sys.stderr)
    size = f"{documents:,} docs / {documents * per_document:,} revisions"
    out = [_row("bootstrap: load snapshot (checkpoint) vs raw executemany", size, base, ours),
           ("bootstrap: write the snapshot on the source", size, "-", _s(src.snapshot_s), "")]
    if clone:
        clone_s = _timed(lambda: Peer.clone(src.path, str(tmp / f"c-{time.time_ns()}.db"), "c",
                                            from_checkpoint=True).close())
        out.append(_row("bootstrap: clone --checkpoint end to end vs raw executemany", size,
                        base, clone_s))
    if full_replay:
        replay_s = _timed(lambda: Peer.clone(src.path, str(tmp / f"r-{time.time_ns()}.db"),
                                             "r").close())
        out.append(_row("bootstrap: clone by full replay vs raw executemany", size, base,
                        replay_s))
    return out


def bootstrap_scenario(tmp: Path, documents: int, per_document: int, full_replay: bool,
                       runs: int) -> list[Row]:
    """A new SQLite peer from a checkpoint's snapshot vs full replay vs raw executemany."""
    src = bootstrap_source(tmp, documents, per_document)
    return bootstrap_rows(tmp, src, documents, per_document, full_replay, runs)


def alembic(tmp: Path, n: int) -> list[Row]:
    """Alembic's and txengine's ``upgrade head`` / ``downgrade base`` on n linear scripts."""
    root = tmp / "alembic"
    root.mkdir()
    ini = alembic_side_by_side.make_project(root, n)
    py = sys.executable
    tx_dir = tmp / "txengine-alembic"
    adopt = [py, "-m", "txengine.cli", "--peer-id", "bench", "--store",
             f"sqlite:///{tx_dir / 'tx.db'}", "init", str(tx_dir), "--from-alembic",
             str(root / "migrations")]
    alembic_side_by_side.timed(adopt, 600, tmp)
    out = []
    for name, args in (("upgrade head", ["upgrade", "head"]),
                       ("downgrade base", ["downgrade", "base"])):
        base = alembic_side_by_side.timed([py, "-m", "alembic", "-c", str(ini), *args], 600,
                                          root)[0]
        ours = alembic_side_by_side.timed([py, "-m", "txengine.cli", "-c",
                                           str(tx_dir / "alembic.ini"), *args], 600, tx_dir)[0]
        out.append(_row(f"alembic: {name} (process, Alembic = baseline)",
                        f"{n:,} scripts", base, ours))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (CI, < 1 minute)")
    size.add_argument("--full", action="store_true", help="add 1,000,000-revision sizes")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="txengine-bench-"))
    atexit.register(shutil.rmtree, tmp, True)
    started = time.perf_counter()
    rows: list[Row] = []
    if args.quick:
        plan = [lambda: write(tmp, 200), lambda: replay(tmp, 5_000, 1),
                lambda: graph(tmp, 10_000), lambda: sync(tmp, 5_000, 20),
                lambda: bootstrap_scenario(tmp, 5_000, 1, True, 1),
                lambda: alembic(tmp, 50)]
    else:
        graphs = [10_000, 100_000] + ([1_000_000] if args.full else [])
        boots = [(100_000, 3)] + ([(1_000_000, 3)] if args.full else [])
        plan = [lambda: write(tmp, 2000), lambda: replay(tmp, 100_000, 3),
                *[(lambda n=n: graph(tmp, n)) for n in graphs],
                lambda: sync(tmp, 100_000, 100),
                *[(lambda d=d, k=k: bootstrap_scenario(tmp, d, k, d <= 100_000, 3))
                  for d, k in boots],
                lambda: alembic(tmp, 2000)]
    for step in plan:
        t = time.perf_counter()
        got = step()
        rows += got
        print(f"  {got[0][0].split(':')[0]} done in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
    print_table(f"{sa.__name__} {sa.__version__}, Python {sys.version.split()[0]}, total"
                f" {time.perf_counter() - started:.0f} s", rows)


def print_table(title: str, rows: list[Row]) -> None:
    """Print the suite's table (Markdown, as docs/performance.md quotes it) under ``title``."""
    print(f"\n{title}\n")
    print("| scenario | size | baseline | txengine | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
