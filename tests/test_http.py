"""Sync over HTTP, end to end: a real ``txengine serve`` process on 127.0.0.1.

The server's store is PostgreSQL when ``TXENGINE_TEST_POSTGRES_URL`` is set
(CI), else SQLite; the client peers are SQLite files, as on devices.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tests.conftest import POSTGRES_ENV, postgres_schema_url, strict
from txengine.cli import cli
from txengine.engine import Progress
from txengine.exceptions import ServerUnreachable, Unauthorized
from txengine.peer import Peer
from txengine.transport import client

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A ``txengine serve`` subprocess on a free port of 127.0.0.1."""

    def __init__(self, store: str, log: Path, args: tuple[str, ...] = ()) -> None:
        self.store = store
        self.args = args
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "txengine.cli", "--store", self.store, "--peer-id", "hub",
                 "serve", "--port", str(self.port), "--log-level", "warning", *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server did not start: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as a crash or an OOM kill."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _server_store(stack: ExitStack, directory: Path) -> str:
    base = os.environ.get(POSTGRES_ENV)
    if base:
        return stack.enter_context(postgres_schema_url(base))
    return f"sqlite:///{directory / 'hub.db'}"


def _start(stack: ExitStack, directory: Path, names: tuple[str, ...] = ("alice", "bob"),
           grants: dict[str, tuple[list[str], list[str]]] | None = None,
           args: tuple[str, ...] = ()) -> tuple[Server, dict[str, str]]:
    """Serve a fresh store whose peers ``names`` may read and write everything, or
    hold ``grants`` (name: (read, write) patterns) instead."""
    directory.mkdir(parents=True, exist_ok=True)
    store = _server_store(stack, directory)
    grants = grants or {name: (["*"], ["*"]) for name in names}
    with Peer.open(store, "hub") as hub:
        tokens = {name: hub.peers_add(name, read, write).token
                  for name, (read, write) in grants.items()}
    server = Server(store, directory / "server.log", args)
    stack.callback(server.stop)
    server.start()
    return server, tokens


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    """One server for the module's tests (starting one costs about a second)."""
    with ExitStack() as stack:
        yield _start(stack, tmp_path_factory.mktemp("hub"))


def _device(tmp_path: Path, name: str) -> Peer:
    return Peer.open(f"sqlite:///{tmp_path / f'{name}.db'}", name)


def _write(peer: Peer, key: Any, counter: str = "total") -> str:
    """Insert one item and count it: a revision applied twice would count twice."""
    with peer.transaction(f"write {key}") as tx:
        tx.insert("items", {"_id": key, "by": peer.peer_id})
        if peer.get("counters", counter) is None:
            tx.insert("counters", {"_id": counter, "n": 1})
        else:
            tx.update("counters", counter, inc={"n": 1})
    assert tx.revision is not None
    return tx.revision.id


def _counter(peer: Peer, key: str) -> int:
    doc = peer.get("counters", key)
    return 0 if doc is None else int(doc["n"])


def _status(server: Server, token: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/status", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


# -- convergence ----------------------------------------------------------------------------


def test_two_offline_peers_converge_through_the_server(hub: Any, tmp_path: Path) -> None:
    """alice and bob write offline, then sync through the server: equal data, equal heads."""
    server, tokens = hub
    with _device(tmp_path, "alice") as alice, _device(tmp_path, "bob") as bob:
        for i in range(5):
            _write(alice, f"a{i}", "alice")
            _write(bob, f"b{i}", "bob")
        with alice.transaction("shared") as tx:
            tx.insert("items", {"_id": "shared", "by": "alice"})
        with bob.transaction("shared") as tx:
            tx.insert("items", {"_id": "shared", "by": "bob"})

        first = alice.sync(server.url, token=tokens["alice"])
        assert (first.local.sent, first.remote.fetched) == (6, 6)
        bob.sync(server.url, token=tokens["bob"])
        again = alice.sync(server.url, token=tokens["alice"])

        assert again.local.fetched == 6
        assert strict(alice.snapshot()) == strict(bob.snapshot())
        assert [h.id for h in alice.heads()] == [h.id for h in bob.heads()]
        assert (_counter(alice, "alice"), _counter(bob, "bob")) == (5, 5)
        assert alice.status().unsent == 0
        with Peer.open(server.store) as on_server:
            assert strict(on_server.snapshot()) == strict(alice.snapshot())
        assert _status(server, tokens["alice"])["revisions"] >= 12


def test_sync_with_nothing_new_is_one_round_trip(hub: Any, tmp_path: Path) -> None:
    server, tokens = hub
    with _device(tmp_path, "carol") as carol:
        carol.sync(server.url, token=tokens["alice"])
        result = carol.sync(server.url, token=tokens["alice"])
    assert (result.round_trips, result.local.fetched, result.local.sent) == (1, 0, 0)


def test_progress_counts_the_payloads_fetched(hub: Any, tmp_path: Path) -> None:
    """progress= reports Progress("fetch", done, total) from the descriptors, total last."""
    server, tokens = hub
    with _device(tmp_path, "dave") as dave:
        for i in range(7):
            _write(dave, f"d{i}", "dave")
        dave.sync(server.url, token=tokens["bob"])
    seen: list[Progress] = []
    with _device(tmp_path, "erin") as erin:
        erin.sync(server.url, token=tokens["bob"], progress=seen.append, batch_size=3)
        held = len(erin.history())
    assert seen[0] == Progress("fetch", 0, held)
    assert seen[-1] == Progress("fetch", held, held)
    assert len(seen) >= 3  # batches of 3: intermediate reports


# -- credentials ------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer txe_wrong"},
                                     {"Authorization": "Basic YWxpY2U6eA=="}])
def test_request_without_a_valid_token_is_refused(hub: Any, headers: dict[str, str]) -> None:
    server, tokens = hub
    before = _status(server, tokens["alice"])
    vector = {"type": "vector", "origin": "mallory:0", "vectors": {}, "first": True}
    for method, path, body in (("POST", "/v1/sync", {"messages": [vector]}),
                               ("GET", "/v1/status", None)):
        response = httpx.request(method, f"{server.url}{path}", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert _status(server, tokens["alice"]) == before


def test_wrong_token_changes_nothing_on_the_server(hub: Any, tmp_path: Path) -> None:
    server, tokens = hub
    before = _status(server, tokens["alice"])
    with _device(tmp_path, "mallory") as mallory:
        _write(mallory, "m1", "mallory")
        with pytest.raises(Unauthorized, match=r"\(401 unauthorized\): the token is not valid"):
            mallory.sync(server.url, token="txe_" + "x" * 43)
        assert mallory.status().unsent == 1
    assert _status(server, tokens["alice"]) == before


def test_a_removed_token_is_refused_at_once(tmp_path: Path) -> None:
    with ExitStack() as stack:
        server, tokens = _start(stack, tmp_path, ("temp",))
        auth = {"Authorization": f"Bearer {tokens['temp']}"}
        assert httpx.get(f"{server.url}/v1/status", headers=auth).status_code == 200
        with Peer.open(server.store) as on_server:
            on_server.peers_remove("temp")
            assert [e.action for e in on_server.audit()][-2:] == ["peers_add", "peers_remove"]
        assert httpx.get(f"{server.url}/v1/status", headers=auth).status_code == 401


def test_peers_commands_add_list_remove(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'server.db'}"
    runner = CliRunner()
    added = runner.invoke(cli, ["--store", store, "peers", "add", "phone", "--json"])
    assert added.exit_code == 0, added.output
    token = json.loads(added.output)["token"]
    assert token.startswith("txe_") and len(token) == 47
    listed = runner.invoke(cli, ["--store", store, "peers", "list", "--json"])
    assert [p["name"] for p in json.loads(listed.output)] == ["phone"]
    assert token not in listed.output
    with Peer.open(store) as peer:
        assert peer.credentials().authenticate(token) == "phone"
    again = runner.invoke(cli, ["--store", store, "peers", "add", "phone"])
    assert again.exit_code == 1
    assert "peer 'phone' already has a token" in again.output
    assert runner.invoke(cli, ["--store", store, "peers", "remove", "phone"]).exit_code == 0
    gone = runner.invoke(cli, ["--store", store, "peers", "remove", "phone"])
    assert gone.exit_code == 1 and "no peer 'phone' holds a token here" in gone.output


# -- bad input ------------------------------------------------------------------------------

_DESCRIPTOR = {"id": "x" * 64, "partition": "default", "parents": [], "depends_on": [],
               "origin": "m:0", "seq": 1, "hlc": [1, 0], "message": "", "kind": "data",
               "checksum": "0" * 64, "collections": [], "branch_labels": [], "digest": "x" * 64}


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "malformed_json"),
    (b"[1, 2]", 422, "invalid_message"),
    (b'"text"', 422, "invalid_message"),
    (b"{}", 422, "invalid_message"),
    (b'{"messages": {}}', 422, "invalid_message"),
    (b'{"messages": [{"type": "nope"}]}', 422, "invalid_message"),
    (b'{"messages": [{"type": "want", "ids": "abc"}]}', 422, "invalid_message"),
    (b'{"messages": [{"type": "want", "ids": [1]}]}', 422, "invalid_message"),
    (b'{"messages": [{"type": "vector", "origin": "o", "vectors": {"p": {"o": "1"}}}]}',
     422, "invalid_message"),
    (b'{"messages": [{"type": "payloads", "items": [["a", "b", "c"]]}]}', 422,
     "invalid_message"),
    (json.dumps({"messages": [{"type": "descriptors", "items": [
        {**_DESCRIPTOR, "seq": True}]}]}).encode(), 422, "invalid_message"),
    (json.dumps({"messages": [{"type": "descriptors", "items": [
        {**_DESCRIPTOR, "extra": 1}]}]}).encode(), 422, "invalid_message"),
])
def test_bad_input_gets_a_json_error_never_a_500(hub: Any, body: bytes, status: int,
                                                 code: str) -> None:
    server, tokens = hub
    response = httpx.post(f"{server.url}/v1/sync", content=body, headers={
        "Authorization": f"Bearer {tokens['alice']}", "Content-Type": "application/json"})
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    assert response.json()["error"]["message"]


def test_forged_descriptor_is_refused_and_reported_not_an_error(hub: Any) -> None:
    """A well-shaped descriptor with a wrong digest is a refusal in the report (audited)."""
    server, tokens = hub
    before = _status(server, tokens["alice"])
    response = httpx.post(f"{server.url}/v1/sync", json={"messages": [
        {"type": "descriptors", "items": [_DESCRIPTOR]}]},
        headers={"Authorization": f"Bearer {tokens['alice']}"})
    assert response.status_code == 200
    (refusal,) = response.json()["report"]["refused"]
    assert refusal["revision"] == "x" * 64 and "digest" in refusal["reason"]
    assert _status(server, tokens["alice"])["announced"] == before["announced"]


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/v1/nothing", 404, "not_found"),
    ("GET", "/v1/sync", 405, "method_not_allowed"),
])
def test_unknown_routes_get_json_errors(hub: Any, method: str, path: str, status: int,
                                        code: str) -> None:
    server, _ = hub
    response = httpx.request(method, f"{server.url}{path}")
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)


def test_server_serves_its_openapi_spec(hub: Any) -> None:
    server, _ = hub
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/sync", "/v1/status", "/v1/health"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"SyncRequest", "SyncResponse", "Descriptor", "ErrorResponse"} <= set(schemas)
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# -- a server killed in the middle of a sync -------------------------------------------------


class _KillAfterFirstPayloads(httpx.HTTPTransport):
    """Kills the server (SIGKILL) once a request carrying payloads got its answer, and
    restarts it a second later, while the client keeps retrying."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server
        self.restarted: threading.Thread | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if self.restarted is None and b'"type":"payloads"' in request.content:
            response.read()
            self.server.kill()
            self.restarted = threading.Thread(target=lambda: (time.sleep(1.0),
                                                              self.server.start()))
            self.restarted.start()
        return response


def test_sigkill_mid_sync_then_restart_loses_nothing_and_applies_nothing_twice(
        tmp_path: Path) -> None:
    """The server dies after the first payload batch; the client retries, the restarted
    server resumes from its store: every revision there once, the counter exact."""
    with ExitStack() as stack:
        server, tokens = _start(stack, tmp_path / "hub", ("alice", "bob"))
        alice = stack.enter_context(_device(tmp_path, "alice"))
        written = [_write(alice, i) for i in range(300)]
        transport = _KillAfterFirstPayloads(server)
        remote = client.HttpRemote(server.url, tokens["alice"], transport=transport,
                                   retries=8, backoff=0.2, max_backoff=1.0)
        result = client.sync(alice, server.url, tokens["alice"], batch_size=50, remote=remote)
        assert transport.restarted is not None
        transport.restarted.join()

        assert result.remote.fetched == 300  # a retried batch is not taken twice
        assert alice.status().unsent == 0
        bob = stack.enter_context(_device(tmp_path, "bob"))
        bob.sync(server.url, token=tokens["bob"])
        assert _counter(bob, "total") == 300
        assert strict(bob.snapshot()) == strict(alice.snapshot())
        with Peer.open(server.store) as on_server:
            assert sorted(r.id for r in on_server.history()) == sorted(written)
            assert _counter(on_server, "total") == 300
            assert on_server.verify(replay=True).ok
            fetches = [e.revision for e in on_server.audit() if e.action == "fetch"]
            assert len(fetches) == len(set(fetches))  # none taken twice


def test_sync_gives_up_when_the_server_is_gone_and_the_next_one_resumes(
        tmp_path: Path) -> None:
    with ExitStack() as stack:
        server, tokens = _start(stack, tmp_path / "hub", ("alice",))
        alice = stack.enter_context(_device(tmp_path, "alice"))
        for i in range(20):
            _write(alice, i)
        server.kill()
        remote = client.HttpRemote(server.url, tokens["alice"], retries=2, backoff=0.05)
        with pytest.raises(ServerUnreachable, match=r"did not answer after 3 attempts"):
            client.sync(alice, server.url, tokens["alice"], remote=remote)
        assert alice.status().unsent == 20
        server.start()
        result = alice.sync(server.url, token=tokens["alice"])
        assert (result.remote.fetched, alice.status().unsent) == (20, 0)


# -- background sync --------------------------------------------------------------------------


def test_watch_backs_off_while_unreachable_then_syncs_after_each_local_write(
        tmp_path: Path) -> None:
    """watch retries with growing waits until the server is up, then syncs a write made by
    another handle on the store (the app) long before its interval comes round."""
    with ExitStack() as stack:
        server, tokens = _start(stack, tmp_path / "hub", ("alice",))
        server.kill()
        alice = stack.enter_context(_device(tmp_path, "alice"))
        _write(alice, "first")
        events = client.watch(alice, server.url, tokens["alice"], interval=60.0, poll=0.05,
                              backoff=0.2, max_backoff=0.4, max_rounds=2)
        waits = []
        for event in events:
            if event.kind == "unreachable":
                waits.append(event.retry_in)
                if len(waits) == 3:
                    server.start()
                continue
            break
        assert waits == [0.2, 0.4, 0.4]
        started = time.monotonic()
        with Peer.open(f"sqlite:///{tmp_path / 'alice.db'}") as app:
            _write(app, "second")  # the app writes while watch holds no lease
        event = next(events)
        assert event.kind == "synced" and event.result.local.sent == 1
        assert time.monotonic() - started < 10
        assert next(events, None) is None  # max_rounds reached
        assert _status(server, tokens["alice"])["revisions"] == 2


def test_sync_watch_command_stops_after_max_rounds(tmp_path: Path) -> None:
    with ExitStack() as stack:
        server, tokens = _start(stack, tmp_path / "hub", ("alice",))
        store = f"sqlite:///{tmp_path / 'alice.db'}"
        with Peer.open(store, "alice") as alice:
            _write(alice, 1)
        result = CliRunner().invoke(cli, [
            "--store", store, "sync", server.url, "--watch", "--interval", "0.2",
            "--max-rounds", "2", "--nl"], env={"TXENGINE_TOKEN": tokens["alice"]})
        assert result.exit_code == 0, result.output
        rounds = [json.loads(line) for line in result.output.splitlines()]
        assert [r["kind"] for r in rounds] == ["synced", "synced"]
        assert rounds[0]["result"]["local"]["sent"] == 1


def test_protocol_page_holds_the_current_schemas() -> None:
    from txengine.transport import schemas

    page = (ROOT / "docs" / "protocol.md").read_text("utf-8")
    assert schemas.render_section() in page, (
        "docs/protocol.md is stale: run `python -m txengine.transport.schemas docs/protocol.md`")
    for name in schemas.schemas():
        assert f"\n### {name}\n" in page
