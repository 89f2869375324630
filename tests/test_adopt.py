"""Adopting an Alembic project: ``txengine init --from-alembic DIR``.

The fixture project is made by Alembic itself (``alembic.command.init``, its
real ``env.py``) and migrated by ``alembic.command.upgrade``; txengine then
adopts it and carries on over both kinds of revision::

    a1 - b2 - c3(shop) - e5      e5 merges c3 and d4
           \\            /
            d4 --------
    g7(audit)                    a second root, with a branch label
    (later) e5 - f6 ..> audit    f6 depends_on the label "audit"
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from click.testing import CliRunner, Result

from txengine.adopt import (
    ORIGIN,
    adopt_directory,
    init_from_alembic,
    read_directory,
    topological,
    versions_dir,
)
from txengine.cli import cli
from txengine.exceptions import CycleDetected, MissingParent, StoreError
from txengine.peer import Peer
from txengine.scripts import load_versions

HEADER = '''"""{message}

Revision ID: {rev}
Revises: {down}
Create Date: 2026-01-01 00:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = {rev!r}
down_revision: Union[str, Sequence[str], None] = {down!r}
branch_labels: Union[str, Sequence[str], None] = {labels!r}
depends_on: Union[str, Sequence[str], None] = {depends!r}


def upgrade() -> None:
{upgrade}


def downgrade() -> None:
{downgrade}
'''

MIGRATIONS: list[dict[str, Any]] = [
    dict(rev="a1", down=None, message="create accounts",
         upgrade='op.create_table("accounts", sa.Column("id", sa.Integer, primary_key=True))',
         downgrade='op.drop_table("accounts")'),
    dict(rev="b2", down="a1", message="add email",
         upgrade='op.add_column("accounts", sa.Column("email", sa.String(100)))',
         downgrade='op.drop_column("accounts", "email")'),
    dict(rev="c3", down="b2", labels=("shop",), message="create orders",
         upgrade='op.create_table("orders", sa.Column("id", sa.Integer, primary_key=True))',
         downgrade='op.drop_table("orders")'),
    dict(rev="d4", down="b2", message="index email",
         upgrade='op.create_index("ix_email", "accounts", ["email"])',
         downgrade='op.drop_index("ix_email", "accounts")'),
    dict(rev="e5", down=("c3", "d4"), message="merge shop and index",
         upgrade="pass", downgrade="pass"),
    dict(rev="g7", down=None, labels=("audit",), message="create audit log",
         upgrade='op.create_table("audit_log", sa.Column("id", sa.Integer, primary_key=True))',
         downgrade='op.drop_table("audit_log")'),
]
LATER = dict(rev="f6", down="e5", depends="audit", message="add order total",
             upgrade='op.add_column("orders", sa.Column("total", sa.Integer))',
             downgrade='op.drop_column("orders", "total")')
NOTE = [{"op": "insert", "collection": "notes", "doc": {"_id": 1, "text": "after Alembic"}}]


def write_migration(versions: Path, spec: dict[str, Any]) -> Path:
    body = {k: textwrap.indent(spec[k], "    ") for k in ("upgrade", "downgrade")}
    text = HEADER.format(message=spec["message"], rev=spec["rev"], down=spec["down"],
                         labels=spec.get("labels"), depends=spec.get("depends"), **body)
    path = versions / f"{spec['rev']}_{spec['message'].replace(' ', '_')}.py"
    path.write_text(text, "utf-8")
    return path


def alembic_project(root: Path, migrations: list[dict[str, Any]]) -> AlembicConfig:
    """Make an Alembic project with Alembic's own ``init`` (real env.py) and migrations."""
    root.mkdir(parents=True, exist_ok=True)
    ini = root / "alembic.ini"
    cfg = AlembicConfig(str(ini))
    command.init(cfg, str(root / "migrations"))
    text = ini.read_text("utf-8").replace(
        "sqlalchemy.url = driver://user:pass@localhost/dbname",
        f"sqlalchemy.url = sqlite:///{root / 'app.db'}")
    ini.write_text(text, "utf-8")
    cfg = AlembicConfig(str(ini))
    for spec in migrations:
        write_migration(root / "migrations" / "versions", spec)
    return cfg


def alembic_heads(cfg: AlembicConfig) -> list[str]:
    return sorted(ScriptDirectory.from_config(cfg).get_heads())


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    return {r[0] for r in rows if not r[0].startswith(("txengine_", "sqlite_"))}


def columns(db: Path, table: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def run(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    return result


def run_json(*args: str) -> Any:
    return json.loads(run(*args, "--json").stdout)


# -- the done-when ------------------------------------------------------------


def test_adopted_alembic_project_continues_with_data_and_script_revisions(
        tmp_path: Path) -> None:
    """Alembic migrates, txengine adopts, writes data, continues, goes to base and back."""
    root = tmp_path / "project"
    cfg = alembic_project(root, MIGRATIONS)
    command.upgrade(cfg, "heads")
    db = root / "app.db"
    assert {"accounts", "orders", "audit_log", "alembic_version"} <= tables(db)

    ini = str(root / "alembic.ini")
    report = run_json("--peer-id", "p1", "init", str(root), "--from-alembic",
                      str(root / "migrations"))
    assert report["adopted"] == ["a1", "b2", "c3", "d4", "e5", "g7"]
    assert report["alembic_heads"] == ["e5", "g7"]
    assert sorted(report["stamped"]) == ["a1", "b2", "c3", "d4", "e5", "g7"]
    assert report["store"] == f"sqlite:///{db}"

    heads = run_json("-c", ini, "heads")
    assert sorted(h["id"] for h in heads) == alembic_heads(cfg) == ["e5", "g7"]
    assert {h["id"]: h["branch_labels"] for h in heads}["g7"] == ["audit"]
    assert run_json("-c", ini, "upgrade", "heads")["applied"] == []

    result = CliRunner().invoke(cli, ["-c", ini, "write", "-m", "a note", "-"],
                                input=json.dumps(NOTE))
    assert result.exit_code == 0, result.output
    data_id = result.stdout.strip()
    assert sorted(run_json("-c", ini, "show", data_id)["parents"]) == ["e5", "g7"]

    # Alembic's author writes one more migration; adopting again freezes only it.
    write_migration(root / "migrations" / "versions", LATER)
    again = run_json("init", str(root), "--from-alembic", str(root / "migrations"))
    assert again["adopted"] == ["f6"] and again["stamped"] == []
    assert alembic_heads(cfg) == ["f6", "g7"]
    # g7 is no longer a head in txengine: the data revision took it as a parent.
    assert sorted(h["id"] for h in run_json("-c", ini, "heads")) == sorted(["f6", data_id])
    upgraded = run_json("-c", ini, "upgrade", "heads")
    assert "f6" in upgraded["applied"]
    assert "total" in columns(db, "orders")
    assert run_json("-c", ini, "get", "notes", "1") == NOTE[0]["doc"]

    down = run_json("-c", ini, "downgrade", "base")
    assert set(down["undone"]) == {"a1", "b2", "c3", "d4", "e5", "f6", "g7", data_id}
    assert tables(db) & {"accounts", "orders", "audit_log"} == set()
    run("-c", ini, "get", "notes", "1", code=1)

    up = run_json("-c", ini, "upgrade", "heads")
    assert set(up["applied"]) == {"a1", "b2", "c3", "d4", "e5", "f6", "g7", data_id}
    assert {"accounts", "orders", "audit_log"} <= tables(db)
    assert "total" in columns(db, "orders") and "email" in columns(db, "accounts")
    assert run_json("-c", ini, "get", "notes", "1") == NOTE[0]["doc"]
    assert run_json("-c", ini, "verify")["ok"]


def test_adopting_a_partly_migrated_database_upgrades_from_where_alembic_stopped(
        tmp_path: Path) -> None:
    """Alembic stopped at c3: txengine stamps a1, b2, c3 and applies the rest."""
    root = tmp_path / "project"
    cfg = alembic_project(root, MIGRATIONS)
    command.upgrade(cfg, "c3")
    db = root / "app.db"
    assert "orders" in tables(db) and "audit_log" not in tables(db)
    report = run_json("--peer-id", "p1", "init", str(root), "--from-alembic",
                      str(root / "migrations" / "versions"))
    assert report["alembic_heads"] == ["c3"]
    assert report["stamped"] == ["a1", "b2", "c3"]
    up = run_json("-c", str(root / "alembic.ini"), "upgrade", "heads")
    assert up["applied"] == ["d4", "e5", "g7"]
    assert "audit_log" in tables(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name='ix_email'").fetchone()
        # On purpose: txengine's ledger is the record now; alembic_version is left alone.
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("c3",)]


# -- the freeze -----------------------------------------------------------------------


def test_every_peer_adopting_the_same_directory_gets_the_same_revisions(tmp_path: Path
                                                                       ) -> None:
    """Two copies of one Alembic directory, adopted separately, freeze identical digests."""
    digests = []
    for name in ("one", "two"):
        versions = tmp_path / name
        versions.mkdir()
        for spec in MIGRATIONS:
            write_migration(versions, spec)
        adopt_directory(versions)
        digests.append({s.revision.id: s.revision.descriptor["digest"]
                        for s in load_versions(versions)})
    assert digests[0] == digests[1] and len(digests[0]) == len(MIGRATIONS)


def test_adoption_assigns_hlc_by_topological_order_ties_broken_by_id(tmp_path: Path) -> None:
    for spec in [*MIGRATIONS, LATER]:
        write_migration(tmp_path, spec)
    result = adopt_directory(tmp_path)
    assert result.adopted == ["a1", "b2", "c3", "d4", "e5", "g7", "f6"] == topological(
        read_directory(tmp_path))
    scripts = {s.revision.id: s.revision.descriptor for s in load_versions(tmp_path)}
    assert [scripts[r]["hlc"] for r in result.adopted] == [[i, 0] for i in range(1, 8)]
    assert {d["origin"] for d in scripts.values()} == {ORIGIN}
    assert scripts["f6"]["depends_on"] == ["g7"]  # the label "audit", resolved
    for d in scripts.values():
        for parent in d["parents"] + d["depends_on"]:
            assert scripts[parent]["hlc"] < d["hlc"]


def test_adopted_files_keep_alembic_working(tmp_path: Path) -> None:
    """The frozen literal is one more module variable: Alembic still loads every file."""
    root = tmp_path / "project"
    cfg = alembic_project(root, [*MIGRATIONS, LATER])
    adopt_directory(root / "migrations")
    assert alembic_heads(cfg) == ["f6", "g7"]
    command.upgrade(cfg, "heads")
    assert "total" in columns(root / "app.db", "orders")


def test_adopting_again_keeps_frozen_files_and_continues_above_them(tmp_path: Path) -> None:
    for spec in MIGRATIONS:
        write_migration(tmp_path, spec)
    adopt_directory(tmp_path)
    before = {p.name: p.read_text() for p in tmp_path.glob("*.py")}
    write_migration(tmp_path, LATER)
    result = adopt_directory(tmp_path)
    assert result.adopted == ["f6"] and len(result.kept) == len(MIGRATIONS)
    assert all((tmp_path / name).read_text() == text for name, text in before.items())
    f6 = next(s for s in load_versions(tmp_path) if s.revision.id == "f6")
    assert f6.revision.descriptor["hlc"] == [7, 0] and f6.revision.descriptor["seq"] == 7


def test_versions_dir_accepts_the_script_directory_or_its_versions_folder(tmp_path: Path
                                                                        ) -> None:
    (tmp_path / "versions").mkdir()
    assert versions_dir(tmp_path) == tmp_path / "versions"
    assert versions_dir(tmp_path / "versions") == tmp_path / "versions"


def test_missing_parent_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    write_migration(tmp_path, dict(MIGRATIONS[1]))
    text = (tmp_path / "b2_add_email.py").read_text()
    with pytest.raises(MissingParent, match="b2"):
        adopt_directory(tmp_path)
    assert (tmp_path / "b2_add_email.py").read_text() == text


def test_adopting_into_a_mongodb_store_is_refused_as_a_store_error(tmp_path: Path) -> None:
    root = tmp_path / "project"
    alembic_project(root, MIGRATIONS)
    with pytest.raises(StoreError, match="only SQL stores have"):
        init_from_alembic(root, root / "migrations", peer_id="p1", store="mongomock://h/adopt")


def test_cycle_is_refused(tmp_path: Path) -> None:
    write_migration(tmp_path, dict(MIGRATIONS[0], down="b2"))
    write_migration(tmp_path, dict(MIGRATIONS[1]))
    with pytest.raises(CycleDetected):
        adopt_directory(tmp_path)


def test_script_with_op_parameter_still_gets_txengine_op(tmp_path: Path) -> None:
    """txengine's own ``def upgrade(op)`` scripts keep receiving the ScriptOp."""
    versions = tmp_path / "versions"
    with Peer.open(f"sqlite:///{tmp_path / 'db.sqlite'}", "p", script_location=versions) as peer:
        new = peer.new_script("make t", rev_id="s1")
        text = new.path.read_text().replace(
            "def upgrade(op):\n", "def upgrade(op):\n    op.schema.create_table("
            "'t', __import__('sqlalchemy').Column('id', __import__('sqlalchemy').Integer))\n",
        ).replace("def downgrade(op):\n", "def downgrade(op):\n    op.schema.drop_table('t')\n")
        new.path.write_text(text)
    with Peer.open(f"sqlite:///{tmp_path / 'db.sqlite'}", "p", script_location=versions) as peer:
        assert peer.upgrade("heads").applied == ["s1"]
    assert "t" in tables(tmp_path / "db.sqlite")
