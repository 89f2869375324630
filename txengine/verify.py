"""Verify: recompute what a peer's ledger claims and name every revision that fails.

Checksums, digests and the chain (missing parents, cycles), the authored
script files, on a rooted peer each held revision's signature, and with
``replay`` the live data against a replay of the ledger (:mod:`txengine.replay`).
Nothing is changed; each finding names its revision and says what to do.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .exceptions import TxEngineError
from .keys import peer_of
from .ledger import BASE, descriptor_from_row, payload_of
from .policy import decode_config
from .replay import replay_findings
from .results import Finding, VerifyReport
from .revision import Revision, check_digest, verify_bytes

if TYPE_CHECKING:
    from .keys import Trust
    from .peer import Peer


def report(peer: Peer, replay: bool = False) -> VerifyReport:
    """Recompute every checksum and digest and check the chain; optionally replay.

    With a root key installed, also check each revision's signature as intake did
    at arrival (:meth:`Trust.held_fault`): the signature lies outside the digest,
    so nothing else shows one stripped, swapped or forged in the ledger. Rows that
    already failed a check, descriptors held by a checkpoint (the checkpoint
    vouches for them) and this peer's own ``versions/`` (trusted as files) are not
    checked, and a script this peer authored may carry its own signature; barriers
    are checked last, once every sequencer is known.
    """
    findings: list[Finding] = []
    checked = 0
    trust = peer._trust()
    memo: dict[str, Any] = {}
    barriers: list[tuple[dict[str, Any], float]] = []
    sequencers: dict[str, set[str | None]] = {}
    for row in peer._ledger.all_rows():
        checked += 1
        try:
            d = descriptor_from_row(row)
        except ValueError as exc:  # a JSON column edited into something else
            findings.append(Finding(row.id, (
                f"revision {row.id[:12]}: its ledger row does not decode ({exc}): the row"
                " was altered; restore the ledger from a backup, or clone this peer again")))
            continue
        try:
            if row.state == BASE:  # held by a checkpoint's vector: a descriptor alone,
                if row.payload is None:  # or a config kept for its enrolments
                    check_digest(d)
                else:
                    verify_bytes(d, payload_of(row))
                continue
            verify_bytes(d, payload_of(row))
            if d["kind"] == "data":
                Revision(d, payload_of(row)).ops  # noqa: B018 - parse to check
        except TxEngineError as exc:
            findings.append(Finding(row.id, str(exc)))
            continue
        if trust is None or row.id in peer._script_paths:
            continue
        if d["kind"] == "data":
            finding = _signature_finding(peer, trust, d, row.stored_at, (), memo)
            if finding is not None:
                findings.append(finding)
            continue
        barriers.append((d, row.stored_at))
        if d["kind"] == "config":
            # A forged config, re-checksummed by hand, may not decode: its signature
            # check below names it.
            with contextlib.suppress(TxEngineError):
                sequencers.setdefault(d["partition"], set()).add(
                    decode_config(payload_of(row)).get("sequencer"))
    peer._store.rollback()
    if trust is not None:
        for partition in {d["partition"] for d, _stored_at in barriers}:
            base = peer._engine.bases.get(partition, {}).get("config", {})
            sequencers.setdefault(partition, set()).update(
                (peer._sequencer(partition), base.get("sequencer")))
        for d, stored_at in barriers:
            named = sequencers[d["partition"]]
            if d["kind"] == "script" and peer_of(d["origin"]) == peer.peer_id:
                named = named | {peer.peer_id}  # its author: it was never taken in
            finding = _signature_finding(peer, trust, d, stored_at, named, memo)
            if finding is not None:
                findings.append(finding)
    for rev_id, problem in peer._engine.graph.validate(peer._engine.stubs):
        findings.append(Finding(rev_id, problem))
    findings += peer._verify_scripts()
    if replay:
        findings += replay_findings(peer)
    return VerifyReport(checked, findings)

def _signature_finding(peer: Peer, trust: Trust, d: dict[str, Any], stored_at: float,
                       sequencers: Iterable[str | None],
                       memo: dict[str, Any]) -> Finding | None:
    """Judge one held revision's signature for :func:`report`; name it if it fails.

    ``memo`` keeps what rows share, each computed at its first need: what lies
    below each revoking config (``below``), and when the root key was installed
    (``installed``: a row stored earlier was never checked, and is worded so).
    """

    graph = peer._engine.graph
    below: dict[str, set[str]] = memo.setdefault("below", {})

    def revoker_above(kid: str) -> str | None:
        for config in sorted(trust.enrolment.revokers.get(kid, ())):
            if config in graph:
                if config not in below:
                    below[config] = graph.descendants([config])
                if any(p in below[config] for p in [*d["parents"], *d["depends_on"]]):
                    return config
        return None

    fault = trust.held_fault(d, sequencers, revoker_above)
    if fault is None:
        return None
    if "installed" not in memo:
        at = next((e.at for e in peer._ledger.audit_entries()
                   if e.action == "install_root"), None)
        peer._store.rollback()
        memo["installed"] = None if at is None else _dt.datetime.fromisoformat(at).timestamp()
    installed = memo["installed"]
    return Finding(d["id"], fault.finding(d, installed is not None and stored_at < installed))
