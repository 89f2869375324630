"""Project configuration: the ``[txengine]`` section of ``alembic.ini`` and ``versions/``.

txengine shares Alembic's ini file so a project keeps one configuration: the
``[txengine]`` section names the ``store``, this peer's ``peer_id``, the
``script_location`` of authored script revisions and, optionally, the
``key_file`` that holds this peer's private key. Relative paths are taken
from the directory of the ini file (``%(here)s``), not from the working
directory, so ``txengine -c /path/to/alembic.ini`` works from anywhere.
"""

from __future__ import annotations

import configparser
import importlib.resources
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from .exceptions import ConfigError

if TYPE_CHECKING:
    pass

SECTION = "txengine"
INI_NAME = "alembic.ini"
DEFAULT_STORE = "sqlite:///txengine.db"
DEFAULT_SCRIPT_LOCATION = "versions"


@dataclass(frozen=True)
class Config:
    """What a command needs to open a peer; every field may be missing."""

    path: Path | None = None
    store: str | None = None
    peer_id: str | None = None
    script_location: Path | None = None
    key_file: Path | None = None
    """This peer's private key file (default: next to a SQLite store; docs/security.md)."""

    def require_store(self) -> str:
        """Return the store URL, or raise saying how to get one."""
        if not self.store:
            where = f"{self.path} has no store" if self.path else f"no {INI_NAME} found"
            raise ConfigError(f"{where}: run `txengine init` or pass --store URL")
        return self.store


def absolute_store(url: str, base: Path) -> str:
    """Make a relative SQLite path or ``sqlite:///relative`` URL absolute under ``base``."""
    if "://" not in url:
        path = Path(url)
        return str(path if path.is_absolute() else base / path)
    prefix = "sqlite:///"
    if url.startswith(prefix):
        rest = url[len(prefix):]
        if rest and rest != ":memory:" and not rest.startswith("/"):
            return prefix + str(base / rest)
    return url


def load(path: str | Path, *, required: bool) -> Config:
    """Read the ``[txengine]`` section of ``path``; a missing optional file gives Config()."""
    ini = Path(path)
    if not ini.is_file():
        if required:
            raise ConfigError(f"no config file {ini}: run `txengine init` or pass --store URL")
        return Config()
    here = ini.resolve().parent
    parser = configparser.ConfigParser(defaults={"here": str(here)})
    try:
        parser.read(ini, encoding="utf-8")
    except configparser.Error as exc:
        raise ConfigError(f"{ini} is not a valid ini file: {exc.message}") from None
    if not parser.has_section(SECTION):
        return Config(path=ini)
    try:
        section = dict(parser.items(SECTION))
    except configparser.Error as exc:
        raise ConfigError(f"{ini}: [{SECTION}] cannot be read: {exc.message}") from None
    store = section.get("store") or None
    location = section.get("script_location") or None
    key_file = section.get("key_file") or None
    return Config(
        path=ini,
        store=absolute_store(store, here) if store else None,
        peer_id=section.get("peer_id") or None,
        script_location=(here / location) if location else None,
        key_file=(here / key_file) if key_file else None,
    )


# -- init -----------------------------------------------------------------------------

@dataclass(frozen=True)
class InitResult:
    """What ``txengine init`` made."""

    config: Path
    created: bool
    script_location: Path
    peer_id: str
    store: str

    def to_json(self) -> dict[str, Any]:
        return {"config": str(self.config), "created": self.created,
                "script_location": str(self.script_location), "peer_id": self.peer_id,
                "store": self.store}


def _template(name: str) -> jinja2.Template:
    try:
        root: Any = importlib.resources.files("txengine.templates")
        text = (root / name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        text = (Path(__file__).resolve().parent.parent / "templates" / name).read_text("utf-8")
    return jinja2.Template(text, keep_trailing_newline=True, trim_blocks=True,
                           lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def init_project(directory: str | Path, peer_id: str | None = None, *, store: str | None = None,
                 script_location: str | Path | None = None) -> InitResult:
    """Write ``alembic.ini`` with a ``[txengine]`` section (or add one) and ``versions/``.

    An existing ``alembic.ini`` is never rewritten: the section is appended, so
    Alembic's own settings and comments survive. A file that already has a
    ``[txengine]`` section is refused rather than silently changed. ``store``
    and ``script_location`` (an existing folder, e.g. an adopted Alembic
    ``versions/``; written relative to the ini file when it is below it)
    replace the defaults.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ini = root / INI_NAME
    peer = peer_id or f"peer-{secrets.token_hex(4)}"
    location = DEFAULT_SCRIPT_LOCATION
    if script_location is not None:
        target = Path(script_location).resolve()
        try:
            location = str(target.relative_to(root.resolve()))
        except ValueError:
            location = str(target)
    values = {"store": store or DEFAULT_STORE, "peer_id": peer, "script_location": location}
    created = not ini.exists()
    if created:
        ini.write_text(_template("alembic.ini.jinja2").render(full=True, **values), "utf-8")
    else:
        parser = configparser.ConfigParser()
        try:
            parser.read(ini, encoding="utf-8")
        except configparser.Error as exc:
            raise ConfigError(f"{ini} is not a valid ini file: {exc.message}") from None
        if parser.has_section(SECTION):
            raise ConfigError(f"{ini} already has a [{SECTION}] section: edit it, or run"
                              " `txengine init` in another directory")
        text = ini.read_text("utf-8")
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        section = _template("alembic.ini.jinja2").render(full=False, **values)
        ini.write_text(text + sep + section, "utf-8")
    versions = root / location
    versions.mkdir(parents=True, exist_ok=True)
    return InitResult(ini, created, versions, peer, values["store"])
