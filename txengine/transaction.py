"""A write transaction: collects ops into one data revision.

Reads inside the block see the block's own writes (an in-memory overlay).
Each op is encoded to Extended JSON and checked as it is called, and the
engine later applies the *decoded payload* — exactly what every replica will
apply — never the caller's objects. ``update`` and ``delete`` fill ``expect``
with the incarnation they read and ``before`` with the values they replace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .exceptions import DocumentNotFound, InvalidInput
from .ops import SELF, Delete, Op, State, apply_op, op_from_json, write_key
from .revision import Revision, build, encode_ops
from .values import document_to_ejson, from_ejson, to_ejson

if TYPE_CHECKING:
    from .peer import Peer

Key = tuple[str, str, str]


class Transaction:
    """Context manager returned by :meth:`Peer.transaction`."""

    def __init__(self, peer: Peer, message: str, partition: str) -> None:
        if not isinstance(partition, str) or not partition:
            raise InvalidInput(f"partition {partition!r} is not valid: use a non-empty string")
        self.peer = peer
        self.message = message
        self.partition = partition
        self.ops: list[Op] = []
        self.revision: Revision | None = None
        self._original: dict[Key, State] = {}
        self._overlay: dict[Key, State] = {}

    def __enter__(self) -> Transaction:
        self.peer._before_write()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.peer._store.rollback()
            return
        if not self.ops:
            self.peer._store.rollback()
            return
        self.revision = self.peer._commit_ops(self.message, self.partition, self.ops,
                                              self._original)

    # -- reads ----------------------------------------------------------------
    def _state(self, collection: str, key: Any) -> tuple[Key, State]:
        op = Delete(collection, key)
        k = (self.partition, *write_key(op))
        if k not in self._overlay:
            found = self.peer._store.load_states(self.partition, k[1], [k[2]])
            state = found.get(k[2], (None, None))
            self._original[k] = state
            self._overlay[k] = state
        return k, self._overlay[k]

    def get(self, collection: str, key: Any) -> dict[str, Any] | None:
        """Return a document as this transaction sees it, or None."""
        probe = op_from_json({"op": "delete", "collection": collection, "key": to_ejson(key)})
        _, (doc, _inc) = self._state(probe.collection, probe.key)
        return None if doc is None else from_ejson(doc)

    # -- writes ---------------------------------------------------------------
    def _add(self, data: dict[str, Any]) -> Op:
        op = op_from_json(data)
        k, state = self._state(op.collection, op.key)
        self._overlay[k] = apply_op(op, state, SELF).state
        self.ops.append(op)
        return op

    def insert(self, collection: str, doc: dict[str, Any]) -> None:
        """Insert a document (``_id`` is its key); an existing one is replaced."""
        if not isinstance(doc, dict) or "_id" not in doc:
            raise InvalidInput("insert needs a dict with an _id (str, int or ObjectId)")
        self._add({"op": "insert", "collection": collection, "doc": document_to_ejson(doc)})

    def update(self, collection: str, key: Any, set: dict[str, Any] | None = None,
               unset: list[str] | None = None, inc: dict[str, Any] | None = None) -> None:
        """Set, unset or increment fields of an existing document."""
        probe = op_from_json({"op": "delete", "collection": collection, "key": to_ejson(key)})
        _, (doc, incarnation) = self._state(probe.collection, probe.key)
        if doc is None:
            raise DocumentNotFound(collection, key)
        touched = [*(set or {}), *(unset or []), *(inc or {})]
        before = {f: doc[f] for f in touched if f in doc}
        data: dict[str, Any] = {"op": "update", "collection": collection, "key": probe.key,
                                "expect": incarnation, "before": before}
        if set:
            data["set"] = document_to_ejson(set)
        if unset:
            data["unset"] = list(unset)
        if inc:
            data["inc"] = to_ejson(inc)
        self._add(data)

    def delete(self, collection: str, key: Any) -> None:
        """Delete an existing document."""
        probe = op_from_json({"op": "delete", "collection": collection, "key": to_ejson(key)})
        _, (doc, incarnation) = self._state(probe.collection, probe.key)
        if doc is None:
            raise DocumentNotFound(collection, key)
        self._add({"op": "delete", "collection": collection, "key": probe.key,
                   "expect": incarnation, "before": doc})

    def add_op(self, op: Op) -> None:
        """Add an op already in its intent form (used by ``write`` and ``revert``)."""
        self._add(op.to_json())


def build_data_revision(peer: Peer, message: str, partition: str, ops: list[Op]) -> Revision:
    """Assemble the next data revision of ``peer`` from ``ops``."""
    engine = peer._engine
    parents = engine.parents_for(partition)
    return build(
        kind="data", payload=encode_ops(ops), partition=partition, parents=parents,
        origin=engine.origin, seq=engine.next_seq(partition), hlc=engine.hlc_for(parents),
        message=message, collections=[op.collection for op in ops], signer=peer.key,
    )


