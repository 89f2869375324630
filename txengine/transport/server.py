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
Bearer TOKEN`` (``txengine peers add NAME``): never an open server. Every
refusal is ``{"error": {"code", "message"}}`` with a stable code
(docs/protocol.md); bad input never yields a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

import orjson
import sqlalchemy as sa
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from ..credentials import Credentials
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
from ..sync import Message, Side
from .schemas import (
    PROTOCOL_VERSION,
    ErrorResponse,
    HealthResponse,
    StatusResponse,
    SyncRequest,
    SyncResponse,
)

STORE_ENV = "TXENGINE_STORE"
PEER_ID_ENV = "TXENGINE_PEER_ID"
MAX_BODY_BYTES = 64 * 1024 * 1024

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
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers)


class _Host:
    """This process's peer on the store: opened on first use, used from one thread.

    After any failure the peer is closed and reopened by the next request, so
    a broken connection or half-updated memory never outlives the request.
    """

    def __init__(self, store: str, peer_id: str | None, batch_size: int) -> None:
        self.store = store
        self.peer_id = peer_id
        self.batch_size = batch_size
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


def _authenticate(credentials: Credentials, token: str | None) -> str:
    """Return the name of the peer holding ``token``, or refuse with 401."""
    name = credentials.authenticate(token) if token else None
    if name is None:
        raise ApiError(401, "unauthorized",
                       "a valid token is required (Authorization: Bearer TOKEN); the server's"
                       " admin creates one with `txengine peers add NAME`"
                       if not token else "the token is not valid (revoked or mistyped)",
                       {"WWW-Authenticate": "Bearer"})
    return name


WRITING = frozenset({"descriptors", "payloads", "had"})
"""Messages that record revisions: handled under the apply lease, then integrated."""


def _sync(peer: Peer, credentials: Credentials, token: str | None, messages: list[Message],
          batch_size: int) -> dict[str, Any]:
    """Handle one request's messages; integrate what was fetched.

    Only messages that record revisions take the lease (taking it moves its
    token, which makes every other server process reload); vectors and
    payload requests are answered from this process's memory, refreshed
    first when another process wrote. An ``ack`` only raises the monotonic
    "sent" mark of this peer's own revisions, which needs no lease.
    """
    name = _authenticate(credentials, token)
    side = Side(peer, batch_size)
    side.other = name
    if any(m["type"] in WRITING for m in messages):
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


def _status(peer: Peer, credentials: Credentials, token: str | None) -> dict[str, Any]:
    _authenticate(credentials, token)
    peer.refresh()
    vector = Side(peer).vector()
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
        (413, "Body too large"), (422, "Wrong shape, or refused input"),
        (503, "Busy or store unavailable: retry after Retry-After seconds"))}


def create_app(store: str, peer_id: str | None = None, *, batch_size: int = 500) -> FastAPI:
    """Return the ASGI app serving the store at URL ``store`` as peer ``peer_id``."""
    host = _Host(store, peer_id, batch_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        host.close()

    app = FastAPI(title="txengine sync", version=str(PROTOCOL_VERSION), lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="The txengine sync protocol: see docs/protocol.md.")

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return error_response(413, "too_large", f"the body exceeds {MAX_BODY_BYTES} bytes:"
                                  " send smaller batches")
        response: Response = await call_next(request)
        return response

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
        return error_response(422, "invalid_message", f"{where or 'body'}: {first.get('msg')}"
                              f" ({len(errors)} problem{'s' if len(errors) > 1 else ''}):"
                              " see docs/protocol.md for the message schemas")

    @app.exception_handler(TxEngineError)
    async def refused(request: Request, exc: TxEngineError) -> JSONResponse:
        status, code = next((s, c) for cls, s, c in ERRORS if isinstance(exc, cls))
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
        messages = orjson.loads(await request.body())["messages"]
        result = await host.run(_sync, token_of(credentials), messages, host.batch_size)
        return Response(orjson.dumps(result), media_type="application/json")

    @app.get("/v1/status", response_model=StatusResponse, responses=ERROR_RESPONSES,
             summary="The server peer's vectors and sync counts")
    async def status(credentials: Token) -> dict[str, Any]:
        return await host.run(_status, token_of(credentials))

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
    return create_app(store, os.environ.get(PEER_ID_ENV) or None)


def serve(store: str, peer_id: str | None, host: str = "127.0.0.1", port: int = 8800,
          workers: int = 1, log_level: str = "info") -> None:
    """Run uvicorn until interrupted (``txengine serve``)."""
    import uvicorn

    os.environ[STORE_ENV] = store
    if peer_id:
        os.environ[PEER_ID_ENV] = peer_id
    uvicorn.run("txengine.transport.server:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level=log_level)
