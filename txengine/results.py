"""What the Peer API returns: plain dataclasses with ``to_json()`` for the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RevisionInfo:
    """What the graph queries return about one revision (no payload)."""

    id: str
    parents: tuple[str, ...]
    kind: str
    message: str
    partition: str
    origin: str
    hlc: tuple[int, int]
    applied: bool
    is_head: bool
    branch_labels: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["parents"] = list(self.parents)
        out["hlc"] = list(self.hlc)
        out["branch_labels"] = list(self.branch_labels)
        out["depends_on"] = list(self.depends_on)
        return out


@dataclass(frozen=True)
class RevisionDetail:
    """One revision in full: descriptor, payload and rendered script."""

    info: RevisionInfo
    descriptor: dict[str, Any]
    payload: bytes
    script: str

    def to_json(self) -> dict[str, Any]:
        return {**self.info.to_json(), "descriptor": self.descriptor, "script": self.script}


@dataclass(frozen=True)
class OperationResult:
    """What an upgrade, downgrade or stamp did."""

    action: str
    applied: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Finding:
    """One problem that ``verify`` found."""

    revision: str | None
    problem: str
    collection: str | None = None
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class VerifyReport:
    """The findings of ``verify``; ``ok`` when there are none."""

    checked: int
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked,
                "findings": [f.to_json() for f in self.findings]}


@dataclass(frozen=True)
class NewScript:
    """An authored script revision written by ``new_script`` (``txengine revision``)."""

    id: str
    path: Path
    parents: tuple[str, ...]
    branch_labels: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": str(self.path), "parents": list(self.parents),
                "branch_labels": list(self.branch_labels), "depends_on": list(self.depends_on)}


@dataclass(frozen=True)
class Status:
    """The counts an app needs for its sync badge."""

    peer: str
    origin: str
    unsent: int
    """Revisions written here that no peer has acknowledged yet."""
    announced: int
    """Descriptors known whose payloads have not arrived."""
    fetched: int
    """Revisions held and checked but not integrated (yet)."""
    conflicted: int
    quarantined: int
    pinned: bool
    refused: int = 0
    """Revisions written here that a server refused (no write grant) and this peer rolled
    back: kept in the ledger to show, never sent again."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
