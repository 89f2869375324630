"""Hostile and unauthorized input to ``txengine serve``: each refused with its code, the
server's store unchanged; per-partition grants; a refused write rolled back at its origin.

One server for the module (PostgreSQL when ``TXENGINE_TEST_POSTGRES_URL`` is set),
holding these peers and grants::

    admin   read *        write *
    reader  read user:*   (writes nothing)
    writer  read user:1   write user:1
    nobody  (no grants: reads and writes nothing)
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import mongomock
import pytest
from click.testing import CliRunner

from tests.test_http import Server, _device, _start
from txengine.cli import cli
from txengine.credentials import Credentials, matches
from txengine.exceptions import CredentialNotFound, InvalidInput
from txengine.peer import Peer
from txengine.revision import MAX_DESCRIPTOR_BYTES, MAX_PAYLOAD_BYTES
from txengine.transport.server import MAX_BODY_BYTES, RateLimit

GRANTS = {"admin": (["*"], ["*"]), "reader": (["user:*"], []),
          "writer": (["user:1"], ["user:1"]), "nobody": ([], [])}


def _serve(stack: ExitStack, directory: Path, args: tuple[str, ...] = ()
           ) -> tuple[Server, dict[str, str]]:
    return _start(stack, directory, grants=GRANTS, args=args)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    with ExitStack() as stack:
        yield _serve(stack, tmp_path_factory.mktemp("secure"))


def _post(server: Server, token: str | None, body: Any, **headers: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/sync", content=content, timeout=30, headers={
        **auth, "Content-Type": "application/json", **headers})


def _held(server: Server) -> tuple[int, dict[str, int], Any]:
    """The server store's revisions by state, and its data: what must not change."""
    with Peer.open(server.store) as on_server:
        counts = on_server._ledger.count_states()
        on_server._store.rollback()
        return len(on_server.history()), counts, on_server.snapshot()


def _error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def _vector(name: str) -> dict[str, Any]:
    return {"type": "vector", "peer": name, "origin": f"{name}:0", "vectors": {}, "first": True}


@pytest.fixture(scope="module")
def shared(hub: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """admin writes one revision in each of user:1, user:2 and team; return their ids."""
    server, tokens = hub
    ids = {}
    with _device(tmp_path_factory.mktemp("admin"), "admin") as admin:
        for partition in ("user:1", "user:2", "team"):
            with admin.transaction(f"in {partition}", partition) as tx:
                tx.insert("items", {"_id": partition, "secret": partition == "team"})
            assert tx.revision is not None
            ids[partition] = tx.revision.id
        admin.sync(server.url, token=tokens["admin"])
    return ids


# -- grants ---------------------------------------------------------------------------------


def test_pull_without_read_permission_gets_nothing_of_the_partition(
        hub: Any, shared: dict[str, str], tmp_path: Path) -> None:
    """reader (read user:*) syncs: it gets both user partitions, nothing of team."""
    server, tokens = hub
    with _device(tmp_path, "reader") as reader:
        result = reader.sync(server.url, token=tokens["reader"])
        assert reader.get("items", "user:2", partition="user:2") is not None
        assert reader.get("items", "team", partition="team") is None
        assert shared["team"] not in {r.id for r in reader.history()}
    assert result.local.fetched == 2


def test_vector_and_descriptors_show_only_readable_partitions(
        hub: Any, shared: dict[str, str]) -> None:
    server, tokens = hub
    replies = _post(server, tokens["reader"], {"messages": [_vector("reader")]}).json()
    vector, descriptors = replies["messages"]
    assert set(vector["vectors"]) == {"user:1", "user:2"}
    assert {d["partition"] for d in descriptors["items"]} == {"user:1", "user:2"}


def test_want_of_an_unreadable_revision_gets_nothing(hub: Any, shared: dict[str, str]) -> None:
    server, tokens = hub
    want = {"messages": [{"type": "want", "ids": [shared["team"], shared["user:1"]]}]}
    (payloads,) = _post(server, tokens["reader"], want).json()["messages"]
    assert [rev_id for rev_id, _ in payloads["items"]] == [shared["user:1"]]
    assert _post(server, tokens["nobody"], want).json()["messages"] == []


def test_peer_without_grants_reads_and_writes_nothing(
        hub: Any, shared: dict[str, str], tmp_path: Path) -> None:
    """A token alone opens nothing: the default until `txengine peers grant`."""
    server, tokens = hub
    before = _held(server)
    with _device(tmp_path, "nobody") as nobody:
        with nobody.transaction("mine") as tx:
            tx.insert("items", {"_id": 1})
        result = nobody.sync(server.url, token=tokens["nobody"])
        assert result.local.fetched == 0 and nobody.get("items", "user:1", "user:1") is None
        assert [r.code for r in result.remote.refused] == ["forbidden_partition"]
    assert _held(server) == before


def test_write_without_permission_is_refused_with_its_code_and_store_unchanged(
        hub: Any, tmp_path: Path) -> None:
    """writer may write user:1 only: its revision for team is refused, and reported."""
    server, tokens = hub
    with _device(tmp_path, "forger") as forger:
        with forger.transaction("in team", "team") as tx:
            tx.insert("items", {"_id": "x"})
        assert tx.revision is not None
        descriptor = tx.revision.descriptor
    before = _held(server)
    response = _post(server, tokens["writer"], {"messages": [
        {"type": "descriptors", "items": [descriptor]}]})
    assert response.status_code == 200 and response.json()["messages"] == []
    (refusal,) = response.json()["report"]["refused"]
    assert refusal == {
        "revision": descriptor["id"], "origin": "forger:0", "code": "forbidden_partition",
        "reason": "writer may not write partition 'team': the server's admin grants it with"
                  " `txengine peers grant writer --write team`"}
    assert _held(server) == before


def test_origin_rolls_back_a_refused_revision_with_what_depends_on_it(
        hub: Any, tmp_path: Path) -> None:
    """writer writes in user:1 (granted) and twice in team, the second on the first::

        user:1   u1
        team     t1 <- t2

    The server takes u1 and refuses t1 and t2; writer rolls both back, counts them as
    refused, never sends them again, and agrees with the server on what it holds.
    """
    server, tokens = hub
    with _device(tmp_path, "writer") as writer:
        with writer.transaction("u1", "user:1") as tx:
            tx.insert("items", {"_id": "w1"})
        with writer.transaction("t1", "team") as tx:
            tx.insert("items", {"_id": "w1", "n": 1})
        with writer.transaction("t2", "team") as tx:
            tx.update("items", "w1", inc={"n": 1})
        t2 = tx.revision
        assert t2 is not None and len(t2.parents) == 1
        result = writer.sync(server.url, token=tokens["writer"])

        assert sorted(r.code for r in result.remote.refused) == ["forbidden_partition"] * 2
        assert len(result.local.rolled_back) == 2 and t2.id in result.local.rolled_back
        assert writer.get("items", "w1", partition="team") is None
        assert writer.get("items", "w1", partition="user:1") is not None
        status = writer.status()
        assert (status.refused, status.unsent) == (2, 0)
        assert [e.action for e in writer.audit(t2.id)][-1] == "refused"

        again = writer.sync(server.url, token=tokens["writer"])
        assert (again.remote.refused, again.local.sent) == ([], 0)
        with writer.transaction("t3", "user:1") as tx:  # new writes take no refused parent
            tx.insert("items", {"_id": "w2"})
        writer.sync(server.url, token=tokens["writer"])
        assert writer.status().unsent == 0
        assert writer.verify(replay=True).ok
        mine = {(p, c, k) for p, c, k in writer.snapshot() if k.startswith('"w')}
    with Peer.open(server.store) as on_server:
        theirs = {(p, c, k) for p, c, k in on_server.snapshot() if k.startswith('"w')}
    assert mine == theirs == {("user:1", "items", '"w1"'), ("user:1", "items", '"w2"')}

    shown = CliRunner().invoke(cli, ["--store", f"sqlite:///{tmp_path / 'writer.db'}",
                                     "status", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["refused"] == 2


def test_grant_revoke_and_list_through_the_cli(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'hub.db'}"
    runner = CliRunner()

    def run(*args: str) -> Any:
        result = runner.invoke(cli, ["--store", store, "peers", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.output) if "--json" in args else result.output

    run("add", "phone", "--read", "user:42")
    granted = run("grant", "phone", "--read", "team", "--write", "user:*", "--json")
    assert (granted["read"], granted["write"]) == (["team", "user:42"], ["user:*"])
    assert run("revoke-grant", "phone", "--read", "team") == (
        "phone  read: user:42  write: user:*\n")
    assert "phone  read: user:42  write: user:*  (added " in run("list")
    missing = runner.invoke(cli, ["--store", store, "peers", "revoke-grant", "phone",
                                  "--write", "team"])
    assert missing.exit_code == 1
    assert "peer 'phone' holds no write grant 'team'" in missing.output
    bad = runner.invoke(cli, ["--store", store, "peers", "grant", "phone", "--read", "a*b"])
    assert bad.exit_code == 1 and "partition pattern 'a*b' is not valid" in bad.output


@pytest.mark.parametrize("backend", ["sql", "mongo"])
def test_grants_are_stored_with_the_credential(tmp_path: Path, backend: str) -> None:
    if backend == "sql":
        import sqlalchemy as sa

        engine = sa.create_engine(f"sqlite:///{tmp_path / 'c.db'}")
        credentials = Credentials(engine.connect())
    else:
        credentials = Credentials(None, mongomock.MongoClient()["app"])
    credentials.add("phone")
    assert credentials.get("phone").read == ()
    credentials.grant("phone", read=["user:*", "user:*"], write=["user:1"])
    credentials.grant("phone", read=["team"])
    phone = credentials.get("phone")
    assert (phone.read, phone.write) == (("team", "user:*"), ("user:1",))
    assert phone.may_read("user:7") and not phone.may_write("user:7")
    credentials.revoke_grant("phone", read=["user:*"])
    assert credentials.list()[0].read == ("team",)
    credentials.remove("phone")
    with pytest.raises(CredentialNotFound):
        credentials.grant("phone", read=["*"])
    with pytest.raises(InvalidInput, match="name at least one partition pattern"):
        credentials.grant("phone")


@pytest.mark.parametrize(("pattern", "partition", "expected"), [
    ("*", "anything", True), ("user:*", "user:42", True), ("user:*", "user:", True),
    ("user:*", "users", False), ("user:42", "user:42", True), ("user:4", "user:42", False),
    ("user:[1]", "user:1", False), ("user:?", "user:1", False),
])
def test_patterns_are_names_or_prefixes(pattern: str, partition: str, expected: bool) -> None:
    assert matches(pattern, partition) is expected


# -- limits -----------------------------------------------------------------------------------


def _descriptor(tmp_path: Path, message: str = "m", size: int = 10) -> tuple[dict[str, Any], str]:
    """A genuine descriptor and payload from a scratch device (built without limits)."""
    with _device(tmp_path, "maker") as maker:
        with maker.transaction(message, "user:1") as tx:
            tx.insert("items", {"_id": "big", "v": "x" * size})
        assert tx.revision is not None
        return tx.revision.descriptor, tx.revision.payload.decode()


def test_oversize_descriptor_is_refused(hub: Any, tmp_path: Path) -> None:
    server, tokens = hub
    descriptor, _ = _descriptor(tmp_path)
    before = _held(server)
    response = _post(server, tokens["admin"], {"messages": [{"type": "descriptors", "items": [
        {**descriptor, "message": "m" * MAX_DESCRIPTOR_BYTES}]}]})
    assert _error(response) == (413, "descriptor_too_large")
    assert "above 4096: shorten its message" in response.json()["error"]["message"]
    assert _held(server) == before


def test_oversize_payload_is_refused(hub: Any, tmp_path: Path) -> None:
    server, tokens = hub
    descriptor, _ = _descriptor(tmp_path)
    before = _held(server)
    response = _post(server, tokens["admin"], {"messages": [{"type": "payloads", "items": [
        [descriptor["id"], "x" * (MAX_PAYLOAD_BYTES + 1)]]}]})
    assert _error(response) == (413, "payload_too_large")
    assert _held(server) == before


@pytest.mark.parametrize("messages", [
    [{"type": "want", "ids": ["a"] * 3000}, {"type": "want", "ids": ["b"] * 3000}],
    [{"type": "want", "ids": ["a"] * 5001}],
    [{"type": "ack", "origin": "o", "vectors": {}}] * 1001,
])
def test_too_many_items_in_one_request_are_refused(hub: Any, messages: list[Any]) -> None:
    server, tokens = hub
    before = _held(server)
    assert _error(_post(server, tokens["admin"], {"messages": messages})) == (
        413, "too_many_items")
    assert _held(server) == before


def test_streamed_body_without_length_is_cut_off_at_the_limit(hub: Any) -> None:
    """No Content-Length (chunked): the server counts as bytes arrive and answers 413."""
    server, tokens = hub
    chunk = b" " * (1 << 20)

    def body() -> Iterator[bytes]:
        yield b'{"messages": ['
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            yield chunk

    before = _held(server)
    response = httpx.post(f"{server.url}/v1/sync", content=body(), timeout=60, headers={
        "Authorization": f"Bearer {tokens['admin']}", "Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert _error(response) == (413, "too_large")
    assert _held(server) == before


def test_declared_oversize_length_is_refused_before_the_body(hub: Any) -> None:
    server, _ = hub
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(MAX_BODY_BYTES + 1).encode() + b"\r\n\r\n{")
        answer = b""
        while b'"}}' not in answer and (chunk := s.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b'"code":"too_large"' in answer


@pytest.mark.parametrize(("body", "status", "code"), [
    (b'{"messages": [{"type": "want",', 400, "malformed_json"),
    # a lone surrogate in a payload text: JSON to FastAPI, not UTF-8 (found by schemathesis)
    (b'{"messages": [{"type": "payloads", "items": [["a", "\\ud94b"]]}]}', 400,
     "malformed_json"),
    # NUL outside a payload text: PostgreSQL text cannot hold it (found by schemathesis)
    (b'{"messages": [{"type": "payloads", "items": [["a\\u0000", "[]"]]}]}', 422,
     "invalid_message"),
    (b'{"messages": [{"type": "ack", "origin": "o", "vectors": {"p\\u0000": {"o": 1}}}]}',
     422, "invalid_message"),
])
def test_malformed_json_is_refused_and_changes_nothing(hub: Any, body: bytes, status: int,
                                                       code: str) -> None:
    server, tokens = hub
    before = _held(server)
    assert _error(_post(server, tokens["admin"], body)) == (status, code)
    assert _held(server) == before


def test_missing_or_wrong_token_writes_nothing(hub: Any, tmp_path: Path) -> None:
    """The token checks of test_http, here with a well-formed revision in the body."""
    server, _ = hub
    descriptor, _ = _descriptor(tmp_path)
    before = _held(server)
    body = {"messages": [{"type": "descriptors", "items": [descriptor]}]}
    assert _error(_post(server, None, body)) == (401, "unauthorized")
    assert _error(_post(server, "txe_" + "x" * 43, body)) == (401, "unauthorized")
    assert _held(server) == before


def test_requests_above_the_rate_get_429_with_retry_after(tmp_path: Path) -> None:
    with ExitStack() as stack:
        server, tokens = _serve(stack, tmp_path, ("--rate", "0.5", "--burst", "3"))
        auth = {"Authorization": f"Bearer {tokens['admin']}"}
        answers = [httpx.get(f"{server.url}/v1/status", headers=auth) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[-1].json()["error"]["code"] == "rate_limited"
        assert answers[-1].headers["Retry-After"] == "2"
        other = {"Authorization": f"Bearer {tokens['reader']}"}  # each peer has its own bucket
        assert httpx.get(f"{server.url}/v1/status", headers=other).status_code == 200


def test_token_bucket_refills_at_the_rate() -> None:
    now = [0.0]
    limit = RateLimit(rate=2.0, burst=2, clock=lambda: now[0])
    assert [limit.wait("a"), limit.wait("a"), limit.wait("a")] == [0.0, 0.0, 0.5]
    now[0] = 0.5
    assert (limit.wait("a"), limit.wait("b")) == (0.0, 0.0)


# -- schemathesis ---------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error(hub: Any, tmp_path: Path) -> None:
    """Generated requests from the served OpenAPI spec, with a valid token: never a 5xx."""
    server, tokens = hub
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
         "--header", f"Authorization: Bearer {tokens['admin']}",
         "--checks", "not_a_server_error", "--max-examples", "40", "--max-time", "25",
         "--phases", "examples,coverage,fuzzing", "--workers", "1", "--no-color", "--seed", "1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "Tested: 3" in run.stdout  # sync, status and health were all exercised


@pytest.mark.parametrize("backend", ["sqlite", "mongo"])
def test_only_own_forbidden_revisions_roll_back_with_their_dependents(
        tmp_path: Path, backend: str) -> None:
    """Side.take_refusals, on each store kind::

        default  a1 ............ a2      (kept: disjoint, later)
        team          t1 <- t2           (t1 refused: t1 and t2 roll back)
    """
    from txengine.intake import Refusal
    from txengine.sync import Side

    url = (f"sqlite:///{tmp_path / 'dev.db'}" if backend == "sqlite"
           else f"mongomock://test-mongo/t_{tmp_path.name[-20:]}")
    with Peer.open(url, "dev") as dev:
        ids = []
        for message, partition, op in [
                ("a1", "default", lambda tx: tx.insert("items", {"_id": "a", "n": 1})),
                ("t1", "team", lambda tx: tx.insert("items", {"_id": "t", "n": 1})),
                ("t2", "team", lambda tx: tx.update("items", "t", inc={"n": 1})),
                ("a2", "default", lambda tx: tx.update("items", "a", inc={"n": 1}))]:
            with dev.transaction(message, partition) as tx:
                op(tx)
            assert tx.revision is not None
            ids.append(tx.revision.id)
        a1, t1, t2, a2 = ids
        side = Side(dev)
        ignored = [Refusal(a1, "no", "dev:0", "refused"), Refusal(a2, "no", "other:0",
                                                                  "forbidden_partition")]
        assert side.take_refusals(ignored) == []
        assert side.take_refusals([Refusal(t1, "no", "dev:0", "forbidden_partition")]) == [
            t1, t2]
        assert side.report.rolled_back == [t1, t2]
        assert dev.get("items", "t", partition="team") is None
        assert dev.get("items", "a") == {"_id": "a", "n": 2}
        assert [r.id for r in dev.history()] == [a2, a1]
        assert (dev.status().refused, [e.action for e in dev.audit(t2)][-1]) == (2, "refused")
