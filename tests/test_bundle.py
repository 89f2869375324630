"""Bundles: sync messages in a JSON Lines file, applied whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write

from txengine.cli import cli
from txengine.engine import Progress
from txengine.exceptions import ChecksumMismatch
from txengine.peer import Peer
from txengine.transport.bundle import BundleError


def counts(peer: Peer) -> tuple[int, int]:
    """Return (ledger rows, audit rows)."""
    rows = len(list(peer._ledger.all_rows()))
    peer._store.rollback()
    return rows, len(peer.audit())


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_round_trip_gives_equal_data_and_a_clean_replay(pair, tmp_path: Path) -> None:
    a, b = pair
    ids = [write(a, k, n=k) for k in range(3)] + [write(a, "u", partition="user:1")]
    info = a.bundle_create(tmp_path / "a.bundle")
    assert (info.revisions, info.partitions) == (4, ("default", "user:1"))
    header, *body = lines(tmp_path / "a.bundle")
    assert header["type"] == "bundle" and header["descriptors"] == header["payloads"] == 4
    assert [m["type"] for m in body] == ["descriptors", "payloads"]
    seen: list[Progress] = []
    report = b.bundle_apply(tmp_path / "a.bundle", progress=seen.append)
    assert sorted(report.report.applied) == sorted(ids)
    assert b.snapshot() == a.snapshot()
    assert b.verify(replay=True).ok
    assert [(p.done, p.total) for p in seen] == [(0, 4), (4, 4)]


def test_progress_never_reports_the_total_before_the_payloads_are_in(pair, tmp_path) -> None:
    a, b = pair
    for k in range(5):
        write(a, k)
    a.bundle_create(tmp_path / "a.bundle", batch_size=2)
    seen: list[tuple[int, int]] = []

    def progress(p: Progress) -> None:
        seen.append((p.done, p.total))
        if p.done == p.total:
            assert b.get("items", 4) == {"_id": 4}

    b.bundle_apply(tmp_path / "a.bundle", progress=progress)
    assert seen == [(0, 5), (2, 5), (4, 5), (5, 5)]


def test_applying_a_bundle_twice_changes_nothing_the_second_time(pair, tmp_path) -> None:
    a, b = pair
    write(a, 1)
    write(a, 2)
    a.bundle_create(tmp_path / "a.bundle")
    b.bundle_apply(tmp_path / "a.bundle")
    before, snapshot = counts(b), b.snapshot()
    again = b.bundle_apply(tmp_path / "a.bundle")
    assert (again.report.announced, again.report.fetched, again.report.applied) == (0, 0, [])
    assert counts(b) == before and b.snapshot() == snapshot


def test_a_truncated_bundle_is_refused_with_nothing_applied(pair, tmp_path) -> None:
    a, b = pair
    for k in range(3):
        write(a, k)
    path = tmp_path / "a.bundle"
    a.bundle_create(path)
    data = path.read_bytes()
    before = counts(b)
    cut = tmp_path / "cut.bundle"
    cut.write_bytes(data[:-10])
    with pytest.raises(BundleError, match="is truncated \\(its last line is incomplete\\)"):
        b.bundle_apply(cut)
    short = tmp_path / "short.bundle"
    short.write_bytes(b"\n".join(data.split(b"\n")[:2]) + b"\n")  # header and descriptors
    with pytest.raises(BundleError) as info:
        b.bundle_apply(short)
    assert str(info.value) == (
        f"bundle {short}: is truncated: the header counts 3 descriptors and 3 payloads, the"
        " file holds 3 and 0; nothing was applied")
    assert counts(b) == before and b.snapshot() == {}


def test_a_tampered_payload_is_refused_with_the_checksum_error(pair, tmp_path) -> None:
    a, b = pair
    write(a, 0, n=0)
    rev = write(a, 1, n=1)
    path = tmp_path / "a.bundle"
    a.bundle_create(path)
    text = path.read_text("utf-8")
    header, descriptors, payloads = text.splitlines()
    forged = json.loads(payloads)
    forged["items"] = [[i, t.replace('"n":1', '"n":1000')] for i, t in forged["items"]]
    path.write_text("\n".join([header, descriptors, json.dumps(forged)]) + "\n", "utf-8")
    before = counts(b)
    with pytest.raises(ChecksumMismatch) as info:
        b.bundle_apply(path)
    assert info.value.revision == rev
    assert "payload checksum" in str(info.value) and "the payload was altered" in str(info.value)
    assert counts(b) == before and b.snapshot() == {}


def test_a_bundle_of_another_partition_is_refused(pair, tmp_path) -> None:
    a, b = pair
    write(a, 1, partition="user:1")
    write(a, 2, partition="user:2")
    path = tmp_path / "u1.bundle"
    info = a.bundle_create(path, partition="user:1")
    assert info.partitions == ("user:1",) and info.revisions == 1
    with pytest.raises(BundleError) as refused:
        b.bundle_apply(path, partition="user:2")
    assert str(refused.value) == (f"bundle {path}: holds partitions ['user:1'], not only"
                                  " 'user:2' as asked; nothing was applied")
    assert b.snapshot() == {}
    b.bundle_apply(path, partition="user:1")
    assert b.get("items", 1, partition="user:1") == {"_id": 1}
    assert b.get("items", 2, partition="user:2") is None


def test_a_descriptor_outside_the_header_partitions_is_refused(pair, tmp_path) -> None:
    a, b = pair
    write(a, 1, partition="user:1")
    path = tmp_path / "u1.bundle"
    a.bundle_create(path, partition="user:1")
    header, *rest = path.read_text("utf-8").splitlines()
    h = json.loads(header)
    h["partitions"] = ["user:2"]
    path.write_text("\n".join([json.dumps(h), *rest]) + "\n", "utf-8")
    with pytest.raises(BundleError, match="is in partition 'user:1', which the header does"
                                          " not list"):
        b.bundle_apply(path)
    assert b.snapshot() == {}


def test_since_writes_only_what_the_other_side_lacks(pair, tmp_path) -> None:
    a, b = pair
    old = [write(a, k) for k in range(2)]
    a.bundle_create(tmp_path / "first.bundle")
    b.bundle_apply(tmp_path / "first.bundle")
    write(b, "b")
    new = [write(a, k) for k in range(2, 4)]
    b.bundle_vector(tmp_path / "b.vector")
    info = a.bundle_create(tmp_path / "second.bundle", since=tmp_path / "b.vector")
    assert info.revisions == 2
    ids = [d["id"] for d in lines(tmp_path / "second.bundle")[1]["items"]]
    assert ids == new and not set(old) & set(ids)
    b.bundle_apply(tmp_path / "second.bundle")
    # The answer: a bundle b made serves as the vector of what b has.
    b.bundle_create(tmp_path / "back.bundle", since=tmp_path / "second.bundle")
    back = lines(tmp_path / "back.bundle")
    assert back[0]["descriptors"] == 1 and back[1]["items"][0]["origin"] == "bob:0"
    a.bundle_apply(tmp_path / "back.bundle")
    assert a.snapshot() == b.snapshot()


def test_an_empty_bundle_applies_as_nothing(pair, tmp_path) -> None:
    a, b = pair
    info = a.bundle_create(tmp_path / "empty.bundle")
    assert info.revisions == 0
    assert b.bundle_apply(tmp_path / "empty.bundle").report.applied == []


def test_cli_bundle_create_and_apply(tmp_path: Path) -> None:
    runner = CliRunner()
    a, b = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    path = str(tmp_path / "x.bundle")
    ops = json.dumps([{"op": "insert", "collection": "items", "doc": {"_id": 1}}])
    assert runner.invoke(cli, ["--store", a, "--peer-id", "alice", "write", "-m", "m", "-"],
                         input=ops).exit_code == 0
    made = runner.invoke(cli, ["--store", a, "bundle", "create", path, "--json"])
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["revisions"] == 1
    applied = runner.invoke(cli, ["--store", b, "--peer-id", "bob", "bundle", "apply", path])
    assert applied.exit_code == 0, applied.output
    assert applied.stdout.startswith(f"1 revisions in {path}: received 1, applied 1")
    again = runner.invoke(cli, ["--store", b, "bundle", "apply", path, "--json"])
    assert json.loads(again.stdout)["applied"] == []
    Path(path).write_bytes(Path(path).read_bytes()[:-5])
    refused = runner.invoke(cli, ["--store", b, "bundle", "apply", path])
    assert refused.exit_code == 1
    assert "is truncated (its last line is incomplete); nothing was applied" in refused.output


def test_bundle_subcommands_have_help_and_are_in_the_reference() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text("utf-8")
    group = cli.commands["bundle"]
    for name, command in group.commands.items():
        assert command.help and f"\n## txengine bundle {name}\n" in doc
        for param in command.params:
            assert getattr(param, "help", True), f"bundle {name} {param.name} lacks help"
