"""HTTP client: a peer's exchange with a ``txengine serve`` server, driven from the client.

The server keeps no state between requests, so the client runs the legs of
:func:`txengine.sync.exchange` itself: its vector; the descriptors each side
lacks and its ``want`` list; the payloads, in batches, one request each. Each
response is handled as it arrives, so every payload batch is committed
locally before the next is asked for.

Every handler on both sides is idempotent and works from the peer's own
state, so a failed request is simply sent again (with back-off, on a
connection error or a 5xx), and a sync that gave up is resumed by the next
one, which starts again from the vectors: what was fetched is kept and not
asked for again, and a revision the server already holds is never sent or
applied twice.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from ..engine import ProgressCallback
from ..exceptions import RemoteError, ServerUnreachable, TxEngineError, Unauthorized
from ..intake import Refusal
from ..sync import Message, Side, SyncReport, SyncResult
from .schemas import MAX_ITEMS

if TYPE_CHECKING:
    from ..peer import Peer

MAX_REQUEST_BYTES = 8 * 1024 * 1024
"""A payloads message is split so that one request stays under this (the server takes 64 MiB)."""


class HttpRemote:
    """The server's end of an exchange: sends messages over HTTP and returns the replies.

    ``retries`` failed attempts of one request (connection errors, timeouts,
    5xx, 429) are retried after ``backoff`` seconds, doubling up to ``max_backoff``
    (with jitter, so many clients of a restarted server do not return at once),
    or after the server's ``Retry-After``.
    """

    def __init__(self, url: str, token: str | None, *, timeout: float = 60.0,
                 retries: int = 6, backoff: float = 0.25, max_backoff: float = 8.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  transport=transport)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HttpRemote:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def post(self, messages: Sequence[Message]) -> tuple[dict[str, Any], int, int]:
        """Send one request of messages; return (response body, bytes sent, bytes received)."""
        body = orjson.dumps({"messages": list(messages)})
        response = self._request("POST", "/v1/sync", body)
        return orjson.loads(response.content), len(body), len(response.content)

    def status(self) -> dict[str, Any]:
        """Return the server peer's status (``GET /v1/status``)."""
        data: dict[str, Any] = self._request("GET", "/v1/status").json()
        return data

    def _request(self, method: str, path: str, body: bytes | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"} if body is not None else None
        attempt = 0
        while True:
            attempt += 1
            wait = None
            try:
                response = self._http.request(method, path, content=body, headers=headers)
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.is_success:
                    return response
                if response.status_code < 500 and response.status_code != 429:
                    raise self._refusal(response)
                reason = f"{response.status_code} {_error(response)[0]}"
                wait = _retry_after(response)
            if attempt > self.retries:
                raise ServerUnreachable(self.url, attempt, reason)
            delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
            time.sleep(min(self.max_backoff, wait) if wait is not None
                       else delay * random.uniform(0.5, 1.0))

    def _refusal(self, response: httpx.Response) -> RemoteError:
        code, message = _error(response)
        if response.status_code == 401:
            return Unauthorized(self.url, message)
        return RemoteError(self.url, response.status_code, code, message)


def _error(response: httpx.Response) -> tuple[str, str]:
    """Return (code, message) of an error response, whatever its body."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}", response.text[:200] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


# -- the exchange ---------------------------------------------------------------------------


_ITEMS = {"descriptors": "items", "payloads": "items", "want": "ids"}


def requests(messages: Sequence[Message], batch_size: int) -> Iterator[list[Message]]:
    """Split one leg's messages into requests: each batch of descriptors, ids or payloads
    its own request (payloads also under :data:`MAX_REQUEST_BYTES`), the small ones last."""
    small: list[Message] = []
    for message in messages:
        key = _ITEMS.get(message["type"])
        if key is None:
            small.append(message)
            continue
        chunk: list[Any] = []
        size = 0
        for item in message[key]:
            weight = len(item[1]) if message["type"] == "payloads" else 0
            if chunk and (len(chunk) >= batch_size or size + weight > MAX_REQUEST_BYTES):
                yield [{**message, key: chunk}]
                chunk, size = [], 0
            chunk.append(item)
            size += weight
        if chunk:
            yield [{**message, key: chunk}]
    if small:
        yield small


def _last_ack_only(messages: list[Message]) -> list[Message]:
    """Keep only the last ``ack``: a later vector says all an earlier one did."""
    acks = [i for i, m in enumerate(messages) if m["type"] == "ack"]
    return [m for i, m in enumerate(messages) if m["type"] != "ack" or i == acks[-1]]


def _take_report(report: SyncReport, data: dict[str, Any]) -> None:
    report.announced += int(data.get("announced", 0))
    report.fetched += int(data.get("fetched", 0))
    report.sent += int(data.get("sent", 0))
    report.applied += data.get("applied", [])
    report.rolled_back += data.get("rolled_back", [])
    report.conflicted += data.get("conflicted", [])
    report.quarantined += data.get("quarantined", [])
    report.refused += [Refusal(r["revision"], r["reason"], r.get("origin"),
                               r.get("code", "refused")) for r in data.get("refused", [])]


def exchange(local: Side, remote: HttpRemote, batch_size: int = 500, max_legs: int = 20
             ) -> SyncResult:
    """Run one exchange between ``local`` and the server; return both sides' reports.

    The local side integrates at the end (also when a request failed for
    good: what was fetched is kept, and the error is raised after), then rolls
    back its own revisions the server refused for lack of a write grant
    (:meth:`Side.take_refusals`): device and server never silently disagree.
    """
    result = SyncResult(local.report, SyncReport(remote.url))
    outgoing: list[Message] = [local.vector(first=True)]
    legs = 0
    try:
        while outgoing and legs < max_legs:
            following: list[Message] = []
            for request in requests(outgoing, batch_size):
                body, sent, received = remote.post(request)
                replies: list[Message] = body["messages"]
                result.round_trips += 1
                result.messages += len(request) + len(replies)
                result.bytes += sent + received
                local.report.bytes_sent += sent
                local.report.bytes_received += received
                result.remote.bytes_sent += received
                result.remote.bytes_received += sent
                _take_report(result.remote, body.get("report", {}))
                for reply in replies:
                    if reply["type"] == "vector" and reply.get("peer"):
                        result.remote.peer = str(reply["peer"])
                following += local.handle(replies)
            outgoing = _last_ack_only(following)
            legs += 1
    finally:
        local.finish()
    local.take_refusals(result.remote.refused)
    return result


def sync(peer: Peer, url: str, token: str | None, *, batch_size: int = 500,
         events: Any = None, progress: ProgressCallback | None = None,
         remote: HttpRemote | None = None) -> SyncResult:
    """Exchange revisions with the server at ``url`` and integrate (see :meth:`Peer.sync`)."""
    own = remote is None
    remote = remote or HttpRemote(url, token)
    batch_size = min(batch_size, MAX_ITEMS)  # the server refuses more a request
    try:
        with peer.leased():
            return exchange(Side(peer, batch_size, events, progress), remote, batch_size)
    finally:
        if own:
            remote.close()


# -- background sync ---------------------------------------------------------------------


@dataclass(frozen=True)
class WatchEvent:
    """One round of ``watch``: a finished sync, or the server unreachable and the wait after."""

    kind: str
    """``synced`` or ``unreachable``."""
    result: SyncResult | None = None
    error: TxEngineError | None = None
    retry_in: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "result": self.result.to_json() if self.result else None,
                "error": str(self.error) if self.error else None, "retry_in": self.retry_in}


def watch(peer: Peer, url: str, token: str | None, *, interval: float = 30.0,
          poll: float = 0.5, max_rounds: int | None = None, backoff: float = 1.0,
          max_backoff: float = 60.0, stop: threading.Event | None = None,
          batch_size: int = 500) -> Iterator[WatchEvent]:
    """Keep syncing with the server, after each local write and every ``interval`` seconds;
    yield a :class:`WatchEvent` per round.

    A local write (by this process or another) shows as a new apply-lease
    token, which costs one small read to poll every ``poll`` seconds. While
    the server is unreachable, the wait doubles from ``backoff`` up to
    ``max_backoff``. The lease is given back between rounds, so the app keeps
    writing. Stops after ``max_rounds`` successful rounds, when ``stop`` is
    set, or when the caller stops iterating (Ctrl-C: KeyboardInterrupt).
    A refusal (a bad token) is raised: waiting does not heal it.
    """
    stop = stop or threading.Event()
    remote = HttpRemote(url, token, retries=1)
    rounds = failures = 0
    mark: int | None = None
    last = float("-inf")
    try:
        while not stop.is_set() and (max_rounds is None or rounds < max_rounds):
            if mark == peer.lease_token() and time.monotonic() - last < interval:
                stop.wait(poll)
                continue
            try:
                result = sync(peer, url, token, batch_size=batch_size, remote=remote)
            except (ServerUnreachable, RemoteError) as exc:
                if isinstance(exc, RemoteError) and exc.status < 500:
                    raise
                failures += 1
                delay = min(max_backoff, backoff * 2 ** (failures - 1))
                yield WatchEvent("unreachable", error=exc, retry_in=delay)
                stop.wait(delay)
                continue
            failures = 0
            rounds += 1
            mark, last = peer.lease_token(), time.monotonic()
            yield WatchEvent("synced", result=result)
    finally:
        remote.close()
