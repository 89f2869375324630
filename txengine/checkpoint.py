"""Checkpoints: a barrier recording a partition's content digest, for fast bootstrap.

Only the partition's sequencer issues one. Its parents are the partition's
integrated heads; its payload (canonical JSON, bound by the descriptor's
checksum — the descriptor's fields are fixed, so the payload is where new
content goes) holds:

* ``digest`` and ``documents`` — the content digest (:mod:`txengine.digest`)
  of the partition's data, which is the state its ancestry produces in
  canonical order; every document's incarnation is part of each hashed line;
* ``vector`` — ``{origin: seq}`` of that ancestry: an origin's revisions
  chain (each descends from the one before), so the ancestry is exactly the
  revisions at or below the vector;
* ``config`` — the partition's policy in force (conflict policies, synced
  collections, sequencer), so a peer that starts from the checkpoint applies
  later revisions with the same rules without the config revisions before it.

A peer *bootstrapped* from a checkpoint holds the snapshot's documents, the
checkpoint revision (applied) and, per partition, a **base**: the
checkpoint's vector, which counts as held in its version vectors. Revisions
at or below it are known by vector, not present. A later revision whose
parent lies before the checkpoint is accepted once the parent's descriptor
(sent by sync beside the child; its id is its digest, so it cannot be
forged) shows an (origin, seq) within the vector: the descriptor is kept as
a *base* row (no payload) that answers the hlc and parent checks.

The trust in force at the checkpoint comes along: the **config** revisions of
its ancestry that the root signed (on a peer without a root: every one) are
kept as base rows *with* their payload and signature, and ``Peer._trust``
folds them in with the configs of the graph, judging each by its root
signature as for any other. A clone takes them from the source only after
checking each against the checkpoint (partition, vector), its own digest and
checksum, and the root key; prune keeps the same ones. They stay out of the
graph: applied there, they would bring back the policy the checkpoint's
``config`` already carries, and barriers the ancestry no longer holds.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import snapshot
from .digest import lines, partition_digest
from .engine import ProgressCallback, node_of
from .exceptions import ConfigError, InvalidInput, MalformedPayload, TxEngineError
from .keys import signed_by_root
from .ledger import APPLIED, BASE, Applied, descriptor_from_row, payload_of
from .revision import Revision, check_descriptor, check_digest, verify_bytes
from .values import canonical, dumps, loads

if TYPE_CHECKING:
    from .engine import Engine
    from .peer import Peer

_FIELDS = {"digest", "documents", "vector", "config"}


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint revision and what its payload records."""

    id: str
    partition: str
    digest: str
    documents: int
    vector: dict[str, int] = field(default_factory=dict)
    parents: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "partition": self.partition, "digest": self.digest,
                "documents": self.documents, "vector": self.vector,
                "parents": list(self.parents)}


def encode_payload(digest: str, documents: int, vector: dict[str, int],
                   config: dict[str, Any]) -> bytes:
    """Return a checkpoint's canonical payload."""
    return canonical({"digest": digest, "documents": documents, "vector": vector,
                      "config": config})


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Parse and check a checkpoint's payload."""
    try:
        body = loads(payload)
    except ValueError as exc:
        raise MalformedPayload(f"checkpoint payload is not JSON: {exc}") from exc
    if not isinstance(body, dict) or set(body) != _FIELDS or not isinstance(
            body["vector"], dict) or not isinstance(body["digest"], str):
        raise MalformedPayload("a checkpoint payload is an object with digest, documents,"
                               " vector and config")
    return body


def info_of(rev: Revision) -> CheckpointInfo:
    body = decode_payload(rev.payload)
    return CheckpointInfo(rev.id, rev.partition, body["digest"], int(body["documents"]),
                          dict(body["vector"]), rev.parents)


def ancestry_vector(engine: Engine, partition: str) -> dict[str, int]:
    """Return ``{origin: seq}`` of the partition's integrated revisions (and its base).

    The integrated set is the ancestry of the integrated heads, and each
    origin's integrated revisions are a prefix of its seqs, so the highest
    integrated seq of each origin describes it.
    """
    held, applied = engine.held, engine.applied
    floor = engine.bases.get(partition, {}).get("vector", {})
    out: dict[str, int] = {}
    for origin in held.origins(partition):
        seq, low = held.highest(partition, origin), floor.get(origin, 0)
        while seq > low and held.get(partition, origin, seq) not in applied:
            seq -= 1
        if seq:
            out[origin] = seq
    return out


def issue(peer: Peer, partition: str, message: str) -> CheckpointInfo:
    """Issue a checkpoint of ``partition`` on its sequencer (see :meth:`Peer.checkpoint`)."""
    named = peer._sequencer(partition)
    if named != peer.peer_id:
        who = "none is named" if named is None else f"it is {named!r}"
        raise ConfigError(f"only the sequencer of partition {partition!r} may issue checkpoints"
                          f" ({who}): run it there, or name this peer with configure"
                          " --sequencer")
    peer._before_write()
    peer._integrate()
    engine = peer._engine
    parents = engine.parents_for(partition)
    if not parents:
        raise InvalidInput(f"partition {partition!r} has no integrated revisions to"
                           " checkpoint: write or sync first")
    try:
        digest, count = partition_digest(peer._store, partition)
    finally:
        peer._store.rollback()
    config = engine.policy_for(partition)
    payload = encode_payload(digest, count, ancestry_vector(engine, partition), {
        "policies": dict(config.policies), "default": config.default,
        "sync": None if config.sync is None else list(config.sync),
        "sequencer": config.sequencer})
    return info_of(peer._issue_barrier("checkpoint", partition, payload, message))


def newest(engine: Engine, partition: str) -> str | None:
    """Return the newest integrated checkpoint of ``partition`` (barrier order), or None."""
    graph = engine.graph
    found = [b for b in graph.barriers() if graph.get(b).kind == "checkpoint"
             and engine.partition.get(b) == partition and b in engine.applied]
    return found[-1] if found else None


def overlay(peer: Peer, checkpoint: str) -> dict[tuple[str, str], Any]:
    """Return the checkpoint-time state of every key written since, from undo records.

    Revisions outside the checkpoint's ancestry sort after it, and writers of
    a shared key are applied in canonical order, so the undo record of the
    earliest-applied later writer of a key holds the key's state at the
    checkpoint. Undo records are read latest first; the earliest wins.
    """
    engine = peer._engine
    partition = engine.partition[checkpoint]
    ancestry = engine.graph.ancestors([checkpoint])
    later = sorted((r for r in engine.applied if engine.partition[r] == partition
                    and r not in ancestry), key=engine.applied.__getitem__, reverse=True)
    states: dict[tuple[str, str], Any] = {}
    for i in range(0, len(later), 500):
        chunk = later[i:i + 500]
        rows = peer._ledger.rows(chunk, "undo", "kind")
        for rev_id in chunk:
            row = rows[rev_id]
            if row.kind == "data" and row.undo:
                for collection, key, doc, inc in loads(row.undo):
                    states[(collection, key)] = (doc, inc)
    peer._store.rollback()
    return states


def write_snapshot(peer: Peer, ref: str, path: str | Path,
                   progress: ProgressCallback | None = None) -> snapshot.SnapshotInfo:
    """Write the snapshot of checkpoint ``ref`` (see :meth:`Peer.write_snapshot`)."""
    rev = peer.revision(ref)
    if rev.kind != "checkpoint":
        raise InvalidInput(f"revision {rev.id[:12]} is a {rev.kind} revision, not a"
                           " checkpoint: `txengine history` shows the checkpoints")
    if rev.id not in peer._engine.applied:
        raise InvalidInput(f"checkpoint {rev.id[:12]} is not integrated on this peer:"
                           " upgrade first")
    info = info_of(rev)
    states = overlay(peer, rev.id)
    header = {"checkpoint": rev.id, "partition": rev.partition, "digest": info.digest,
              "documents": info.documents}
    try:
        return snapshot.write(path, header, lines(peer._store, rev.partition, states), progress)
    finally:
        peer._store.rollback()


def base_configs(engine: Engine) -> list[str]:
    """Return the config revisions this peer holds as base rows, for its trust view.

    The configs before a checkpoint it started from (or pruned to) are not in
    the graph, yet their enrolments and revocations still hold. A payload-less
    one (a parent descriptor sync sent) decodes as nothing and enrolls no one.
    """
    return sorted(r for r, node in engine.stubs.items() if node.kind == "config")


def carries_trust(root: bytes | None, d: dict[str, Any]) -> bool:
    """Say whether config ``d`` keeps its payload past a checkpoint (bootstrap, prune).

    On a rooted peer only a root-signed config can enroll or revoke, so only
    those; a forged root signature raises. On a peer without a root every
    one: a root installed later judges them as it judges the configs taken
    in open mode.
    """
    return root is None or signed_by_root(root, d)


def ancestry_configs(source: Peer, partition: str, vector: dict[str, int]
                     ) -> list[tuple[dict[str, Any], bytes]]:
    """Return (descriptor, payload) of the configs of ``partition`` within ``vector`` on
    ``source``: in its graph, or kept as base rows if it started from a checkpoint itself."""
    engine = source._engine
    graph = engine.graph
    ids = [b for b in graph.barriers() if graph.get(b).kind == "config"
           and engine.partition.get(b) == partition] + base_configs(engine)
    rows = source._ledger.full_rows(ids)
    source._store.rollback()
    out = []
    for r in ids:
        row = rows.get(r)
        if row is None or row.payload is None:
            continue
        d = descriptor_from_row(row)
        if d["partition"] == partition and d["seq"] <= vector.get(d["origin"], 0):
            out.append((d, payload_of(row)))
    return out


def _checked_configs(root: bytes | None, rev: Revision, vector: dict[str, int],
                     configs: Sequence[tuple[dict[str, Any], bytes]]
                     ) -> list[tuple[dict[str, Any], bytes]]:
    """Check the configs a source sent with checkpoint ``rev``; return those to keep.

    Each must be intact (digest, checksum) and lie in the checkpoint's
    ancestry (its partition, within its vector), else the bootstrap is
    refused; of those, :func:`carries_trust` picks what is kept.
    """
    out = []
    for raw, payload in configs:
        d = check_descriptor(raw)
        verify_bytes(d, payload)
        if (d["kind"] != "config" or d["partition"] != rev.partition
                or d["seq"] > vector.get(d["origin"], 0)):
            raise InvalidInput(f"revision {d['id'][:12]} was sent as a config of checkpoint"
                               f" {rev.id[:12]}'s ancestry, which it is not: nothing was"
                               " loaded; clone from another peer")
        if carries_trust(root, d):
            out.append((d, payload))
    return out


def _checked_parents(rev: Revision, parents: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for raw in parents:
        d = check_descriptor(raw)
        check_digest(d)
        if d["id"] in rev.parents:
            out.append(d)
    return out


def bootstrap(peer: Peer, rev: Revision, parents: Sequence[dict[str, Any]], path: str | Path,
              progress: ProgressCallback | None = None,
              configs: Sequence[tuple[dict[str, Any], bytes]] = ()) -> int:
    """Start ``peer`` (an empty store) from a checkpoint and its snapshot; return documents.

    Documents, the checkpoint (applied), its parents' descriptors, the
    trust-carrying ``configs`` of its ancestry (descriptor, payload: see
    :func:`_checked_configs`) and the base commit in one transaction; a
    snapshot that misses the digest, or a config that fails its checks,
    loads nothing.
    """
    verify_bytes(rev.descriptor, rev.payload)
    if rev.kind != "checkpoint":
        raise InvalidInput(f"revision {rev.id[:12]} is not a checkpoint")
    body = decode_payload(rev.payload)
    kept: dict[str, tuple[dict[str, Any], bytes | None]] = {
        d["id"]: (d, None) for d in _checked_parents(rev, parents)}
    kept.update({d["id"]: (d, payload) for d, payload in _checked_configs(
        peer._root_public(), rev, body["vector"], configs)})
    peer._take_lease()
    engine, ledger, store = peer._engine, peer._ledger, peer._store
    partition = rev.partition
    if partition in engine.bases or any(engine.partition.get(r) == partition
                                        for r in engine.graph):
        raise InvalidInput(f"partition {partition!r} already holds revisions here: bootstrap"
                           " from a checkpoint needs an empty partition")
    try:
        count = snapshot.load(store, path, partition, rev.id, body["digest"], progress)
        ledger.insert_many([(Revision(d, payload), BASE, None)  # type: ignore[arg-type]
                            for rev_id, (d, payload) in kept.items()
                            if rev_id not in engine.stubs]
                           + [(rev, APPLIED, Applied(rev.id, engine.next_position, []))])
        bases = {**engine.bases, partition: {"checkpoint": rev.id, "vector": body["vector"],
                                             "config": body["config"]}}
        ledger.set_state("bases", dumps(bases))
        if body["config"].get("sequencer") is None and ledger.get_state(
                f"sequencer:{partition}") is None:
            ledger.set_state(f"sequencer:{partition}", rev.descriptor["origin"].rpartition(":")[0])
        ledger.audit("bootstrap", rev.id, detail={"partition": partition, "documents": count,
                                                  "digest": body["digest"]})
        store.commit()
    except BaseException:
        store.rollback()
        raise
    engine.load()
    return count


def bootstrap_from(source: Peer, peer: Peer, partition: str | None,
                   progress: ProgressCallback | None = None) -> list[str]:
    """Bootstrap ``peer`` from ``source``'s newest checkpoint of each partition; return them.

    With ``partition``, only that one (and it must have a checkpoint);
    without, every partition of the source that has one.
    """
    engine = source._engine
    partitions = [partition] if partition else sorted(set(engine.partition.values()))
    used = []
    for p in partitions:
        ckpt = newest(engine, p)
        if ckpt is None:
            continue
        rev = source.revision(ckpt)
        rows = source._ledger.full_rows(list(rev.parents))
        source._store.rollback()
        parents = [descriptor_from_row(rows[r]) for r in rev.parents if r in rows]
        configs = ancestry_configs(source, p, decode_payload(rev.payload)["vector"])
        with tempfile.TemporaryDirectory(prefix="txengine-snapshot-") as scratch:
            path = Path(scratch) / "snapshot.jsonl"
            write_snapshot(source, ckpt, path)
            bootstrap(peer, rev, parents, path, progress, configs)
        used.append(ckpt)
    if not used:
        where = f"partition {partition!r}" if partition else "any partition"
        raise InvalidInput(f"the source has no checkpoint in {where}: run `txengine"
                           " checkpoint` on the sequencer, or clone without --checkpoint")
    return used


# -- sync: parents known by a checkpoint's vector -------------------------------------------


def boundary(peer: Peer, items: Sequence[dict[str, Any]], bases: dict[str, Any]
             ) -> list[dict[str, Any]]:
    """Return the descriptors of the parents of ``items`` that are not among them.

    Sent only to a receiver that has a base in their partition: it holds
    those parents by vector alone and needs their (origin, seq) and hlc.
    """
    sent = {d["id"] for d in items}
    wanted = sorted({p for d in items if d["partition"] in bases
                     for p in (*d["parents"], *d["depends_on"]) if p not in sent})
    if not wanted:
        return []
    rows = peer._ledger.full_rows(wanted)
    peer._store.rollback()
    return [descriptor_from_row(rows[r]) for r in wanted if r in rows]


def record_parents(peer: Peer, descriptors: Sequence[Any]) -> int:
    """Keep the parent descriptors that lie within a base's vector; return how many.

    A descriptor that does not check, lies outside the vector or is known
    already is ignored: its child then waits, as for any missing parent.
    """
    engine = peer._engine
    fresh: dict[str, dict[str, Any]] = {}
    for raw in descriptors:
        try:
            d = check_digest(check_descriptor(raw))
        except TxEngineError:
            continue
        if (d["id"] in engine.graph or d["id"] in engine.stubs
                or not engine.covered(d["partition"], d["origin"], d["seq"])):
            continue
        fresh[d["id"]] = d
    if fresh:
        peer._ledger.insert_many([(Revision(d, None), BASE, None)  # type: ignore[arg-type]
                                  for d in fresh.values()])
        peer._store.commit()
        for rev_id, d in fresh.items():
            engine.stubs[rev_id] = node_of(d)
    return len(fresh)



# -- prune: archive the history before a checkpoint ---------------------------------------


@dataclass(frozen=True)
class PruneInfo:
    """What ``prune`` removed from the ledger (and where it archived it)."""

    checkpoint: str
    partition: str
    removed: int
    kept: int
    archive: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "partition": self.partition,
                "removed": self.removed, "kept": self.kept, "archive": self.archive}


def prune(peer: Peer, ref: str, archive: str | Path | None = None) -> PruneInfo:
    """Drop the revisions before checkpoint ``ref`` from the ledger (see :meth:`Peer.prune`).

    The peer ends as if cloned from the checkpoint: its vector becomes the
    partition's base, the descriptors that later revisions still name as
    parents stay as base rows (no payload, no undo record), and so do the
    configs that carry trust (:func:`carries_trust`), with their payload, so
    the enrolments stay known; every other revision of the checkpoint's
    ancestry goes, after ``archive`` (a bundle file) received it. Documents
    and the audit are untouched.
    """
    from .sync import Side
    from .transport import bundle

    rev = peer.revision(ref)
    engine, ledger, store = peer._engine, peer._ledger, peer._store
    if rev.kind != "checkpoint":
        raise InvalidInput(f"revision {rev.id[:12]} is a {rev.kind} revision, not a"
                           " checkpoint: prune --before takes a checkpoint")
    if rev.id not in engine.applied:
        raise InvalidInput(f"checkpoint {rev.id[:12]} is not integrated on this peer:"
                           " upgrade first")
    if peer.pinned:
        raise InvalidInput("this peer is pinned by a downgrade: upgrade before pruning")
    partition = rev.partition
    graph = engine.graph
    before = graph.ancestors([rev.id], inclusive=False)
    before = {r for r in before if engine.partition.get(r) == partition}
    if not before:
        raise InvalidInput(f"nothing lies before checkpoint {rev.id[:12]} on this peer")
    named = {p for r in graph if r not in before
             for p in (*graph.get(r).parents, *graph.get(r).depends_on) if p in before}
    order = graph.canonical_order(before)
    root = peer._root_public()
    configs = ledger.full_rows([r for r in order if graph.get(r).kind == "config"])
    store.rollback()
    trusted = {r: Revision(d, payload_of(row)) for r, row in configs.items()
               if carries_trust(root, d := descriptor_from_row(row))}
    peer._take_lease()
    if archive is not None:
        rows = ledger.full_rows(order)
        store.rollback()
        items = [descriptor_from_row(rows[r]) for r in order]
        messages: list[dict[str, Any]] = [
            {"type": "descriptors", "items": items},
            {"type": "payloads", "items": [[r, payload_of(rows[r]).decode("utf-8")]
                                           for r in order]}]
        bundle.write(archive, bundle.header_of(Side(peer), [partition], {}, messages), messages)
    body = decode_payload(rev.payload)
    try:
        ledger.strip(sorted(named - trusted.keys()))
        ledger.delete([r for r in order if r not in named or r in trusted])
        ledger.insert_many([(kept, BASE, None) for kept in trusted.values()])
        bases = {**engine.bases, partition: {"checkpoint": rev.id, "vector": body["vector"],
                                             "config": body["config"]}}
        ledger.set_state("bases", dumps(bases))
        ledger.audit("prune", rev.id, detail={
            "partition": partition, "removed": len(order),
            "kept_as_base": len(named | trusted.keys()),
            "archive": None if archive is None else str(archive)})
        store.commit()
    except BaseException:
        store.rollback()
        raise
    finally:
        engine.load()
    return PruneInfo(rev.id, partition, len(order), len(named | trusted.keys()),
                     None if archive is None else str(archive))
