"""Clone by replay: bootstrap an empty peer from another store's data revisions in one pass.

A clone could go through sync's messages (descriptors announced and
recorded, payloads fetched and filled in, then integrated), and does when
the history holds code or barriers, whose trust rules live in sync. For a
history of data revisions only, that is three ledger writes and two checks
a revision where one of each will do: the new peer is empty, so nothing it
holds can sort after what arrives. The source's revisions are read in
canonical order, a batch at a time; each batch passes the same intake
checks as any revision from outside (shape, checksum, digest, ops, parents,
hlc order, signatures under a root key) and is applied and recorded in one
transaction, one INSERT a revision and one audit row a batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .engine import Progress, ProgressCallback
from .ledger import DESCRIPTOR_COLUMNS, descriptor_from_row, payload_of

if TYPE_CHECKING:
    from .peer import Peer


def replayable(source: Peer, partition: str | None) -> list[str] | None:
    """Return the ids a clone takes from ``source`` in canonical order, or None when any of
    them is not a data revision (the general path, through sync, must run)."""
    engine = source._engine
    graph, held = engine.graph, engine.held
    ids = [r for p in sorted(held.partitions()) if partition in (None, p)
           for r in held.after(p, {}) if r in graph]
    if any(graph.get(r).kind != "data" for r in ids):
        return None
    return graph.canonical_order(ids)


def replay(source: Peer, target: Peer, ids: list[str], batch_size: int,
           progress: ProgressCallback | None = None) -> int:
    """Replay ``ids`` (from :func:`replayable`) from ``source`` into the empty ``target``.

    Each batch is checked whole and committed whole: bad input refuses its
    batch with the intake's one-line error, and what earlier batches
    committed is a consistent prefix a plain ``sync`` completes. Returns the
    number of revisions taken.
    """
    engine = target._engine
    trust = target._trust()
    total = len(ids)
    if progress is not None:
        progress(Progress("fetch", 0, total))
    for start in range(0, total, batch_size):
        chunk = ids[start:start + batch_size]
        target._ledger.keep_lease()  # a long clone outlasts it
        rows = source._ledger.rows(chunk, *DESCRIPTOR_COLUMNS, "payload")
        source._store.rollback()
        engine.receive([(descriptor_from_row(rows[r]), payload_of(rows[r])) for r in chunk],
                       trust=trust, apply=True)
        if progress is not None and start + len(chunk) < total:
            progress(Progress("fetch", start + len(chunk), total))
    engine.integrate()  # what could not be applied as it arrived (none on an empty peer)
    if progress is not None:
        progress(Progress("fetch", total, total))
    return total
