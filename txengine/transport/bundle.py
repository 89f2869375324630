"""Bundles: sync messages written to a JSON Lines file, for a USB stick or a queue.

A bundle is one side of an exchange, frozen: a header line, then
``descriptors`` messages, then ``payloads`` messages — the messages
:class:`~txengine.sync.Side` sends in a live sync. Applying a bundle is the
receiving side of the same protocol (announce, fetch, integrate), so every
intake check and refusal is the one sync makes, and re-applying a bundle
changes nothing (known revisions are exact repeats and are dropped).

A bundle is checked whole before the first write: a truncated file (the
last line cut, or fewer lines than the header counts), a payload whose
checksum does not match its descriptor, or a descriptor of a partition the
header does not list is refused, and nothing is applied.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import Progress, ProgressCallback
from ..exceptions import BundleError, InvalidInput
from ..revision import check_descriptor, verify_bytes
from ..sync import Message, Side, SyncReport, decode, encode

FORMAT = "txengine-bundle"
VERSION = 1


@dataclass(frozen=True)
class BundleInfo:
    """What ``bundle create`` wrote."""

    path: str
    revisions: int
    partitions: tuple[str, ...]
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "revisions": self.revisions,
                "partitions": list(self.partitions), "bytes": self.bytes}


@dataclass
class BundleReport:
    """What ``bundle apply`` (or ``clone``) did on the receiving peer."""

    source: str
    revisions: int
    report: SyncReport
    partitions: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "revisions": self.revisions,
                "partitions": list(self.partitions), **self.report.to_json()}


# -- building the messages ----------------------------------------------------------------


def read_vector(path: str | Path) -> dict[str, Any]:
    """Read a version vector: a ``vector`` message, a bundle's header, or a plain mapping.

    A plain mapping is ``{partition: {origin: seq}}``.

    The header of a bundle made by the other side carries its vector, so that
    bundle serves as ``--since`` for the answer.
    """
    text = Path(path).read_text("utf-8")
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = json.loads(text.split("\n", 1)[0])
        except ValueError as exc:
            raise InvalidInput(f"{path}: not a version vector (JSON expected: {exc})") from exc
    bases: dict[str, Any] = {}
    if isinstance(data, dict) and isinstance(data.get("vectors"), dict):
        vectors, tips = data["vectors"], data.get("tips") or {}
        bases = data.get("bases") or {}  # the other side started from checkpoints
    elif isinstance(data, dict):
        vectors, tips = data, {}
    else:
        raise InvalidInput(f"{path}: a version vector is a JSON object")
    for partition, vector in vectors.items():
        if not isinstance(vector, dict) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in vector.values()):
            raise InvalidInput(f"{path}: the vector of partition {partition!r} must map"
                               " origins to integers")
    return {"vectors": vectors, "tips": tips, "bases": bases}


def outgoing(side: Side, since: dict[str, Any] | None = None,
             partition: str | None = None) -> tuple[Message, list[Message]]:
    """Return (header, messages): what ``side``'s peer holds beyond ``since``, as sync sends it.

    The descriptors come from the side's answer to the vector ``since`` (all
    of them with none), filtered to ``partition``; the payloads are its answer
    to a ``want`` of every one of them, in batches.
    """
    since = since or {"vectors": {}, "tips": {}}
    replies = side.answer_vector({"type": "vector", "peer": None, "vectors": since["vectors"],
                               "tips": since.get("tips", {}), "first": False,
                               "bases": since.get("bases") or {}})
    if any(m["type"] == "have" for m in replies):
        raise InvalidInput("the vector holds revisions of this peer's origin that this store"
                           " lacks (was it restored from a backup?): sync directly instead")
    items = [d for m in replies if m["type"] == "descriptors" for d in m["items"]
             if partition is None or d["partition"] == partition]
    parents = [p for m in replies if m["type"] == "descriptors" for p in m.get("parents", ())]
    messages: list[Message] = [{"type": "descriptors", "items": items,
                                **({"parents": parents} if parents else {})}] if items else []
    if items:
        messages += side.answer_want({"type": "want", "ids": [d["id"] for d in items]})
    partitions = [partition] if partition else sorted({d["partition"] for d in items})
    return header_of(side, partitions, since["vectors"], messages), messages


def header_of(side: Side, partitions: list[str], since: dict[str, Any],
              messages: list[Message]) -> Message:
    """Return the header line of a bundle of ``messages`` written by ``side``'s peer."""
    mine = side.vector()
    return {"type": "bundle", "format": FORMAT, "version": VERSION, "peer": mine["peer"],
            "origin": mine["origin"], "created_ms": int(time.time() * 1000),
            "partitions": partitions, "since": since, "vectors": mine["vectors"],
            "tips": mine["tips"],
            "descriptors": sum(len(m["items"]) for m in messages if m["type"] == "descriptors"),
            "payloads": sum(len(m["items"]) for m in messages if m["type"] == "payloads")}


def write(path: str | Path, header: Message, messages: Iterable[Message]) -> int:
    """Write a bundle (one message a line, newline-terminated); return its size in bytes."""
    target = Path(path)
    temp = target.with_name(target.name + ".part")
    size = 0
    with temp.open("wb") as out:
        for message in (header, *messages):
            line = encode(message) + b"\n"
            out.write(line)
            size += len(line)
    temp.replace(target)  # never leave a half-written bundle under the final name
    return size


# -- reading and applying -------------------------------------------------------------------


def read(path: str | Path) -> tuple[Message, list[Message]]:
    """Read and check a whole bundle; return (header, messages) or raise :class:`BundleError`.

    Checks, before anything is written: the header, the line structure
    (a cut last line, fewer items than the header counts), every payload
    against its descriptor (checksum, digest: a tampered payload raises
    :class:`~txengine.exceptions.ChecksumMismatch`), and the partitions.
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(name, f"cannot be read ({exc.strerror})") from exc
    if not data:
        raise BundleError(name, "is empty")
    if not data.endswith(b"\n"):
        raise BundleError(name, "is truncated (its last line is incomplete)")
    lines = data[:-1].split(b"\n")
    messages: list[Message] = []
    for number, line in enumerate(lines, 1):
        try:
            messages.append(decode(line))
        except ValueError as exc:
            raise BundleError(name, f"line {number} is not a sync message ({exc})") from exc
    header, body = messages[0], messages[1:]
    if header.get("type") != "bundle" or header.get("format") != FORMAT:
        raise BundleError(name, "has no bundle header (is it a txengine bundle?)")
    if header.get("version") != VERSION:
        raise BundleError(name, f"is bundle format version {header.get('version')!r};"
                                f" this txengine reads version {VERSION}")
    _check_body(name, header, body)
    return header, body


def _check_body(name: str, header: Message, body: list[Message]) -> None:
    descriptors: dict[str, dict[str, Any]] = {}
    payloads: dict[str, bytes] = {}
    seen_payloads = False
    for message in body:
        kind = message["type"]
        if kind == "descriptors" and not seen_payloads:
            for raw in message.get("items", []):
                d = check_descriptor(raw)
                descriptors[d["id"]] = d
        elif kind == "payloads":
            seen_payloads = True
            for rev_id, text in message.get("items", []):
                payloads[str(rev_id)] = str(text).encode("utf-8")
        else:
            raise BundleError(name, f"holds an unexpected {kind!r} message (descriptors"
                                    " come first, then payloads)")
    counted = (header.get("descriptors"), header.get("payloads"))
    if counted != (len(descriptors), len(payloads)):
        raise BundleError(name, f"is truncated: the header counts {counted[0]} descriptors and"
                                f" {counted[1]} payloads, the file holds {len(descriptors)}"
                                f" and {len(payloads)}")
    listed = header.get("partitions") or []
    for d in descriptors.values():
        if d["partition"] not in listed:
            raise BundleError(name, f"revision {d['id'][:12]} is in partition"
                                    f" {d['partition']!r}, which the header does not list"
                                    f" ({listed})")
    for rev_id, payload in payloads.items():
        descriptor = descriptors.get(rev_id)
        if descriptor is None:
            raise BundleError(name, f"holds a payload for {rev_id[:12]} without its descriptor")
        verify_bytes(descriptor, payload)
    missing = sorted(set(descriptors) - set(payloads))
    if missing:
        raise BundleError(name, f"lacks the payload of {missing[0][:12]}")


def check_partition(name: str, header: Message, partition: str | None) -> None:
    """Refuse a bundle holding partitions other than the one asked for."""
    listed = list(header.get("partitions") or [])
    if partition is not None and any(p != partition for p in listed):
        raise BundleError(name, f"holds partitions {listed}, not only {partition!r} as asked")


def apply(side: Side, header: Message, messages: Sequence[Message], source: str,
          progress: ProgressCallback | None = None) -> BundleReport:
    """Take checked messages on the receiving ``side``: announce, fetch, integrate.

    Progress totals come from the descriptors; ``done`` counts fetched
    payloads, and the total is reported only once they are integrated.
    """
    total = int(header.get("descriptors", 0))
    side.other = str(header.get("peer"))
    if progress is not None:
        progress(Progress("fetch", 0, total))
    side.handle(m for m in messages if m["type"] == "descriptors")
    done = 0
    late: set[str] = set()
    for message in messages:
        if message["type"] != "payloads":
            continue
        replies = side.handle([message])
        late.update(i for m in replies if m["type"] == "want" for i in m["ids"])
        done += len(message.get("items", []))
        if progress is not None and done < total:
            progress(Progress("fetch", done, total))
    if late:  # their signer was enrolled by a config of this bundle: take them now
        side.handle([{"type": "payloads", "items": [
            item for m in messages if m["type"] == "payloads" for item in m["items"]
            if item[0] in late]}])
    side.finish()
    if progress is not None:
        progress(Progress("fetch", total, total))
    return BundleReport(source, total, side.report, tuple(header.get("partitions") or ()))


def run(side: Side, path: str | Path, partition: str | None = None,
        progress: ProgressCallback | None = None) -> BundleReport:
    """Read, check and apply the bundle at ``path`` on ``side``'s peer."""
    header, messages = read(path)
    check_partition(str(path), header, partition)
    return apply(side, header, messages, str(path), progress)
