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

import contextlib
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine import Engine, Progress, ProgressCallback, paused_gc
from .exceptions import IntegrityError, InvalidInput, RevisionError, UntrustedScript
from .intake import check_follows, check_items, check_rows
from .ledger import (
    APPLIED,
    CONFLICTED,
    COPY_COLUMNS,
    FETCHED,
    descriptor_from_row,
    payload_of,
)
from .sync import Side
from .transport import bundle
from .values import loads
from .vector import Vector

if TYPE_CHECKING:
    from .peer import Peer
    from .revision import Revision

_HELD = frozenset({FETCHED, APPLIED, CONFLICTED})
"""The ledger states of the revisions in a peer's graph: those a clone takes."""
_PIECE = 1000
"""Rows a one-pass clone checks at a time: a piece's objects stay in the CPU's caches
from one column's check to the next, which a whole batch's (tens of megabytes) do not."""
_HOLD_REVISIONS = 40_000
_HOLD_PAYLOAD = 16 << 20
"""How much of the batches it has committed a one-pass clone keeps in memory (:class:`_Held`),
in revisions and payload bytes: two of a SQL store's batches, about 3 KB a revision of small
documents and several times its payload (~120 MB at most). Holding all of a 100,000-revision
clone was no faster, and took 130 MB more."""
_SYNC_BATCH = 2000
"""Revisions a clone through sync's messages moves a batch, by default. A one-pass clone
commits the new store's ``bulk_batch`` at a time, as a bulk upgrade does."""


def clone(peer_class: type[Peer], source: str | Any, store: str | Any,
          peer_id: str | None = None, *, partition: str | None = None,
          source_peer_id: str | None = None, progress: ProgressCallback | None = None,
          batch_size: int | None = None, from_checkpoint: bool = False,
          key_file: str | Path | None = None) -> Peer:
    """:meth:`Peer.clone`: a new peer on the empty ``store``, by replay of ``source``'s
    revisions, in one pass (:func:`replay`) when they are all data, else through sync's
    messages."""
    new = peer_class.open(store, peer_id, key_file=key_file)
    try:
        if len(new._engine.graph):
            raise InvalidInput(f"store {store!r} already holds {len(new._engine.graph)}"
                               " revisions: clone needs an empty store")
        with peer_class.open(source, source_peer_id) as origin:
            root = origin.root_key()
            if root is not None and new.root_key() is None:
                new.install_root(root)  # trust the source's anchor: the clone chose it
            since = None
            if from_checkpoint:
                from .checkpoint import bootstrap_from

                bootstrap_from(origin, new, partition, progress)
                since = Side(new).vector()
            taken = None
            with paused_gc():  # the read plan alone holds a tuple a revision
                ids = None if from_checkpoint else replayable(origin, partition)
                if ids is not None:
                    new._take_lease()
                    try:
                        taken = replay(origin, new, ids, batch_size or new._store.bulk_batch,
                                       progress)
                    except (InvalidInput, IntegrityError, RevisionError, UntrustedScript):
                        since = Side(new).vector()  # a bad revision: sync refuses it alone
                    ids = None  # freed before the collector runs again
            if taken is None:
                sender = Side(origin, batch_size or _SYNC_BATCH)
                header, messages = bundle.outgoing(sender, since, partition)
                new._take_lease()  # after reading the source, which can take long
                bundle.apply(Side(new, batch_size or _SYNC_BATCH), header, messages,
                             str(source), progress)
                taken = Side(new).vector()["vectors"]
            origin._take_ack(taken)  # the source learns what was sent
    except BaseException:
        new.close()
        raise
    return new


def replayable(source: Peer, partition: str | None) -> list[tuple[str, Any]] | None:
    """Return (id, address) of the revisions a clone takes from ``source``, in canonical
    order, or None when the general path, through sync, must run: the source holds a
    revision that is not data (a barrier cuts the order into segments), or it started
    from a checkpoint.

    Read from the ledger's rows (:meth:`Ledger.ordered`), not the source's graph, which
    a one-pass clone never loads: without barriers the canonical order is (hlc, origin, id).
    """
    ledger = source._ledger
    try:
        if loads(ledger.get_state("bases") or "{}"):
            return None
        held = ledger.ordered(_HELD)
    finally:
        source._store.rollback()
    if any(kind != "data" for *_key, kind, _at in held):
        return None
    return [(rev_id, at) for _ms, _c, _origin, rev_id, part, _kind, at in held
            if partition in (None, part)]


def replay(source: Peer, target: Peer, ids: list[tuple[str, Any]], batch_size: int,
           progress: ProgressCallback | None = None) -> dict[str, Vector]:
    """Replay ``ids`` (from :func:`replayable`) from ``source`` into the empty ``target``.

    Each batch is checked whole and committed whole: bad input refuses its
    batch with the intake's one-line error, and what earlier batches
    committed is a consistent prefix a plain ``sync`` completes. Returns the
    vectors (by partition) of what it took, which the source takes as an
    acknowledgement. The target loads its graph from the ledger on its next
    use, as if just opened.
    """
    trust = target._trust()
    total = len(ids)
    if progress is not None:
        progress(Progress("fetch", 0, total))
    slots: dict[tuple[str, str, int], str] = {}
    held = _Held()
    with paused_gc():
        try:
            finish = _replay(source, target._engine, ids, batch_size, trust, slots, held,
                             progress)
            try:  # while the last batch commits
                held.free()
                vectors = _vectors(slots)
                slots.clear()  # and while the collector still sleeps: it would walk them all
            finally:
                if finish is not None:
                    finish()
        finally:
            target._unload()
    if progress is not None:
        progress(Progress("fetch", total, total))
    return vectors


def _replay(source: Peer, engine: Engine, ids: list[tuple[str, Any]], batch_size: int,
            trust: Any, slots: dict[tuple[str, str, int], str],
            held: _Held, progress: ProgressCallback | None) -> Callable[[], Any] | None:
    """Each batch is read from the source and checked, :data:`_PIECE` rows at a time,
    while the batch before it commits (:meth:`Engine.begin_copied`); it is applied and
    committed whole. Return the call that waits for the last commit. A committed
    batch's objects go to ``held``.
    """
    total = len(ids)
    coming = {rev_id for rev_id, _at in ids}
    seen: dict[str, list[int]] = {}
    finish: Callable[[], Any] | None = None
    try:
        for start in range(0, total, batch_size):
            chunk = ids[start:start + batch_size]
            rows = source._ledger.rows_at([at for _id, at in chunk], *COPY_COLUMNS, "payload")
            source._store.rollback()
            if [row[0] for row in rows] != [rev_id for rev_id, _at in chunk]:  # ids
                raise InvalidInput("the source's revisions changed during the clone (one left"
                                   " or moved): the rest comes through sync")
            batch: list[Revision] = []
            for at in range(0, len(rows), _PIECE):
                piece = rows[at:at + _PIECE]
                checked = check_rows(piece)
                if checked is None:  # a row is not plain: each alone, to name the fault
                    checked = check_items([(descriptor_from_row(r), payload_of(r))
                                           for r in piece], trust is not None)
                batch += check_follows(checked, seen, slots, coming, trust)
            if finish is not None:
                waiting, finish = finish, None
                waiting()
                if progress is not None:
                    progress(Progress("fetch", start, total))
            engine.ledger.keep_lease()  # a long clone outlasts it
            lists: list[list[Any]] = [batch, rows]
            if batch:
                finish = engine.begin_copied(batch, rows, lists)
            held.add(lists, len(rows), sum(map(len, [row[15] for row in rows])))  # payloads
        return finish
    except BaseException:
        if finish is not None:
            with contextlib.suppress(BaseException):
                finish()  # what was checked before the failure stays committed
        raise


class _Held:
    """The objects of the batches a one-pass clone committed, kept from the allocator.

    A batch leaves tens of objects a revision (rows, revisions, ops, undo
    records). Freed whole as the next batch replaced them, they cost it 5-10 %
    of its time. They are kept instead, the oldest freed once more than
    :data:`_HOLD_REVISIONS` or :data:`_HOLD_PAYLOAD` are held, and the rest
    while the last commit runs, when the clone has nothing else to do. Each
    list is freed :data:`_PIECE` items at a time: freeing it whole is one call
    that holds the GIL throughout, and keeps the commit's helper thread from
    binding its statements meanwhile.
    """

    def __init__(self) -> None:
        self.batches: deque[tuple[list[list[Any]], int, int]] = deque()
        self.revisions = self.payload = 0

    def add(self, lists: list[list[Any]], revisions: int, payload: int) -> None:
        """Keep one batch's ``lists`` (of ``revisions`` and ``payload`` bytes)."""
        self.batches.append((lists, revisions, payload))
        self.revisions += revisions
        self.payload += payload
        while self.revisions > _HOLD_REVISIONS or self.payload > _HOLD_PAYLOAD:
            self._free_oldest()

    def free(self) -> None:
        """Free every batch held, oldest first."""
        while self.batches:
            self._free_oldest()

    def _free_oldest(self) -> None:
        lists, revisions, payload = self.batches.popleft()
        self.revisions -= revisions
        self.payload -= payload
        for objects in lists:
            while objects:
                del objects[-_PIECE:]


def _vectors(slots: Iterable[tuple[str, str, int]]) -> dict[str, Vector]:
    """Return the version vectors (per partition, the contiguous top seq of each origin)
    of the (partition, origin, seq) slots a clone took."""
    seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
    for partition, origin, seq in slots:
        seqs[(partition, origin)].append(seq)
    vectors: dict[str, Vector] = defaultdict(dict)
    for (partition, origin), taken in seqs.items():
        taken.sort()
        top = 0
        for seq in taken:
            if seq != top + 1:
                break
            top = seq
        vectors[partition][origin] = top
    return dict(vectors)
