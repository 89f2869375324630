"""Adopt an Alembic project: freeze its migrations as authored script revisions.

An Alembic migration already carries what txengine needs except the frozen
descriptor fields (hlc, origin, seq, stores). Adoption writes them into each
file as the ``txengine = {...}`` literal, right after Alembic's header, so the
Alembic directory itself becomes the script location: Alembic still reads the
files (an extra module variable is harmless) and every peer that loads them
gets the same revisions.

The freeze is deterministic, so two peers adopting the same directory get the
same ids, hlcs and digests: files are taken in a topological order of the
Alembic graph (parents and ``depends_on`` first, ties broken by revision id),
and the k-th one gets ``hlc = [base + k, 0]`` and ``seq = base_seq + k`` under
the origin :data:`ORIGIN`, where ``base`` is the highest hlc already frozen in
the directory (0 the first time). So hlc grows along every edge, barriers are
ordered like Alembic's graph, and adopting again after new Alembic revisions
freezes only the new files, above everything already frozen.

Everything here reads headers with ``ast``: nothing is imported or executed,
and ``env.py`` is not needed.
"""

from __future__ import annotations

import ast
import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .exceptions import ConfigError, CycleDetected, MalformedPayload, MissingParent
from .revision import DEFAULT_PARTITION, check_id
from .scripts import header_ids, read_header

ORIGIN = "alembic:0"
"""The origin of adopted revisions: the same on every peer, so digests agree."""

_HEADERS = ("revision", "down_revision", "branch_labels", "depends_on", "txengine")
MARK = "# txengine: adopted from Alembic; frozen descriptor (docs/alembic.md)"


@dataclass(frozen=True)
class AlembicScript:
    """One Alembic migration file as adoption reads it (headers only)."""

    path: Path
    revision: str
    down_revision: tuple[str, ...]
    branch_labels: tuple[str, ...]
    depends_on: tuple[str, ...]
    frozen: dict[str, Any] | None
    insert_after: int  # last line of Alembic's header block


@dataclass(frozen=True)
class AdoptResult:
    """What adoption froze: the versions directory and the ids written (topological)."""

    versions: Path
    adopted: list[str]
    kept: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"versions": str(self.versions), "adopted": self.adopted, "kept": self.kept}


def versions_dir(directory: str | Path) -> Path:
    """Return the versions folder of an Alembic script directory, or the folder itself."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory: pass an Alembic script directory"
                          " (with versions/) or its versions folder")
    if (root / "versions").is_dir():
        return root / "versions"
    return root


def read_script(path: Path) -> AlembicScript | None:
    """Read one file's Alembic header with ``ast``; None when it has no ``revision``."""
    where = str(path)
    try:
        tree = ast.parse(path.read_text("utf-8"), filename=where)
    except SyntaxError as exc:
        raise MalformedPayload(f"{where}:{exc.lineno}: syntax error: {exc.msg}") from None
    header = read_header(tree, where, _HEADERS)
    found = {name: value for name, (value, _first, _last) in header.items()}
    last = max((end for name, (_v, _first, end) in header.items() if name != "txengine"),
               default=0)
    if not isinstance(found.get("revision"), str):
        return None
    frozen = found.get("txengine")
    ids = {name: header_ids(*header.get(name, (None, 1, 1))[:2], name, where)
           for name in ("down_revision", "branch_labels", "depends_on")}
    return AlembicScript(
        path, check_id(found["revision"]), ids["down_revision"], ids["branch_labels"],
        ids["depends_on"], frozen if isinstance(frozen, dict) else None, last,
    )


def read_directory(versions: Path) -> list[AlembicScript]:
    """Read every migration under ``versions`` (recursively, as Alembic's recursive mode)."""
    scripts: dict[str, AlembicScript] = {}
    for path in sorted(versions.rglob("*.py")):
        if path.name == "__init__.py" or "__pycache__" in path.parts:
            continue
        script = read_script(path)
        if script is None:
            continue
        if script.revision in scripts:
            raise MalformedPayload(f"{path}: revision {script.revision} is also defined in"
                                   f" {scripts[script.revision].path}")
        scripts[script.revision] = script
    return list(scripts.values())


def _resolved_depends_on(scripts: Sequence[AlembicScript]) -> dict[str, tuple[str, ...]]:
    """Resolve ``depends_on`` entries that name branch labels, as Alembic does."""
    ids = {s.revision for s in scripts}
    labels = {label: s.revision for s in scripts for label in s.branch_labels}
    out = {}
    for s in scripts:
        deps = []
        for dep in s.depends_on:
            rid = dep if dep in ids else labels.get(dep)
            if rid is None:
                raise MissingParent(s.revision, dep)
            deps.append(rid)
        out[s.revision] = tuple(dict.fromkeys(deps))
    return out


def topological(scripts: Sequence[AlembicScript]) -> list[str]:
    """Order revision ids parents and dependencies first, ties by id (Kahn with a heap)."""
    deps = _resolved_depends_on(scripts)
    ids = {s.revision for s in scripts}
    waiting: dict[str, int] = {}
    after: dict[str, list[str]] = {}
    for s in scripts:
        before = set(s.down_revision) | set(deps[s.revision])
        for p in before:
            if p not in ids:
                raise MissingParent(s.revision, p)
            after.setdefault(p, []).append(s.revision)
        waiting[s.revision] = len(before)
    ready = [r for r, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        rid = heapq.heappop(ready)
        order.append(rid)
        for child in after.get(rid, ()):
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, child)
    if len(order) != len(ids):
        raise CycleDetected(sorted(ids - set(order)))
    return order


def _literal(frozen: dict[str, Any]) -> str:
    parts = []
    for key, value in frozen.items():
        if isinstance(value, list):
            text = "[" + ", ".join(repr(v) if not isinstance(v, str) else f'"{v}"'
                                   for v in value) + "]"
        elif isinstance(value, str):
            text = f'"{value}"'
        else:
            text = repr(value)
        parts.append(f'"{key}": {text}')
    return "txengine = {" + ", ".join(parts) + "}"


def adopt_directory(directory: str | Path, *, stores: Sequence[str] = ("sql",),
                    partition: str = DEFAULT_PARTITION) -> AdoptResult:
    """Freeze a descriptor into every Alembic migration of ``directory`` that lacks one.

    Files already frozen are kept as they are (their digests are settled); new
    ones continue above the highest frozen hlc and seq, in topological order.
    """
    versions = versions_dir(directory)
    scripts = read_directory(versions)
    by_id = {s.revision: s for s in scripts}
    deps = _resolved_depends_on(scripts)
    frozen = [s.frozen for s in scripts if s.frozen]
    base_ms = max((int(f["hlc"][0]) for f in frozen), default=0)
    base_seq = max((int(f["seq"]) for f in frozen
                    if f.get("origin") == ORIGIN and f.get("partition", "default") == partition),
                   default=0)
    adopted, kept = [], []
    k = 0
    for rid in topological(scripts):
        script = by_id[rid]
        if script.frozen is not None:
            kept.append(rid)
            continue
        k += 1
        literal: dict[str, Any] = {"hlc": [base_ms + k, 0], "origin": ORIGIN,
                                   "seq": base_seq + k, "partition": partition,
                                   "stores": list(stores)}
        if deps[rid] != script.depends_on:
            literal["depends_on"] = list(deps[rid])
        lines = script.path.read_text("utf-8").splitlines(keepends=True)
        block = f"\n{MARK}\n{_literal(literal)}\n"
        at = script.insert_after
        if at and not lines[at - 1].endswith("\n"):
            lines[at - 1] += "\n"
        lines.insert(at, block)
        script.path.write_text("".join(lines), "utf-8")
        adopted.append(rid)
    return AdoptResult(versions, adopted, kept)


def alembic_version_heads(conn: sa.Connection, table: str = "alembic_version") -> list[str]:
    """Return the rows of Alembic's version table (the heads Alembic stopped at)."""
    if not sa.inspect(conn).has_table(table):
        return []
    rows = conn.execute(sa.text(f"SELECT version_num FROM {table}")).scalars().all()
    return sorted(str(r) for r in rows)




# -- a whole project ------------------------------------------------------------------


@dataclass(frozen=True)
class AdoptReport:
    """What ``txengine init --from-alembic`` did: config, freeze and stamp."""

    config: Path
    created: bool
    store: str
    peer_id: str
    versions: Path
    adopted: list[str]
    kept: list[str]
    stamped: list[str]
    alembic_heads: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"config": str(self.config), "created": self.created, "store": self.store,
                "peer_id": self.peer_id, "versions": str(self.versions),
                "adopted": self.adopted, "kept": self.kept, "stamped": self.stamped,
                "alembic_heads": self.alembic_heads}


def alembic_url(source: str | Path, project: str | Path) -> str | None:
    """Return ``sqlalchemy.url`` of the Alembic ini next to the project or the source."""
    import configparser

    for folder in (Path(project), Path(source), Path(source).parent):
        ini = folder / "alembic.ini"
        if not ini.is_file():
            continue
        parser = configparser.ConfigParser(defaults={"here": str(ini.resolve().parent)})
        try:
            parser.read(ini, encoding="utf-8")
            url = parser.get("alembic", "sqlalchemy.url", fallback=None)
        except configparser.Error:
            continue
        if url and "driver://" not in url:
            return url
    return None


def init_from_alembic(directory: str | Path, source: str | Path, *, peer_id: str | None = None,
                      store: str | None = None) -> AdoptReport:
    """Make ``directory`` a txengine project over the Alembic scripts in ``source``.

    Freezes a descriptor into each migration (:func:`adopt_directory`), writes
    the ``[txengine]`` section with ``script_location`` = Alembic's versions
    folder and ``store`` = ``store``, else Alembic's ``sqlalchemy.url``, else
    the default; then opens the store and stamps the heads of its
    ``alembic_version`` table (:meth:`Peer.adopt`).
    """
    from . import config as _config
    from .peer import Peer

    versions = versions_dir(source)
    read_directory(versions)  # refuse a broken directory before writing anything
    ini = Path(directory) / _config.INI_NAME
    created = not ini.exists()
    cfg = _config.load(ini, required=False)
    again = (cfg.script_location is not None
             and cfg.script_location.resolve() == versions.resolve())
    if not again:  # a second run only freezes new migrations and stamps again
        _config.init_project(directory, peer_id=peer_id,
                             store=store or alembic_url(source, directory),
                             script_location=versions)
        cfg = _config.load(ini, required=True)
    frozen = adopt_directory(versions)
    url = store or cfg.require_store()
    with Peer.open(url, peer_id or cfg.peer_id, script_location=cfg.script_location) as peer:
        stamped = peer.adopt()
        assert peer._conn is not None  # adopt refused a store without SQL tables
        heads = alembic_version_heads(peer._conn)
        peer._conn.rollback()
        peer_name = peer.peer_id
    return AdoptReport(ini, created, url, peer_name, versions, frozen.adopted, frozen.kept,
                       stamped.applied, heads)


__all__ = ["ORIGIN", "AdoptReport", "AdoptResult", "AlembicScript", "adopt_directory",
           "alembic_version_heads", "init_from_alembic", "read_directory", "topological",
           "versions_dir"]
