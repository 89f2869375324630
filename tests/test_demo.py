"""`txengine demo`'s sync story: two peers offline, a conflict, sync, convergence, audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from txengine.cli import cli
from txengine.demo import MONGODB_ENV
from txengine.peer import Peer


def run_demo(folder: Path, *options: str) -> str:
    result = CliRunner().invoke(cli, ["demo", "--dir", str(folder), *options])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_demo_shows_pending_counts_convergence_and_the_conflict_entry(tmp_path: Path) -> None:
    out = run_demo(tmp_path / "demo")
    for header in ("11. Two peers, offline", "12. Sync: descriptors first, then payloads",
                   "13. Converged", "14. The conflict, in the audit"):
        assert f"== {header} ==" in out
    lines = out.splitlines()
    pending = lines.index("device: 2 announced (data pending), 0 fetched, 2 unsent,"
                          " 0 conflicted")
    assert lines[pending - 1] == "cloud -> device: descriptors, vector", "before the payloads"
    assert lines[pending + 2] == "cloud -> device: payloads, want"
    assert "both integrated: device: 0 announced (data pending), 0 fetched, 0 unsent," \
           " 1 conflicted" in lines
    assert "data equal on device and cloud: True" in lines
    [audit] = [line for line in lines if " conflict " in line and "device (" in line]
    assert '"reason": "update of a missing document"' in audit
    assert '"set": {"email": "grace@example.com"}' in audit and '"current": null' in audit
    assert lines.count('  {"_id": 3, "name": "Linus"}') == 2


def test_demo_peers_hold_equal_data_and_both_audit_the_conflict(tmp_path: Path) -> None:
    run_demo(tmp_path / "demo")
    peers = tmp_path / "demo" / "peers"
    with Peer.open(str(peers / "device.db")) as device, \
            Peer.open(str(peers / "cloud.db")) as cloud:
        assert device.snapshot() == cloud.snapshot()
        assert device.get("customers", 2) is None and device.get("orders", 1) is not None
        for peer in (device, cloud):
            [entry] = [e for e in peer.audit() if e.action == "conflict"]
            assert entry.detail["op"]["set"] == {"email": "grace@example.com"}
            assert peer.verify(replay=True).ok


def test_demo_nl_carries_the_conflict_entry_as_data(tmp_path: Path) -> None:
    out = run_demo(tmp_path / "demo", "--nl")
    events = [json.loads(line) for line in out.splitlines()]
    audits = [e["value"] for e in events if e["kind"] == "result" and e["text"] == "audit"
              and e["value"]["action"] == "conflict"]
    assert len(audits) == 1 and audits[0]["peer_id"] == "device"
    assert audits[0]["detail"]["reason"] == "update of a missing document"


def test_demo_puts_the_cloud_on_mongodb_when_the_environment_names_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MONGODB_ENV, "mongomock://demo-test/ignored")
    out = run_demo(tmp_path / "demo")
    [url] = {word for line in out.splitlines() for word in line.split()
             if word.startswith("mongomock://demo-test/txengine_demo_")}
    assert "data equal on device and cloud: True" in out
    assert not (tmp_path / "demo" / "peers" / "cloud.db").exists()
    with Peer.open(url) as cloud:
        entries: list[Any] = [e for e in cloud.audit() if e.action == "conflict"]
        assert cloud.peer_id == "cloud" and len(entries) == 1
