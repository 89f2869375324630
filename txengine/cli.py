"""The ``txengine`` command line: click commands, each a thin shell over :class:`Peer`.

Every command parses its arguments, calls one ``Peer`` method and renders the
result. Read commands share :func:`output_options` (human text, ``--json`` for
one JSON document, ``--nl`` for one object per line). Library errors
(:class:`TxEngineError`) are turned into one line on stderr and exit status 1
in one place, :meth:`_Group.invoke`; ``--traceback`` re-raises them instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO, TypeVar

import click
import sqlalchemy as sa

from . import config as _config
from .engine import Progress
from .exceptions import (
    DocumentNotFound,
    InvalidInput,
    MalformedPayload,
    StoreError,
    TxEngineError,
)
from .ledger import AuditEntry
from .peer import OperationResult, Peer, RevisionDetail, RevisionInfo, VerifyReport
from .revision import DEFAULT_PARTITION

T = TypeVar("T")

# -- state and errors ----------------------------------------------------------------


@dataclass
class State:
    """The global options, and the peer opened for this invocation (at most one)."""

    config_path: str = _config.INI_NAME
    config_given: bool = False
    store: str | None = None
    peer_id: str | None = None
    traceback: bool = False
    peer: Peer | None = None

    def config(self) -> _config.Config:
        cfg = _config.load(self.config_path, required=self.config_given)
        if self.store:
            cfg = dataclasses.replace(cfg, store=self.store)
        return cfg

    def close_peer(self) -> None:
        if self.peer is not None:
            peer, self.peer = self.peer, None
            peer.close()


def open_peer() -> Peer:
    """Open this invocation's peer from the global options; it is closed with the context."""
    ctx = click.get_current_context()
    state = ctx.ensure_object(State)
    if state.peer is None:
        cfg = state.config()
        url = cfg.require_store()
        try:
            state.peer = Peer.open(url, state.peer_id or cfg.peer_id,
                                   script_location=cfg.script_location, key_file=cfg.key_file)
        except sa.exc.DBAPIError as exc:  # stopgap: Peer.open should raise StoreError
            raise StoreError(f"cannot open store {url!r}: {exc.orig}") from exc
        ctx.find_root().call_on_close(state.close_peer)
    return state.peer


class _Group(click.Group):
    """A group that reports library errors as one line (the only place that catches them)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TxEngineError as exc:
            state = ctx.find_object(State)
            if state is not None and state.traceback:
                raise
            raise click.ClickException(" ".join(str(exc).split())) from None


# -- output ------------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """Return the JSON form of a result: ``to_json()``, a dataclass, or the value itself."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


@dataclass
class Output:
    """What a command returns: items plus how to show one as text."""

    items: Iterable[Any]
    lines: Callable[[Any], Iterable[str]]
    single: bool = False
    empty: str | None = None
    exit_code: int = 0
    json: Callable[[Any], Any] = field(default=to_json)


def _emit(out: Output, as_json: bool, nl: bool) -> None:
    if as_json and out.single:
        click.echo(json.dumps(out.json(next(iter(out.items))), indent=2))
    elif as_json:
        first = True
        click.echo("[", nl=False)
        for item in out.items:
            click.echo(("\n" if first else ",\n") + json.dumps(out.json(item)), nl=False)
            first = False
        click.echo("\n]" if not first else "]")
    elif nl:
        for item in out.items:
            click.echo(json.dumps(out.json(item)))
    else:
        shown = False
        for item in out.items:
            for line in out.lines(item):
                click.echo(line)
            shown = True
        if not shown and out.empty:
            click.echo(out.empty)


def output_options(fn: Callable[..., Output]) -> Callable[..., None]:
    """Add ``--json`` and ``--nl`` to a command that returns an :class:`Output`."""

    @click.option("--nl", is_flag=True, help="Output newline-delimited JSON, one object a line.")
    @click.option("--json", "as_json", is_flag=True, help="Output one JSON document.")
    @functools.wraps(fn)
    def wrapper(*args: Any, as_json: bool, nl: bool, **kwargs: Any) -> None:
        if as_json and nl:
            raise click.UsageError("--json and --nl cannot be used together")
        out = fn(*args, **kwargs)
        _emit(out, as_json, nl)
        if out.exit_code:
            click.get_current_context().exit(out.exit_code)

    return wrapper


def _marks(info: RevisionInfo) -> str:
    marks = [m for m, on in (("(head)", info.is_head), ("(applied)", info.applied)) if on]
    if len(info.parents) > 1:
        marks.append("(mergepoint)")
    if info.branch_labels:
        marks.append(f"({', '.join(info.branch_labels)})")
    return " ".join(marks)


def revision_line(info: RevisionInfo) -> list[str]:
    """One line per revision, as ``alembic history`` prints: ``parents -> id (marks), msg``."""
    parents = ", ".join(p[:12] for p in info.parents) or "<base>"
    if len(info.parents) > 1:
        parents = f"({parents})"
    marks = _marks(info)
    return [f"{parents} -> {info.short_id}{' ' + marks if marks else ''}"
            f" [{info.kind}], {info.message}"]


def revision_block(info: RevisionInfo) -> list[str]:
    """Several lines per revision (``history --verbose``): every field, the full id."""
    return [
        f"Rev: {info.id} {_marks(info)}".rstrip(),
        f"Parent: {', '.join(info.parents) or '<base>'}",
        *([f"Depends on: {', '.join(info.depends_on)}"] if info.depends_on else []),
        f"Kind: {info.kind}    Partition: {info.partition}",
        f"Origin: {info.origin}    HLC: {info.hlc[0]}/{info.hlc[1]}",
        "",
        f"    {info.message}",
        "",
    ]


def operation_lines(result: OperationResult) -> list[str]:
    """Say what an upgrade, downgrade or stamp did."""
    def names(ids: list[str]) -> str:
        shown = ", ".join(i[:12] for i in ids[:10])
        return shown + (f", ... ({len(ids) - 10} more)" if len(ids) > 10 else "")

    verb = {"upgrade": "applied", "downgrade": "undid", "stamp": "stamped"}[result.action]
    lines = []
    if result.undone:
        lines.append(f"{'unstamped' if result.action == 'stamp' else 'undid'}"
                     f" {len(result.undone)}: {names(result.undone)}")
    if result.applied:
        lines.append(f"{verb if result.action != 'downgrade' else 'redid'}"
                     f" {len(result.applied)}: {names(result.applied)}")
    return lines or ["nothing to do"]


def audit_line(entry: AuditEntry) -> list[str]:
    """One audit row: when, what, which revision, who, outcome."""
    rev = entry.revision[:12] if entry.revision else "-"
    detail = f" {json.dumps(entry.detail)}" if entry.detail else ""
    return [f"{entry.seq:>5} {entry.at} {entry.action:<8} {rev:<12} {entry.peer_id}"
            f" ({entry.os_user}) {entry.outcome} {entry.duration_ms:.1f}ms{detail}"]


def verify_lines(report: VerifyReport) -> list[str]:
    """Say OK, or name each finding's revision in full."""
    if report.ok:
        return [f"OK: {report.checked} revisions checked, no findings"]
    lines = [f"FAILED: {len(report.findings)} findings in {report.checked} revisions"]
    for f in report.findings:
        where = f" {f.collection}/{f.key}" if f.collection else ""
        lines.append(f"revision {f.revision or '-'}{where}: {f.problem}")
    return lines


def detail_lines(detail: RevisionDetail) -> list[str]:
    return [detail.script.rstrip("\n")]


def document_json(doc: dict[str, Any]) -> Any:
    from .values import to_ejson

    return to_ejson(doc)


RENDERERS: dict[str, Callable[[Any], Iterable[str]]] = {
    "revision": revision_line,
    "operation": operation_lines,
    "audit": audit_line,
    "verify": verify_lines,
    "detail": detail_lines,
    "document": lambda d: [json.dumps(document_json(d))],
}


class ProgressBar:
    """A ``progress=`` callback drawing a bar on stderr (only when stderr is a terminal)."""

    def __init__(self, label: str, file: TextIO | None = None) -> None:
        self.label = label
        self.file = file or click.get_text_stream("stderr")
        self._bar: Any = None
        self._done = 0

    def __call__(self, progress: Progress) -> None:
        if self._bar is None:
            self._bar = click.progressbar(length=progress.total, label=self.label,
                                          file=self.file)
            self._bar.__enter__()
        self._bar.length = progress.total  # a sync's total grows when more descriptors arrive
        self._bar.update(progress.done - self._done)
        self._done = progress.done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def _run_with_progress(label: str, call: Callable[[Any], T]) -> T:
    if not click.get_text_stream("stderr").isatty():
        return call(None)
    bar = ProgressBar(label)
    try:
        return call(bar)
    finally:
        bar.close()


# -- the group ---------------------------------------------------------------------------


@click.group(cls=_Group)
@click.version_option(package_name="txengine")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="Config file with a [txengine] section (default: ./alembic.ini;"
                   " optional when --store is given).")
@click.option("--store", metavar="URL",
              help="Store to use: a SQLite path or a SQLAlchemy URL (overrides the config).")
@click.option("--peer-id", help="This peer's id (overrides the config).")
@click.option("--traceback", is_flag=True, help="Show the full traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, store: str | None,
        peer_id: str | None, traceback: bool) -> None:
    """txengine: every data write a reversible, replicated revision.

    Alembic, but for data, and for many peers. Start with `txengine init`,
    or see the whole cycle with `txengine demo`.
    """
    ctx.obj = State(config_path or _config.INI_NAME, config_path is not None, store,
                    peer_id, traceback)


def main() -> None:
    """Run the command line (the ``txengine`` console script)."""
    cli(prog_name="txengine")


def _one(render: str) -> Callable[[Any], Output]:
    return lambda value: Output([value], RENDERERS[render], single=True)


def _many(render: str, items: Iterable[Any], empty: str | None = None) -> Output:
    return Output(list(items), RENDERERS[render], empty=empty)


partition_option = click.option("--partition", default=DEFAULT_PARTITION, show_default=True,
                                help="Partition the revision belongs to.")


# -- project ------------------------------------------------------------------------------


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--from-alembic", "source", type=click.Path(exists=True, file_okay=False),
              help="Adopt the Alembic script directory (or versions folder) SOURCE: freeze"
                   " each migration as a script revision, stamp alembic_version's heads.")
@click.option("--root-key", metavar="PUBLIC",
              help="Install the deployment's root public key (from `keys init-root`): the"
                   " peer then accepts only revisions signed by enrolled keys.")
@output_options
def init(directory: str, source: str | None, root_key: str | None) -> Output:
    """Create alembic.ini ([txengine] section) and versions/ in DIRECTORY.

    An existing alembic.ini is kept: the [txengine] section is added to it.
    The store defaults to sqlite:///txengine.db next to alembic.ini (with
    --from-alembic: --store, else Alembic's sqlalchemy.url). See docs/alembic.md
    and, for --root-key, docs/security.md.
    """
    state = click.get_current_context().find_object(State)
    peer_id = state.peer_id if state else None
    if source is not None:
        from .adopt import AdoptReport, init_from_alembic

        report = init_from_alembic(directory, source, peer_id=peer_id,
                                   store=state.store if state else None)

        def adopted(r: AdoptReport) -> list[str]:
            heads = ", ".join(r.alembic_heads) or "none (no alembic_version table)"
            return [f"{'Wrote' if r.created else 'Added a [txengine] section to'} {r.config}",
                    f"Adopted {len(r.adopted)} Alembic revisions in {r.versions}"
                    f" ({len(r.kept)} already adopted)",
                    f"Alembic heads: {heads}; stamped {len(r.stamped)} revisions",
                    f"Store: {r.store}, peer id: {r.peer_id}"]

        return Output([report], adopted, single=True)
    if root_key is not None:
        from .keys import public_from_text

        public_from_text(root_key)  # refuse a bad key before writing anything
    result = _config.init_project(directory, peer_id=peer_id)
    if root_key is not None:
        cfg = _config.load(result.config, required=True)
        with Peer.open(cfg.require_store(), cfg.peer_id, key_file=cfg.key_file) as peer:
            peer.install_root(root_key)

    def lines(r: _config.InitResult) -> list[str]:
        did = "Wrote" if r.created else "Added a [txengine] section to"
        return [f"{did} {r.config}", f"Scripts go in {r.script_location}",
                f"Store: {r.store}, peer id: {r.peer_id}",
                *([f"Root key installed: {root_key}"] if root_key else [])]

    return Output([result], lines, single=True)


@cli.command()
@click.option("-m", "--message", required=True, help="What the script revision does.")
@click.option("--head", help="Revision to base it on ('base' for a new branch;"
                             " default: the script head).")
@click.option("--splice", is_flag=True, help="Allow --head to name a non-head revision.")
@click.option("--branch-label", help="A label for a new branch.")
@click.option("--rev-id", help="The revision id (default: generated).")
@click.option("--depends-on", multiple=True, help="A revision it depends on (repeatable).")
@click.option("--runs-on", multiple=True, default=("sql",), show_default=True,
              help="Store kind the script runs on (repeatable).")
@output_options
def revision(message: str, head: str | None, splice: bool, branch_label: str | None,
             rev_id: str | None, depends_on: tuple[str, ...], runs_on: tuple[str, ...]) -> Output:
    """Create an authored script revision in the script location.

    Edit its upgrade(op)/downgrade(op); op.schema is Alembic's Operations.
    """
    new = open_peer().new_script(message, head=head, splice=splice,
                                 branch_label=[branch_label] if branch_label else [],
                                 rev_id=rev_id, depends_on=depends_on, stores=runs_on)
    return Output([new], lambda n: [f"Generating {n.path} ... done", n.id], single=True)


# -- writes -------------------------------------------------------------------------------


@cli.command()
@click.option("-m", "--message", required=True, help="The revision message.")
@click.argument("file", type=click.File("r"))
@partition_option
@output_options
def write(message: str, file: IO[str], partition: str) -> Output:
    """Write the JSON list of ops in FILE (- for stdin) as one data revision.

    Ops: {"op": "insert", "collection": "c", "doc": {"_id": 1, ...}},
    {"op": "update", "collection": "c", "key": 1, "set": {...}},
    {"op": "delete", "collection": "c", "key": 1}. Prints the new revision id.
    """
    try:
        ops = json.load(file)
    except ValueError as exc:
        raise MalformedPayload(f"{file.name} is not valid JSON: {exc}") from None
    info = open_peer().write(message, ops, partition)
    return Output([info], lambda i: [i.id], single=True)


@cli.command()
@click.argument("revisions", nargs=-1)
@click.option("-m", "--message", default="merge", show_default=True, help="The message.")
@partition_option
@output_options
def merge(revisions: tuple[str, ...], message: str, partition: str) -> Output:
    """Write an empty revision whose parents are REVISIONS (default: all heads)."""
    info = open_peer().merge(list(revisions) or ["heads"], message, partition)
    return Output([info], lambda i: [i.id], single=True)


@cli.command()
@click.argument("rev")
@click.option("-m", "--message", help="The message (default: 'Revert <id>: <message>').")
@output_options
def revert(rev: str, message: str | None) -> Output:
    """Write a revision that undoes REV where its values still stand."""
    info = open_peer().revert(rev, message)
    return Output([info], lambda i: [i.id if i else "nothing left to revert"], single=True)


# -- moving the peer ----------------------------------------------------------------------

# `downgrade -1` as in Alembic: a negative relative target is an argument, not an option.
_RELATIVE_TARGETS = {"ignore_unknown_options": True}


@cli.command(context_settings=_RELATIVE_TARGETS)
@click.argument("target", default="heads")
@output_options
def upgrade(target: str) -> Output:
    """Apply revisions up to TARGET (default heads; also an id, a label, +N)."""
    peer = open_peer()
    result = _run_with_progress("upgrading", lambda bar: peer.upgrade(target, progress=bar))
    return _one("operation")(result)


@cli.command(context_settings=_RELATIVE_TARGETS)
@click.argument("target")
@output_options
def downgrade(target: str) -> Output:
    """Undo applied revisions back to TARGET (base, an id, -N); pins this peer."""
    peer = open_peer()
    result = _run_with_progress("downgrading", lambda bar: peer.downgrade(target, progress=bar))
    return _one("operation")(result)


@cli.command(context_settings=_RELATIVE_TARGETS)
@click.argument("target")
@output_options
def stamp(target: str) -> Output:
    """Mark TARGET and its ancestry as applied without running anything."""
    return _one("operation")(open_peer().stamp(target))


# -- reads --------------------------------------------------------------------------------


@cli.command()
@output_options
def current() -> Output:
    """Show the applied heads: what this peer's data reflects."""
    return _many("revision", open_peer().current(), empty="<base>: nothing applied")


@cli.command()
@output_options
def heads() -> Output:
    """Show the revisions with no children."""
    return _many("revision", open_peer().heads(), empty="no revisions")


@cli.command()
@output_options
def branches() -> Output:
    """Show branch points: revisions with more than one child."""
    return _many("revision", open_peer().branches(), empty="no branch points")


@cli.command()
@click.option("-r", "--rev-range", help="Only A:B: B's ancestry after A (either may be empty).")
@click.option("-v", "--verbose", is_flag=True, help="Show every field.")
@output_options
def history(rev_range: str | None, verbose: bool) -> Output:
    """List revisions, newest first."""
    out = _many("revision", open_peer().history(rev_range), empty="no revisions")
    if verbose:
        out.lines = revision_block
    return out


@cli.command()
@click.argument("rev")
@output_options
def show(rev: str) -> Output:
    """Print REV's script (rendered from the payload for a data revision)."""
    return _one("detail")(open_peer().show(rev))


@cli.command()
@click.option("--rev", help="Only the entries about this revision.")
@output_options
def audit(rev: str | None) -> Output:
    """Show the audit trail, oldest first."""
    return _many("audit", open_peer().audit(rev), empty="no audit entries")


@cli.command()
@click.option("--replay", is_flag=True,
              help="Also replay the applied chain into a scratch store and compare the data.")
@output_options
def verify(replay: bool) -> Output:
    """Check checksums, digests, signatures, chain; exit 1 on any finding.

    Signatures are checked on a peer with a root key installed (see docs/security.md).
    """
    report = open_peer().verify(replay=replay)
    return Output([report], verify_lines, single=True, exit_code=0 if report.ok else 1)


@cli.command()
@output_options
def status() -> Output:
    """Show the sync badge counts: unsent, announced, fetched, conflicted, quarantined,
    refused."""
    result = open_peer().status()

    def lines(st: Any) -> list[str]:
        return [f"peer {st.peer} (origin {st.origin}){' pinned' if st.pinned else ''}",
                f"unsent {st.unsent}, announced {st.announced}, fetched {st.fetched},"
                f" conflicted {st.conflicted}, quarantined {st.quarantined},"
                f" refused {st.refused}"]

    return Output([result], lines, single=True)


def _sync_lines(r: Any) -> list[str]:
    refused = [f"refused {x.revision[:12]}: {x.reason}" for x in r.local.refused]
    refused += [f"the other side refused {x.revision[:12]}: {x.reason}" for x in r.remote.refused]
    return [f"received {r.local.fetched}, sent {r.local.sent}, applied"
            f" {len(r.local.applied)}, rolled back {len(r.local.rolled_back)}, conflicted"
            f" {len(r.local.conflicted)}, quarantined {len(r.local.quarantined)}"
            f" ({r.round_trips} round trips, {r.bytes} bytes)", *refused]


@cli.command()
@click.argument("other")
@click.option("--other-peer-id", help="The other store's peer id (default: the one it holds).")
@click.option("--token", envvar="TXENGINE_TOKEN", show_envvar=True,
              help="The token for a sync server (OTHER is http[s]://host:port).")
@click.option("--watch", is_flag=True, help="With a sync server: keep syncing after each local"
              " write and every --interval seconds, until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="With --watch: seconds between syncs while nothing is written here.")
@click.option("--max-rounds", type=click.IntRange(min=1),
              help="With --watch: stop after this many successful syncs.")
@output_options
def sync(other: str, other_peer_id: str | None, token: str | None, watch: bool,
         interval: float, max_rounds: int | None) -> Output:
    """Exchange revisions both ways with OTHER: a store URL (in this process) or a sync
    server, http://host:port (`txengine serve`)."""
    peer = open_peer()
    if other.startswith(("http://", "https://")):
        if watch:
            return Output(_watching(peer.watch(other, token=token, interval=interval,
                                               max_rounds=max_rounds)), _watch_lines)
        result = _run_with_progress("sync", lambda bar: peer.sync(other, token=token,
                                                                  progress=bar))
        return Output([result], _sync_lines, single=True)
    if watch:
        raise click.UsageError("--watch needs a sync server URL (http://host:port)")
    with Peer.open(other, other_peer_id) as remote:
        result = _run_with_progress("sync", lambda bar: peer.sync(remote, progress=bar))
    return Output([result], _sync_lines, single=True)


def _watching(events: Iterator[Any]) -> Iterator[Any]:
    """Stop cleanly on Ctrl-C (between two committed steps; the lease is given back)."""
    try:
        yield from events
    except KeyboardInterrupt:
        return


def _watch_lines(event: Any) -> list[str]:
    if event.kind == "synced":
        return _sync_lines(event.result)
    return [f"{event.error}; retrying in {event.retry_in:.1f}s"]


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=8800, show_default=True, help="Port to listen on.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Server processes (they share the store through its apply lease).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help="uvicorn's log level.")
@click.option("--rate", type=click.FloatRange(min=0.01), default=50.0, show_default=True,
              help="Requests a second per peer, per server process (then 429).")
@click.option("--burst", type=click.IntRange(min=1), default=200, show_default=True,
              help="Requests a peer may send at once before --rate applies.")
def serve(host: str, port: int, workers: int, log_level: str, rate: float, burst: int) -> None:
    """Serve the store to other peers over HTTP (the sync protocol, docs/protocol.md).

    Every request needs a token from `txengine peers add NAME`, and reads and
    writes only the partitions `txengine peers grant` gave it.
    """
    from .transport.server import serve as run

    state = click.get_current_context().ensure_object(State)
    peer = open_peer()  # fail here, not in each worker, on a bad store
    peer_id, holders = peer.peer_id, peer.peers_list()
    state.close_peer()
    if not holders:
        click.echo("warning: no peer holds a token yet, so every request will be refused:"
                   " run `txengine peers add NAME`", err=True)
    elif not any(c.read or c.write for c in holders):
        click.echo("warning: no peer holds a grant yet, so no partition will be read or"
                   " written: run `txengine peers grant NAME --read P --write P`", err=True)
    run(state.config().require_store(), peer_id, host, port, workers, log_level, rate, burst)


@cli.group()
def peers() -> None:
    """Manage who may sync with this store over HTTP: tokens and partition grants."""


def grant_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--read P / --write P, repeatable: partition names or prefixes ending in '*'."""
    fn = click.option("--write", "write", multiple=True, metavar="PATTERN",
                      help="A partition it may send revisions of: a name, or a prefix ending"
                      " in '*' ('user:*'; '*' for all). Repeatable.")(fn)
    return click.option("--read", "read", multiple=True, metavar="PATTERN",
                        help="A partition it may receive: a name, or a prefix ending in '*'."
                        " Repeatable.")(fn)


def _grant_lines(c: Any) -> list[str]:
    return [f"{c.name}  read: {', '.join(c.read) or '-'}  write: {', '.join(c.write) or '-'}"]


@peers.command("add")
@click.argument("name")
@grant_options
@output_options
def peers_add(name: str, read: tuple[str, ...], write: tuple[str, ...]) -> Output:
    """Let peer NAME sync with this store; print its token (once: only a hash is kept).

    It reads and writes nothing until granted: pass --read/--write here or
    run `txengine peers grant`.
    """
    return Output([open_peer().peers_add(name, read, write)], lambda c: [c.token], single=True)


@peers.command("grant")
@click.argument("name")
@grant_options
@output_options
def peers_grant(name: str, read: tuple[str, ...], write: tuple[str, ...]) -> Output:
    """Let peer NAME read and write more partitions (--read/--write PATTERN)."""
    return Output([open_peer().peers_grant(name, read, write)], _grant_lines, single=True)


@peers.command("revoke-grant")
@click.argument("name")
@grant_options
@output_options
def peers_revoke_grant(name: str, read: tuple[str, ...], write: tuple[str, ...]) -> Output:
    """Take grants back from peer NAME: its next request sees only what is left."""
    return Output([open_peer().peers_revoke_grant(name, read, write)], _grant_lines,
                  single=True)


@peers.command("list")
@output_options
def peers_list() -> Output:
    """List the peers that hold a token for this store, with their grants."""
    import datetime as _dt

    def lines(c: Any) -> list[str]:
        when = _dt.datetime.fromtimestamp(c.created_at, _dt.UTC).isoformat(timespec="seconds")
        return [f"{_grant_lines(c)[0]}  (added {when})"]

    return Output(open_peer().peers_list(), lines, empty="no peer holds a token")


@peers.command("remove")
@click.argument("name")
def peers_remove(name: str) -> None:
    """Revoke peer NAME's token: its next request is refused."""
    open_peer().peers_remove(name)
    click.echo(f"removed {name}")


@cli.group()
def keys() -> None:
    """Peer keys and the deployment's root key: show, init-root, install-root, enroll,
    revoke, list. See docs/security.md."""


def _key_lines(info: Any) -> list[str]:
    revoked = f"  (revoked by {info.revoked_by})" if info.revoked_by else ""
    return [f"{info.peer or 'root'}  {info.key}  {info.public}{revoked}"]


def _root_pair(path: str) -> Any:
    from .keys import read_key_file

    return read_key_file(path)


_root_key_option = click.option(
    "--root-key", "root_key_file", required=True, type=click.Path(exists=True, dir_okay=False),
    help="The root private key file (from `keys init-root`).")


@keys.command("show")
@output_options
def keys_show() -> Output:
    """Print this peer's key id and public key (made at first use): what the root enrolls."""
    return Output([open_peer().key_info()], _key_lines, single=True)


@keys.command("init-root")
@click.argument("file", type=click.Path(dir_okay=False))
@output_options
def keys_init_root(file: str) -> Output:
    """Make the deployment's root key pair in FILE (mode 0600, never overwritten).

    Keep FILE offline with whoever enrolls peers; install the printed public
    key on every peer (`init --root-key`, `keys install-root`).
    """
    from .keys import init_root

    return Output([init_root(file)], _key_lines, single=True)


@keys.command("install-root")
@click.argument("public")
def keys_install_root(public: str) -> None:
    """Install the root public key PUBLIC: from now on this peer accepts only revisions
    signed by keys the root enrolled (a root is installed once)."""
    open_peer().install_root(public)
    click.echo(f"root key installed on {open_peer().peer_id}")


@keys.command("enroll")
@click.argument("peer_id")
@click.argument("public")
@_root_key_option
@partition_option
@click.option("--sequencer", help="Also name the partition's sequencer.")
@output_options
def keys_enroll(peer_id: str, public: str, root_key_file: str, partition: str,
                sequencer: str | None) -> Output:
    """Enroll peer PEER_ID's public key PUBLIC in a config revision signed by the root."""
    info = open_peer().enroll(_root_pair(root_key_file), {peer_id: public}, partition,
                              sequencer=sequencer)
    return Output([info], RENDERERS["revision"], single=True)


@keys.command("revoke")
@click.argument("key_ids", nargs=-1, required=True)
@_root_key_option
@partition_option
@output_options
def keys_revoke(key_ids: tuple[str, ...], root_key_file: str, partition: str) -> Output:
    """Revoke KEY_IDS in a config revision signed by the root: their revisions outside
    its ancestry are refused from then on."""
    info = open_peer().revoke(_root_pair(root_key_file), list(key_ids), partition)
    return Output([info], RENDERERS["revision"], single=True)


@keys.command("list")
@output_options
def keys_list() -> Output:
    """List the keys the root enrolled, as this peer knows them."""
    return Output(open_peer().enrolled(), _key_lines, empty="no key is enrolled here")


@cli.group()
def bundle() -> None:
    """Move revisions through a file (USB stick, message queue): create, apply.

    A bundle is JSON Lines: a header, descriptors, then payloads. See
    docs/bundles.md.
    """


@bundle.command("create")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--since", "vector_file", type=click.Path(exists=True, dir_okay=False),
              help="The other side's version vector (from `bundle vector`, or a bundle it"
                   " made): write only what it lacks (default: everything).")
@click.option("--partition", help="Only this partition (default: all).")
@output_options
def bundle_create(file: str, vector_file: str | None, partition: str | None) -> Output:
    """Write the revisions the other side lacks to the bundle FILE."""
    info = open_peer().bundle_create(file, since=vector_file, partition=partition)
    def lines(i: Any) -> list[str]:
        partitions = ", ".join(i.partitions) or "no partitions"
        return [f"wrote {i.revisions} revisions ({partitions}) to {i.path}, {i.bytes} bytes"]

    return Output([info], lines, single=True)


@bundle.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--partition", help="Refuse the bundle unless it holds only this partition.")
@output_options
def bundle_apply(file: str, partition: str | None) -> Output:
    """Check the bundle FILE whole, then take and integrate its revisions.

    A truncated or tampered bundle is refused with nothing applied; applying
    a bundle again changes nothing.
    """
    peer = open_peer()
    result = _run_with_progress("applying", lambda p: peer.bundle_apply(file, partition, p))

    def lines(r: Any) -> list[str]:
        refused = [f"refused {x.revision[:12]}: {x.reason}" for x in r.report.refused]
        return [f"{r.revisions} revisions in {r.source}: received {r.report.fetched},"
                f" applied {len(r.report.applied)}, rolled back {len(r.report.rolled_back)},"
                f" conflicted {len(r.report.conflicted)}, quarantined"
                f" {len(r.report.quarantined)}", *refused]

    return Output([result], lines, single=True)


@bundle.command("vector")
@click.argument("file", type=click.Path(dir_okay=False))
@output_options
def bundle_vector(file: str) -> Output:
    """Write this peer's version vector to FILE, for the other side's --since."""
    message = open_peer().bundle_vector(file)
    return Output([message], lambda m: [f"wrote the vector of {m['peer']} to {file}"],
                  single=True)


@cli.command()
@click.argument("source")
@click.option("--partition", help="Clone only this partition (default: all).")
@click.option("--source-peer-id", help="The source store's peer id (default: the one it holds).")
@click.option("--checkpoint", "from_checkpoint", is_flag=True,
              help="Start from the source's newest checkpoint (its snapshot) and replay only"
                   " what follows.")
@output_options
def clone(source: str, partition: str | None, source_peer_id: str | None,
          from_checkpoint: bool) -> Output:
    """Bootstrap this peer on an empty store (--store) by replay of the store at SOURCE."""
    ctx = click.get_current_context()
    state = ctx.ensure_object(State)
    cfg = state.config()
    url = cfg.require_store()
    peer = _run_with_progress("cloning", lambda p: Peer.clone(
        source, url, state.peer_id or cfg.peer_id, partition=partition,
        source_peer_id=source_peer_id, progress=p, from_checkpoint=from_checkpoint,
        key_file=cfg.key_file))
    state.peer = peer
    ctx.find_root().call_on_close(state.close_peer)
    result = {"source": source, "store": url, "peer": peer.peer_id,
              "revisions": len(peer.history()), "heads": [h.id for h in peer.heads()]}
    return Output([result], lambda r: [
        f"cloned {r['revisions']} revisions from {r['source']} into {r['store']} as peer"
        f" {r['peer']}", f"heads: {', '.join(h[:12] for h in r['heads']) or 'none'}"],
        single=True)


@cli.command()
@click.option("--partition", help="One partition (default: every partition, combined).")
@output_options
def digest(partition: str | None) -> Output:
    """Print the content digest of this peer's data: equal on peers holding equal data."""
    value = open_peer().content_digest(partition)
    result = {"partition": partition, "digest": value}
    return Output([result], lambda r: [r["digest"]], single=True)


@cli.command()
@partition_option
@click.option("-m", "--message", default="checkpoint", show_default=True,
              help="The checkpoint revision's message.")
@output_options
def checkpoint(partition: str, message: str) -> Output:
    """Issue a checkpoint of a partition (its sequencer only), for clone --checkpoint.

    The checkpoint records the content digest, the version vector of its
    ancestry and the policy in force; see docs/checkpoints.md.
    """
    info = open_peer().checkpoint(partition, message)
    return Output([info], lambda i: [
        f"checkpoint {i.id} of partition {i.partition}: {i.documents} documents, digest"
        f" {i.digest}"], single=True)


@cli.command()
@click.option("--before", "checkpoint", required=True, metavar="CHECKPOINT",
              help="The checkpoint (id, prefix or target) whose history goes.")
@click.option("--archive", type=click.Path(dir_okay=False),
              help="Write the pruned revisions to this bundle file first.")
@output_options
def prune(checkpoint: str, archive: str | None) -> Output:
    """Drop the history before a checkpoint from the ledger (data and audit stay).

    The peer keeps syncing, as a peer cloned from the checkpoint does; see
    docs/checkpoints.md.
    """
    info = open_peer().prune(checkpoint, archive)
    return Output([info], lambda i: [
        f"pruned {i.removed} revisions before checkpoint {i.checkpoint[:12]} of partition"
        f" {i.partition} ({i.kept} kept as descriptors)"
        + (f"; archived to {i.archive}" if i.archive else "")], single=True)


@cli.command()
@click.argument("collection")
@click.argument("key")
@partition_option
@output_options
def get(collection: str, key: str, partition: str) -> Output:
    """Print one document of COLLECTION.

    KEY is read as JSON when it parses: 1 is the int key, '"1"' the str key.
    """
    value = _json_or_text(key)
    doc = open_peer().get(collection, value, partition)
    if doc is None:
        raise DocumentNotFound(collection, value)
    return Output([doc], RENDERERS["document"], single=True, json=document_json)


@cli.command()
@click.argument("collection")
@click.option("--where", "filter_", metavar="JSON", help='Field values to match: {"name": "Ada"}.')
@partition_option
@output_options
def find(collection: str, filter_: str | None, partition: str) -> Output:
    """List the documents of COLLECTION (optionally those matching --where)."""
    wanted = _json_or_text(filter_) if filter_ else None
    if filter_ and not isinstance(wanted, dict):
        raise InvalidInput(f"--where must be a JSON object, got {filter_!r}")
    docs = open_peer().find(collection, wanted, partition)
    return Output(docs, RENDERERS["document"], json=document_json, empty="no documents")


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@cli.command()
@click.option("--scripts", "directory", required=True, type=click.Path(file_okay=False),
              help="Directory to write the rendered data revision scripts into.")
@output_options
def export(directory: str) -> Output:
    """Render every data revision as a script file in a directory."""
    from .scripts import render_data, script_filename

    peer = open_peer()
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for info in reversed(peer.history()):
        if info.kind == "data":
            path = target / script_filename(info.id, info.message)
            path.write_text(render_data(peer.revision(info.id)), "utf-8")
            written.append({"id": info.id, "path": str(path)})
    return Output(written, lambda w: [w["path"]], empty="no data revisions")


@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False),
              help="Folder to run in (default: a new temporary folder, kept afterwards).")
@output_options
def demo(directory: str | None) -> Output:
    """Run the whole cycle in a fresh folder, explaining each step.

    One peer on SQLite first; then a device (SQLite) and a cloud peer write
    offline, collide on one document, sync and converge. The cloud is a
    MongoDB database when TXENGINE_DEMO_MONGODB_URI names a server, else SQLite.
    """
    from .demo import Event, run_demo

    def lines(event: Event) -> Iterator[str]:
        if event.kind == "section":
            yield ""
            yield click.style(f"== {event.text} ==", bold=True)
        elif event.kind == "command":
            yield click.style(f"$ {event.text}", fg="cyan")
        elif event.kind == "result":
            for line in RENDERERS[event.text](event.value):
                yield f"  {line}" if event.text != "detail" else line
        else:
            yield event.text

    def as_json(event: Event) -> Any:
        return {"kind": event.kind, "text": event.text, "value": to_json(event.value)}

    return Output(run_demo(Path(directory) if directory else None), lines, json=as_json)


# -- the CLI reference ----------------------------------------------------------------------


def render_docs() -> str:
    """Return docs/cli.md: the ``--help`` of the group and of every command."""
    out = [
        "# Command-line reference",
        "",
        "<!-- Generated by `python -m txengine.cli --doc docs/cli.md`; do not edit."
        " tests/test_docs.py fails when this page is stale. -->",
        "",
    ]
    root = click.Context(cli, info_name="txengine", terminal_width=88, max_content_width=88)
    sections = [("txengine", root.get_help())]
    for name in sorted(cli.commands):
        command = cli.commands[name]
        sub = click.Context(command, info_name=name, parent=root, terminal_width=88,
                            max_content_width=88)
        sections.append((f"txengine {name}", sub.get_help()))
        if isinstance(command, click.Group):
            for sub_name in sorted(command.commands):
                leaf = click.Context(command.commands[sub_name], info_name=sub_name,
                                     parent=sub, terminal_width=88, max_content_width=88)
                sections.append((f"txengine {name} {sub_name}", leaf.get_help()))
    for title, text in sections:
        out += [f"## {title}", "", "```text", text, "```", ""]
    return "\n".join(out)


def _doc_main(argv: list[str]) -> int:
    """``python -m txengine.cli --doc [PATH]``: print or write the CLI reference."""
    text = render_docs()
    if len(argv) > 1:
        Path(argv[1]).write_text(text, "utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--doc"]:
        sys.exit(_doc_main(sys.argv[1:]))
    main()
