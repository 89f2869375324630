"""Sync I speed: 100 new revisions between two peers that share 100,000.

Run: python benchmarks/sync.py [--quick] [--shared N] [--new M]

Reports the bytes the exchange moved against the size of the new revisions'
descriptors + payloads (target: at most 2x) and its round trips (target: at
most 3), and the time it took.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from txengine import Peer  # noqa: E402
from txengine.ops import Insert  # noqa: E402
from txengine.revision import build, encode_ops  # noqa: E402


def shared_history(n: int) -> list[tuple[dict, bytes]]:
    start = int(time.time() * 1000) - n - 10_000
    items = []
    parents: list[str] = []
    for i in range(n):
        doc = {"_id": i, "name": f"customer {i}", "email": f"c{i}@example.com", "n": i}
        rev = build(kind="data", payload=encode_ops([Insert("customers", doc)]),
                    partition="default", parents=parents, origin="seed:0", seq=i + 1,
                    hlc=(start + i, 0), message=f"add {i}", collections=["customers"])
        parents = [rev.id]
        items.append((rev.descriptor, rev.payload))
    return items


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="10,000 shared instead of 100,000")
    parser.add_argument("--shared", type=int, default=None)
    parser.add_argument("--new", type=int, default=100)
    args = parser.parse_args()
    shared = args.shared or (10_000 if args.quick else 100_000)
    tmp = Path(tempfile.mkdtemp(prefix="txengine-bench-sync-"))
    atexit.register(shutil.rmtree, tmp, True)
    items = shared_history(shared)
    peers = []
    for name in ("alice", "bob"):
        t = time.perf_counter()
        peer = Peer.open(str(tmp / f"{name}.db"), peer_id=name)
        peer.receive(items)
        peer.upgrade("heads")
        peers.append(peer)
        print(f"{name}: {shared:,} shared revisions recorded and applied in"
              f" {time.perf_counter() - t:.1f}s", file=sys.stderr)
    a, b = peers
    new = []
    for i in range(args.new):
        with a.transaction(f"edit {i}") as tx:
            tx.update("customers", i, set={"email": f"new{i}@example.com"})
        new.append(tx.revision)
    size = sum(len(json.dumps(r.descriptor, separators=(",", ":"))) + len(r.payload)
               for r in new)
    t = time.perf_counter()
    result = a.sync(b)
    elapsed = time.perf_counter() - t
    assert all(r.id in b._engine.applied for r in new)
    ratio = result.bytes / size
    print(f"sync of {args.new} new over {shared:,} shared: {result.bytes:,} bytes moved for"
          f" {size:,} bytes of descriptors + payloads = {ratio:.2f}x (target <= 2x),"
          f" {result.round_trips} round trips (target <= 3), {result.messages} messages,"
          f" {elapsed * 1000:.0f} ms")
    again = a.sync(b)
    print(f"sync with nothing new: {again.bytes:,} bytes, {again.round_trips} round trip(s)")
    for peer in peers:
        peer.close()


if __name__ == "__main__":
    main()
