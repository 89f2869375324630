"""Snapshots: a checkpoint's documents as a file, checked against its content digest.

A snapshot is JSON Lines: a header (``format``, ``version``, ``checkpoint``,
``partition``, ``digest``, ``documents``), then one canonical line per
document exactly as :mod:`txengine.digest` hashes them. The checkpoint
revision carries only the digest; the snapshot is a separate artifact that
only a cloning peer needs, and it proves itself: its body must hash to the
digest of a checkpoint the cloning peer received from the source.

Loading checks the whole file first (its digest, which fixes every line,
so the document count and order too), so a tampered snapshot writes
nothing, and hashes it again while writing, so a file changed between the
two reads is caught before the commit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from .engine import Progress, ProgressCallback, paused_gc
from .exceptions import InvalidInput, SnapshotMismatch
from .ops import State
from .stores.base import Store
from .values import canonical

FORMAT = "txengine-snapshot"
VERSION = 1
CHUNK = 5000
"""Documents written per store call: large enough for executemany, small for memory."""
BLOCK = 1 << 20
"""Bytes hashed per read by :func:`verify`: whole blocks, not a million per-line calls."""


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot file: which checkpoint, partition and digest, how many documents."""

    path: str
    checkpoint: str
    partition: str
    digest: str
    documents: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def write(path: str | Path, header: dict[str, Any], lines: Iterable[bytes],
          progress: ProgressCallback | None = None) -> SnapshotInfo:
    """Write a snapshot; refuse (and leave no file) when its body misses the header's digest.

    The source rebuilds the checkpoint's state from today's data and undo
    records; comparing with the digest the checkpoint recorded proves the
    rebuild before anyone downloads it.
    """
    target = Path(path)
    temp = target.with_name(target.name + ".part")
    h = hashlib.sha256()
    count = 0
    total = int(header["documents"])
    with temp.open("wb") as out:
        head = canonical({"type": "snapshot", "format": FORMAT, "version": VERSION, **header})
        out.write(head + b"\n")
        size = len(head) + 1
        for line in lines:
            h.update(line)
            out.write(line)
            size += len(line)
            count += 1
            if progress is not None and count % 100_000 == 0:
                progress(Progress("snapshot", count, total))
    actual = h.hexdigest()
    if actual != header["digest"] or count != total:
        temp.unlink()
        raise SnapshotMismatch(str(path), header["checkpoint"], header["digest"], actual)
    temp.replace(target)
    if progress is not None:
        progress(Progress("snapshot", count, total))
    return SnapshotInfo(str(path), header["checkpoint"], header["partition"], actual, count,
                        size)


def read_header(path: str | Path) -> dict[str, Any]:
    """Return a snapshot's header, or raise when the file is not a snapshot."""
    try:
        with Path(path).open("rb") as f:
            first = f.readline()
        header = json.loads(first)
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"snapshot {path} cannot be read ({exc}): fetch it again") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InvalidInput(f"{path} has no snapshot header: pass a file that"
                           " `Peer.write_snapshot` wrote")
    if header.get("version") != VERSION:
        raise InvalidInput(f"snapshot {path} is format version {header.get('version')!r};"
                           f" this txengine reads version {VERSION}: upgrade txengine")
    return header


def _blocks(path: str | Path) -> Iterator[bytes]:
    """Yield the body (everything after the header line) in blocks of :data:`BLOCK` bytes."""
    with Path(path).open("rb") as f:
        f.readline()
        while block := f.read(BLOCK):
            yield block


def verify(path: str | Path, checkpoint: str, digest: str) -> dict[str, Any]:
    """Check a whole snapshot against a checkpoint's digest before anything is written."""
    header = read_header(path)
    h = hashlib.sha256()
    for block in _blocks(path):
        h.update(block)
    actual = h.hexdigest()
    if actual != digest or header.get("digest") != digest or header.get(
            "checkpoint") != checkpoint:
        raise SnapshotMismatch(str(path), checkpoint, digest, actual)
    return header


def load(store: Store, path: str | Path, partition: str, checkpoint: str, digest: str,
         progress: ProgressCallback | None = None) -> int:
    """Write a verified snapshot's documents into ``store`` (uncommitted); return how many.

    The caller commits, together with the checkpoint's ledger rows, or rolls
    back on :class:`SnapshotMismatch` (the file changed after :func:`verify`).
    The cyclic garbage collector is paused: each batch allocates thousands of
    documents that reference counting frees anyway, and collecting them cost
    about a sixth of the load at 1,000,000 documents.
    """
    header = verify(path, checkpoint, digest)
    total = int(header.get("documents", 0))
    h = hashlib.sha256()
    loads = orjson.loads
    batch: dict[str, State] = {}
    collection = None
    done = 0
    with paused_gc(), Path(path).open("rb") as f:
        f.readline()
        for line in f:
            h.update(line)
            coll, key, inc, doc = loads(line)
            if coll != collection or len(batch) >= CHUNK:
                if batch:
                    store.write_states(partition, collection, batch)  # type: ignore[arg-type]
                    done += len(batch)
                    if progress is not None:
                        progress(Progress("snapshot", done, total))
                batch = {}
                collection = coll
            batch[key] = (doc, inc)
        if batch:
            store.write_states(partition, collection, batch)  # type: ignore[arg-type]
            done += len(batch)
    actual = h.hexdigest()
    if actual != digest:
        raise SnapshotMismatch(str(path), checkpoint, digest, actual)
    if progress is not None:
        progress(Progress("snapshot", done, total))
    return done
