"""Content digests: one hash of a partition's data, equal on every peer and store kind.

The digest of a partition is the SHA-256 of its documents as canonical lines,
``[collection, key text, incarnation, doc]`` in RFC 8785 bytes with a newline,
sorted by (collection, key text) in code-point order. The line holds only
values every store reads back the same (relaxed Extended JSON, the canonical
key text), so two peers holding the same documents — whatever order the
revisions arrived in, SQLite, PostgreSQL or MongoDB — compute the same bytes.
A sorted hash (not a sum of per-document hashes) because a sum can be
matched by a crafted set of documents; sorting costs nothing on SQL stores,
which return keys in order.

The same lines, behind a header, are a checkpoint's snapshot file
(:mod:`txengine.snapshot`): hashing the file's body gives the digest.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .ops import State
from .stores.base import Store
from .values import canonical, sha256

EMPTY = sha256(b"")
"""The digest of a partition without documents."""

Overlay = Mapping[tuple[str, str], State]
"""``{(collection, key text): (doc, incarnation)}`` laid over the store; a None doc is absent."""


def document_line(collection: str, key: str, incarnation: str | None, doc: Any) -> bytes:
    """Return one document's canonical line (newline included)."""
    return canonical([collection, key, incarnation, doc]) + b"\n"


def documents(store: Store, partition: str, overlay: Overlay | None = None
              ) -> Iterator[tuple[str, str, str | None, dict[str, Any]]]:
    """Yield (collection, key text, incarnation, doc) of a partition in digest order.

    ``overlay`` replaces the stored state of some keys (the state a checkpoint
    saw, rebuilt from undo records); documents are streamed from the store and
    merged with the overlay's sorted keys.
    """
    by_collection: dict[str, list[tuple[str, State]]] = defaultdict(list)
    for (collection, key), state in (overlay or {}).items():
        by_collection[collection].append((key, state))
    for collection in sorted(set(store.collections()) | set(by_collection)):
        extra = sorted(by_collection.get(collection, ()), key=lambda item: item[0])
        i = 0
        for key, doc, inc in store.ordered_states(partition, collection):
            while i < len(extra) and extra[i][0] < key:
                extra_doc, extra_inc = extra[i][1]
                if extra_doc is not None:
                    yield collection, extra[i][0], extra_inc, extra_doc
                i += 1
            if i < len(extra) and extra[i][0] == key:
                extra_doc, extra_inc = extra[i][1]
                if extra_doc is not None:
                    yield collection, key, extra_inc, extra_doc
                i += 1
                continue
            yield collection, key, inc, doc
        for key, (extra_doc, extra_inc) in extra[i:]:
            if extra_doc is not None:
                yield collection, key, extra_inc, extra_doc


def lines(store: Store, partition: str, overlay: Overlay | None = None) -> Iterator[bytes]:
    """Yield the canonical lines of a partition's documents, in digest order."""
    for collection, key, inc, doc in documents(store, partition, overlay):
        yield document_line(collection, key, inc, doc)


def partition_digest(store: Store, partition: str, overlay: Overlay | None = None
                     ) -> tuple[str, int]:
    """Return (content digest, number of documents) of one partition, streaming."""
    h = hashlib.sha256()
    count = 0
    for line in lines(store, partition, overlay):
        h.update(line)
        count += 1
    return h.hexdigest(), count


def combine(digests: Mapping[str, str]) -> str:
    """Return the digest of several partitions: SHA-256 of ``{partition: digest}``, canonical.

    Partitions without documents are left out, so a peer that merely knows
    an empty partition's name does not differ from one that does not.
    """
    return sha256(canonical({p: d for p, d in sorted(digests.items()) if d != EMPTY}))


def content_digest(store: Store, partitions: str | Iterable[str]) -> str:
    """Return the digest of one partition (a name) or of several (an iterable of names)."""
    if isinstance(partitions, str):
        return partition_digest(store, partitions)[0]
    return combine({p: partition_digest(store, p)[0] for p in partitions})
