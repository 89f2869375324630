"""Credentials: the peers allowed to sync with this store over HTTP, each by a token.

``txengine peers add NAME`` makes a token and shows it once; the store keeps
only its SHA-256, in ``txengine_peers`` (a table on SQL stores, a collection
on MongoDB), next to the data it guards. A slow KDF (bcrypt, scrypt, argon2)
exists to make guessing a *low-entropy* password from a stolen hash costly;
a token holds 256 random bits, which no one can guess, so one fast hash is
as safe and keeps the check on every request cheap. Looking tokens up by
their hash also leaves no timing to measure: the secret is never compared.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .exceptions import CredentialNotFound, InvalidInput

TOKEN_PREFIX = "txe_"
"""Marks a txengine token, so secret scanners and people recognize one."""

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")

metadata = sa.MetaData()

peers = sa.Table(
    "txengine_peers",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class Credential:
    """A peer allowed to sync with this store (never its token)."""

    name: str
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "created_at": self.created_at}


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
        self._coll = mongo_db["txengine_peers"] if conn is None else None
        if conn is not None:
            metadata.create_all(conn)
            conn.commit()
        else:
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
        """Return the peers that may sync, by name."""
        if self._conn is not None:
            rows = self._conn.execute(
                sa.select(peers.c.name, peers.c.created_at).order_by(peers.c.name)).all()
            self._conn.rollback()
            return [Credential(r.name, r.created_at) for r in rows]
        return [Credential(d["name"], d["created_at"])
                for d in self._coll.find({}, sort=[("name", 1)])]

    def remove(self, name: str) -> None:
        """Remove a peer: its token stops working at once, on every server process."""
        if self._conn is not None:
            count = self._conn.execute(peers.delete().where(peers.c.name == name)).rowcount
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
