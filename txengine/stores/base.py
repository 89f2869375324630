"""The store contract: what the engine needs from where a peer's data lives.

A store reads and writes whole document states — ``(doc, incarnation)`` —
and nothing else; op semantics live in :mod:`txengine.ops` so that every
store kind computes the same result. Capability flags let the contract suite
skip what a store cannot do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from ..ops import State


class Store(Protocol):
    """A peer's data store (SQL through SQLAlchemy, later MongoDB)."""

    kind: str
    """``"sql"`` or ``"mongo"``: the store kinds an authored script declares."""
    transactional: bool
    """True when data, ledger and audit writes commit in one transaction."""
    declared_tables: bool
    """True when an app-declared table (SQL) can hold a collection, column for field."""
    bulk_batch: int
    """Revisions a bulk upgrade or downgrade commits together unless the peer was opened
    with a ``batch_size``: each commit has a fixed cost, which a store sets against the
    size of one transaction."""

    def commit(self) -> None:
        """Commit data, ledger and audit writes together (or finish the intent record)."""
        ...

    def commit_in_background(self, statements: Sequence[Any] = ()) -> Callable[[], None]:
        """Run deferred ``statements`` and :meth:`commit`, and return the call that waits
        for it (and raises what it raised); until then the caller only computes. A store
        may do it all at once."""
        ...

    def rollback(self) -> None:
        """Drop uncommitted writes; end a read snapshot."""
        ...

    def load_states(self, partition: str, collection: str,
                    keys: Iterable[str]) -> dict[str, State]:
        """Return the state of each key (text form) that exists; missing keys are absent."""
        ...

    def write_states(self, partition: str, collection: str, states: Mapping[str, State],
                     defer: list[Any] | None = None) -> None:
        """Write final states: a ``None`` doc deletes the document. A store may add the
        statements to ``defer`` instead, for :meth:`commit_in_background` to run."""
        ...

    def documents(self, partition: str, collection: str) -> Iterator[dict[str, Any]]:
        """Yield every document of a collection in a partition (Extended JSON)."""
        ...

    def snapshot(self) -> dict[tuple[str, str, str], State]:
        """Return every document state of every synced collection (for tests and verify)."""
        ...

    def ordered_states(self, partition: str, collection: str
                       ) -> Iterator[tuple[str, dict[str, Any], str | None]]:
        """Yield (key text, doc, incarnation) in key-text code-point order (content digests)."""
        ...

    def collections(self) -> list[str]:
        """Return the names of the collections holding documents."""
        ...
