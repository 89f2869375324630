"""Sync: version vectors, descriptors first, payloads after, integration in canonical order.

This module deals in *messages* — JSON objects — and never moves bytes
itself: a transport (in process, a bundle file, HTTP) carries them. Each
peer's end is a :class:`Side`; :func:`exchange` drives two sides in one
process, through an optional ``channel`` that may drop, duplicate or reorder
messages (tests use it to show that nothing is lost, only delayed).

Messages (``type``):

``vector``
    ``{"peer", "origin", "vectors": {partition: {origin: seq}}, "tips":
    {partition: {origin: id prefix}}, "first"}`` — what the sender holds.
    The first vector of an exchange asks for the other's in return.
``descriptors``
    ``{"items": [descriptor, ...]}`` in canonical order: what the other lacks.
    The receiver checks each (digest, forks, hlc, barrier rights) and records
    it as *announced*, so an app can show "3 updates pending" at once.
``want``
    ``{"ids": [...]}`` — the announced revisions whose payloads the sender needs.
``payloads``
    ``{"items": [[id, payload text], ...]}``, in batches. The receiver checks
    checksum, digest, hlc and parents and marks them *fetched*; a bad one is
    refused, audited and reported and keeps nothing: its slot stays open.
``ack``
    the sender's vector after taking payloads: the other side learns which
    of its own revisions have been sent (``status().unsent``).
``have`` / ``had``
    after a restore from backup: which of my revisions do you hold?

With nothing lost, an exchange takes three round trips: vectors and the
first descriptors; the other descriptors and both ``want`` lists with the
first payloads; the other payloads and the acks.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .clock import wall_ms
from .engine import Progress, ProgressCallback
from .exceptions import UnknownSigner
from .intake import Refusal, check_announced, check_fetched
from .ledger import (
    CONFLICTED,
    DESCRIPTOR_COLUMNS,
    FETCHED,
    QUARANTINED,
    descriptor_from_row,
    payload_of,
)

if TYPE_CHECKING:
    from .peer import Peer
    from .revision import Revision

Message = dict[str, Any]
Channel = Callable[[list[bytes]], list[bytes]]
"""What a transport does to one leg's messages: the identity, or drop/duplicate/reorder."""

TIP = 16
"""Characters of a tip id carried in vectors (enough to tell a fork from a match)."""

FORBIDDEN_PARTITION = "forbidden_partition"
"""The code of a refusal for a partition the sender may not write: its origin rolls it back."""

DEPENDS_ON_REFUSED = "depends on a revision the server refused"

Access = Callable[[str], bool]
"""Whether the other side may read (or write) a partition; a server passes its grants."""


@dataclass(frozen=True)
class SyncEvent:
    """One thing sync did on a peer: announced, fetched, applied, rolled_back,
    conflicted, refused, quarantined or epoch."""

    kind: str
    revision: str | None
    detail: dict[str, Any] = field(default_factory=dict)


EventCallback = Callable[[SyncEvent], None]


@dataclass
class SyncReport:
    """What one exchange did, seen from one peer."""

    peer: str
    announced: int = 0
    fetched: int = 0
    sent: int = 0
    applied: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    conflicted: list[str] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    reissued: dict[str, str] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["refused"] = [r.to_json() for r in self.refused]
        return out


@dataclass
class SyncResult:
    """Both sides' reports and the cost of the exchange."""

    local: SyncReport
    remote: SyncReport
    round_trips: int = 0
    messages: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"local": self.local.to_json(), "remote": self.remote.to_json(),
                "round_trips": self.round_trips, "messages": self.messages,
                "bytes": self.bytes}


def encode(message: Message) -> bytes:
    """Encode a message for a transport (compact JSON, UTF-8)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode(data: bytes) -> Message:
    message = json.loads(data)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("a sync message is a JSON object with a type")
    return message


class Side:
    """One peer's end of an exchange: takes messages, returns the replies.

    ``progress`` receives ``Progress("fetch", done, total)``: ``total`` counts
    the payloads this side asked for (from the descriptors), ``done`` those
    that arrived; ``done == total`` is reported only by :meth:`finish`, once
    they are integrated.

    ``may_read`` and ``may_write`` filter by partition what the other side
    gets and gives (a server passes the token's grants; by default, all).
    The other side receives descriptors, payloads and ids only of partitions
    it may read, and vectors of those it may read or write (a writer needs
    them to send only what is missing, and learns ids and counters, no
    data); a revision of a partition it may not write is refused with code
    :data:`FORBIDDEN_PARTITION` and reported, so its origin rolls it back.
    """

    def __init__(self, peer: Peer, batch_size: int = 500,
                 events: EventCallback | None = None,
                 progress: ProgressCallback | None = None, *,
                 may_read: Access | None = None, may_write: Access | None = None) -> None:
        self.peer = peer
        self.may_read: Access = may_read or _anything
        self.may_write: Access = may_write or _anything
        self.engine = peer._engine
        self.batch_size = batch_size
        self.events = events
        self.progress = progress
        self.report = SyncReport(peer.peer_id)
        self.other: str | None = None
        self._checked: dict[str, dict[str, Any]] = {}
        """Descriptors this side announced in this exchange and still lacks payloads for:
        checked (digest included) and at hand, so their payloads need no ledger read."""
        self._wanted: set[str] = set()
        self._arrived: set[str] = set()
        self.postponed: dict[str, tuple[dict[str, Any], Refusal]] = {}
        """Descriptors whose signer is not enrolled *yet*: checked again after each leg of
        payloads (an enrolling config may be among them), refused by :meth:`finish`."""

    def _emit(self, kind: str, revision: str | None, **detail: Any) -> None:
        if self.events is not None:
            self.events(SyncEvent(kind, revision, detail))

    # -- vectors -------------------------------------------------------------------
    def vector(self, first: bool = False) -> Message:
        """Return this peer's version vectors (per partition) as a message."""
        held = self.engine.held
        vectors, tips = {}, {}
        for partition in sorted(held.partitions()):
            if not (self.may_read(partition) or self.may_write(partition)):
                continue
            vector = held.vector(partition)
            vectors[partition] = vector
            tips[partition] = {o: (held.get(partition, o, s) or "")[:TIP]
                               for o, s in vector.items()}
        message = {"type": "vector", "peer": self.peer.peer_id, "origin": self.engine.origin,
                   "vectors": vectors, "tips": tips, "first": first}
        if self.engine.bases:  # started from checkpoints: ask for the parents it lacks
            message["bases"] = {p: b["checkpoint"] for p, b in self.engine.bases.items()}
        return message

    def precheck(self, messages: Iterable[Message]) -> None:
        """Verify the signatures of arriving descriptors ahead of :meth:`handle`.

        Pure work, needing no lease: a server runs it before it takes the
        apply lease, so that other processes keep applying meanwhile (the
        costly part of intake is Ed25519). Results are remembered by
        :func:`txengine.keys.verify`; :meth:`handle` still checks everything,
        and refuses what fails here.
        """
        from .exceptions import TxEngineError
        from .revision import check_descriptor, check_digest

        trust = self.peer._trust()
        if trust is None:
            return
        for message in messages:
            if message.get("type") != "descriptors":
                continue
            for raw in message.get("items", []):
                with contextlib.suppress(TxEngineError, KeyError, TypeError, AttributeError):
                    trust.check(check_digest(check_descriptor(raw)))

    def handle(self, messages: Iterable[Message]) -> list[Message]:
        """Handle one leg's messages, in arrival order; return the replies."""
        out: list[Message] = []
        payloads: dict[str, bytes] = {}
        for message in messages:
            kind = message.get("type")
            if kind == "vector":
                out += self.answer_vector(message)
            elif kind == "descriptors":
                out += self._on_descriptors(message)
            elif kind == "want":
                out += self.answer_want(message)
            elif kind == "payloads":
                for rev_id, text in message.get("items", []):
                    payloads[str(rev_id)] = str(text).encode("utf-8")
            elif kind == "ack":
                self._on_ack(message)
            elif kind == "have":
                out.append(self._on_have(message))
            elif kind == "had":
                out += self._on_had(message)
        if payloads:
            self._on_payloads(payloads)
            ack = self.vector()
            ack["type"] = "ack"
            out.append(ack)
            out += self._recheck()
        return out

    def answer_vector(self, message: Message) -> list[Message]:
        """Answer the other side's version vectors with the descriptors it lacks."""
        self.other = str(message.get("peer"))
        vectors: dict[str, dict[str, int]] = message.get("vectors", {})
        tips: dict[str, dict[str, str]] = message.get("tips", {})
        out: list[Message] = [self.vector()] if message.get("first") else []
        self._on_ack(message)
        have = self._restored(vectors, tips)
        if have is not None:
            return [*out, have]
        held, graph = self.engine.held, self.engine.graph
        ids: list[str] = []
        for partition in sorted(held.partitions()):
            if self.may_read(partition):
                ids += [r for r in held.after(partition, vectors.get(partition, {}))
                        if r in graph]
        if ids:
            rows = self.peer._ledger.rows(ids, *DESCRIPTOR_COLUMNS)
            self.peer._store.rollback()
            items = [descriptor_from_row(rows[r]) for r in graph.canonical_order(ids)]
            reply: Message = {"type": "descriptors", "items": items}
            bases = message.get("bases")
            if isinstance(bases, dict) and bases:
                from .checkpoint import boundary

                reply["parents"] = boundary(self.peer, items, bases)
            out.append(reply)
        return out

    def _restored(self, vectors: dict[str, dict[str, int]], tips: dict[str, dict[str, str]]
                  ) -> Message | None:
        """Return a ``have`` query when the other side holds my (origin, seq) values
        beyond, or other than, mine: this store was restored from a backup."""
        origin, held = self.engine.origin, self.engine.held
        for partition, vector in vectors.items():
            seq = vector.get(origin, 0)
            if not seq:
                continue
            mine = held.get(partition, origin, seq)
            if mine is None and self.engine.covered(partition, origin, seq):
                continue  # pruned before a checkpoint: held by its vector, not by id
            if mine is None or not mine.startswith(tips.get(partition, {}).get(origin, "")):
                ids = [r for p in held.partitions() for r in held.after(p, {})
                       if self.engine.graph._nodes.get(r) is not None
                       and self.engine.graph.get(r).origin == origin]
                return {"type": "have", "origin": origin, "ids": ids}
        return None

    def _on_have(self, message: Message) -> Message:
        ids = [str(i) for i in message.get("ids", [])]
        return {"type": "had", "origin": message.get("origin"),
                "ids": [i for i in ids if i in self.engine.graph and self._readable(i)]}

    def _on_had(self, message: Message) -> list[Message]:
        if message.get("origin") != self.engine.origin:
            return []  # an answer about an epoch already left
        mapping = self.peer._reissue(set(map(str, message.get("ids", []))))
        self.report.reissued.update(mapping)
        self._emit("epoch", None, origin=self.engine.origin, reissued=mapping)
        return [self.vector(first=True)]

    # -- descriptors ---------------------------------------------------------------
    def _on_descriptors(self, message: Message) -> list[Message]:
        items, forbidden = self._writable(message.get("items", []))
        parents = self._writable(message.get("parents") or [])[0]
        if parents and self.engine.bases:
            from .checkpoint import record_parents

            record_parents(self.peer, parents)
        fresh, refused = check_announced(self.engine, items, self.peer._sequencer,
                                         self.peer._trust())
        refused = self._postpone(items, refused)
        ledger = self.peer._ledger
        self._refuse(forbidden + refused)
        if fresh:
            ledger.announce_many(fresh)
            ledger.audit_many([("announce", d["id"], "ok", 0.0, {"origin": d["origin"]})
                               for d in fresh])
            self.peer._store.commit()
            self.report.announced += len(fresh)
            self._checked.update((d["id"], d) for d in fresh)
            for d in fresh:
                self._emit("announced", d["id"], origin=d["origin"])
        listed = [str(d["id"]) for d in items if isinstance(d, dict) and "id" in d]
        earlier = [i for i in listed if i not in self._checked]  # announced before, or known
        rows = ledger.rows(earlier, "state") if earlier else {}
        self.peer._store.rollback()
        want = [i for i in listed if i in self._checked
                or (i in rows and rows[i].state == "announced")]
        self._wanted.update(want)
        self._report_progress()
        return [{"type": "want", "ids": want}] if want else []

    def _postpone(self, items: list[Any], refused: list[Refusal]) -> list[Refusal]:
        """Hold back the descriptors refused because their signer is unknown: the config
        that enrolls it may come with this exchange's payloads. Return the other refusals."""
        raw = {d.get("id"): d for d in items if isinstance(d, dict)}
        rest = []
        for r in refused:
            if r.code == UnknownSigner.code and r.revision in raw:
                self.postponed[r.revision] = (raw[r.revision], r)
            else:
                rest.append(r)
        return rest

    def _recheck(self) -> list[Message]:
        """Check postponed descriptors again; return a ``want`` for those now accepted,
        and again for wanted payloads that came before their parents did (their
        children among them: they waited for the postponed parents)."""
        if not self.postponed:
            return []
        items = [d for d, _refusal in self.postponed.values()]
        self.postponed = {}
        replies = self._on_descriptors({"type": "descriptors", "items": items})
        accepted = [i for m in replies if m["type"] == "want" for i in m["ids"]]
        if not accepted:
            return []
        waiting = sorted(self._wanted - self._arrived - set(accepted))
        return [{"type": "want", "ids": accepted + waiting}]

    def _writable(self, items: list[Any]) -> tuple[list[Any], list[Refusal]]:
        """Split descriptors into those the other side may write and refusals of the rest
        (shapes are left to intake, which refuses a bad one on its own)."""
        if self.may_write is _anything:
            return items, []
        kept: list[Any] = []
        forbidden: list[Refusal] = []
        for d in items:
            partition = d.get("partition") if isinstance(d, dict) else None
            if isinstance(partition, str) and not self.may_write(partition):
                forbidden.append(Refusal(
                    str(d.get("id")), f"{self.other or 'the sender'} may not write partition"
                    f" {partition!r}: the server's admin grants it with `txengine peers grant"
                    f" {self.other or 'NAME'} --write {partition}`", d.get("origin"),
                    FORBIDDEN_PARTITION))
            else:
                kept.append(d)
        return kept, forbidden

    def _readable(self, rev_id: str) -> bool:
        partition = self.engine.partition.get(rev_id)
        return partition is not None and self.may_read(partition)

    def _refuse(self, refused: list[Refusal]) -> None:
        if not refused:
            return
        self.peer._ledger.audit_many([
            ("refuse", r.revision, "refused", 0.0, {"reason": r.reason, "origin": r.origin,
                                                     "from": self.other})
            for r in refused])
        self.peer._store.commit()
        self.report.refused += refused
        for r in refused:
            self._emit("refused", r.revision, reason=r.reason)

    # -- payloads ------------------------------------------------------------------
    def answer_want(self, message: Message) -> list[Message]:
        """Answer a list of wanted ids with their payloads, in batches."""
        ids = [str(i) for i in message.get("ids", [])
               if str(i) in self.engine.graph and self._readable(str(i))]
        out = []
        for i in range(0, len(ids), self.batch_size):
            chunk = ids[i:i + self.batch_size]
            rows = self.peer._ledger.rows(chunk, "payload")
            out.append({"type": "payloads", "items": [
                [r, payload_of(rows[r]).decode("utf-8")] for r in chunk if r in rows]})
            self.report.sent += len(chunk)
        self.peer._store.rollback()
        return out

    def _on_payloads(self, payloads: dict[str, bytes]) -> None:
        """Take a leg's payloads in hlc order, ``batch_size`` at a time.

        Each batch commits and reports progress on its own. Parents sort before
        their children, so a batch finds every parent of its revisions taken
        by an earlier one, exactly as if the leg were checked whole.
        """
        announced = {r: self._checked[r] for r in payloads if r in self._checked}
        earlier = [r for r in payloads if r not in announced]
        if earlier:  # announced in an earlier exchange (or not at all): ask the ledger
            rows = self.peer._ledger.rows(earlier, "state", *DESCRIPTOR_COLUMNS)
            self.peer._store.rollback()
            announced.update((r, descriptor_from_row(row)) for r, row in rows.items()
                             if row.state == "announced")
        announced, forbidden = self._writable_payloads(announced)
        self._refuse(forbidden)
        order = sorted(announced, key=lambda r: (*announced[r]["hlc"], announced[r]["origin"], r))
        for i in range(0, len(order), self.batch_size):
            chunk = order[i:i + self.batch_size]
            self.peer._ledger.keep_lease()  # a big leg can outlast it
            self._take_payloads({r: announced[r] for r in chunk}, {r: payloads[r] for r in chunk})

    def _writable_payloads(self, announced: dict[str, dict[str, Any]]
                           ) -> tuple[dict[str, dict[str, Any]], list[Refusal]]:
        """Keep the payloads of partitions the other side may write (another peer may have
        announced the revision; its payload is still a write from this sender)."""
        if self.may_write is _anything:
            return announced, []
        kept, forbidden = self._writable(list(announced.values()))
        return {d["id"]: d for d in kept}, forbidden

    def _take_payloads(self, announced: dict[str, dict[str, Any]], payloads: dict[str, bytes]
                       ) -> None:
        ledger = self.peer._ledger
        horizon = max(wall_ms(), self.engine.clock.last[0]) + self.peer.max_clock_skew_ms
        good, held, refused = check_fetched(self.engine, announced, payloads, horizon,
                                            self._checked, trust=self.peer._trust())
        self._refuse(refused)
        if good and not held and not self.peer.pinned and self._apply_arrived(good):
            return
        if good or held:
            ledger.fill_payloads([(r, FETCHED) for r in good] + [(r, QUARANTINED) for r in held])
            ledger.audit_many([("fetch", r.id, "ok", 0.0, {}) for r in good]
                              + [("quarantine", r.id, "quarantined", 0.0,
                                  {"hlc": list(r.hlc), "horizon": horizon}) for r in held])
            self.peer._store.commit()
            self.engine.add_fetched(good, held)
            self.report.fetched += len(good)
            self.report.quarantined += [r.id for r in held]
            for r in good:
                self._emit("fetched", r.id)
            for r in held:
                self._emit("quarantined", r.id, hlc=list(r.hlc))
            self._took([r.id for r in (*good, *held)])
        self.peer._admit_quarantined([r for r in good if r.kind != "data"])

    def _apply_arrived(self, good: list[Revision]) -> bool:
        """Apply payloads at once when they sort after everything integrated
        (:meth:`Engine.apply_arrived`); say whether that was done."""
        entries = self.engine.apply_arrived(good)
        if entries is None:
            return False
        self.report.fetched += len(good)
        for entry in entries:
            self.report.applied.append(entry.id)
            if entry.state == CONFLICTED:
                self.report.conflicted.append(entry.id)
            self._emit("fetched", entry.id)
            self._emit("conflicted" if entry.state == CONFLICTED else "applied", entry.id)
        self._took([entry.id for entry in entries])
        return True

    def _took(self, ids: list[str]) -> None:
        """Forget the announced descriptors of revisions whose payloads were taken, and
        count them toward progress."""
        for rev_id in ids:
            self._checked.pop(rev_id, None)
            if rev_id in self._wanted:
                self._arrived.add(rev_id)
        self._report_progress()

    def _report_progress(self, final: bool = False) -> None:
        """Report what arrived of what was wanted; all of it only when ``final``."""
        total, done = len(self._wanted), len(self._arrived)
        if self.progress is not None and total and (final or done < total):
            self.progress(Progress("fetch", done, total))

    def take_refusals(self, refusals: Iterable[Refusal]) -> list[str]:
        """Roll back this peer's own revisions the other side refused for lack of write
        permission, with what depends on them, and keep them as refused
        (:meth:`Peer._refused_by_remote`); return the ids, in canonical order.

        Only the origin does: a relayed revision stays, since its writer may
        hold the grant this peer lacks.
        """
        mine = {r.revision: r.reason for r in refusals
                if r.code == FORBIDDEN_PARTITION and r.origin == self.engine.origin}
        if not mine:
            return []
        applied = set(self.engine.applied)
        refused = self.peer._refused_by_remote(mine)
        for rev_id in refused:
            if rev_id in applied:
                self.report.rolled_back.append(rev_id)
                self._emit("rolled_back", rev_id)
            self._emit("refused", rev_id, reason=mine.get(rev_id, DEPENDS_ON_REFUSED))
        return refused

    def _on_ack(self, message: Message) -> None:
        self.peer._take_ack(message.get("vectors", {}))

    # -- integration -----------------------------------------------------------------
    def finish(self) -> None:
        """Integrate what was fetched (unless the peer is pinned by a downgrade)."""
        self._refuse([refusal for _d, refusal in self.postponed.values()])
        self.postponed = {}
        self.peer._release_quarantine()
        if self.peer.pinned:
            self._report_progress(final=True)
            return
        engine = self.engine
        steps = self.peer._integrate()
        undone = {s.revision for s in steps if s.action == "undo"}
        for step in steps:
            if step.action == "undo":
                self.report.rolled_back.append(step.revision)
                self._emit("rolled_back", step.revision)
            elif step.action == "apply":
                if step.revision in engine.conflicted:
                    self.report.conflicted.append(step.revision)
                    self._emit("conflicted", step.revision)
                else:
                    self._emit("applied", step.revision)
                if step.revision not in undone:
                    self.report.applied.append(step.revision)
        self._report_progress(final=True)


def _anything(partition: str) -> bool:
    return True


def exchange(local: Side, remote: Side, channel: Channel | None = None,
             max_legs: int = 20) -> SyncResult:
    """Run one exchange between two sides in this process; return both reports.

    Messages are encoded to bytes for each leg (that is what is counted) and
    passed through ``channel``; whatever arrives is handled. The exchange ends
    when a leg carries nothing, then both sides integrate.
    """
    result = SyncResult(local.report, remote.report)
    outgoing: list[Message] = [local.vector(first=True)]
    sender, receiver = local, remote
    legs = 0
    while outgoing and legs < max_legs:
        data = [encode(m) for m in outgoing]
        size = sum(len(d) for d in data)
        result.bytes += size
        result.messages += len(data)
        sender.report.bytes_sent += size
        if sender is local:
            result.round_trips += 1
        arrived = channel(data) if channel is not None else data
        receiver.report.bytes_received += sum(len(d) for d in arrived)
        outgoing = receiver.handle(decode(d) for d in arrived)
        sender, receiver = receiver, sender
        legs += 1
    local.finish()
    remote.finish()
    return result
