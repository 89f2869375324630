"""Bad input gets a clear error and changes nothing: one test per row of docs/bad-inputs.md.

Each case holds the input, the exception class and the message prefix; the
prefix may name ``{rev}`` (the offending revision's 12-character id) and
``{parent}``/``{known}`` placeholders filled in by the case. After every
refusal the store is unchanged: same snapshot, same ledger rows, same audit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from txengine.exceptions import (
    ChecksumMismatch,
    CycleDetected,
    DigestMismatch,
    ForkedRevision,
    InvalidKey,
    MalformedPayload,
    MissingParent,
    NonLiteralScript,
    OversizePayload,
    ReservedCollection,
    UnknownOp,
    UntrustedScript,
)
from txengine.peer import Peer
from txengine.revision import MAX_PAYLOAD_BYTES, Revision, build
from txengine.scripts import load_data, render_data
from txengine.values import canonical

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
INSERT = [{"op": "insert", "collection": "items", "doc": {"_id": 2, "v": 1}}]


def foreign(peer: Peer, ops: Any = INSERT, payload: bytes | None = None, **fields: Any
            ) -> Revision:
    """Build a revision as another peer would send it, on top of this peer's head."""
    head = peer.heads()[0]
    args: dict[str, Any] = {
        "kind": "data", "partition": "default", "parents": [head.id], "origin": "other:0",
        "seq": 1, "hlc": (head.hlc[0] + 1, 0), "message": "from elsewhere",
        "collections": ["items"],
    }
    args.update(fields)
    return build(payload=canonical(ops) if payload is None else payload, **args)


def receive(peer: Peer, *revs: Revision) -> Callable[[], Any]:
    return lambda: peer.receive([(dict(r.descriptor), r.payload) for r in revs])


def short(rev: Revision) -> str:
    return rev.id[:12]


# -- the cases: each returns (the call that must fail, values for the prefix) ----------------

def malformed_payload(peer):
    rev = foreign(peer, payload=b"{not json")
    return receive(peer, rev), {}


def malformed_descriptor(peer):
    rev = foreign(peer)
    descriptor = {k: v for k, v in rev.descriptor.items() if k != "hlc"}
    return lambda: peer.receive([(descriptor, rev.payload)]), {}


def unknown_op(peer):
    rev = foreign(peer, ops=[{"op": "upsert", "collection": "items", "key": 1}])
    return receive(peer, rev), {}


def cycle(peer):
    first = build(kind="checkpoint", payload=b"", partition="default", parents=["ckptb"],
                  origin="other:0", seq=1, hlc=(10, 0), message="a", rev_id="ckpta")
    second = build(kind="checkpoint", payload=b"", partition="default", parents=["ckpta"],
                   origin="other:0", seq=2, hlc=(11, 0), message="b", rev_id="ckptb")
    items = [(dict(r.descriptor), r.payload) for r in (first, second)]
    return lambda: peer._engine.receive(items, trusted=True), {}


def missing_parent(peer):
    rev = foreign(peer, parents=["a" * 64])
    return receive(peer, rev), {"rev": short(rev), "parent": "a" * 12}


def non_literal_script(peer):
    text = render_data(peer.revision(peer.heads()[0].id))
    edited = text.replace('"v": 1}', '"v": __import__("os").getcwd()}', 1)
    assert edited != text
    line = next(n for n, t in enumerate(edited.splitlines(), 1) if "__import__" in t)
    return lambda: load_data(edited, "rev.py"), {"line": line}


def float_key(peer):
    def write():
        with peer.transaction("float key") as tx:
            tx.insert("items", {"_id": 1.5})
    return write, {}


def float_key_in_payload(peer):
    rev = foreign(peer, ops=[{"op": "insert", "collection": "items", "doc": {"_id": 1.5}}])
    return receive(peer, rev), {}


def reserved_collection(peer):
    def write():
        with peer.transaction("sneaky") as tx:
            tx.insert("txengine_audit", {"_id": 1})
    return write, {}


def reserved_collection_in_payload(peer):
    ops = [{"op": "insert", "collection": "txengine_revisions", "doc": {"_id": 1}}]
    rev = foreign(peer, ops=ops, collections=["txengine_revisions"])
    return receive(peer, rev), {}


def oversize_payload(peer):
    ops = [{"op": "insert", "collection": "items", "doc": {"_id": 2, "v": "x" * MAX_PAYLOAD_BYTES}}]
    rev = foreign(peer, ops=ops)
    return receive(peer, rev), {"size": len(rev.payload)}


def tampered_checksum(peer):
    rev = foreign(peer)
    forged = Revision(rev.descriptor, rev.payload.replace(b'"v":1', b'"v":2'))
    return receive(peer, forged), {"rev": short(rev)}


def data_id_not_its_digest(peer):
    rev = foreign(peer)
    descriptor = {**rev.descriptor, "message": "changed in transit"}
    return lambda: peer.receive([(descriptor, rev.payload)]), {"rev": short(rev)}


def known_id_other_digest(peer):
    def checkpoint(message):
        return build(kind="checkpoint", payload=b"", partition="default", parents=[],
                     origin="other:0", seq=1, hlc=(10, 0), message=message, rev_id="ckpt1")
    peer._engine.receive([(dict(checkpoint("one").descriptor), b"")], trusted=True)
    forged = checkpoint("two")
    known = checkpoint("one").descriptor["digest"][:12]
    items = [(dict(forged.descriptor), b"")]
    return lambda: peer._engine.receive(items, trusted=True), {"known": known}


def known_origin_seq_other_digest(peer):
    mine = peer.revision(peer.heads()[0].id).descriptor
    rev = foreign(peer, origin=mine["origin"], seq=mine["seq"], parents=[])
    return receive(peer, rev), {"origin": mine["origin"], "known": mine["digest"][:12]}


def hlc_not_above_parent(peer):
    head = peer.heads()[0]
    rev = foreign(peer, hlc=head.hlc)
    return receive(peer, rev), {"rev": short(rev), "parent": head.id[:12]}


def unsigned_script(peer):
    rev = build(kind="script", payload=b"def upgrade(op):\n    pass\n", partition="default",
                parents=[], origin="other:0", seq=1, hlc=(10, 0), message="code",
                rev_id="evilscript")
    return receive(peer, rev), {}


def collections_mismatch(peer):
    rev = foreign(peer, collections=["other"])
    return receive(peer, rev), {"rev": short(rev)}


def not_a_revision_record(peer):
    return lambda: peer.receive_json(['{"descriptor": {}}']), {}


def non_bool_cas(peer):
    ops = [{"op": "update", "collection": "items", "key": 1, "set": {"v": 2},
            "before": {"v": 1}, "cas": "yes"}]
    return receive(peer, foreign(peer, ops=ops)), {}


@dataclass(frozen=True)
class Case:
    name: str
    input: str
    error: type[Exception]
    prefix: str
    make: Callable[[Peer], tuple[Callable[[], Any], dict[str, Any]]]


CASES = [
    Case("malformed payload", "a data payload that is not JSON (`{not json`)",
         MalformedPayload, "payload is not valid JSON: ", malformed_payload),
    Case("malformed descriptor", "a descriptor without its `hlc` field", MalformedPayload,
         "descriptor fields wrong: missing ['hlc'], unexpected []", malformed_descriptor),
    Case("not a revision record", "a JSON line without `payload` (`receive_json`)",
         MalformedPayload, "line 1: not a revision record", not_a_revision_record),
    Case("unknown op", "an op `upsert` in a received payload", UnknownOp,
         "unknown op 'upsert': use one of insert, update, delete", unknown_op),
    Case("cycle", "two authored revisions that name each other as parent", CycleDetected,
         "revisions ckpta, ckptb form a cycle through their parents", cycle),
    Case("missing parent", "a revision whose parent this peer does not have", MissingParent,
         "revision {rev} names parent {parent}, which this peer does not have", missing_parent),
    Case("non-literal data script", "a rendered data script edited to call a function",
         NonLiteralScript, "rev.py:{line}: call to __import__('os').getcwd is not a literal",
         non_literal_script),
    Case("float key", "`tx.insert('items', {'_id': 1.5})`", InvalidKey,
         "invalid key 1.5 (float): keys are str, int or ObjectId", float_key),
    Case("float key in a payload", "a received insert whose `_id` is `1.5`", InvalidKey,
         "invalid key 1.5 (float): keys are str, int or ObjectId", float_key_in_payload),
    Case("write to txengine_*", "`tx.insert('txengine_audit', ...)`", ReservedCollection,
         "collection 'txengine_audit' is reserved", reserved_collection),
    Case("write to txengine_* in a payload", "a received insert into `txengine_revisions`",
         ReservedCollection, "collection 'txengine_revisions' is reserved",
         reserved_collection_in_payload),
    Case("oversize payload", "a received payload above 1 MiB", OversizePayload,
         "payload of {size} bytes exceeds the 1048576-byte limit", oversize_payload),
    Case("tampered checksum", "a payload changed after its descriptor was made",
         ChecksumMismatch, "revision {rev}: payload checksum ", tampered_checksum),
    Case("data id not its digest", "a data descriptor changed in transit (id kept)",
         DigestMismatch, "revision {rev}: descriptor digest ", data_id_not_its_digest),
    Case("known id with another digest", "an authored id arriving again with other content",
         ForkedRevision, "revision ckpt1 is already known with digest {known}",
         known_id_other_digest),
    Case("known (origin, seq) with another digest",
         "another revision in a slot this peer already holds", ForkedRevision,
         "(origin {origin}, seq 1) is already known with digest {known}",
         known_origin_seq_other_digest),
    Case("hlc not above parent", "a revision whose hlc equals its parent's", MalformedPayload,
         "revision {rev} has hlc ", hlc_not_above_parent),
    Case("unsigned script from another peer", "a `script` revision received from a peer",
         UntrustedScript, "revision evilscript is script code from another peer and is not"
         " signed by the sequencer", unsigned_script),
    Case("declared collections not matching ops", "`collections: ['other']` on ops on `items`",
         MalformedPayload, "revision {rev} declares collections ['other'] but its ops write"
         " ['items']", collections_mismatch),
    Case("non-bool cas", 'a received update with `"cas": "yes"`', MalformedPayload,
         "cas must be true or false, got 'yes': omit it for a plain op", non_bool_cas),
]


def counts(peer: Peer) -> tuple[int, int]:
    engine = sa.create_engine(peer.sa_engine.url)
    try:
        with engine.connect() as conn:
            return (conn.execute(sa.text("SELECT count(*) FROM txengine_revisions")).scalar(),
                    conn.execute(sa.text("SELECT count(*) FROM txengine_audit")).scalar())
    finally:
        engine.dispose()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_with_a_clear_error_and_changes_nothing(
        peer: Peer, case: Case) -> None:
    with peer.transaction("seed") as tx:
        tx.insert("items", {"_id": 1, "v": 1})
    call, values = case.make(peer)
    before = (peer.snapshot(), counts(peer), len(peer.history()))
    with pytest.raises(case.error, match="^" + re.escape(case.prefix.format(**values))):
        call()
    assert (peer.snapshot(), counts(peer), len(peer.history())) == before
    with Peer.open(peer.sa_engine.url.render_as_string(hide_password=False)) as again:
        assert len(again.history()) == before[2]
        assert again.verify().ok


def test_doc_table_lists_every_case_with_its_error_and_message() -> None:
    rows = [line for line in DOC.read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and not line.startswith("| bad input")]
    table = {row.split("|")[1].strip(): row for row in rows if not set(row) <= set("|- ")}
    assert sorted(table) == sorted(c.name for c in CASES)
    for case in CASES:
        row = table[case.name]
        assert f"`{case.error.__name__}`" in row, case.name
        assert f"`{case.prefix}`" in row, case.name
