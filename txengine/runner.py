"""Run authored script revisions with an ``op`` bound to the peer's store.

Scripts are trusted local code from this peer's ``versions/``; script
revisions from elsewhere are refused at intake (engine.receive), so only the
text recorded in the ledger — which ``verify`` compares with the file — runs.
A script declares the store kinds it runs on; on any other kind it is
recorded as skipped, the same way on every peer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

from .exceptions import UntrustedScript
from .revision import Revision
from .scripts import AuthoredScript, parse_authored

if TYPE_CHECKING:
    from .peer import Peer


@dataclass
class ScriptOp:
    """The ``op`` an authored script receives.

    ``schema`` is Alembic's ``Operations`` on the peer's connection (SQL
    stores), so ``op.schema.create_table(...)`` works as in an Alembic
    migration and commits with the ledger row; ``connection`` is the
    SQLAlchemy Connection itself; ``db`` is the pymongo Database on MongoDB
    stores, where ``connection`` and ``schema`` are None. A MongoDB script's
    collection and index work is not part of the step's transaction: write
    it idempotently (``create_index`` is).
    """

    connection: sa.Connection | None
    schema: Operations | None
    store_kind: str
    db: Any = None


def run_authored(peer: Peer, rev: Revision, direction: str) -> str | None:
    """Run ``upgrade`` or ``downgrade`` of a script revision; return a note when skipped."""
    known = peer.authored(rev.id)
    if known is None and rev.descriptor.get("signature") and peer._trust() is not None:
        # Arrived by sync on a rooted peer: intake took it only signed by the sequencer.
        known = parse_authored(rev.payload, Path(f"synced_{rev.id}.py"))
    if known is None:
        raise UntrustedScript(
            f"script revision {rev.id} is not in this peer's script location"
            f" ({peer.script_location}): add its file to versions/ before running it"
        )
    if peer._store.kind not in known.stores:
        return f"skipped: declared for {', '.join(known.stores)}, this store is {peer._store.kind}"
    script = AuthoredScript(known.path, rev.payload.decode("utf-8"), rev, known.stores)
    module = script.module()
    conn = peer._conn
    if conn is None:  # MongoDB: collection and index work on the pymongo Database
        func = getattr(module, direction)
        op = ScriptOp(connection=None, schema=None, store_kind=peer._store.kind,
                      db=peer._store.db)
        func() if _takes_no_argument(func) else func(op)
        return None
    context = MigrationContext.configure(connection=conn)
    schema = Operations(context)
    func = getattr(module, direction)
    # Alembic's module-level ``op`` (``from alembic import op``) is a proxy bound by
    # ``Operations.context``; bind it here so adopted Alembic migrations run unchanged.
    schema._install_proxy()
    try:
        if _takes_no_argument(func):
            func()  # Alembic's convention: ``def upgrade():`` uses the global ``op``
        else:
            func(ScriptOp(connection=conn, schema=schema, store_kind=peer._store.kind))
    finally:
        schema._remove_proxy()
    peer._store.forget_tables()
    return None


def _takes_no_argument(func: Any) -> bool:
    """Say whether ``func`` is called with no argument (an Alembic-style ``upgrade()``)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                   for p in params)
