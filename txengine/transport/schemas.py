"""The HTTP protocol's JSON shapes, as pydantic models: request validation and JSON Schema.

The models mirror the sync messages of :mod:`txengine.sync`. They are strict
(no coercion: ``"1"`` is not a seq) so that a client in another language
learns of a wrong shape from a 422 with a stable code, never from a 500 or a
silent repair. They validate only: the server hands the message objects on
as they arrived, because a descriptor's digest covers its exact fields.
``python -m txengine.transport.schemas docs/protocol.md`` regenerates the
schema section of the protocol page (a test fails when it is stale).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

PROTOCOL_VERSION = 1
MAX_ITEMS = 5000
"""Most descriptors, ids or payloads one message, and one request, may carry (clients send
500)."""

Id = Annotated[str, Field(min_length=1, max_length=80, description="A revision id.")]
Vectors = dict[str, dict[str, Annotated[int, Field(ge=0)]]]


class _Shape(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Signature(_Shape):
    """The origin's Ed25519 signature of a descriptor's digest (see docs/security.md).

    ``sig`` signs the ASCII bytes ``txengine-revision-v1``, a newline, then the
    digest (hex); ``key`` is the signer's key id, the first 16 hex characters
    of the SHA-256 of its raw public key. Relays pass it on unchanged.
    """

    key: str = Field(min_length=1, max_length=64, description="The signer's key id.")
    sig: str = Field(min_length=1, max_length=200, description="Base64 of the 64-byte signature.")


class Descriptor(_Shape):
    """A revision's descriptor: light JSON that travels before its payload.

    ``digest`` is the SHA-256 of the RFC 8785 canonical descriptor without
    ``digest`` and ``signature``; a data revision's ``id`` is its digest.
    ``checksum`` is the SHA-256 of the payload text (UTF-8).
    """

    id: Id
    partition: str
    parents: list[str]
    depends_on: list[str]
    origin: str = Field(description="Writer: peer id and epoch, 'phone:0'.")
    seq: int = Field(ge=1, description="Counter per origin and partition.")
    hlc: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)] = Field(
        description="Hybrid logical clock: [milliseconds, counter].")
    message: str
    kind: Literal["data", "script", "checkpoint", "config"]
    checksum: str
    collections: list[str]
    branch_labels: list[str]
    digest: str
    signature: Signature | None = Field(default=None, description=(
        "Required by a peer with a root key installed; outside the digest."))


class _Held(_Shape):
    peer: str | None = None
    origin: str
    vectors: Vectors
    tips: dict[str, dict[str, str]] = Field(default_factory=dict)
    first: bool = False
    bases: dict[str, str] | None = Field(default=None, description=(
        "Per partition, the checkpoint this peer started from: ask for the descriptors of"
        " the parents it holds by vector alone."))


class VectorMessage(_Held):
    """What the sender holds: per partition, per origin, the highest contiguous seq.

    ``tips`` holds the id prefix of each such revision, so a fork of an
    (origin, seq) slot shows at once. ``first: true`` asks for the other
    side's vector in return (the client's opening message).
    """

    type: Literal["vector"]


class AckMessage(_Held):
    """The sender's vector after it took payloads: the writer learns what was received."""

    type: Literal["ack"]


class DescriptorsMessage(_Shape):
    """Descriptors the receiver lacks, in canonical order (parents first)."""

    type: Literal["descriptors"]
    items: list[Descriptor] = Field(max_length=MAX_ITEMS)
    parents: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_ITEMS, description=(
        "For a receiver that sent ``bases``: descriptors of the items' parents it holds by"
        " vector alone (each checked; a bad one is ignored)."))


class WantMessage(_Shape):
    """Announced revisions whose payloads the sender needs, in canonical order."""

    type: Literal["want"]
    ids: list[Id] = Field(max_length=MAX_ITEMS)


class PayloadsMessage(_Shape):
    """Payloads: ``[id, payload text]`` pairs (a data revision's payload is its op list)."""

    type: Literal["payloads"]
    items: list[Annotated[list[str], Field(min_length=2, max_length=2)]] = Field(
        max_length=MAX_ITEMS)


class HaveMessage(_Shape):
    """After a restore from backup: which of these revisions of my origin do you hold?"""

    type: Literal["have"]
    origin: str
    ids: list[Id]


class HadMessage(_Shape):
    """The answer to ``have``: the ids the sender holds."""

    type: Literal["had"]
    origin: str | None = None
    ids: list[Id]


Message = Annotated[
    VectorMessage | AckMessage | DescriptorsMessage | WantMessage | PayloadsMessage
    | HaveMessage | HadMessage,
    Field(discriminator="type"),
]


class SyncRequest(_Shape):
    """One leg of an exchange from the client: messages handled in order."""

    messages: list[Message] = Field(max_length=1000)


class Refusal(_Shape):
    """A revision the server refused (audited there; its slot stays open)."""

    revision: str
    reason: str
    origin: str | None = None
    code: str = Field(default="refused", description=(
        "``forbidden_partition``: the token may not write the revision's partition, so its"
        " origin rolls it back; ``unsigned``, ``bad_signature``, ``unknown_signer``,"
        " ``revoked_key``, ``untrusted_code``: a signature refusal (docs/security.md);"
        " ``refused``: any other reason (see ``reason``)."))


class ServerReport(_Shape):
    """What the server did with one request."""

    announced: int
    fetched: int
    sent: int
    applied: list[str]
    rolled_back: list[str]
    conflicted: list[str]
    quarantined: list[str]
    refused: list[Refusal]


class SyncResponse(_Shape):
    """The server's replies to one request, and what it did."""

    messages: list[Message]
    report: ServerReport


class StatusResponse(_Shape):
    """The server peer's identity, version vectors and sync badge counts."""

    protocol: int
    peer: str
    origin: str
    revisions: int
    vectors: Vectors
    unsent: int
    announced: int
    fetched: int
    conflicted: int
    quarantined: int
    pinned: bool
    refused: int = Field(default=0, description=(
        "The server peer's own revisions another server refused (it rolled them back)."))


class HealthResponse(_Shape):
    """The server answers and its store is reachable."""

    status: Literal["ok"]


class ErrorBody(_Shape):
    code: str = Field(description="A stable, machine-readable code (see docs/protocol.md).")
    message: str = Field(description="One line for people: what failed, what to do next.")


class ErrorResponse(_Shape):
    """Every refusal: a status code and this body."""

    error: ErrorBody


MESSAGES: tuple[type[BaseModel], ...] = (
    VectorMessage, AckMessage, DescriptorsMessage, WantMessage, PayloadsMessage, HaveMessage,
    HadMessage)


def schemas() -> dict[str, Any]:
    """Return the JSON Schema of every message and body, by name; each refers to the others
    as ``#/$defs/Name`` (one document: ``{"$defs": schemas()}``)."""
    models: tuple[type[BaseModel], ...] = (
        Descriptor, Signature, *MESSAGES, SyncRequest, SyncResponse, Refusal, ServerReport,
        StatusResponse, HealthResponse, ErrorResponse, ErrorBody)
    _, document = models_json_schema([(m, "validation") for m in models])
    defs: dict[str, Any] = document["$defs"]
    return {m.__name__: defs[m.__name__] for m in models}


BEGIN = "<!-- schemas: generated by `python -m txengine.transport.schemas docs/protocol.md` -->"
END = "<!-- schemas: end -->"


def render_section() -> str:
    """Return the schema section of docs/protocol.md, one JSON Schema per shape."""
    out = [BEGIN, ""]
    for name, schema in schemas().items():
        out += [f"### {name}", "", "```json", json.dumps(schema, indent=2), "```", ""]
    return "\n".join([*out, END])


def fill(text: str) -> str:
    """Return ``text`` with its schema section regenerated."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + render_section() + tail


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if len(sys.argv) > 1:
        page = Path(sys.argv[1])
        page.write_text(fill(page.read_text("utf-8")), "utf-8")
    else:
        print(json.dumps(schemas(), indent=2))
