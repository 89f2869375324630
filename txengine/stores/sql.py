"""SQL store on SQLAlchemy Core: SQLite (the embedded default) and PostgreSQL.

A collection with no declared table lives in a JSON document table that
txengine creates, named after the collection and keyed by
``(_partition, _key)``; ``_key`` is the canonical JSON text of the document's
key, so the str ``"1"`` and the int ``1`` stay distinct, and ``doc`` holds
the Extended JSON document, plain JSON values natively so SQL filters can
use them. ``_incarnation`` is the id of the revision that created the
document.

A table named like the collection that the app declared itself (e.g. with
``op.schema.create_table`` in an authored revision) is used as it is: see
:mod:`txengine.stores.declared` for the mapping, the bookkeeping table
``txengine_keys`` and the constraints that are refused.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from ..exceptions import StoreError
from ..ops import State, check_collection
from ..revision import DEFAULT_PARTITION
from ..values import dumps, loads
from .declared import KEYS_TABLE, DeclaredTable, keys_table, resolve

# PostgreSQL's ``json`` (not ``jsonb``): jsonb refuses U+0000 inside strings, which
# is valid JSON that SQLite and MongoDB keep; filters run in txengine.query anyway.
_JSON = sa.Text().with_variant(postgresql.JSON(), "postgresql")
DOC_COLUMNS = {"_partition", "_key", "doc", "_incarnation"}
_KEYS = keys_table(sa.MetaData())


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


Statement = tuple[str, Sequence[Any]]
"""One SQL statement and its parameters, as bulk writes hand them to a commit."""


def row_values(conn: sa.Connection) -> int:
    """Return how many parameters one multi-row statement may bind, or 0 to use
    ``executemany``: SQLite from 3.33 (``UPDATE ... FROM``) only.

    A multi-row statement binds all its rows at once and then runs without
    the GIL, so a helper thread can run a batch's writes while this one
    computes (:meth:`SqlStore.commit_in_background`); ``executemany`` takes
    the GIL back for every row, which would queue the helper behind it.
    """
    if conn.dialect.name != "sqlite" or sqlite3.sqlite_version_info < (3, 33):
        return 0
    return int(conn.connection.dbapi_connection.getlimit(  # type: ignore[union-attr]
        sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


def values_statements(head: str, rows: Sequence[Sequence[Any]], tail: str,
                      limit: int) -> list[Statement]:
    """Return ``head (?, ...), (?, ...) tail`` statements for ``rows``, as few as the
    parameter ``limit`` allows."""
    width = len(rows[0])
    group = "(" + ", ".join("?" * width) + ")"
    per = max(1, limit // width)
    return [(f"{head} {', '.join([group] * len(chunk))}{tail}",
             list(chain.from_iterable(chunk)))
            for chunk in (rows[i:i + per] for i in range(0, len(rows), per))]


def run_statements(cur: Any, statements: list[Statement],
                   defer: list[Statement] | None) -> None:
    """Run ``statements`` now, or add them to ``defer`` for the commit to run."""
    if defer is not None:
        defer += statements
    else:
        for sql, params in statements:
            cur.execute(sql, params)


_dumps = dumps


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA cache_size=-65536")
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
    declared_tables = True
    """App-declared tables serve as collections (see :mod:`.declared`)."""
    bulk_batch = 20_000
    """A commit rewrites every page its batch dirtied, and the ledger's id index and the
    document keys take their keys at random, so small batches write the same pages again
    and again. On SQLite, at 20,000 a batch rather than 2,000, ``upgrade heads`` of
    100,000 revisions ran ~25 % faster and ``downgrade base`` ~20 % (PostgreSQL: no
    slower), and a clone's commits took 4 µs a revision instead of 17."""

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self.dialect = conn.dialect.name
        self._tables: dict[str, sa.Table] = {}
        self._declared: dict[str, DeclaredTable] = {}
        self._metadata = sa.MetaData()
        self._is_pg = self.dialect == "postgresql"
        self._statements: dict[str, dict[str, str]] = {}
        self._created: set[str] = set()
        self._row_values = row_values(conn)
        sa.event.listen(conn, "commit", self._on_commit)
        sa.event.listen(conn, "rollback", self._on_rollback)

    @property
    def exact_decimal_columns(self) -> bool:
        """True when a declared Numeric column holds every Decimal exactly (not SQLite)."""
        return self._is_pg

    def _on_commit(self, _conn: sa.Connection) -> None:
        self._created.clear()

    def _on_rollback(self, _conn: sa.Connection) -> None:
        """Forget tables created (or resolved) in the transaction that was rolled back."""
        for name in self._created:
            table = self._tables.pop(name, None)
            if table is not None:
                self._metadata.remove(table)
            self._declared.pop(name, None)
            self._statements.pop(name, None)
        self._created.clear()

    # -- tables --------------------------------------------------------------
    def table(self, collection: str, create: bool = True) -> sa.Table | None:
        """Return the JSON document table of a collection, creating it when asked."""
        found = self.resolve(collection, create)
        if isinstance(found, DeclaredTable):
            raise StoreError(f"collection {collection!r} lives in a declared table, not in a"
                             " JSON document table")
        return found

    def resolve(self, collection: str, create: bool = True) -> sa.Table | DeclaredTable | None:
        """Return where a collection lives: its JSON document table or its declared table.

        A missing table is created as a JSON document table when ``create``;
        an existing table without the document columns is a declared table.
        """
        table = self._tables.get(collection)
        if table is not None:
            return table
        declared = self._declared.get(collection)
        if declared is not None:
            return declared
        check_collection(collection)
        inspector = sa.inspect(self.conn)
        if inspector.has_table(collection):
            columns = {c["name"] for c in inspector.get_columns(collection)}
            if not DOC_COLUMNS <= columns:
                declared = resolve(self.conn, collection)
                _KEYS.create(self.conn, checkfirst=True)
                self._declared[collection] = declared
                self._created.add(collection)
                return declared
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
        self._created.add(collection)
        return table

    def forget_tables(self) -> None:
        """Drop cached table metadata (after DDL that a script ran)."""
        self._tables.clear()
        self._declared.clear()
        self._statements.clear()
        self._created.clear()
        self._metadata = sa.MetaData()

    def collections(self) -> list[str]:
        """Return the collections holding documents (txengine's own tables excluded).

        JSON document tables, and declared tables once txengine has written a
        document into them (they have rows in ``txengine_keys``).
        """
        names = []
        inspector = sa.inspect(self.conn)
        tables = inspector.get_table_names()
        for name in tables:
            if name.startswith("txengine_") or name == "alembic_version":
                continue
            columns = {c["name"] for c in inspector.get_columns(name)}
            if DOC_COLUMNS <= columns:
                names.append(name)
        if KEYS_TABLE in tables:
            q = sa.select(_KEYS.c.collection).distinct()
            names += [n for (n,) in self.conn.execute(q) if n in tables]
        return sorted(names)

    # -- states --------------------------------------------------------------
    def _decode(self, doc: Any) -> dict[str, Any]:
        # A bare integer beyond ±(2^53-1) can only be a whole float (Extended JSON writes
        # such ints as $numberLong): RFC 8785 prints -5.6e16 as digits and JSONB keeps
        # numbers as numeric, so restore the float on every store alike.
        return _whole_floats(doc if isinstance(doc, dict) else loads(doc))

    def commit(self) -> None:
        """Commit the data, ledger and audit writes of the current transaction."""
        self.conn.commit()

    def commit_in_background(self, statements: Sequence[Statement] = ()
                             ) -> Callable[[], None]:
        """Run ``statements`` and commit on a helper thread; return the call that waits.

        The driver lets go of the GIL while the database works (multi-row
        statements, see :func:`row_values`; writing pages; now and then a
        checkpoint), so bulk work computes its next batch meanwhile; the
        caller runs no statement until it has waited. Waiting raises what
        the helper raised, then settles SQLAlchemy's transaction (the driver
        has nothing left to commit).
        """
        cur = self.cursor()
        dbapi = self.conn.connection.dbapi_connection
        failed: list[BaseException] = []

        def commit() -> None:
            try:
                for sql, params in statements:
                    cur.execute(sql, params)
                dbapi.commit()  # type: ignore[union-attr]
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                failed.append(exc)

        thread = threading.Thread(target=commit, name="txengine-commit")
        thread.start()

        def wait() -> None:
            interrupted = None
            while thread.is_alive():  # never roll back under a commit still running
                try:
                    thread.join()
                except BaseException as exc:  # noqa: BLE001 - raised once it is done
                    interrupted = exc
            if interrupted is not None:
                raise interrupted
            if failed:
                raise failed[0]
            self.conn.commit()

        return wait

    def rollback(self) -> None:
        """Drop uncommitted writes; after reads, end the snapshot so the next read is fresh."""
        self.conn.rollback()

    def cursor(self) -> Any:
        return raw_cursor(self.conn)

    def placeholder(self) -> str:
        return placeholder(self.conn)

    def _sql(self, collection: str) -> dict[str, str]:
        sql = self._statements.get(collection)
        if sql is None:
            q = self.conn.dialect.identifier_preparer.quote(collection)
            ph = self.placeholder()
            doc = f"CAST({ph} AS JSON)" if self._is_pg else ph
            upsert_rows = f"INSERT INTO {q} (_partition, _key, doc, _incarnation) VALUES"
            on_conflict = (" ON CONFLICT (_partition, _key) DO UPDATE SET doc = excluded.doc,"
                           " _incarnation = excluded._incarnation")
            sql = {
                "select1": f"SELECT _key, doc, _incarnation FROM {q}"
                           f" WHERE _partition = {ph} AND _key = {ph}",
                "select": f"SELECT _key, doc, _incarnation FROM {q}"
                          f" WHERE _partition = {ph} AND _key IN ",
                "upsert": f"{upsert_rows} ({ph}, {ph}, {doc}, {ph}){on_conflict}",
                "delete": f"DELETE FROM {q} WHERE _partition = {ph} AND _key = {ph}",
                "delete_in": f"DELETE FROM {q} WHERE _partition = {ph} AND _key IN ",
                "upsert_rows": upsert_rows,
                "on_conflict": on_conflict,
            }
            self._statements[collection] = sql
        return sql

    def load_states(self, partition: str, collection: str,
                    keys: Iterable[str]) -> dict[str, State]:
        found = self.resolve(collection, create=False)
        if found is None:
            return {}
        if isinstance(found, DeclaredTable):
            return self._load_declared(found, partition, list(keys))
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

    def write_states(self, partition: str, collection: str, states: Mapping[str, State],
                     defer: list[Statement] | None = None) -> None:
        found = self.resolve(collection)
        if isinstance(found, DeclaredTable):
            self._write_declared(found, partition, states)
            return
        sql = self._sql(collection)
        upserts = []
        deletes = []
        for key, (doc, inc) in states.items():
            if doc is None:
                deletes.append((partition, key))
            else:
                upserts.append((partition, key, _dumps(doc), inc))
        cur = self.cursor()
        limit = self._row_values
        if limit and (deletes or upserts):
            statements: list[Statement] = []
            if deletes:  # by key list: the row-value form `IN (VALUES ...)` scans the table
                keys = [key for _partition, key in deletes]
                statements += [(f"{sql['delete_in']}({', '.join('?' * len(chunk))})",
                                [partition, *chunk])
                               for chunk in (keys[i:i + limit - 1]
                                             for i in range(0, len(keys), limit - 1))]
            if upserts:
                statements += values_statements(sql["upsert_rows"], upserts, sql["on_conflict"],
                                                 limit)
            run_statements(cur, statements, defer)
            return
        if deletes:
            cur.executemany(sql["delete"], deletes)
        if upserts:
            cur.executemany(sql["upsert"], upserts)

    def documents(self, partition: str, collection: str) -> Iterator[dict[str, Any]]:
        for _text, doc, _inc in self.ordered_states(partition, collection):
            yield doc

    def snapshot(self) -> dict[tuple[str, str, str], State]:
        out: dict[tuple[str, str, str], State] = {}
        for name in self.collections():
            table = self.resolve(name, create=False)
            assert table is not None
            if isinstance(table, DeclaredTable):
                for partition, text, doc, inc in self._declared_rows(table):
                    out[(partition, name, text)] = (doc, inc)
                continue
            q = sa.select(table.c._partition, table.c._key, table.c.doc, table.c._incarnation)
            for partition, key, doc, inc in self.conn.execute(q):
                out[(partition, name, key)] = (self._decode(doc), inc)
        return out

    def ordered_states(self, partition: str, collection: str
                       ) -> Iterator[tuple[str, dict[str, Any], str | None]]:
        """Yield (key text, doc, incarnation) of a partition's collection by key text.

        Code-point order (SQLite's BINARY collation, PostgreSQL's ``"C"``), the
        order Python sorts strings in, so a content digest is the same on every
        store kind; streamed, so a million documents never sit in memory.
        """
        table = self.resolve(collection, create=False)
        if table is None:
            return
        if isinstance(table, DeclaredTable):
            rows = sorted((r for r in self._declared_rows(table) if r[0] == partition),
                          key=lambda r: r[1])
            for _partition, text, doc, inc in rows:
                yield text, doc, inc
            return
        order = 'ORDER BY _key COLLATE "C"' if self._is_pg else "ORDER BY _key"
        quoted = self.conn.dialect.identifier_preparer.quote(collection)
        q = sa.text(f"SELECT _key, doc, _incarnation FROM {quoted} WHERE _partition = :p"
                    f" {order}").execution_options(stream_results=True, yield_per=5000)
        for key, doc, inc in self.conn.execute(q, {"p": partition}):
            yield key, self._decode(doc), inc

    # -- declared tables -----------------------------------------------------
    def _declared_sql(self, table: DeclaredTable) -> dict[str, str]:
        """Return (and cache) the hand-written statements of a declared table."""
        if table.sql:
            return table.sql
        quote = self.conn.dialect.identifier_preparer.quote
        ph = self.placeholder()
        q, key = quote(table.name), quote(table.key.column)
        names = [quote(n) for n in table.fields]
        values = ", ".join([ph, *(c.placeholder.format(ph) for c in table.fields.values())])
        update = (" DO UPDATE SET " + ", ".join(f"{n} = excluded.{n}" for n in names)
                  if names else " DO NOTHING")
        where_keys = f"collection = {ph} AND _partition = {ph} AND _key"
        table.sql = {
            "select": f"SELECT {', '.join([key, *names])} FROM {q} WHERE {key} IN ",
            "all": f"SELECT {', '.join([key, *names])} FROM {q}",
            "upsert": f"INSERT INTO {q} ({', '.join([key, *names])}) VALUES ({values})"
                      f" ON CONFLICT ({key}){update}",
            "delete": f"DELETE FROM {q} WHERE {key} = {ph}",
            "keys": f"SELECT _key, incarnation, nulls FROM {KEYS_TABLE} WHERE {where_keys} IN ",
            "all_keys": f"SELECT _partition, _key, incarnation, nulls FROM {KEYS_TABLE}"
                        f" WHERE collection = {ph}",
            "key_upsert": f"INSERT INTO {KEYS_TABLE} (collection, _partition, _key, incarnation,"
                          f" nulls) VALUES ({ph}, {ph}, {ph}, {ph}, {ph})"
                          " ON CONFLICT (collection, _partition, _key) DO UPDATE SET"
                          " incarnation = excluded.incarnation, nulls = excluded.nulls",
            "key_delete": f"DELETE FROM {KEYS_TABLE} WHERE {where_keys} = {ph}",
            "owner": f"SELECT _partition FROM {KEYS_TABLE} WHERE collection = {ph}"
                     f" AND _partition <> {ph} LIMIT 1",
            "any": f"SELECT 1 FROM {q} LIMIT 1",
        }
        return table.sql

    def _owner(self, table: DeclaredTable) -> str:
        """Return the partition a declared table's documents belong to.

        The partition of its bookkeeping rows; with none yet, ``default``
        (rows the app wrote itself, untracked, count as ``default``).
        """
        if table.partition is not None:
            return table.partition
        cur = self.cursor()
        cur.execute(self._declared_sql(table)["owner"], (table.name, ""))
        row = cur.fetchone()
        if row is not None:
            table.partition = row[0]
        return row[0] if row is not None else DEFAULT_PARTITION

    def _claim(self, table: DeclaredTable, partition: str) -> None:
        """Refuse a write of a second partition into a declared table (no partition column)."""
        if table.partition == partition:
            return
        cur = self.cursor()
        sql = self._declared_sql(table)
        cur.execute(sql["owner"], (table.name, partition))
        row = cur.fetchone()
        other = row[0] if row is not None else None
        if other is None and partition != DEFAULT_PARTITION:
            cur.execute(sql["any"])
            if cur.fetchone() is not None:
                cur.execute(sql["owner"], (table.name, DEFAULT_PARTITION))
                if cur.fetchone() is None:
                    other = DEFAULT_PARTITION  # untracked rows only: the app's own, in default
        if other is not None:
            raise StoreError(
                f"declared table {table.name!r} holds the documents of partition {other!r} and"
                f" has no partition column, so partition {partition!r} cannot write to it:"
                " give that partition a collection of its own")
        table.partition = partition

    def _load_declared(self, table: DeclaredTable, partition: str,
                       keys: list[str]) -> dict[str, State]:
        if partition != self._owner(table):
            return {}
        values: dict[Any, str] = {}
        for text in keys:
            try:
                values[table.key_value(text)] = text
            except StoreError:
                continue  # a key this table cannot hold is a missing document
        sql = self._declared_sql(table)
        ph = self.placeholder()
        cur = self.cursor()
        out: dict[str, State] = {}
        pks = list(values)
        for i in range(0, len(pks), 500):
            chunk = pks[i:i + 500]
            cur.execute(sql["select"] + "(" + ", ".join([ph] * len(chunk)) + ")", chunk)
            rows = cur.fetchall()
            if not rows:
                continue
            texts = [values[r[0]] for r in rows]
            cur.execute(sql["keys"] + "(" + ", ".join([ph] * len(texts)) + ")",
                        (table.name, partition, *texts))
            meta = {text: (inc, nulls) for text, inc, nulls in cur.fetchall()}
            for row, text in zip(rows, texts, strict=True):
                inc, nulls = meta.get(text, (None, None))
                out[text] = (table.decode(row[0], row[1:], nulls), inc)
        return out

    def _write_declared(self, table: DeclaredTable, partition: str,
                        states: Mapping[str, State]) -> None:
        """Write final states into a declared table and its bookkeeping rows.

        Every document is checked (refused constraints, partition, columns,
        values) before the group's first statement runs.
        """
        if table.refusal:
            raise StoreError(table.refusal)
        upserts, deletes, key_upserts, key_deletes = [], [], [], []
        for text, (doc, inc) in states.items():
            value = table.key_value(text)
            if doc is None:
                deletes.append((value,))
                key_deletes.append((table.name, partition, text))
            else:
                row, nulls = table.encode(text, doc)
                upserts.append((value, *row))
                key_upserts.append((table.name, partition, text, inc, nulls))
        self._claim(table, partition)
        sql = self._declared_sql(table)
        cur = self.cursor()
        if deletes:
            cur.executemany(sql["delete"], deletes)
            cur.executemany(sql["key_delete"], key_deletes)
        if upserts:
            cur.executemany(sql["upsert"], upserts)
            cur.executemany(sql["key_upsert"], key_upserts)

    def _declared_rows(self, table: DeclaredTable) -> Iterator[tuple[str, str, Any, Any]]:
        """Yield (partition, key text, doc, incarnation) of every row of a declared table."""
        sql = self._declared_sql(table)
        cur = self.cursor()
        cur.execute(sql["all_keys"], (table.name,))
        meta = {text: (partition, inc, nulls) for partition, text, inc, nulls in cur.fetchall()}
        owner = next((m[0] for m in meta.values()), DEFAULT_PARTITION)
        cur.execute(sql["all"])
        for row in cur.fetchall():
            text = table.key_text_of(row[0])
            partition, inc, nulls = meta.get(text, (owner, None, None))
            yield partition, text, table.decode(row[0], row[1:], nulls), inc


def _has_big_int(value: Any) -> bool:
    kind = type(value)
    if kind is int:
        return not -(2**53 - 1) <= value <= 2**53 - 1
    if kind is dict:
        return any(_has_big_int(v) for v in value.values())
    if kind is list:
        return any(_has_big_int(v) for v in value)
    return False


def _rebuild_whole_floats(value: Any) -> Any:
    if type(value) is int and not -(2**53 - 1) <= value <= 2**53 - 1:
        return float(value)
    if isinstance(value, dict):
        return {k: _rebuild_whole_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebuild_whole_floats(v) for v in value]
    return value


def _whole_floats(value: Any) -> Any:
    """Return ``value`` with integers beyond ±(2^53-1) turned back into floats.

    Scans first and rebuilds only the rare document that needs it: this runs
    on every document read.
    """
    return _rebuild_whole_floats(value) if _has_big_int(value) else value
