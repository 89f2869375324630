"""Load: many device peers write and sync concurrently through one HTTP server.

Loopback only, bounded in count and time. By default 50 client peers
(SQLite files in a temporary folder) write 200 revisions each, in bursts,
syncing after each burst and then until they hold every revision, through a
``txengine serve --workers 2`` backed by PostgreSQL (``--store``, or a fresh
schema in ``TXENGINE_TEST_POSTGRES_URL``, dropped after). Clients are threads
in a few processes (``--procs``), one Peer and one HTTP connection each.

Afterwards every peer and the server must hold equal data and all
``peers x writes`` revisions, none lost or duplicated (a counter every
revision increments must equal the count), all visible on every peer within
``--deadline`` seconds of the last write. Prints revisions/s accepted by the
server and the p50/p99 time from a write to its visibility on every other
peer. Exits 1 when a check fails.

    python benchmarks/load.py                      # 50 x 200: 3-5 minutes on 2 cores
    python benchmarks/load.py --peers 8 --writes 30   # a quick run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from txengine.peer import Peer  # noqa: E402
from txengine.transport import client  # noqa: E402


@contextmanager
def fresh_schema(base: str) -> Iterator[str]:
    """Yield a URL on a new, empty PostgreSQL schema; drop it after."""
    schema = f"load_{secrets.token_hex(4)}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        sep = "&" if "?" in base else "?"
        yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(store: str, workers: int, log: Path) -> Iterator[str]:
    """Run ``txengine serve`` on a free loopback port; yield its URL; stop it after."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "txengine.cli", "--store", store, "--peer-id", "hub",
             "serve", "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()


# -- a client process -----------------------------------------------------------------------


def device(name: str, store: str, url: str, token: str, args: dict[str, Any], total: int,
           out: dict[str, Any]) -> None:
    """One device: write in bursts, sync after each, then sync until it holds everything."""
    rng = random.Random(name)
    written: dict[str, float] = {}
    seen: dict[str, float] = {}
    rounds = 0
    with Peer.open(store, name) as peer, client.HttpRemote(url, token, timeout=120) as remote:
        left = args["writes"]
        stop_at = None
        while True:
            for _ in range(min(args["burst"], left)):
                with peer.transaction(f"{name} {left}") as tx:
                    tx.insert("items", {"_id": f"{name}-{left}", "by": name})
                    if left == args["writes"]:
                        tx.insert("counters", {"_id": name, "n": 1})
                    else:  # a revision applied twice anywhere would count twice
                        tx.update("counters", name, inc={"n": 1})
                assert tx.revision is not None
                written[tx.revision.id] = time.time()
                left -= 1
            result = client.sync(peer, url, token, remote=remote)
            now = time.time()
            rounds += 1
            for rev_id in result.local.applied:
                seen.setdefault(rev_id, now)
            if not left and stop_at is None:
                stop_at = time.monotonic() + args["deadline"] + 60
            if not left and len(written) + len(seen) >= total:  # every revision new once
                break
            if stop_at is not None and time.monotonic() > stop_at:
                break
            time.sleep(rng.uniform(0.5, 1.5) * args["pause"])
        out[name] = {"written": written, "seen": seen, "rounds": rounds,
                     "snapshot": sorted(json.dumps([list(k), v], sort_keys=True)
                                        for k, v in peer.snapshot().items()),
                     "revisions": sorted(r.id for r in peer.history())}


def client_process(names: list[str], folder: str, url: str, tokens: dict[str, str],
                   args: dict[str, Any], total: int, result_path: str) -> None:
    out: dict[str, Any] = {}
    threads = [threading.Thread(target=device, args=(
        n, f"sqlite:///{folder}/{n}.db", url, tokens[n], args, total, out)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(result_path).write_text(json.dumps(out))


# -- the run -------------------------------------------------------------------------------------


def push_rate(url: str, token: str, folder: Path, count: int) -> float:
    """Return revisions/s of one sync pushing ``count`` new revisions: the server's intake
    (checks, ledger, integration), apart from what simulating many devices costs here."""
    with Peer.open(f"sqlite:///{folder}/pusher.db", "pusher") as peer:
        for i in range(count):
            with peer.transaction(f"push {i}") as tx:
                tx.insert("pushed", {"_id": i})
        started = time.perf_counter()
        result = client.sync(peer, url, token)
        elapsed = time.perf_counter() - started
    assert result.remote.fetched == count, result.remote
    return count / elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(store: str, args: argparse.Namespace, folder: Path) -> bool:
    names = [f"device{i:03d}" for i in range(args.peers)]
    total = args.peers * args.writes
    with Peer.open(store, "hub") as hub:
        tokens = {n: hub.peers_add(n, ["*"], ["*"]).token for n in names}
    options = {"writes": args.writes, "burst": args.burst, "pause": args.pause,
               "deadline": args.deadline}
    with server(store, args.workers, folder / "server.log") as url:
        ctx = multiprocessing.get_context("spawn")
        groups = [names[i::args.procs] for i in range(args.procs)]
        results = [str(folder / f"result{i}.json") for i in range(args.procs)]
        started = time.time()
        procs = [ctx.Process(target=client_process, args=(g, str(folder), url, tokens, options,
                                                          total, r))
                 for g, r in zip(groups, results, strict=True) if g]
        for p in procs:
            p.start()
        accepted_at = None
        auth = {"Authorization": f"Bearer {tokens[names[0]]}"}
        while any(p.is_alive() for p in procs):
            if accepted_at is None:
                held = httpx.get(f"{url}/v1/status", headers=auth, timeout=60).json()
                if held["revisions"] >= total:
                    accepted_at = time.time()
            time.sleep(0.5)
        for p in procs:
            p.join()
        finished = time.time()
        with Peer.open(store) as hub:
            server_revisions = sorted(r.id for r in hub.history())
            server_snapshot = sorted(json.dumps([list(k), v], sort_keys=True)
                                     for k, v in hub.snapshot().items())
            counters = {n: (hub.get("counters", n) or {}).get("n") for n in names}
        intake = push_rate(url, tokens[names[0]], folder, args.push) if args.push else None
    devices: dict[str, Any] = {}
    for r in results:
        devices.update(json.loads(Path(r).read_text()))

    written = {rev: (name, t) for name, d in devices.items() for rev, t in d["written"].items()}
    first_write = min(t for _, t in written.values())
    last_write = max(t for _, t in written.values())
    latencies, late = [], 0
    for rev, (writer, t) in written.items():
        times = [d["seen"].get(rev) for name, d in devices.items() if name != writer]
        if any(x is None for x in times):
            late += 1
            continue
        latencies.append(max(times) - t)  # type: ignore[type-var, operator]
    visible_by = max(max(d["seen"].values(), default=last_write) for d in devices.values())
    checks = {
        "every revision written": len(written) == total,
        "server holds all, none duplicated": server_revisions == sorted(written),
        "every peer holds all": all(d["revisions"] == server_revisions
                                    for d in devices.values()),
        "equal data everywhere": all(d["snapshot"] == server_snapshot for d in devices.values()),
        "counters exact (nothing applied twice)": set(counters.values()) == {args.writes},
        "all visible on every peer": late == 0,
        f"visible within {args.deadline:.0f}s of the last write":
            visible_by - last_write <= args.deadline,
    }
    accepted = (accepted_at or finished) - first_write
    print(f"{args.peers} peers x {args.writes} writes = {total} revisions, server with"
          f" {args.workers} workers on {store.split('://')[0]}, {args.procs} client processes")
    print(f"accepted: {total} revisions in {accepted:.1f}s = {total / accepted:.0f} revisions/s")
    print(f"writes took {last_write - first_write:.1f}s; every peer held everything"
          f" {visible_by - last_write:.1f}s after the last write; run {finished - started:.1f}s")
    if latencies:
        print(f"write -> visible on every other peer: p50 {percentile(latencies, 0.5):.2f}s,"
              f" p99 {percentile(latencies, 0.99):.2f}s, max {max(latencies):.2f}s")
    if intake is not None:
        print(f"server intake alone: one peer pushed {args.push} revisions in one sync at"
              f" {intake:.0f} revisions/s")
    print(f"sync rounds per peer: {sum(d['rounds'] for d in devices.values()) / len(devices):.1f}")
    for name, ok in checks.items():
        print(f"  {'ok ' if ok else 'FAIL'} {name}")
    return all(checks.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=50, help="client peers (default 50)")
    parser.add_argument("--writes", type=int, default=200, help="writes per peer (default 200)")
    parser.add_argument("--burst", type=int, default=20, help="writes between syncs (20)")
    parser.add_argument("--pause", type=float, default=1.0,
                        help="mean seconds between a peer's syncs (1.0)")
    parser.add_argument("--workers", type=int, default=2, help="server processes (2)")
    parser.add_argument("--procs", type=int, default=2, help="client processes (2)")
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="seconds after the last write by which all must be visible (120)")
    parser.add_argument("--push", type=int, default=2000,
                        help="then time one peer pushing this many revisions (2000; 0: skip)")
    parser.add_argument("--store", help="server store URL (default: a fresh schema in"
                                        " $TXENGINE_TEST_POSTGRES_URL)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="txengine-load-") as folder:
        if args.store:
            return 0 if run(args.store, args, Path(folder)) else 1
        base = os.environ.get("TXENGINE_TEST_POSTGRES_URL")
        if not base:
            raise SystemExit("pass --store URL or set TXENGINE_TEST_POSTGRES_URL")
        with fresh_schema(base) as store:
            return 0 if run(store, args, Path(folder)) else 1


if __name__ == "__main__":
    sys.exit(main())
