"""SQL store on SQLAlchemy Core: SQLite (the embedded default) and PostgreSQL.

A collection with no declared table lives in a JSON document table that
txengine creates, named after the collection and keyed by
``(_partition, _key)``; ``_key`` is the canonical JSON text of the document's
key, so the str ``"1"`` and the int ``1`` stay distinct, and ``doc`` holds
the Extended JSON document, plain JSON values natively so SQL filters can
use them. ``_incarnation`` is the id of the revision that created the
document.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from ..exceptions import StoreError
from ..ops import State, check_collection

_JSON = sa.Text().with_variant(postgresql.JSONB(), "postgresql")
DOC_COLUMNS = {"_partition", "_key", "doc", "_incarnation"}


def raw_cursor(conn: sa.Connection) -> Any:
    """Return a DBAPI cursor inside the Connection's transaction.

    The hot paths (one write, bulk replay) run hand-written SQL on the
    driver's cursor: SQLAlchemy's per-statement compile and cache-key work
    costs more than the database does (machine-facts.md). Beginning the
    SQLAlchemy transaction first keeps ``conn.commit()``/``rollback()``
    authoritative.
    """
    if not conn.in_transaction():
        conn.begin()
    return conn.connection.cursor()


def placeholder(conn: sa.Connection) -> str:
    """Return the driver's positional placeholder (qmark for sqlite3, %s for psycopg)."""
    return "%s" if conn.dialect.name == "postgresql" else "?"


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def create_engine(url: str) -> sa.Engine:
    """Create a SQLAlchemy engine with txengine's defaults (WAL, synchronous=NORMAL)."""
    if "://" not in url and not url.startswith("sqlite"):
        url = f"sqlite:///{url}"
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise StoreError(f"cannot open store {url!r}: {exc}") from exc
    configure_engine(engine)
    return engine


def configure_engine(engine: sa.Engine) -> None:
    """Set SQLite PRAGMAs on every new connection of ``engine``."""
    if engine.dialect.name == "sqlite" and not sa.event.contains(
            engine, "connect", _sqlite_pragmas):
        sa.event.listen(engine, "connect", _sqlite_pragmas)


class SqlStore:
    """Document states in SQL tables, on the peer's one connection."""

    kind = "sql"
    transactional = True

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self.dialect = conn.dialect.name
        self._tables: dict[str, sa.Table] = {}
        self._metadata = sa.MetaData()
        self._is_pg = self.dialect == "postgresql"
        self._statements: dict[str, dict[str, str]] = {}

    # -- tables --------------------------------------------------------------
    def table(self, collection: str, create: bool = True) -> sa.Table | None:
        """Return the document table of a collection, creating it when asked."""
        table = self._tables.get(collection)
        if table is not None:
            return table
        check_collection(collection)
        inspector = sa.inspect(self.conn)
        if inspector.has_table(collection):
            columns = {c["name"] for c in inspector.get_columns(collection)}
            if not DOC_COLUMNS <= columns:
                raise StoreError(
                    f"table {collection!r} exists but is not a txengine document table"
                    f" (columns {sorted(columns)}): pick another collection name"
                )
        elif not create:
            return None
        table = sa.Table(
            collection, self._metadata,
            sa.Column("_partition", sa.String(200), primary_key=True),
            sa.Column("_key", sa.String(400), primary_key=True),
            sa.Column("doc", _JSON, nullable=False),
            sa.Column("_incarnation", sa.String(80), nullable=False),
        )
        table.create(self.conn, checkfirst=True)
        self._tables[collection] = table
        return table

    def forget_tables(self) -> None:
        """Drop cached table metadata (after DDL that a script ran)."""
        self._tables.clear()
        self._statements.clear()
        self._metadata = sa.MetaData()

    def collections(self) -> list[str]:
        """Return the document tables in the database (txengine's own excluded)."""
        names = []
        inspector = sa.inspect(self.conn)
        for name in inspector.get_table_names():
            if name.startswith("txengine_") or name == "alembic_version":
                continue
            columns = {c["name"] for c in inspector.get_columns(name)}
            if DOC_COLUMNS <= columns:
                names.append(name)
        return sorted(names)

    # -- states --------------------------------------------------------------
    def _decode(self, doc: Any) -> dict[str, Any]:
        return doc if isinstance(doc, dict) else json.loads(doc)

    def cursor(self) -> Any:
        return raw_cursor(self.conn)

    def placeholder(self) -> str:
        return placeholder(self.conn)

    def _sql(self, collection: str) -> dict[str, str]:
        sql = self._statements.get(collection)
        if sql is None:
            q = self.conn.dialect.identifier_preparer.quote(collection)
            ph = self.placeholder()
            doc = f"CAST({ph} AS JSONB)" if self._is_pg else ph
            sql = {
                "select1": f"SELECT _key, doc, _incarnation FROM {q}"
                           f" WHERE _partition = {ph} AND _key = {ph}",
                "select": f"SELECT _key, doc, _incarnation FROM {q}"
                          f" WHERE _partition = {ph} AND _key IN ",
                "upsert": f"INSERT INTO {q} (_partition, _key, doc, _incarnation)"
                          f" VALUES ({ph}, {ph}, {doc}, {ph}) ON CONFLICT (_partition, _key)"
                          " DO UPDATE SET doc = excluded.doc,"
                          " _incarnation = excluded._incarnation",
                "delete": f"DELETE FROM {q} WHERE _partition = {ph} AND _key = {ph}",
            }
            self._statements[collection] = sql
        return sql

    def load_states(self, partition: str, collection: str,
                    keys: Iterable[str]) -> dict[str, State]:
        if self.table(collection, create=False) is None:
            return {}
        keys = list(keys)
        sql = self._sql(collection)
        out: dict[str, State] = {}
        cur = self.cursor()
        ph = self.placeholder()
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            if len(chunk) == 1:
                cur.execute(sql["select1"], (partition, chunk[0]))
            else:
                cur.execute(sql["select"] + "(" + ", ".join([ph] * len(chunk)) + ")",
                            (partition, *chunk))
            for key, doc, inc in cur.fetchall():
                out[key] = (self._decode(doc), inc)
        return out

    def write_states(self, partition: str, collection: str,
                     states: Mapping[str, State]) -> None:
        self.table(collection)
        sql = self._sql(collection)
        upserts = []
        deletes = []
        for key, (doc, inc) in states.items():
            if doc is None:
                deletes.append((partition, key))
            else:
                upserts.append((partition, key, _dumps(doc), inc))
        cur = self.cursor()
        if deletes:
            cur.executemany(sql["delete"], deletes)
        if upserts:
            cur.executemany(sql["upsert"], upserts)

    def documents(self, partition: str, collection: str) -> Iterator[dict[str, Any]]:
        table = self.table(collection, create=False)
        if table is None:
            return
        q = sa.select(table.c.doc).where(table.c._partition == partition).order_by(table.c._key)
        for (doc,) in self.conn.execute(q):
            yield self._decode(doc)

    def snapshot(self) -> dict[tuple[str, str, str], State]:
        out: dict[tuple[str, str, str], State] = {}
        for name in self.collections():
            table = self.table(name, create=False)
            assert table is not None
            q = sa.select(table.c._partition, table.c._key, table.c.doc, table.c._incarnation)
            for partition, key, doc, inc in self.conn.execute(q):
                out[(partition, name, key)] = (self._decode(doc), inc)
        return out
