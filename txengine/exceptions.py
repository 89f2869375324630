"""One exception hierarchy, rooted at :class:`TxEngineError`.

Every message is one line that says what failed, which revision (when there
is one) and what to do next, so the CLI can print ``str(error)`` as is.
"""

from __future__ import annotations

from collections.abc import Iterable


class TxEngineError(Exception):
    """Base of every error txengine raises on purpose."""


class InvalidInput(TxEngineError, ValueError):
    """Input that txengine refuses before it changes anything."""


class BundleError(InvalidInput):
    """A bundle file is truncated, malformed or does not fit the request; nothing applied."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"bundle {path}: {reason}; nothing was applied")


class MalformedPayload(InvalidInput):
    """A payload or descriptor that is not the JSON txengine expects."""


class UnknownOp(InvalidInput):
    """An op name outside insert, update and delete."""

    def __init__(self, name: object) -> None:
        self.name = name
        super().__init__(
            f"unknown op {name!r}: use one of insert, update, delete"
        )


class InvalidKey(InvalidInput):
    """A document key that is not a str, an int or an ObjectId."""

    def __init__(self, key: object) -> None:
        self.key = key
        super().__init__(
            f"invalid key {key!r} ({type(key).__name__}): keys are str, int or ObjectId"
            " (never floats or booleans)"
        )


class ReservedCollection(InvalidInput):
    """An op that targets a collection txengine keeps for itself."""

    def __init__(self, collection: str) -> None:
        self.collection = collection
        super().__init__(
            f"collection {collection!r} is reserved: ops never write txengine_* or system.*"
            " collections; pick another name"
        )


class OversizePayload(InvalidInput):
    """A payload above the configured byte limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"payload of {size} bytes exceeds the {limit}-byte limit:"
            " split the change into several revisions"
        )


class NonLiteralScript(InvalidInput):
    """A data revision script that is not the literal form the template renders."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        super().__init__(
            f"{path}:{line}: {reason}; a data revision script may hold only the literal"
            " op calls txengine renders (re-export it with `txengine export --scripts`)"
        )


class RevisionError(TxEngineError):
    """Problems with revisions and the graph they form."""


class RevisionNotFound(RevisionError, LookupError):
    """A revision id, prefix or label that names nothing known."""

    def __init__(self, ref: str, referenced_by: str | None = None) -> None:
        self.ref = ref
        self.referenced_by = referenced_by
        by = f" (a parent of {referenced_by})" if referenced_by else ""
        super().__init__(
            f"no revision {ref!r}{by}: run `txengine history` to see the known revisions"
        )


class MissingParent(RevisionError, LookupError):
    """A revision whose parent is not known to this peer."""

    def __init__(self, revision: str, parent: str) -> None:
        self.revision = revision
        self.parent = parent
        super().__init__(
            f"revision {revision[:12]} names parent {parent[:12]}, which this peer does not"
            " have: fetch the parent first (sync or bundle), then retry"
        )


class CycleDetected(RevisionError):
    """Revisions whose parents form a cycle."""

    def __init__(self, revisions: Iterable[str]) -> None:
        self.revisions = sorted(revisions)
        names = ", ".join(r[:12] for r in self.revisions)
        super().__init__(
            f"revisions {names} form a cycle through their parents: a revision graph must be"
            " acyclic; remove or fix one of them"
        )


class AmbiguousRevision(RevisionError, LookupError):
    """A prefix that matches several revisions."""

    def __init__(self, ref: str, candidates: Iterable[str]) -> None:
        self.ref = ref
        self.candidates = sorted(candidates)
        shown = ", ".join(c[:12] for c in self.candidates[:5])
        super().__init__(
            f"{ref!r} matches {len(self.candidates)} revisions ({shown}): give more characters"
        )


class MultipleHeads(RevisionError):
    """A target such as ``head`` that needs one head where there are several."""

    def __init__(self, heads: Iterable[str], argument: str) -> None:
        self.heads = sorted(heads)
        self.argument = argument
        shown = ", ".join(h[:12] for h in self.heads)
        super().__init__(
            f"{argument!r} needs a single head but there are {len(self.heads)} ({shown}):"
            " use 'heads', name one, or `txengine merge heads`"
        )


class InvalidTarget(RevisionError, ValueError):
    """A target expression txengine cannot resolve."""

    def __init__(self, target: str, reason: str) -> None:
        self.target = target
        super().__init__(f"cannot resolve target {target!r}: {reason}")


class ForkedRevision(RevisionError):
    """A known id, or (origin, seq), arriving again with a different digest."""

    def __init__(self, what: str, known: str, new: str) -> None:
        self.what = what
        super().__init__(
            f"{what} is already known with digest {known[:12]} but arrived with {new[:12]}:"
            " refused as forged or forked; nothing was changed"
        )


class IntegrityError(TxEngineError):
    """Stored bytes that do not match their checksum or digest."""


class ChecksumMismatch(IntegrityError):
    """A payload whose SHA-256 differs from the descriptor's checksum."""

    def __init__(self, revision: str, expected: str, actual: str) -> None:
        self.revision = revision
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"revision {revision[:12]}: payload checksum {actual[:12]} does not match the"
            f" descriptor's {expected[:12]}; the payload was altered, refetch it from a peer"
        )


class DigestMismatch(IntegrityError):
    """A descriptor whose digest (or data id) does not match its content."""

    def __init__(self, revision: str, expected: str, actual: str) -> None:
        self.revision = revision
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"revision {revision[:12]}: descriptor digest {actual[:12]} does not match"
            f" {expected[:12]}; the descriptor was altered, refetch it from a peer"
        )


class SignatureError(IntegrityError):
    """A revision whose signature is missing or does not verify (``code``: ``unsigned``,
    ``bad_signature``; subclasses ``unknown_signer``, ``revoked_key``)."""

    code = "bad_signature"

    def __init__(self, revision: str, reason: str, code: str | None = None) -> None:
        self.revision = revision
        self.code = code or type(self).code
        super().__init__(f"revision {revision[:12]} {reason}: refused; nothing was changed")


class UnknownSigner(SignatureError):
    """A revision signed by a key that is not enrolled for its origin's peer id."""

    code = "unknown_signer"

    def __init__(self, revision: str, key: str, origin_peer: str,
                 enrolled_for: str | None = None) -> None:
        self.key = key
        self.origin_peer = origin_peer
        whose = ("is not enrolled" if enrolled_for is None
                 else f"belongs to peer {enrolled_for!r}, not to its origin {origin_peer!r}")
        super().__init__(revision, f"is signed by key {key}, which {whose}: the root holder"
                         f" enrolls {origin_peer!r}'s key with `txengine keys enroll`")


class RevokedKey(SignatureError):
    """A revision signed by a revoked key, outside the revoking barrier's ancestry."""

    code = "revoked_key"

    def __init__(self, revision: str, key: str, barrier: str) -> None:
        self.key = key
        self.barrier = barrier
        super().__init__(revision, f"is signed by key {key}, revoked by {barrier[:12]}, and"
                         " is not in that barrier's ancestry; its writer must enroll a new key")


class SnapshotMismatch(IntegrityError):
    """A snapshot whose documents do not hash to its checkpoint's content digest."""

    def __init__(self, path: str, checkpoint: str, expected: str, actual: str) -> None:
        self.path = path
        self.checkpoint = checkpoint
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"snapshot {path} does not match checkpoint {checkpoint[:12]}: its documents hash"
            f" to {actual[:12]}, the checkpoint says {expected[:12]}; nothing was loaded,"
            " fetch the snapshot again from the source"
        )


class IrreversibleRevision(TxEngineError):
    """A revision that cannot be undone (or reverted) as asked."""

    def __init__(self, revision: str, reason: str) -> None:
        self.revision = revision
        super().__init__(f"revision {revision[:12]} cannot be undone: {reason}")


class UntrustedScript(TxEngineError):
    """Script code that did not come from a trusted author."""

    code = "untrusted_code"


class ConflictRejected(TxEngineError):
    """A write refused by a collection's conflict policy."""


class LockTimeout(TxEngineError):
    """The apply lease is held by another live process."""

    def __init__(self, holder: str, seconds: float) -> None:
        self.holder = holder
        super().__init__(
            f"the apply lock is held by {holder}; gave up after {seconds:.1f}s:"
            " wait for it to finish, or stop it"
        )


class StaleLease(TxEngineError):
    """A write attempted under a lease that another process has since taken."""


class PinnedPeer(TxEngineError):
    """A write on a peer that a local downgrade pinned."""

    def __init__(self) -> None:
        super().__init__(
            "this peer is pinned by a local downgrade and refuses new writes:"
            " run `txengine upgrade heads` to unpin it"
        )


class DocumentNotFound(TxEngineError, LookupError):
    """An update or delete of a document that does not exist."""

    def __init__(self, collection: str, key: object) -> None:
        self.collection = collection
        self.key = key
        super().__init__(
            f"no document {key!r} in {collection!r}: insert it first, or check the key's type"
            " (the str '1' and the int 1 are different keys)"
        )


class StoreError(TxEngineError):
    """A store URL or table txengine cannot use."""


class ConfigError(TxEngineError):
    """A missing or invalid configuration (alembic.ini, --store, peer id)."""


class CredentialNotFound(TxEngineError, LookupError):
    """A peer name with no token on this store."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no peer {name!r} holds a token here: `txengine peers list` shows"
                         " who does")


class RemoteError(TxEngineError):
    """A sync server refused a request; ``code`` is the server's stable error code."""

    def __init__(self, url: str, status: int, code: str, message: str) -> None:
        self.url = url
        self.status = status
        self.code = code
        super().__init__(f"server {url} refused the request ({status} {code}): {message}")


class Unauthorized(RemoteError):
    """A sync server that does not accept the token sent (or none was sent)."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(url, 401, "unauthorized", f"{message}; pass the token `txengine peers"
                         " add NAME` printed on the server (--token or TXENGINE_TOKEN)")


class ServerUnreachable(TxEngineError):
    """A sync server that did not answer, even after the retries."""

    def __init__(self, url: str, attempts: int, reason: str) -> None:
        self.url = url
        self.attempts = attempts
        super().__init__(f"server {url} did not answer after {attempts} attempts ({reason}):"
                         " check that `txengine serve` runs there, then sync again")
