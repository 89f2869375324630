"""Alembic and txengine side by side on one generated Alembic project.

Run: python benchmarks/alembic_side_by_side.py [--revisions N] [--quick] [--time-limit S]

Generates an Alembic project of N linear revisions (default 20,000; --quick
1,000) with Alembic's own ``init`` (real env.py, logging at WARN), each
migration one real statement (``UPDATE bench SET n = n + 1``, the first one
creates the table). Then times, each as its own process (interpreter start
included on both sides): Alembic's ``heads``, ``history``, ``upgrade head``
and ``downgrade base`` on SQLite; adoption (``txengine init --from-alembic``);
and txengine's same four commands on a fresh SQLite store. A command still
running at the time limit is killed; for Alembic's migrations the table says
how many steps had run (reported by an ``on_version_apply`` hook in env.py;
0 means it was still planning — Alembic computes the whole plan first).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MIGRATION = '''"""step {i}

Revision ID: {rev}
Revises: {down}
Create Date: 2026-01-01 00:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = {rev!r}
down_revision: Union[str, Sequence[str], None] = {down!r}
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    {upgrade}


def downgrade() -> None:
    {downgrade}
'''

PROGRESS_HOOK = '''
import os as _os

_steps = [0]


def _progress(ctx, step, heads, run_args):
    _steps[0] += 1
    path = _os.environ.get("BENCH_PROGRESS")
    if path and _steps[0] % 100 == 0:
        with open(path, "w") as f:
            f.write(str(_steps[0]))
'''


def rev_id(i: int) -> str:
    return f"{i:012x}"


def make_project(root: Path, n: int) -> Path:
    """Write an Alembic project of ``n`` linear migrations; return its alembic.ini."""
    from alembic import command
    from alembic.config import Config

    ini = root / "alembic.ini"
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        command.init(Config(str(ini), stdout=quiet), str(root / "migrations"))
    text = ini.read_text().replace("sqlalchemy.url = driver://user:pass@localhost/dbname",
                                   f"sqlalchemy.url = sqlite:///{root / 'alembic.db'}")
    ini.write_text(text.replace("level = INFO", "level = WARN"))
    env = root / "migrations" / "env.py"
    env_text = env.read_text().replace(
        "            connection=connection, target_metadata=target_metadata\n",
        "            connection=connection, target_metadata=target_metadata,\n"
        "            on_version_apply=_progress,\n")
    env.write_text(env_text.replace("config = context.config\n",
                                    "config = context.config\n" + PROGRESS_HOOK, 1))
    versions = root / "migrations" / "versions"
    for i in range(n):
        if i == 0:
            up = ('op.execute("CREATE TABLE bench (n INTEGER)")\n'
                  '    op.execute("INSERT INTO bench VALUES (0)")')
            down = 'op.execute("DROP TABLE bench")'
        else:
            up = 'op.execute("UPDATE bench SET n = n + 1")'
            down = 'op.execute("UPDATE bench SET n = n - 1")'
        (versions / f"{rev_id(i)}_step_{i}.py").write_text(MIGRATION.format(
            i=i, rev=rev_id(i), down=rev_id(i - 1) if i else None, upgrade=up, downgrade=down))
    return ini


def timed(argv: list[str], limit: float, cwd: Path, progress: Path | None = None
          ) -> tuple[float, bool, int | None]:
    """Run a command; return (seconds, finished, steps reported)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if progress is not None:
        progress.unlink(missing_ok=True)
        env["BENCH_PROGRESS"] = str(progress)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=limit)
        finished = True
        if proc.returncode:
            raise SystemExit(f"{' '.join(argv)} failed:\n{err[-2000:]}")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        finished = False
    seconds = time.perf_counter() - started
    steps = None
    if progress is not None and progress.exists():
        steps = int(progress.read_text() or 0)
    elif progress is not None:
        steps = 0
    return seconds, finished, steps


def cell(seconds: float, finished: bool, steps: int | None, n: int) -> str:
    if finished:
        return f"{seconds:8.2f} s"
    got = "planning" if not steps else f"{steps:,}/{n:,} steps"
    return f"> {seconds:.0f} s (cut off; {got})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--revisions", type=int, default=None, help="revisions (default 20,000)")
    ap.add_argument("--quick", action="store_true", help="1,000 revisions")
    ap.add_argument("--time-limit", type=float, default=600.0,
                    help="seconds before a command is cut off (default 600)")
    args = ap.parse_args()
    n = args.revisions or (1000 if args.quick else 20000)
    limit = args.time_limit
    work = Path(tempfile.mkdtemp(prefix="txengine-alembic-bench-"))
    atexit.register(shutil.rmtree, work, True)
    alembic_dir = work / "alembic"
    alembic_dir.mkdir()
    t = time.perf_counter()
    ini = make_project(alembic_dir, n)
    print(f"generated {n:,} Alembic revisions in {time.perf_counter() - t:.1f}s under {work}",
          flush=True)

    py = sys.executable
    progress = work / "progress"
    alembic = [py, "-m", "alembic", "-c", str(ini)]
    results: dict[str, list[str]] = {}
    seconds: dict[str, list[float | None]] = {}
    commands = [("heads", ["heads"], ["heads"]), ("history", ["history"], ["history"]),
                ("upgrade head", ["upgrade", "head"], ["upgrade", "head"]),
                ("downgrade base", ["downgrade", "base"], ["downgrade", "base"])]
    for name, a_args, _ in commands:
        hook = progress if name.startswith(("upgrade", "downgrade")) else None
        s, done, steps = timed(alembic + a_args, limit, alembic_dir, hook)
        results[name] = [cell(s, done, steps, n)]
        seconds[name] = [s if done else None]
        print(f"alembic {name}: {results[name][0]}", flush=True)

    tx_dir = work / "txengine"
    t = time.perf_counter()
    adopt = [py, "-m", "txengine.cli", "--peer-id", "bench", "--store",
             f"sqlite:///{tx_dir / 'tx.db'}", "init", str(tx_dir), "--from-alembic",
             str(alembic_dir / "migrations")]
    s, done, _ = timed(adopt, limit * 2, work)
    print(f"txengine init --from-alembic: {s:.2f}s (freeze {n:,} files, load, ledger)",
          flush=True)
    txengine = [py, "-m", "txengine.cli", "-c", str(tx_dir / "alembic.ini")]
    for name, _, t_args in commands:
        s, done, _ = timed(txengine + t_args, limit, tx_dir)
        results[name].append(cell(s, done, None, n))
        seconds[name].append(s if done else None)
        print(f"txengine {name}: {results[name][1]}", flush=True)

    print()
    print(f"## Alembic {_version('alembic')} vs txengine, {n:,} linear revisions, SQLite")
    print()
    print("| command | Alembic | txengine | Alembic / txengine |")
    print("| --- | --- | --- | --- |")
    for name, _, _ in commands:
        a, x = seconds[name]
        if a is not None and x:
            ratio = f"{a / x:.1f}x"
        elif a is None and x:
            ratio = f"> {limit / x:.0f}x"
        else:
            ratio = "-"
        print(f"| {name} | {results[name][0].strip()} | {results[name][1].strip()} | {ratio} |")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
