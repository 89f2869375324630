"""Replay: rebuild a peer's applied chain in a scratch SQLite store and compare.

``verify --replay`` uses it to report drift between what the ledger says and
what the live tables hold — a row edited behind txengine's back, a lost
write — naming each collection and key that differs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .ledger import descriptor_from_row, payload_of

if TYPE_CHECKING:
    from .peer import Finding, Peer


def replay_findings(peer: Peer) -> list[Finding]:
    """Replay ``peer``'s applied revisions into a scratch store; return every difference."""
    from .peer import Finding, Peer

    applied = list(peer._engine.applied)
    rows = peer._ledger.full_rows(applied)
    peer._store.rollback()
    items = [(descriptor_from_row(rows[r]), payload_of(rows[r])) for r in
             peer._engine.graph.canonical_order(applied)]
    with tempfile.TemporaryDirectory(prefix="txengine-replay-") as scratch:
        with Peer.open(str(Path(scratch) / "replay.db"), peer_id=peer.peer_id,
                       script_location=peer.script_location) as fresh:
            fresh._take_lease()
            fresh._engine.receive([i for i in items if i[0]["id"] not in fresh._engine.graph],
                                  trusted=True)
            fresh._execute("upgrade", "heads", None)
            expected = fresh.snapshot()
    actual = peer.snapshot()
    findings = []
    for key in sorted(set(expected) | set(actual)):
        partition, collection, text = key
        want, have = expected.get(key), actual.get(key)
        if want == have:
            continue
        if have is None:
            assert want is not None  # the key is in one snapshot or the other
            problem = f"missing from the live data; replay has {want[0]}"
        elif want is None:
            problem = f"in the live data ({have[0]}) but not in the replay"
        else:
            problem = f"live {have[0]} differs from replay {want[0]}"
        findings.append(Finding(None, f"{partition}/{collection}/{text}: {problem}",
                                collection=collection, key=text))
    return findings
