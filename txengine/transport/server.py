"""HTTP server: the sync protocol as an ASGI app (FastAPI), over any store.

The server is a peer like any other; it keeps no state outside its store.
A request that records revisions takes the store's apply lease, which
reloads whatever another process (another worker, another host behind the
load balancer) wrote since, handles the messages with a fresh
:class:`~txengine.sync.Side`, integrates what was fetched, and gives the
lease back; other requests first reload only if the lease token moved. So
several processes can serve one PostgreSQL or MongoDB, and the open
:class:`~txengine.peer.Peer` each process keeps is only a cache. The peer is
not thread-safe, so each process uses it from one thread; asyncio keeps
accepting connections meanwhile.

Every request but ``/v1/health`` and ``/openapi.json`` carries ``Authorization:
Bearer TOKEN`` (``txengine peers add NAME``): never an open server. The
token's grants decide which partitions it reads and writes (a
:class:`~txengine.sync.Side` filter, so intake is not duplicated here).
Every refusal is ``{"error": {"code", "message"}}`` with a stable code
(docs/protocol.md); bad input never yields a 500. Limits bound what one
request may cost: body size (counted as it arrives, also without
Content-Length), items, descriptor and payload sizes, and requests per
second per peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

import orjson
import sqlalchemy as sa
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from ..credentials import Credential, Credentials
from ..exceptions import (
    ForkedRevision,
    IntegrityError,
    InvalidInput,
    LockTimeout,
    PinnedPeer,
    RevisionError,
    StaleLease,
    StoreError,
    TxEngineError,
)
from ..peer import Peer
from ..revision import MAX_DESCRIPTOR_BYTES, MAX_PAYLOAD_BYTES
from ..sync import Message, Side
from .schemas import (
    MAX_ITEMS,
    PROTOCOL_VERSION,
    ErrorResponse,
    HealthResponse,
    StatusResponse,
    SyncRequest,
    SyncResponse,
)

STORE_ENV = "TXENGINE_STORE"
PEER_ID_ENV = "TXENGINE_PEER_ID"
RATE_ENV = "TXENGINE_RATE"
BURST_ENV = "TXENGINE_BURST"
MAX_BODY_BYTES = 64 * 1024 * 1024
RATE = 50.0
BURST = 200
"""Requests a second per peer on average, and at once: a sync of 100,000 revisions in
batches of 500 makes about 600 requests."""

log = logging.getLogger(__name__)
T = TypeVar("T")

# Library errors -> (HTTP status, stable code); the first class that matches wins.
ERRORS: tuple[tuple[type[TxEngineError], int, str], ...] = (
    (LockTimeout, 503, "busy"),
    (StaleLease, 503, "busy"),
    (PinnedPeer, 409, "pinned"),
    (ForkedRevision, 409, "forked"),
    (IntegrityError, 422, "integrity"),
    (InvalidInput, 422, "invalid_input"),
    (RevisionError, 422, "invalid_revision"),
    (StoreError, 503, "store_unavailable"),
    (TxEngineError, 422, "refused"),
)
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


class ApiError(HTTPException):
    """A refusal with a stable code (raised by the app, rendered as the error body)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.code = code


def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the body exceeds {limit} bytes: send smaller batches")


class BodyLimit:
    """ASGI middleware: refuse a body over ``limit`` bytes with 413, before it is all read.

    A declared Content-Length is checked at once; a streamed (chunked) body
    is counted as it arrives and refused as soon as it passes the limit, so
    a client cannot make the server buffer more by leaving the length out.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[..., Any],
                       send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            exc = _too_large(self.limit)
            await error_response(413, exc.code, str(exc.detail))(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _too_large(self.limit)  # inside the app: rendered by its handler
            return message

        await self.app(scope, counted, send)


class RateLimit:
    """Requests per peer: a token bucket of ``burst`` requests that refills at ``rate`` a
    second.

    Kept in this server process (no store round trip per request): with
    ``--workers N`` or several hosts, each process counts on its own, so a
    peer may reach N times the rate.
    """

    def __init__(self, rate: float = RATE, burst: int = BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def wait(self, name: str) -> float:
        """Take one request for ``name``; return 0, or the seconds until one is allowed."""
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(name, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / self.rate


class _Host:
    """This process's peer on the store: opened on first use, used from one thread.

    After any failure the peer is closed and reopened by the next request, so
    a broken connection or half-updated memory never outlives the request.
    """

    def __init__(self, store: str, peer_id: str | None, batch_size: int,
                 rate: RateLimit) -> None:
        self.store = store
        self.peer_id = peer_id
        self.batch_size = batch_size
        self.rate = rate
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="txengine-peer")
        self._peer: Peer | None = None
        self._credentials: Credentials | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, fn, args)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._peer is None or self._credentials is None:
            self._peer = Peer.open(self.store, self.peer_id)
            self._credentials = self._peer.credentials()
        try:
            return fn(self._peer, self._credentials, *args)
        except (ApiError, InvalidInput):
            raise  # refused before anything changed
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        peer, self._peer, self._credentials = self._peer, None, None
        if peer is not None:
            with contextlib.suppress(Exception):
                peer.close()

    def close(self) -> None:
        self._pool.submit(self._drop).result()
        self._pool.shutdown()


def _authenticate(credentials: Credentials, token: str | None, rate: RateLimit) -> Credential:
    """Return the peer holding ``token`` with its grants; refuse with 401, or 429 when it
    sends requests faster than ``rate`` allows."""
    name = credentials.authenticate(token) if token else None
    if name is None:
        raise ApiError(401, "unauthorized",
                       "a valid token is required (Authorization: Bearer TOKEN); the server's"
                       " admin creates one with `txengine peers add NAME`"
                       if not token else "the token is not valid (revoked or mistyped)",
                       {"WWW-Authenticate": "Bearer"})
    wait = rate.wait(name)
    if wait:
        raise ApiError(429, "rate_limited", f"peer {name!r} sends more than {rate.rate:g}"
                       " requests a second: retry after Retry-After seconds",
                       {"Retry-After": str(math.ceil(wait))})
    return credentials.get(name)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _check_limits(messages: list[Message]) -> None:
    """Refuse with 413 a request over the item, descriptor or payload limits, and with 422
    one with a NUL character outside payload texts (ids, partitions and origins are
    stored as text, which PostgreSQL cannot hold NUL in), before any of it is handled
    (the reference client never sends one)."""
    if _has_nul([m if m["type"] != "payloads" else [i[0] for i in m["items"]]
                 for m in messages]):
        raise ApiError(422, "invalid_message", "a NUL character (\\u0000) outside a payload"
                       " text: ids, partitions and origins never hold one")
    items = 0
    for message in messages:
        kind = message["type"]
        if kind == "descriptors":
            listed = [*message["items"], *(message.get("parents") or [])]
            items += len(listed)
            for d in listed:
                size = len(orjson.dumps({k: v for k, v in d.items() if k != "signature"}))
                if size > MAX_DESCRIPTOR_BYTES:
                    raise ApiError(413, "descriptor_too_large", f"descriptor"
                                   f" {str(d.get('id'))[:12]} has {size} bytes, above"
                                   f" {MAX_DESCRIPTOR_BYTES}: shorten its message")
        elif kind == "payloads":
            items += len(message["items"])
            for rev_id, text in message["items"]:
                size = len(text.encode("utf-8"))
                if size > MAX_PAYLOAD_BYTES:
                    raise ApiError(413, "payload_too_large", f"payload of {rev_id[:12]} has"
                                   f" {size} bytes, above {MAX_PAYLOAD_BYTES}: split the"
                                   " revision's ops into several revisions")
        elif kind == "want":
            items += len(message["ids"])
    if items > MAX_ITEMS:
        raise ApiError(413, "too_many_items", f"the request carries {items} descriptors, ids"
                       f" and payloads, above {MAX_ITEMS}: send smaller batches")


WRITING = frozenset({"descriptors", "payloads", "had"})
"""Messages that record revisions: handled under the apply lease, then integrated."""


def _sync(peer: Peer, credentials: Credentials, token: str | None, messages: list[Message],
          batch_size: int, rate: RateLimit) -> dict[str, Any]:
    """Handle one request's messages; integrate what was fetched.

    Only messages that record revisions take the lease (taking it moves its
    token, which makes every other server process reload), and only after
    their signatures were verified without it; vectors and
    payload requests are answered from this process's memory, refreshed
    first when another process wrote. An ``ack`` only raises the monotonic
    "sent" mark of this peer's own revisions, which needs no lease.
    """
    holder = _authenticate(credentials, token, rate)
    _check_limits(messages)
    side = Side(peer, batch_size, may_read=holder.may_read, may_write=holder.may_write)
    side.other = holder.name
    if any(m["type"] in WRITING for m in messages):
        peer.refresh()
        side.precheck(messages)  # signatures, outside the lease: intake runs concurrently
        with peer.leased():
            replies = side.handle(messages)
            side.finish()  # also what a killed process fetched and did not integrate
    else:
        peer.refresh()
        replies = side.handle(messages)
    report = side.report.to_json()
    for key in ("peer", "reissued", "bytes_sent", "bytes_received"):
        report.pop(key)
    return {"messages": replies, "report": report}


def _status(peer: Peer, credentials: Credentials, token: str | None, rate: RateLimit
            ) -> dict[str, Any]:
    holder = _authenticate(credentials, token, rate)
    peer.refresh()
    vector = Side(peer, may_read=holder.may_read, may_write=holder.may_write).vector()
    status = peer.status()
    revisions = len(peer._engine.graph)
    return {"protocol": PROTOCOL_VERSION, **status.to_json(), "revisions": revisions,
            "vectors": vector["vectors"]}


def _health(peer: Peer, credentials: Credentials) -> dict[str, str]:
    credentials.list()  # the store answers
    return {"status": "ok"}


bearer = HTTPBearer(auto_error=False, description="A token from `txengine peers add NAME`.")
Token = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (400, "Malformed JSON"), (401, "Missing or invalid token"),
        (413, "Body, descriptor or payload too large, or too many items"),
        (422, "Wrong shape, or refused input"),
        (429, "Too many requests from this peer: retry after Retry-After seconds"),
        (503, "Busy or store unavailable: retry after Retry-After seconds"))}


def create_app(store: str, peer_id: str | None = None, *, batch_size: int = 500,
               rate: float = RATE, burst: int = BURST) -> FastAPI:
    """Return the ASGI app serving the store at URL ``store`` as peer ``peer_id``,
    taking at most ``rate`` requests a second per peer (``burst`` at once)."""
    host = _Host(store, peer_id, batch_size, RateLimit(rate, burst))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        host.close()

    app = FastAPI(title="txengine sync", version=str(PROTOCOL_VERSION), lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="The txengine sync protocol: see docs/protocol.md.")

    app.add_middleware(BodyLimit)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code,
                                                              f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "malformed_json", "the body is not a JSON object:"
                                  " send Content-Type: application/json and a JSON object")
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        if first.get("type") == "too_long" and first["loc"][-1] in ("messages", "items", "ids",
                                                                    "parents"):
            return error_response(413, "too_many_items", f"{where or 'body'}: {first.get('msg')}:"
                                  " send smaller batches")
        return error_response(422, "invalid_message", f"{where or 'body'}: {first.get('msg')}"
                              f" ({len(errors)} problem{'s' if len(errors) > 1 else ''}):"
                              " see docs/protocol.md for the message schemas")

    @app.exception_handler(TxEngineError)
    async def refused(request: Request, exc: TxEngineError) -> JSONResponse:
        status, code = next((s, c) for cls, s, c in ERRORS if isinstance(exc, cls))
        code = getattr(exc, "code", None) or code  # signature errors name their own
        headers = {"Retry-After": "1"} if status == 503 else None
        return error_response(status, code, " ".join(str(exc).split()), headers)

    @app.exception_handler(sa.exc.DBAPIError)
    async def store_down(request: Request, exc: sa.exc.DBAPIError) -> JSONResponse:
        log.warning("store error: %s", exc.orig)
        return error_response(503, "store_unavailable", "the store did not answer: retry later",
                              {"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "internal_error", f"{type(exc).__name__}: the server failed;"
                              " its log holds the traceback")

    def token_of(credentials: HTTPAuthorizationCredentials | None) -> str | None:
        return credentials.credentials if credentials is not None else None

    @app.post("/v1/sync", response_model=SyncResponse, responses=ERROR_RESPONSES,
              summary="Handle one leg of a sync exchange")
    async def sync(request: Request, body: SyncRequest, credentials: Token) -> Response:
        """Handle the messages in order and return the replies (see docs/protocol.md)."""
        del body  # validated; the messages are handled as they arrived (digests cover them)
        try:
            messages = orjson.loads(await request.body())["messages"]
        except orjson.JSONDecodeError as exc:  # valid to pydantic, not UTF-8: a lone surrogate
            raise ApiError(400, "malformed_json", f"the body is not UTF-8 JSON ({exc}): escape"
                           " only whole surrogate pairs") from exc
        result = await host.run(_sync, token_of(credentials), messages, host.batch_size,
                                host.rate)
        return Response(orjson.dumps(result), media_type="application/json")

    @app.get("/v1/status", response_model=StatusResponse, responses=ERROR_RESPONSES,
             summary="The server peer's vectors and sync counts")
    async def status(credentials: Token) -> dict[str, Any]:
        return await host.run(_status, token_of(credentials), host.rate)

    @app.get("/v1/health", response_model=HealthResponse, responses=ERROR_RESPONSES,
             summary="Liveness: the server and its store answer (no token needed)")
    async def health() -> dict[str, str]:
        return await host.run(_health)

    return app


def app_from_env() -> FastAPI:
    """Build the app from ``TXENGINE_STORE`` (and ``TXENGINE_PEER_ID``): uvicorn's factory
    for ``--workers N``, where each worker process imports the app by name."""
    store = os.environ.get(STORE_ENV)
    if not store:
        raise StoreError(f"{STORE_ENV} is not set: run `txengine --store URL serve`")
    return create_app(store, os.environ.get(PEER_ID_ENV) or None,
                      rate=float(os.environ.get(RATE_ENV) or RATE),
                      burst=int(os.environ.get(BURST_ENV) or BURST))


def serve(store: str, peer_id: str | None, host: str = "127.0.0.1", port: int = 8800,
          workers: int = 1, log_level: str = "info", rate: float = RATE,
          burst: int = BURST) -> None:
    """Run uvicorn until interrupted (``txengine serve``)."""
    import uvicorn

    os.environ[STORE_ENV] = store
    os.environ[RATE_ENV] = str(rate)
    os.environ[BURST_ENV] = str(burst)
    if peer_id:
        os.environ[PEER_ID_ENV] = peer_id
    uvicorn.run("txengine.transport.server:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level=log_level)
