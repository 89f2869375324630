"""The ``txengine`` command line, through click's CliRunner.

Every command is run in a project made by ``init`` in ``tmp_path`` (absolute
paths, ``-c``), checked for its exit code, its parsed ``--json`` output and
its one-line error on bad input.
"""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from txengine.cli import ProgressBar, cli
from txengine.engine import Progress

ADA = [{"op": "insert", "collection": "customers", "doc": {"_id": 1, "name": "Ada"}}]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def project(runner: CliRunner, tmp_path: Path) -> Path:
    """An initialised project folder: alembic.ini, versions/, store next to the ini."""
    result = runner.invoke(cli, ["--peer-id", "test", "init", str(tmp_path)])
    assert result.exit_code == 0, result.output
    return tmp_path


def run(runner: CliRunner, project: Path, *args: str, input: str | None = None,
        code: int = 0) -> Result:
    result = runner.invoke(cli, ["-c", str(project / "alembic.ini"), *args], input=input)
    assert result.exit_code == code, (result.output, result.exception)
    return result


def run_json(runner: CliRunner, project: Path, *args: str, input: str | None = None,
             code: int = 0) -> Any:
    return json.loads(run(runner, project, *args, "--json", input=input, code=code).stdout)


def write(runner: CliRunner, project: Path, ops: list[dict[str, Any]], message: str = "m"
          ) -> str:
    return run(runner, project, "write", "-m", message, "-", input=json.dumps(ops)).stdout.strip()


def assert_one_line_error(result: Result, text: str) -> None:
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and text in lines[0]
    assert "Traceback" not in result.output


def test_done_when_scenario(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                            ) -> None:
    """The issue's end-to-end scenario, in an empty folder with the default ./alembic.ini."""
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(cli, ["init", "."]).exit_code == 0
    result = runner.invoke(cli, ["write", "-m", "add Ada", "-"], input=json.dumps(ADA))
    assert result.exit_code == 0
    rev_id = result.stdout.strip()
    assert len(rev_id) == 64
    heads = json.loads(runner.invoke(cli, ["heads", "--json"]).stdout)
    assert [h["id"] for h in heads] == [rev_id]
    assert runner.invoke(cli, ["downgrade", "base"]).exit_code == 0
    assert json.loads(runner.invoke(cli, ["find", "customers", "--json"]).stdout) == []
    assert runner.invoke(cli, ["upgrade", "heads"]).exit_code == 0
    assert json.loads(runner.invoke(cli, ["find", "customers", "--json"]).stdout) == [
        {"_id": 1, "name": "Ada"}]
    entries = json.loads(runner.invoke(cli, ["audit", "--json"]).stdout)
    assert [(e["action"], e["revision"]) for e in entries if e["revision"]] == [
        ("apply", rev_id), ("undo", rev_id), ("apply", rev_id)]
    assert runner.invoke(cli, ["verify"]).exit_code == 0
    with sqlite3.connect(tmp_path / "txengine.db") as conn:
        conn.execute("UPDATE txengine_revisions SET payload = CAST(replace(CAST(payload AS TEXT),"
                     " 'Ada', 'Eve') AS BLOB) WHERE id = ?", (rev_id,))
    conn.close()
    result = runner.invoke(cli, ["verify"])
    assert result.exit_code == 1
    assert rev_id in result.stdout


# -- init and configuration ---------------------------------------------------------------

def test_init_writes_config_and_versions(runner: CliRunner, tmp_path: Path) -> None:
    out = json.loads(runner.invoke(cli, ["init", str(tmp_path / "p"), "--json"]).stdout)
    assert out["created"] is True
    text = (tmp_path / "p" / "alembic.ini").read_text()
    assert "[txengine]" in text and "store = sqlite:///txengine.db" in text
    assert f"peer_id = {out['peer_id']}" in text
    assert (tmp_path / "p" / "versions").is_dir()


def test_init_adds_section_to_existing_alembic_ini(runner: CliRunner, tmp_path: Path) -> None:
    ini = tmp_path / "alembic.ini"
    ini.write_text("[alembic]\n# keep me\nscript_location = migrations\n")
    out = json.loads(runner.invoke(cli, ["init", str(tmp_path), "--json"]).stdout)
    assert out["created"] is False
    text = ini.read_text()
    assert text.startswith("[alembic]\n# keep me\nscript_location = migrations\n")
    assert "[txengine]" in text


def test_init_refuses_a_second_txengine_section(runner: CliRunner, project: Path) -> None:
    result = runner.invoke(cli, ["init", str(project)])
    assert_one_line_error(result, "already has a [txengine] section")


def test_missing_config_says_to_init_or_pass_store(runner: CliRunner, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["heads"])
    assert_one_line_error(result, "run `txengine init` or pass --store")


def test_store_option_needs_no_config(runner: CliRunner, tmp_path: Path) -> None:
    store = str(tmp_path / "bare.db")
    result = runner.invoke(cli, ["--store", store, "write", "-m", "m", "-"],
                           input=json.dumps(ADA))
    assert result.exit_code == 0
    heads = json.loads(runner.invoke(cli, ["--store", store, "heads", "--json"]).stdout)
    assert heads[0]["id"] == result.stdout.strip()


def test_unopenable_store_is_one_line(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["--store", str(tmp_path / "no" / "such" / "x.db"), "heads"])
    assert_one_line_error(result, "cannot open store")


def test_relative_store_is_relative_to_the_config_file(runner: CliRunner, project: Path) -> None:
    write(runner, project, ADA)
    assert (project / "txengine.db").exists()


def test_peer_id_mismatch_is_one_line(runner: CliRunner, project: Path) -> None:
    write(runner, project, ADA)
    result = runner.invoke(cli, ["-c", str(project / "alembic.ini"), "--peer-id", "other",
                                 "heads"])
    assert_one_line_error(result, "belongs to peer 'test'")


def test_traceback_option_reraises(runner: CliRunner, project: Path) -> None:
    result = runner.invoke(cli, ["-c", str(project / "alembic.ini"), "--traceback",
                                 "show", "nope"])
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "RevisionNotFound"


# -- writes -------------------------------------------------------------------------------

def test_write_prints_the_revision_id(runner: CliRunner, project: Path) -> None:
    (project / "ops.json").write_text(json.dumps(ADA))
    out = run_json(runner, project, "write", "-m", "add", str(project / "ops.json"))
    assert out["message"] == "add" and out["applied"] and len(out["id"]) == 64


def test_write_malformed_json_is_one_line(runner: CliRunner, project: Path) -> None:
    result = run(runner, project, "write", "-m", "m", "-", input="[{", code=1)
    assert_one_line_error(result, "<stdin> is not valid JSON")


def test_write_unknown_op_is_one_line(runner: CliRunner, project: Path) -> None:
    result = run(runner, project, "write", "-m", "m", "-", code=1,
                 input='[{"op": "upsert", "collection": "c", "doc": {"_id": 1}}]')
    assert_one_line_error(result, "unknown op 'upsert'")


def test_write_keeps_a_compare_and_set_op_as_written(runner: CliRunner, project: Path) -> None:
    run(runner, project, "write", "-m", "add", "-", input=json.dumps(ADA))
    cas = [{"op": "update", "collection": "customers", "key": 1, "set": {"name": "Ada L."},
            "before": {"name": "Grace"}, "cas": True}]
    out = run_json(runner, project, "write", "-m", "cas", "-", input=json.dumps(cas))
    shown = run_json(runner, project, "show", out["id"])
    assert "cas=True" in json.dumps(shown)  # the rendered upgrade keeps the flag
    # the document does not hold the expected value: the field is left in place
    assert run_json(runner, project, "find", "customers") == [{"_id": 1, "name": "Ada"}]


def test_write_to_a_partition(runner: CliRunner, project: Path) -> None:
    out = run_json(runner, project, "write", "-m", "m", "--partition", "user:1", "-",
                   input=json.dumps(ADA))
    assert out["partition"] == "user:1"
    assert run_json(runner, project, "find", "customers") == []
    assert run_json(runner, project, "find", "customers", "--partition", "user:1") == [
        {"_id": 1, "name": "Ada"}]


def test_merge_joins_two_heads(runner: CliRunner, project: Path) -> None:
    first = write(runner, project, ADA)
    run(runner, project, "stamp", "base")
    second = write(runner, project, [{"op": "insert", "collection": "c", "doc": {"_id": 2}}])
    run(runner, project, "upgrade", "heads")
    assert len(run_json(runner, project, "heads")) == 2
    out = run_json(runner, project, "merge", "-m", "join")
    assert sorted(out["parents"]) == sorted([first, second])
    assert [h["id"] for h in run_json(runner, project, "heads")] == [out["id"]]


def test_merge_of_one_head_is_one_line(runner: CliRunner, project: Path) -> None:
    write(runner, project, ADA)
    assert_one_line_error(run(runner, project, "merge", code=1), "merge needs two or more heads")


def test_revert_restores_the_old_value(runner: CliRunner, project: Path) -> None:
    write(runner, project, ADA)
    rename = write(runner, project, [{"op": "update", "collection": "customers", "key": 1,
                                      "set": {"name": "Ada L."}}])
    out = run_json(runner, project, "revert", rename[:12])
    assert out["message"].startswith(f"Revert {rename[:12]}")
    assert run_json(runner, project, "get", "customers", "1")["name"] == "Ada"


def test_revert_unknown_revision_is_one_line(runner: CliRunner, project: Path) -> None:
    assert_one_line_error(run(runner, project, "revert", "abc", code=1), "no revision 'abc'")


# -- moving the peer ----------------------------------------------------------------------

def test_downgrade_and_upgrade_report_revisions(runner: CliRunner, project: Path) -> None:
    rev = write(runner, project, ADA)
    assert run_json(runner, project, "downgrade", "base") == {
        "action": "downgrade", "applied": [], "undone": [rev]}
    assert run_json(runner, project, "current") == []
    assert run(runner, project, "current").stdout.strip() == "<base>: nothing applied"
    assert run_json(runner, project, "upgrade")["applied"] == [rev]
    assert [c["id"] for c in run_json(runner, project, "current")] == [rev]


def test_downgrade_pins_and_write_is_refused(runner: CliRunner, project: Path) -> None:
    write(runner, project, ADA)
    run(runner, project, "downgrade", "base")
    result = run(runner, project, "write", "-m", "m", "-", input=json.dumps(ADA), code=1)
    assert_one_line_error(result, "pinned by a local downgrade")


def test_upgrade_unknown_target_is_one_line(runner: CliRunner, project: Path) -> None:
    write(runner, project, ADA)
    assert_one_line_error(run(runner, project, "upgrade", "zzz", code=1), "zzz")


def test_downgrade_needs_a_target(runner: CliRunner, project: Path) -> None:
    assert run(runner, project, "downgrade", code=2).exit_code == 2


def test_stamp_marks_without_running(runner: CliRunner, project: Path) -> None:
    rev = write(runner, project, ADA)
    assert run_json(runner, project, "stamp", "base")["undone"] == [rev]
    assert run_json(runner, project, "get", "customers", "1") == {"_id": 1, "name": "Ada"}
    assert run_json(runner, project, "current") == []
    assert_one_line_error(run(runner, project, "stamp", "nope", code=1), "nope")


def test_progress_bar_draws_on_the_given_stream() -> None:
    stream = io.StringIO()
    bar = ProgressBar("upgrading", file=stream)
    bar(Progress("upgrade", 1, 2, "a"))
    bar(Progress("upgrade", 2, 2, "b"))
    bar.close()
    assert "upgrading" in stream.getvalue()


# -- reads --------------------------------------------------------------------------------

def test_heads_json_is_a_list_of_revisions(runner: CliRunner, project: Path) -> None:
    assert run_json(runner, project, "heads") == []
    rev = write(runner, project, ADA, message="add Ada")
    (head,) = run_json(runner, project, "heads")
    assert head["id"] == rev and head["is_head"] and head["message"] == "add Ada"
    assert rev[:12] in run(runner, project, "heads").stdout


def test_nl_is_one_object_per_line(runner: CliRunner, project: Path) -> None:
    write(runner, project, ADA)
    write(runner, project, [{"op": "insert", "collection": "c", "doc": {"_id": 2}}])
    lines = run(runner, project, "history", "--nl").stdout.splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["data", "data"]


def test_json_and_nl_together_is_a_usage_error(runner: CliRunner, project: Path) -> None:
    result = run(runner, project, "heads", "--json", "--nl", code=2)
    assert "cannot be used together" in result.stderr


def test_branches_lists_branch_points(runner: CliRunner, project: Path) -> None:
    base = write(runner, project, ADA)
    write(runner, project, [{"op": "insert", "collection": "c", "doc": {"_id": 2}}])
    run(runner, project, "stamp", base)
    run(runner, project, "downgrade", base)
    assert run_json(runner, project, "branches") == []
    assert run(runner, project, "branches").stdout.strip() == "no branch points"


def test_history_range_and_verbose(runner: CliRunner, project: Path) -> None:
    first = write(runner, project, ADA, message="one")
    second = write(runner, project, [{"op": "insert", "collection": "c", "doc": {"_id": 2}}],
                   message="two")
    assert [r["id"] for r in run_json(runner, project, "history")] == [second, first]
    assert [r["id"] for r in run_json(runner, project, "history", "-r", f"{second}:")] == [second]
    assert [r["id"] for r in run_json(runner, project, "history", "-r", f":{first}")] == [first]
    verbose = run(runner, project, "history", "--verbose").stdout
    assert f"Rev: {second}" in verbose and "Kind: data" in verbose
    assert_one_line_error(run(runner, project, "history", "-r", "nope:", code=1), "nope")


def test_show_prints_the_rendered_script(runner: CliRunner, project: Path) -> None:
    rev = write(runner, project, ADA, message="add Ada")
    text = run(runner, project, "show", rev[:8]).stdout
    assert text.startswith('"""add Ada') and "def upgrade(op):" in text
    out = run_json(runner, project, "show", rev[:8])
    assert out["id"] == rev and out["descriptor"]["id"] == rev and "def downgrade" in out["script"]
    assert_one_line_error(run(runner, project, "show", "nope", code=1), "no revision 'nope'")


def test_audit_filters_by_revision(runner: CliRunner, project: Path) -> None:
    first = write(runner, project, ADA)
    write(runner, project, [{"op": "insert", "collection": "c", "doc": {"_id": 2}}])
    entries = run_json(runner, project, "audit", "--rev", first[:10])
    assert [(e["action"], e["revision"]) for e in entries] == [("apply", first)]
    assert_one_line_error(run(runner, project, "audit", "--rev", "nope", code=1), "nope")


def test_verify_json_reports_findings(runner: CliRunner, project: Path) -> None:
    rev = write(runner, project, ADA)
    assert run_json(runner, project, "verify") == {"ok": True, "checked": 1, "findings": []}
    with sqlite3.connect(project / "txengine.db") as conn:
        conn.execute("UPDATE txengine_revisions SET message = 'forged' WHERE id = ?", (rev,))
    conn.close()
    out = run_json(runner, project, "verify", code=1)
    assert out["ok"] is False and out["findings"][0]["revision"] == rev


def test_verify_replay(runner: CliRunner, project: Path) -> None:
    write(runner, project, ADA)
    assert run_json(runner, project, "verify", "--replay")["ok"] is True


def test_get_and_find(runner: CliRunner, project: Path) -> None:
    write(runner, project, [*ADA, {"op": "insert", "collection": "customers",
                                   "doc": {"_id": "1", "name": "Str"}}])
    assert run_json(runner, project, "get", "customers", "1") == {"_id": 1, "name": "Ada"}
    assert run_json(runner, project, "get", "customers", '"1"')["name"] == "Str"
    found = run_json(runner, project, "find", "customers", "--where", '{"name": "Str"}')
    assert found == [{"_id": "1", "name": "Str"}]
    assert_one_line_error(run(runner, project, "get", "customers", "9", code=1),
                          "no document 9 in 'customers'")
    assert_one_line_error(run(runner, project, "find", "customers", "--where", "[1]", code=1),
                          "--where must be a JSON object")


def test_export_writes_one_script_per_data_revision(runner: CliRunner, project: Path) -> None:
    rev = write(runner, project, ADA, message="add Ada")
    out = run_json(runner, project, "export", "--scripts", str(project / "out"))
    assert out == [{"id": rev, "path": str(project / "out" / f"{rev}_add_ada.py")}]
    assert "def upgrade(op):" in (project / "out" / f"{rev}_add_ada.py").read_text()
    assert run(runner, project, "export", code=2).exit_code == 2


# -- authored script revisions ------------------------------------------------------------

def test_revision_writes_an_authored_script(runner: CliRunner, project: Path) -> None:
    out = run_json(runner, project, "revision", "-m", "create notes", "--rev-id", "s1")
    path = Path(out["path"])
    assert path == project / "versions" / "s1_create_notes.py"
    text = path.read_text()
    assert 'revision = "s1"' in text and "down_revision = None" in text
    (head,) = run_json(runner, project, "heads")
    assert head["id"] == "s1" and head["kind"] == "script"
    second = run_json(runner, project, "revision", "-m", "more", "--rev-id", "s2",
                      "--branch-label", "schema")
    assert second["parents"] == ["s1"]
    assert 'down_revision = "s1"' in Path(second["path"]).read_text()


def test_revision_then_write_takes_the_next_seq(runner: CliRunner, project: Path) -> None:
    """The script is registered when authored, so a later write does not reuse its seq."""
    run(runner, project, "revision", "-m", "s", "--rev-id", "s1")
    rev = write(runner, project, ADA)
    descriptor = run_json(runner, project, "show", rev)["descriptor"]
    assert descriptor["seq"] == 2


def test_revision_head_must_be_a_head_unless_splice(runner: CliRunner, project: Path) -> None:
    run(runner, project, "revision", "-m", "a", "--rev-id", "s1")
    run(runner, project, "revision", "-m", "b", "--rev-id", "s2")
    result = run(runner, project, "revision", "-m", "c", "--head", "s1", code=1)
    assert_one_line_error(result, "is not a script head: pass --splice")
    out = run_json(runner, project, "revision", "-m", "c", "--head", "s1", "--splice",
                   "--rev-id", "s3")
    assert out["parents"] == ["s1"]
    result = run(runner, project, "revision", "-m", "d", code=1)
    assert_one_line_error(result, "there are 2 script heads")


def test_revision_refuses_a_reserved_or_taken_id(runner: CliRunner, project: Path) -> None:
    run(runner, project, "revision", "-m", "a", "--rev-id", "s1")
    assert_one_line_error(run(runner, project, "revision", "-m", "b", "--rev-id", "s1", code=1),
                          "already exists")
    assert_one_line_error(run(runner, project, "revision", "-m", "b", "--rev-id", "a-b", code=1),
                          "is not valid")


def test_authored_schema_revision_upgrades_and_downgrades(runner: CliRunner,
                                                          project: Path) -> None:
    pytest.importorskip("txengine.runner")
    out = run_json(runner, project, "revision", "-m", "notes", "--rev-id", "s1")
    path = Path(out["path"])
    head = path.read_text().split("\n\ndef upgrade(op):")[0]
    path.write_text(head + "\n\ndef upgrade(op):\n    import sqlalchemy as sa\n"
                    '    op.schema.create_table("notes", sa.Column("id", sa.Integer,'
                    " primary_key=True))\n\n\ndef downgrade(op):\n"
                    '    op.schema.drop_table("notes")\n')
    assert run_json(runner, project, "upgrade")["applied"] == ["s1"]
    with sqlite3.connect(project / "txengine.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "notes" in tables


# -- demo ---------------------------------------------------------------------------------

def test_demo_runs_the_whole_cycle(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["demo", "--dir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    for header in ("1. A new project", "3. Data revisions", "4. History", "6. Downgrade",
                   "7. Revert", "8. The audit", "9. Verify", "10. Tampering is caught"):
        assert header in result.stdout
    assert "FAILED: 1 findings" in result.stdout


def test_demo_nl_streams_events(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["demo", "--dir", str(tmp_path / "demo"), "--nl"])
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0] == {"kind": "section", "text": "1. A new project", "value": None}
    verifies = [e["value"] for e in events if e["kind"] == "result" and e["text"] == "verify"]
    assert [v["ok"] for v in verifies] == [True, False]


def test_demo_refuses_a_used_folder(runner: CliRunner, project: Path) -> None:
    result = runner.invoke(cli, ["demo", "--dir", str(project)])
    assert_one_line_error(result, "already holds an alembic.ini")


def test_downgrade_accepts_a_negative_relative_target(runner: CliRunner, project: Path) -> None:
    """`txengine downgrade -1` works as in Alembic: -1 is a target, not an option."""
    for name in ("Ada", "Grace"):
        ops = json.dumps([{"op": "insert", "collection": "c", "doc": {"_id": name}}])
        run(runner, project, "write", "-m", name, "-", input=ops)
    out = run_json(runner, project, "downgrade", "-1")
    assert len(out["undone"]) == 1
    assert [d["_id"] for d in run_json(runner, project, "find", "c")] == ["Ada"]


def test_show_head_renders_the_single_head(runner: CliRunner, project: Path) -> None:
    ops = json.dumps([{"op": "insert", "collection": "c", "doc": {"_id": 1}}])
    run(runner, project, "write", "-m", "one", "-", input=ops)
    assert "def upgrade(op):" in run(runner, project, "show", "head").stdout
