"""The ``txengine demo`` scenario: the whole cycle on SQLite, as a stream of events.

The scenario calls the :class:`Peer` API and yields :class:`Event` objects:
section titles, explanations, the equivalent ``txengine`` command, and the
values the API returned. It never prints; ``cli.py`` renders the events with
the same renderers its commands use, so the demo shows what the commands show.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shlex
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import config as _config
from .exceptions import InvalidInput
from .peer import Peer
from .sync import Message, Side

MONGODB_ENV = "TXENGINE_DEMO_MONGODB_URI"
"""Set it (``mongodb://host:27017``) and the demo's cloud peer is a MongoDB database."""

SCHEMA_SCRIPT = '''

def upgrade(op):
    import sqlalchemy as sa

    # A side table for the app's own notes (not a synced collection).
    op.schema.create_table(
        "audit_notes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("note", sa.Text, nullable=False),
    )


def downgrade(op):
    op.schema.drop_table("audit_notes")
'''


@dataclass(frozen=True)
class Event:
    """One step of the demo.

    ``kind`` is ``section`` (a title), ``say`` (an explanation), ``command``
    (the equivalent command line), ``result`` (``value`` is what the API
    returned, ``text`` names its renderer: revision, operation, audit, verify,
    detail, document) or ``note`` (a caveat).
    """

    kind: str
    text: str = ""
    value: Any = None


def _section(title: str) -> Event:
    return Event("section", title)


def _say(text: str) -> Event:
    return Event("say", text)


def _cmd(*argv: str) -> Event:
    return Event("command", "txengine " + shlex.join(argv))


def _results(render: str, values: Any) -> Iterator[Event]:
    for value in values:
        yield Event("result", render, value)


def _schema_revision(root: Path, peer: Peer) -> Iterator[Event]:
    """Author a script revision that creates ``audit_notes``; skip it if scripts cannot run."""
    yield _section("2. An authored schema revision")
    if importlib.util.find_spec("txengine.runner") is None:
        yield Event("note", "Skipped: this build cannot apply authored script revisions yet"
                            " (txengine.runner is missing).")
        return
    yield _say("Schema changes are authored scripts, as in Alembic. `op.schema` is Alembic's"
               " Operations, bound to this peer's database.")
    yield _cmd("revision", "-m", "create audit_notes")
    assert peer.script_location is not None
    new = peer.new_script("create audit_notes")
    text = new.path.read_text("utf-8")
    new.path.write_text(text.split("\n\ndef upgrade(op):")[0].rstrip("\n") + SCHEMA_SCRIPT,
                        "utf-8")
    yield _say(f"Wrote {new.path.relative_to(root)}; its upgrade() now creates a table:")
    yield Event("say", SCHEMA_SCRIPT.strip("\n"))


def run_demo(directory: Path | None = None) -> Iterator[Event]:
    """Yield the demo's events while running it in ``directory`` (default: a new temp folder)."""
    started = time.perf_counter()
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="txengine-demo-"))
    root = root.resolve()
    if (root / _config.INI_NAME).exists():
        raise InvalidInput(f"{root} already holds an {_config.INI_NAME}: give --dir an empty"
                           " folder")
    yield _section("1. A new project")
    yield _say(f"Working in {root}. `init` writes alembic.ini with a [txengine] section"
               " and a versions/ folder, like `alembic init`.")
    yield _cmd("init", str(root))
    made = _config.init_project(root, peer_id="laptop")
    cfg = _config.load(made.config, required=True)

    def open_peer() -> Peer:
        return Peer.open(cfg.require_store(), cfg.peer_id, script_location=cfg.script_location)

    with open_peer() as peer:
        yield from _schema_revision(root, peer)
    with open_peer() as peer:
        if peer.heads():
            yield _cmd("upgrade", "heads")
            yield from _results("operation", [peer.upgrade("heads")])
        yield from _data_cycle(root, peer, cfg)
    yield from _two_peers(root)
    yield _section("Done")
    yield _say(f"The whole cycle took {time.perf_counter() - started:.1f}s. Explore it:"
               f" cd {shlex.quote(str(root))} && txengine history")


def _data_cycle(root: Path, peer: Peer, cfg: _config.Config) -> Iterator[Event]:
    yield _section("3. Data revisions through the write API")
    yield _say("Every write is a revision: a list of ops, chained to its parents by id."
               " The id is the SHA-256 digest of the revision.")
    ops = [{"op": "insert", "collection": "customers", "doc": {"_id": 1, "name": "Ada"}},
           {"op": "insert", "collection": "customers", "doc": {"_id": 2, "name": "Grace"}}]
    listing = "[\n" + ",\n".join(f"  {json.dumps(o)}" for o in ops) + "\n]\n"
    (root / "customers.json").write_text(listing, "utf-8")
    yield _say("customers.json:\n" + listing.rstrip("\n"))
    yield _cmd("write", "-m", "Add Ada and Grace", "customers.json")
    first = peer.write("Add Ada and Grace", ops)
    yield Event("say", first.id)
    rename = [{"op": "update", "collection": "customers", "key": 1,
               "set": {"name": "Ada Lovelace"}}]
    yield Event("command", f"echo {shlex.quote(json.dumps(rename))} | txengine write"
                           " -m \"Ada's full name\" -")
    second = peer.write("Ada's full name", rename)
    yield Event("say", second.id)
    yield _cmd("find", "customers")
    yield from _results("document", peer.find("customers"))

    yield _section("4. History")
    yield _cmd("history")
    yield from _results("revision", peer.history())

    yield _section("5. A revision as a script")
    yield _say("A data revision renders as an Alembic-style script: upgrade() holds the ops,"
               " downgrade() their inverses. It is derived from the payload, never executed.")
    yield _cmd("show", second.id[:12])
    yield Event("result", "detail", peer.show(second.id))

    yield _section("6. Downgrade, then upgrade")
    yield _say("`downgrade` moves this peer back (locally) and pins it there: new writes are"
               " refused until `upgrade heads`.")
    yield _cmd("downgrade", "-1")
    yield from _results("operation", [peer.downgrade("-1")])
    yield _cmd("get", "customers", "1")
    yield from _results("document", [peer.get("customers", 1)])
    yield _cmd("upgrade", "heads")
    yield from _results("operation", [peer.upgrade("heads")])
    yield _cmd("get", "customers", "1")
    yield from _results("document", [peer.get("customers", 1)])

    yield _section("7. Revert: the undo that other peers see")
    yield _say("`revert` writes a new revision that restores the old values where the"
               " reverted ones still stand, so later changes by others survive.")
    yield _cmd("revert", second.id[:12])
    reverted = peer.revert(second.id)
    yield Event("say", reverted.id if reverted else "nothing left to revert")
    yield _cmd("get", "customers", "1")
    yield from _results("document", [peer.get("customers", 1)])

    yield _section("8. The audit")
    yield _say("Every apply, undo, pin and unpin is an append-only audit row:"
               " when, which revision, which peer, which OS user, how long.")
    yield _cmd("audit")
    yield from _results("audit", peer.audit())

    yield _section("9. Verify")
    yield _say("`verify` recomputes every checksum and digest and checks the chain.")
    yield _cmd("verify")
    yield Event("result", "verify", peer.verify())

    yield _section("10. Tampering is caught")
    db = cfg.require_store().removeprefix("sqlite:///")
    sql = ("UPDATE txengine_revisions SET payload = replace(payload, 'Grace', 'Mallory')"
           f" WHERE id = '{first.id}'")
    yield _say("Someone edits a stored revision behind txengine's back, with the sqlite3 shell:")
    yield Event("command", f"sqlite3 txengine.db \"{sql}\"".replace("txengine.db",
                                                                  Path(db).name))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE txengine_revisions SET payload = CAST(replace(CAST(payload AS TEXT),"
                     " 'Grace', 'Mallory') AS BLOB) WHERE id = ?", (first.id,))
    conn.close()
    yield _cmd("verify")
    report = peer.verify()
    yield Event("result", "verify", report)
    yield _say(f"verify exits with status {0 if report.ok else 1} and names revision"
               f" {first.id[:12]}.")


def _cloud_store(folder: Path) -> tuple[str, str, str]:
    """Return (store URL, what to type for it, what it is): a new MongoDB database when
    the environment names a server, else a second SQLite file."""
    uri = os.environ.get(MONGODB_ENV)
    if not uri:
        return f"sqlite:///{folder / 'cloud.db'}", "cloud.db", "second SQLite file, cloud.db"
    name = f"txengine_demo_{secrets.token_hex(4)}"
    url = urlunsplit(urlsplit(uri)._replace(path=f"/{name}"))
    return url, url, f"MongoDB database, {name} (from ${MONGODB_ENV}; drop it when done)"


def _status_line(peer: Peer) -> str:
    st = peer.status()
    return (f"{peer.peer_id}: {st.announced} announced (data pending), {st.fetched} fetched,"
            f" {st.unsent} unsent, {st.conflicted} conflicted")


def _two_peers(root: Path) -> Iterator[Event]:
    """A device and the cloud write offline, one edit collides, sync, converge, audit."""
    yield _section("11. Two peers, offline")
    folder = root / "peers"
    folder.mkdir()
    cloud_url, cloud_arg, cloud_name = _cloud_store(folder)
    yield _say("Peers are equal: a device with embedded SQLite (device.db) and the cloud,"
               f" here a {cloud_name}. They live in peers/, away from the project's"
               " alembic.ini. The cloud holds the customers; the device syncs once.")
    yield Event("command", "cd peers")
    with Peer.open(f"sqlite:///{folder / 'device.db'}", "device") as device, \
            Peer.open(cloud_url, "cloud") as cloud:
        cloud.write("Add Ada and Grace", [
            {"op": "insert", "collection": "customers", "doc": {"_id": 1, "name": "Ada"}},
            {"op": "insert", "collection": "customers", "doc": {"_id": 2, "name": "Grace"}}])
        yield _cmd("--store", "device.db", "--peer-id", "device", "sync", cloud_arg)
        device.sync(cloud)
        yield _say("Then both write offline. On the device, Grace closes her account and"
                   " Ada places an order; in the cloud, support fixes Grace's e-mail (the"
                   " same document, concurrently) and adds Linus.")
        for message, ops in (
                ("Grace leaves", [{"op": "delete", "collection": "customers", "key": 2}]),
                ("First order for Ada", [{"op": "insert", "collection": "orders",
                                        "doc": {"_id": 1, "customer": 1}}])):
            yield _write_cmd("device.db", message, ops)
            device.write(message, ops)
        time.sleep(0.002)  # the cloud's edit comes a moment later: it sorts after the delete
        for message, ops in (
                ("Fix Grace e-mail", [{"op": "update", "collection": "customers", "key": 2,
                                     "set": {"email": "grace@example.com"}}]),
                ("Add Linus", [{"op": "insert", "collection": "customers",
                                "doc": {"_id": 3, "name": "Linus"}}])):
            yield _write_cmd(cloud_arg, message, ops)
            cloud.write(message, ops)
        yield _cmd("--store", "device.db", "status")
        yield _say(_status_line(device))

        yield _section("12. Sync: descriptors first, then payloads")
        yield _say("The exchange is JSON messages (txengine.sync.Side), here driven by hand:"
                   " version vectors, then each side's missing descriptors — recorded as"
                   " announced, so an app can show \"2 updates pending\" at once — then the"
                   " payloads, checked against the descriptors, then integration in canonical"
                   " order on both peers.")
        yield from _exchange(Side(device), Side(cloud), device)

        yield _section("13. Converged")
        equal = device.snapshot() == cloud.snapshot()
        yield _say(f"data equal on device and cloud: {equal}")
        for name, peer in (("device.db", device), (cloud_arg, cloud)):
            yield _cmd("--store", name, "find", "customers")
            yield from _results("document", peer.find("customers"))

        yield _section("14. The conflict, in the audit")
        yield _say("Delete wins: the e-mail fix came after Grace's delete, found no document,"
                   " and was recorded as a conflict with both values, the same way on both"
                   " peers. The revision is marked conflicted; nothing was silently lost.")
        [entry] = [e for e in device.audit() if e.action == "conflict"]
        assert entry.revision is not None
        yield _cmd("--store", "device.db", "audit", "--rev", entry.revision[:12])
        yield from _results("audit", [entry])


def _write_cmd(store: str, message: str, ops: list[dict[str, Any]]) -> Event:
    return Event("command", f"echo {shlex.quote(json.dumps(ops))} | txengine --store"
                            f" {shlex.quote(store)} write -m {shlex.quote(message)} -")


def _exchange(local: Side, remote: Side, device: Peer) -> Iterator[Event]:
    """Pass messages between two sides until neither has more; show the device's counts
    once the descriptors have arrived and again at the end."""
    outgoing: list[Message] = [local.vector(first=True)]
    sender, receiver = local, remote
    shown = False
    while outgoing:
        kinds = ", ".join(sorted({m["type"] for m in outgoing}))
        yield _say(f"{sender.peer.peer_id} -> {receiver.peer.peer_id}: {kinds}")
        outgoing = receiver.handle(outgoing)
        sender, receiver = receiver, sender
        if not shown and device.status().announced:
            yield _say(_status_line(device))
            shown = True
    local.finish()
    remote.finish()
    yield _say("both integrated: " + _status_line(device))
