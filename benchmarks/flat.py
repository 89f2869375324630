"""Scale: do a write, `heads` and a sync of 10 new revisions stay flat as history grows?

Run: python benchmarks/flat.py [--sizes 10000,1000000] [--runs 11] [--data DIR]

For each size N, two SQLite peers share N revisions (the linear history of
``sync.py``); then, on the open peers, it times one write, ``heads``, and a
sync of 10 new revisions (median of ``--runs``), and prints each against the
smallest size: the target is under 2x from 10,000 to 1,000,000. Opening a
peer still loads every descriptor (issue 10): that cost is printed apart.
Building the 1,000,000-revision pair takes minutes: ``--data DIR`` keeps
the peers there and reuses them on the next run (each run adds a few
revisions, nothing that moves the sizes).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sync import shared_history  # noqa: E402

from txengine import Peer  # noqa: E402


def build(tmp: Path, n: int) -> None:
    """Give two peers the same ``n`` revisions, unless ``tmp`` holds them from a past run."""
    if (tmp / "built").exists():
        return
    tmp.mkdir(parents=True, exist_ok=True)
    items = shared_history(n)
    for name in ("alice", "bob"):
        peer = Peer.open(str(tmp / f"{name}.db"), peer_id=name)
        for i in range(0, n, 20_000):
            peer.receive(items[i:i + 20_000])
        peer.upgrade("heads")
        peer.close()
    (tmp / "built").write_text(str(n))


def measure(n: int, runs: int, data: Path | None) -> dict[str, float]:
    tmp = data / str(n) if data else Path(tempfile.mkdtemp(prefix="txengine-bench-flat-"))
    if not data:  # --data keeps what it built for the next run
        atexit.register(shutil.rmtree, tmp, True)
    build(tmp, n)
    t = time.perf_counter()
    a = Peer.open(str(tmp / "alice.db"), peer_id="alice")
    a.heads()  # the first use loads the graph
    opened = time.perf_counter() - t
    b = Peer.open(str(tmp / "bob.db"), peer_id="bob")
    b.heads()  # loaded here, not inside the first timed sync
    counter = iter(range(time.time_ns() % n, 10**9))  # reused peers: new values each run

    def write() -> None:
        i = next(counter)
        with a.transaction(f"edit {i}") as tx:
            tx.update("customers", i % n, set={"email": f"new{i}@example.com"})

    writes, heads, syncs = [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        write()
        writes.append(time.perf_counter() - t)
        t = time.perf_counter()
        a.heads()
        heads.append(time.perf_counter() - t)
    for _ in range(runs):
        for _ in range(10):
            write()
        t = time.perf_counter()
        a.sync(b)
        syncs.append(time.perf_counter() - t)
    a.close()
    b.close()
    return {"write": statistics.median(writes), "heads": statistics.median(heads),
            "sync of 10 new": statistics.median(syncs), "open": opened}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--data", type=Path, default=None,
                        help="keep the built peers here and reuse them on later runs")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {n: measure(n, args.runs, args.data) for n in sizes}
    base = results[sizes[0]]
    print(f"| operation | {' | '.join(f'{n:,}' for n in sizes)} | ratio |")
    print(f"| --- | {' | '.join('---' for _ in sizes)} | --- |")
    for name in ("write", "heads", "sync of 10 new", "open"):
        cells = " | ".join(f"{results[n][name] * 1000:.2f} ms" for n in sizes)
        print(f"| {name} | {cells} | {results[sizes[-1]][name] / base[name]:.2f}x |")


if __name__ == "__main__":
    main()
