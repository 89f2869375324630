"""Fixtures of the store contract suite: a store per backend, and what it can do.

The suite in ``test_contract.py`` runs against every backend fixture:
SQLite, PostgreSQL (``TXENGINE_TEST_POSTGRES_URL``) and MongoDB (mongomock,
or a real server when ``TXENGINE_TEST_MONGODB_URI`` is set). Like Alembic's
``SuiteRequirements``, :class:`Requirements` reads the store's capability
flags, so a test of something a store cannot do skips with the reason.
A backend plugs in by giving :class:`StoreHarness` a ``declare`` (create an
app table as an authored revision would) and ``execute`` (raw DDL).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from conftest import postgres_base_url, store_url_for

from txengine.peer import Peer
from txengine.stores.mongo import MongoStore, open_database
from txengine.stores.sql import SqlStore, create_engine

MONGODB_ENV = "TXENGINE_TEST_MONGODB_URI"
STORE_BACKENDS = ["sqlite", "postgresql", "mongodb"]


@contextmanager
def mongodb_url() -> Iterator[str]:
    """Yield the URL of an empty MongoDB database, dropped after.

    A real server when ``TXENGINE_TEST_MONGODB_URI`` is set (``mongodb://host:port``;
    each test gets a database of its own), else mongomock (``mongomock://``).
    """
    name = f"t_{secrets.token_hex(6)}"
    base = os.environ.get(MONGODB_ENV)
    url = f"{base.rstrip('/')}/{name}" if base else f"mongomock://tests/{name}"
    try:
        yield url
    finally:
        db, client = open_database(url)
        db.client.drop_database(name)
        if client is not None:
            client.close()


@pytest.fixture(params=STORE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The store kind under test (overrides tests/conftest.py's to add MongoDB)."""
    if request.param == "postgresql":
        postgres_base_url()
    return request.param


@pytest.fixture
def store_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """URL of an empty store: SQLite file, PostgreSQL schema or MongoDB database."""
    if backend == "mongodb":
        with mongodb_url() as url:
            yield url
    else:
        with store_url_for(backend, tmp_path / "stores") as url:
            yield url


class Requirements:
    """Capabilities of the store under test; each property is one flag of the store."""

    def __init__(self, store: Any) -> None:
        self.store = store

    @property
    def declared_tables(self) -> bool:
        """App-declared tables can serve as collections."""
        return bool(getattr(self.store, "declared_tables", False))

    @property
    def coupling_checks(self) -> bool:
        """Constraints that couple documents (UNIQUE, cascades, triggers) exist and are refused."""
        return self.declared_tables and self.store.kind == "sql"

    @property
    def exact_decimal_columns(self) -> bool:
        """A declared decimal column holds every Decimal128 exactly."""
        return bool(getattr(self.store, "exact_decimal_columns", False))

    @property
    def transactional(self) -> bool:
        return bool(self.store.transactional)

    def require(self, *flags: str) -> None:
        """Skip the calling test unless the store has every flag."""
        for flag in flags:
            if not getattr(self, flag):
                pytest.skip(f"{type(self.store).__name__} on this backend lacks {flag}")


class StoreHarness:
    """One store on a fresh database, plus the backend-specific setup a test needs."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith(("mongodb://", "mongomock://")):
            db, self.client = open_database(url)
            self.engine = self.conn = None
            self.store: SqlStore | MongoStore = MongoStore(db, self.client)
            self.dialect = "mongodb"
        else:
            self.engine = create_engine(url)
            self.conn = self.engine.connect()
            self.store = SqlStore(self.conn)
            self.dialect = self.conn.dialect.name
        self.requirements = Requirements(self.store)

    def commit(self) -> None:
        self.store.commit()

    def rollback(self) -> None:
        self.store.rollback()

    def declare(self, name: str, *columns: Any) -> None:
        """Create an app table the way an authored revision does (``op.schema.create_table``)."""
        assert self.conn is not None, "declared tables are SQL only (require declared_tables)"
        Operations(MigrationContext.configure(connection=self.conn)).create_table(name, *columns)
        self.conn.commit()
        self.store.forget_tables()

    def execute(self, sql: str) -> None:
        """Run raw DDL/DML (triggers, rows written behind txengine's back), committed."""
        assert self.conn is not None, "raw SQL needs a SQL store"
        self.conn.exec_driver_sql(sql)
        self.conn.commit()
        self.store.forget_tables()

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        """Return a table's rows as the app sees them, ordered by its first column."""
        assert self.conn is not None, "rows() reads a SQL table"
        rows = self.conn.execute(sa.text(f'SELECT * FROM "{table}" ORDER BY 1')).all()
        self.conn.rollback()
        return [tuple(r) for r in rows]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.engine.dispose()
        else:
            self.store.close()


@pytest.fixture
def harness(store_url: str) -> Iterator[StoreHarness]:
    """The store under test on an empty database (SQLite file or PostgreSQL schema)."""
    h = StoreHarness(store_url)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def requirements(harness: StoreHarness) -> Requirements:
    return harness.requirements


SCRIPT_BODY = '''

def upgrade(op):
    import sqlalchemy as sa

{upgrade}


def downgrade(op):
    import sqlalchemy as sa

{downgrade}
'''


def author_script(peer: Peer, message: str, upgrade: str, downgrade: str) -> str:
    """Author a script revision whose bodies are ``upgrade``/``downgrade`` (4-space indented)."""
    new = peer.new_script(message)
    head = new.path.read_text("utf-8").split("\n\ndef upgrade(op):")[0].rstrip("\n")
    indent = lambda body: "\n".join("    " + line for line in body.strip("\n").splitlines())  # noqa: E731
    new.path.write_text(head + SCRIPT_BODY.format(upgrade=indent(upgrade),
                                                  downgrade=indent(downgrade)), "utf-8")
    return new.id


@pytest.fixture
def script_peer(store_url: str, tmp_path: Path) -> Iterator[Peer]:
    """A peer with a ``versions/`` script location, on the empty store."""
    p = Peer.open(store_url, peer_id="test", script_location=tmp_path / "versions")
    try:
        yield p
    finally:
        p.close()
