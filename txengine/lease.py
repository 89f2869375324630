"""What both ledgers share about the apply lease: holder names, liveness, checks.

The lease itself (a row in ``txengine_lock`` or a document in MongoDB) is
taken and renewed by each ledger with its own compare-and-set; the rules for
who holds it, whether a holder is dead, and when a write must stop are here,
once.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from .exceptions import StaleLease


class LeaseHolder:
    """Mixin for a ledger: ``peer_id``, ``_lease_token`` and ``_lease_expires`` it must set."""

    peer_id: str
    _lease_token: int | None
    _lease_expires: float
    acquire_lease: Callable[..., bool]
    renew_lease: Callable[[], None]
    """Each ledger takes and renews the lease with its own compare-and-set."""

    def _holder(self) -> str:
        return f"{self.peer_id}@{socket.gethostname()}:{os.getpid()}"

    @staticmethod
    def _holder_dead(holder: str) -> bool:
        """Tell whether a holder on this host is a process that no longer runs."""
        host, _, pid = holder.rpartition("@")[2].rpartition(":")
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return int(pid) != os.getpid() and _is_zombie(int(pid))

    def check_lease(self) -> None:
        """Raise StaleLease when this process's lease has run out."""
        if self._lease_token is None or time.time() >= self._lease_expires:
            raise StaleLease(
                "the apply lease expired before this write: another process may have written;"
                " retry the command"
            )

    def keep_lease(self) -> None:
        """Between the batches of a long intake (a big bundle, sync leg or clone), extend
        the lease this process holds, so it does not run out halfway; raise StaleLease
        when another process took it. Does nothing when no lease is held. Commits."""
        if self._lease_token is None:
            return
        if time.time() < self._lease_expires:
            self.renew_lease()
        else:  # a long step outlasted it: take it again unless another process held it
            self.reclaim_lease()

    def reclaim_lease(self) -> None:
        """Renew the lease this process took before a long pause (planning a million
        revisions can outlast it); raise StaleLease when another process held it since,
        which makes what was planned stale, or when it was never taken."""
        if self._lease_token is None:
            raise StaleLease("no apply lease is held: take it before writing")
        if self.acquire_lease():
            raise StaleLease("another process took the apply lease while this command was"
                             " running, and may have written: run the command again")

    @staticmethod
    def _lost() -> StaleLease:
        """The error for a renewal that found another holder."""
        return StaleLease(
            "the apply lease expired and another process took it: this operation stopped"
            " at a batch boundary; run the command again to finish it"
        )


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False
