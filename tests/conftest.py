"""Shared fixtures: one store URL per backend, and a peer opened on it.

``store_url`` runs a test on a SQLite file and on PostgreSQL. PostgreSQL
needs ``TXENGINE_TEST_POSTGRES_URL`` (``bash .ci/postgres.sh start`` prints
it); each test gets a schema of its own, created empty before the test and
dropped after it, selected through ``search_path`` in the URL, so tests (and
concurrent test runs) never see each other's tables.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from hypothesis import Phase, settings

from txengine.peer import Peer

# `pytest --hypothesis-profile=noshrink` reports the first failing example at once
# (shrinking a slow store-backed property can take minutes).
settings.register_profile("noshrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])

POSTGRES_ENV = "TXENGINE_TEST_POSTGRES_URL"
BACKENDS = ["sqlite", "postgresql"]


def postgres_base_url() -> str:
    """Return the PostgreSQL test URL, or skip the test when it is not configured."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} not set: PostgreSQL cases skipped")
    return url


@contextmanager
def postgres_schema_url(base: str) -> Iterator[str]:
    """Create a fresh, empty schema; yield a URL whose connections use it; drop it after."""
    schema = f"t_{secrets.token_hex(6)}"
    admin = sa.create_engine(base)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        sep = "&" if "?" in base else "?"
        yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def store_url_for(backend: str, directory: Path) -> Iterator[str]:
    """Yield an empty store's URL for ``backend`` (a SQLite file lives in ``directory``)."""
    if backend == "sqlite":
        directory.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{directory / f'store-{secrets.token_hex(4)}.db'}"
    else:
        with postgres_schema_url(postgres_base_url()) as url:
            yield url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The store kind under test; PostgreSQL skips when it is not configured."""
    if request.param == "postgresql":
        postgres_base_url()
    return request.param


@pytest.fixture
def store_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """URL of an empty store: a SQLite file in tmp_path, or a fresh PostgreSQL schema."""
    with store_url_for(backend, tmp_path / "stores") as url:
        yield url


@pytest.fixture
def new_store(backend: str, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Factory of further empty stores of the same backend (for second peers, replays)."""
    stack: list[Iterator[str]] = []

    def make() -> str:
        cm = store_url_for(backend, tmp_path / "more")
        stack.append(cm)
        return cm.__enter__()

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def peer(store_url: str) -> Iterator[Peer]:
    """A peer named ``test`` on the empty store, closed after the test."""
    p = Peer.open(store_url, peer_id="test")
    try:
        yield p
    finally:
        p.close()


# -- helpers shared by the test modules ---------------------------------------------------


def strict(snapshot: dict[tuple[str, str, str], object]) -> str:
    """Return a snapshot as text that tells 1 from 1.0 and keeps field order out of it."""
    import json

    rows = sorted([list(k), v] for k, v in snapshot.items())
    return json.dumps(rows, sort_keys=True, ensure_ascii=False)


def ledger_items(p: Peer, ids: list[str] | None = None) -> list[tuple[dict, bytes]]:
    """Return (descriptor, payload) of revisions of ``p`` in canonical order (default: all)."""
    order = p._engine.graph.canonical_order(ids)
    out = []
    for rev_id in order:
        rev = p.revision(rev_id)
        out.append((dict(rev.descriptor), rev.payload))
    return out


def replayed_snapshot(source: Peer, url: str, ids: list[str] | None = None) -> dict:
    """Replay ``source``'s revisions (default: its applied set) into the empty store ``url``."""
    ids = list(source._engine.applied) if ids is None else ids
    with Peer.open(url, peer_id="replayer") as fresh:
        fresh.receive(ledger_items(source, ids))
        fresh.upgrade("heads")
        return fresh.snapshot()


def write(peer: Peer, key: Any, partition: str = "default", **fields: Any) -> str:
    """Insert one item as its own revision; a short sleep keeps hlc milliseconds apart."""
    with peer.transaction(f"write {key}", partition=partition) as tx:
        tx.insert("items", {"_id": key, **fields})
    time.sleep(0.002)
    assert tx.revision is not None
    return tx.revision.id


@pytest.fixture
def pair(store_url: str, new_store: Any) -> Iterator[tuple[Peer, Peer]]:
    """Two empty peers, alice on the backend under test and bob on another store."""
    a = Peer.open(store_url, peer_id="alice")
    b = Peer.open(new_store(), peer_id="bob")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def fail_background_commit(monkeypatch: pytest.MonkeyPatch, call: int) -> list[int]:
    """Make the ``call``-th ``SqlStore.commit_in_background`` run a statement that fails
    (``no_such_table``) after what it was handed; return, per call, how many statements
    it was handed. ``monkeypatch.undo()`` restores the real one."""
    from txengine.stores.sql import SqlStore

    real = SqlStore.commit_in_background
    calls: list[int] = []

    def failing(self: SqlStore, statements: Any = ()) -> Callable[[], None]:
        calls.append(len(statements))
        if len(calls) == call:
            statements = [*statements, ("UPDATE no_such_table SET x = 1", [])]
        return real(self, statements)

    monkeypatch.setattr(SqlStore, "commit_in_background", failing)
    return calls
