"""Bootstrap from a checkpoint at one size: load the snapshot vs a raw executemany.

Run: python benchmarks/bootstrap.py [--documents N] [--per-document K] [--runs R]
                                     [--keep DIR] [--load-only] [--replay] [--profile]

The ``bootstrap`` rows of benchmarks/run.py (same code, imported) at one size,
1,000,000 documents made by 3,000,000 revisions by default, without the
suite's other scenarios. Building that source takes minutes and several GiB,
so ``--keep DIR`` keeps it (source peer, snapshot, baseline rows) in DIR and
reuses it on the next run: iterate on the load side without rebuilding.
Adds the peak RSS of a fresh process that only bootstraps (``spawn``ed
before the build, so it does not count the builder's memory).
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import pickle
import pstats
import resource
import shutil
import sys
import tempfile
import time
from multiprocessing.pool import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402
    BootstrapSource,
    Row,
    _s,
    bootstrap_rows,
    bootstrap_source,
    load_checkpoint,
    print_table,
)


def _source(keep: Path | None, scratch: Path, documents: int,
            per_document: int) -> BootstrapSource:
    """Build the source, or reuse the one ``--keep`` saved for the same size."""
    if keep is None:
        return bootstrap_source(scratch, documents, per_document)
    keep.mkdir(parents=True, exist_ok=True)
    saved = keep / f"source-{documents}x{per_document}.pickle"
    if saved.exists():
        with saved.open("rb") as f:
            src = pickle.load(f)
        print(f"  bootstrap source: reused {saved}", file=sys.stderr)
        return src
    src = bootstrap_source(keep, documents, per_document)
    with saved.open("wb") as f:
        pickle.dump(src, f, protocol=pickle.HIGHEST_PROTOCOL)
    return src


def _fresh_load(scratch: str, src: BootstrapSource) -> tuple[float, int, int]:
    """In a spawned process: (seconds, peak RSS before, peak RSS after) of one bootstrap."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = load_checkpoint(Path(scratch), src)
    return seconds, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_row(pool: Pool, scratch: Path, src: BootstrapSource, size: str) -> Row:
    """Peak RSS of a process that imports txengine and bootstraps once (ru_maxrss, KiB)."""
    light = BootstrapSource(src.path, src.rev, src.parents, src.snapshot, src.snapshot_s, [])
    seconds, before, after = pool.apply(_fresh_load, (str(scratch), light))
    return ("bootstrap: peak RSS of a fresh process loading the snapshot", size,
            f"{before / 1024:.0f} MiB after imports", f"{after / 1024:.0f} MiB",
            f"load {_s(seconds)}")


def profile(scratch: Path, src: BootstrapSource) -> None:
    """Print the top of a cProfile of one load (cumulative time) to stderr."""
    prof = cProfile.Profile()
    prof.runcall(load_checkpoint, scratch, src)
    pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--per-document", type=int, default=3,
                        help="revisions per document: one insert, then updates")
    parser.add_argument("--runs", type=int, default=3, help="median of this many loads")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep the built source in DIR and reuse it when present")
    parser.add_argument("--load-only", action="store_true",
                        help="skip the clone --checkpoint end-to-end row")
    parser.add_argument("--replay", action="store_true",
                        help="add the clone-by-full-replay row (very long at 1,000,000)")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile of one extra load to stderr")
    args = parser.parse_args()
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="txengine-bootstrap-"))
    # Started while this process is small: a child's ru_maxrss starts at its parent's
    # RSS when it is forked (Linux keeps it across exec), so a later one would report
    # the builder's gigabytes.
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        src = _source(args.keep, scratch, args.documents, args.per_document)
        size = f"{args.documents:,} docs / {args.documents * args.per_document:,} revisions"
        rows = bootstrap_rows(scratch, src, args.documents, args.per_document, args.replay,
                              args.runs, clone=not args.load_only)
        rows.append(memory_row(pool, scratch, src, size))
        if args.profile:
            profile(scratch, src)
    finally:
        pool.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(f"Python {sys.version.split()[0]}, {args.runs} runs (medians), total"
                f" {time.perf_counter() - started:.0f} s", rows)


if __name__ == "__main__":
    main()
