"""Credentials: the peers allowed to sync with this store over HTTP, each by a token.

``txengine peers add NAME`` makes a token and shows it once; the store keeps
only its SHA-256, in ``txengine_peers`` (a table on SQL stores, a collection
on MongoDB), next to the data it guards. A slow KDF (bcrypt, scrypt, argon2)
exists to make guessing a *low-entropy* password from a stolen hash costly;
a token holds 256 random bits, which no one can guess, so one fast hash is
as safe and keeps the check on every request cheap. Looking tokens up by
their hash also leaves no timing to measure: the secret is never compared.

Each peer also holds **grants**: the partitions it may read and write
(``txengine peers grant NAME --read P --write P``). A peer holds none until
granted, so a new token opens nothing by mistake. A pattern is a partition
name, or a prefix followed by one trailing ``*`` (``user:*``; ``*`` alone is
every partition): prefixes are easy to predict, and unlike fnmatch nothing in
a partition name (``?``, ``[``) is read as a wildcard. Grants live in
``txengine_grants`` on SQL stores (a table of its own, so a store created
before grants existed gains it without a migration) and in the peer's
document on MongoDB.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .exceptions import CredentialNotFound, InvalidInput

TOKEN_PREFIX = "txe_"
"""Marks a txengine token, so secret scanners and people recognize one."""

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
MODES = ("read", "write")
MAX_PATTERN = 200

metadata = sa.MetaData()

peers = sa.Table(
    "txengine_peers",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

grants = sa.Table(
    "txengine_grants",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("mode", sa.String(8), primary_key=True),
    sa.Column("pattern", sa.String(MAX_PATTERN), primary_key=True),
)


def matches(pattern: str, partition: str) -> bool:
    """Say whether a grant pattern covers a partition: equal, or a prefix before ``*``."""
    if pattern.endswith("*"):
        return partition.startswith(pattern[:-1])
    return partition == pattern


def check_pattern(pattern: str) -> str:
    """Return ``pattern``, or refuse one that is empty, too long or has an inner ``*``."""
    if not pattern or len(pattern) > MAX_PATTERN or "*" in pattern[:-1]:
        raise InvalidInput(f"partition pattern {pattern!r} is not valid: use a partition name,"
                           " or a prefix ending in one '*' ('user:*', or '*' for all)")
    return pattern


@dataclass(frozen=True)
class Credential:
    """A peer allowed to sync with this store (never its token)."""

    name: str
    created_at: float
    read: tuple[str, ...] = ()
    """Patterns of the partitions this peer may receive."""
    write: tuple[str, ...] = ()
    """Patterns of the partitions this peer may send revisions of."""

    def may_read(self, partition: str) -> bool:
        return any(matches(p, partition) for p in self.read)

    def may_write(self, partition: str) -> bool:
        return any(matches(p, partition) for p in self.write)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "created_at": self.created_at, "read": list(self.read),
                "write": list(self.write)}


@dataclass(frozen=True)
class NewCredential:
    """A freshly added peer and its token: shown once, stored only as a hash."""

    name: str
    token: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "token": self.token}


def token_hash(token: str) -> str:
    """Return the SHA-256 (hex) under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Credentials:
    """The ``txengine_peers`` table (SQL) or collection (MongoDB) of one store."""

    def __init__(self, conn: sa.Connection | None, mongo_db: Any = None) -> None:
        self._conn = conn
        self._coll: Any = None
        if conn is not None:
            metadata.create_all(conn)
            conn.commit()
        else:
            self._coll = mongo_db["txengine_peers"]
            self._coll.create_index("token_sha256", unique=True)

    def add(self, name: str) -> NewCredential:
        """Add a peer; return it with its new token (the only time the token is seen)."""
        if not _NAME.match(name):
            raise InvalidInput(f"peer name {name!r} is not valid: use 1-100 letters, digits,"
                               " '.', '_' or '-'")
        if any(c.name == name for c in self.list()):
            raise InvalidInput(f"peer {name!r} already has a token: `txengine peers remove"
                               f" {name}` first to replace it")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = {"name": name, "token_sha256": token_hash(token), "created_at": time.time()}
        if self._conn is not None:
            self._conn.execute(peers.insert().values(**row))
            self._conn.commit()
        else:
            self._coll.insert_one({"_id": name, **row})
        return NewCredential(name, token)

    def list(self) -> list[Credential]:
        """Return the peers that may sync, by name, with their grants."""
        if self._conn is not None:
            rows = self._conn.execute(
                sa.select(peers.c.name, peers.c.created_at).order_by(peers.c.name)).all()
            held = self._grants()
            self._conn.rollback()
            return [Credential(r.name, r.created_at, *held.get(r.name, ((), ())))
                    for r in rows]
        return [_from_document(d) for d in self._coll.find({}, sort=[("name", 1)])]

    def get(self, name: str) -> Credential:
        """Return one peer with its grants, or raise CredentialNotFound."""
        if self._conn is not None:
            row = self._conn.execute(
                sa.select(peers.c.name, peers.c.created_at).where(peers.c.name == name)).first()
            held = self._grants(name) if row is not None else {}
            self._conn.rollback()
            if row is None:
                raise CredentialNotFound(name)
            return Credential(row.name, row.created_at, *held.get(name, ((), ())))
        doc = self._coll.find_one({"_id": name})
        if doc is None:
            raise CredentialNotFound(name)
        return _from_document(doc)

    def grant(self, name: str, read: Sequence[str] = (), write: Sequence[str] = ()
              ) -> Credential:
        """Let peer ``name`` read and write the partitions the patterns cover; return it."""
        wanted = _pairs(read, write)
        held = self.get(name)
        new = [(m, p) for m, p in wanted if p not in getattr(held, m)]
        if self._conn is not None:
            if new:
                self._conn.execute(grants.insert(), [{"name": name, "mode": m, "pattern": p}
                                                     for m, p in dict.fromkeys(new)])
            self._conn.commit()
        else:
            for mode in MODES:
                patterns = list(dict.fromkeys(p for m, p in new if m == mode))
                if patterns:
                    self._coll.update_one({"_id": name},
                                          {"$addToSet": {mode: {"$each": patterns}}})
        return self.get(name)

    def revoke_grant(self, name: str, read: Sequence[str] = (), write: Sequence[str] = ()
                     ) -> Credential:
        """Take grants back from peer ``name`` (each must be held); return it."""
        wanted = _pairs(read, write)
        held = self.get(name)
        for mode, pattern in wanted:
            if pattern not in getattr(held, mode):
                raise InvalidInput(f"peer {name!r} holds no {mode} grant {pattern!r}:"
                                   " `txengine peers list` shows its grants")
        if self._conn is not None:
            for mode, pattern in wanted:
                self._conn.execute(grants.delete().where(
                    (grants.c.name == name) & (grants.c.mode == mode)
                    & (grants.c.pattern == pattern)))
            self._conn.commit()
        else:
            for mode in MODES:
                patterns = [p for m, p in wanted if m == mode]
                if patterns:
                    self._coll.update_one({"_id": name}, {"$pull": {mode: {"$in": patterns}}})
        return self.get(name)

    def _grants(self, name: str | None = None) -> dict[str, tuple[tuple[str, ...], ...]]:
        """Return ``{name: (read patterns, write patterns)}`` from the SQL table."""
        query = sa.select(grants.c.name, grants.c.mode, grants.c.pattern).order_by(
            grants.c.pattern)
        if name is not None:
            query = query.where(grants.c.name == name)
        found: dict[str, dict[str, list[str]]] = {}
        assert self._conn is not None
        for row in self._conn.execute(query):
            found.setdefault(row.name, {m: [] for m in MODES})[row.mode].append(row.pattern)
        return {n: tuple(tuple(by[m]) for m in MODES) for n, by in found.items()}

    def remove(self, name: str) -> None:
        """Remove a peer: its token stops working at once, on every server process."""
        if self._conn is not None:
            count = self._conn.execute(peers.delete().where(peers.c.name == name)).rowcount
            self._conn.execute(grants.delete().where(grants.c.name == name))
            self._conn.commit()
        else:
            count = self._coll.delete_one({"_id": name}).deleted_count
        if not count:
            raise CredentialNotFound(name)

    def authenticate(self, token: str) -> str | None:
        """Return the name of the peer holding ``token``, or None."""
        digest = token_hash(token)
        if self._conn is not None:
            name = self._conn.execute(
                sa.select(peers.c.name).where(peers.c.token_sha256 == digest)).scalar()
            self._conn.rollback()
            return name
        found = self._coll.find_one({"token_sha256": digest})
        return None if found is None else str(found["name"])


def _pairs(read: Sequence[str], write: Sequence[str]) -> list[tuple[str, str]]:
    """Return checked (mode, pattern) pairs; refuse an empty request."""
    pairs = [("read", check_pattern(p)) for p in read] + [("write", check_pattern(p))
                                                           for p in write]
    if not pairs:
        raise InvalidInput("name at least one partition pattern: --read P or --write P")
    return pairs


def _from_document(doc: dict[str, Any]) -> Credential:
    return Credential(doc["name"], doc["created_at"], tuple(sorted(doc.get("read", ()))),
                      tuple(sorted(doc.get("write", ()))))
