"""Config revisions: each partition's conflict policy, synced collections and sequencer.

A ``config`` revision is a barrier whose payload is canonical JSON::

    {"policies": {"orders": "reject", "notes": "resolver:keep_longest"},
     "default": "rules", "sync": ["orders", "notes"] | null, "sequencer": "hub",
     "enroll": {"phone": "<base64 public key>"}, "revoke": ["<key id>"]}

Every field is optional; ``enroll`` and ``revoke`` count only in a config
signed by the deployment's root key (see :mod:`txengine.keys`), and
accumulate instead of overriding. a later config (in canonical order) overrides the
fields it names. With no config revision the built-in default holds, the same
on every peer: the rules of DESIGN.md for every collection, every collection
synced, and no sequencer (so no barrier is accepted from sync).

Policies:

* ``rules`` — last writer wins per field, delete wins, ``inc`` adds (ops.py);
* ``reject`` — a revision with any conflict in the collection is integrated
  as a no-op and marked conflicted;
* ``resolver:NAME`` — the function registered under NAME decides the
  document. It must be deterministic and registered on every peer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .exceptions import ConfigError, MalformedPayload
from .keys import public_from_text
from .ops import Op, State
from .values import canonical

RULES = "rules"
REJECT = "reject"

Resolver = Callable[[Op, State, str, str], State]
"""``resolver(op, current_state, revision_id, conflict_reason) -> new state``."""

_RESOLVERS: dict[str, Resolver] = {}


def register_resolver(name: str) -> Callable[[Resolver], Resolver]:
    """Register a conflict resolver under ``name`` (decorator); every peer must do the same."""
    def deco(fn: Resolver) -> Resolver:
        _RESOLVERS[name] = fn
        return fn
    return deco


def resolver(name: str) -> Resolver:
    try:
        return _RESOLVERS[name]
    except KeyError:
        raise ConfigError(
            f"conflict resolver {name!r} is named by a config revision but not registered"
            " on this peer: register it with txengine.policy.register_resolver") from None


def _check_policy(value: Any) -> str:
    if value in (RULES, REJECT) or (isinstance(value, str) and value.startswith("resolver:")
                                    and len(value) > 9):
        return value
    raise MalformedPayload(f"conflict policy {value!r} is not valid: use 'rules', 'reject'"
                           " or 'resolver:NAME'")


@dataclass(frozen=True)
class Policy:
    """The effective configuration of one partition at one point of canonical order."""

    policies: dict[str, str] = field(default_factory=dict)
    default: str = RULES
    sync: tuple[str, ...] | None = None
    sequencer: str | None = None

    def for_collection(self, collection: str) -> str:
        return self.policies.get(collection, self.default)

    def syncs(self, collections: Iterable[str]) -> bool:
        """Say whether a revision writing ``collections`` is exchanged by sync."""
        return self.sync is None or all(c in self.sync for c in collections)

    def merged(self, config: dict[str, Any]) -> Policy:
        """Return this policy with one config revision's fields laid over it."""
        return Policy(
            policies={**self.policies, **config.get("policies", {})},
            default=config.get("default", self.default),
            sync=tuple(config["sync"]) if config.get("sync") is not None else (
                None if "sync" in config else self.sync),
            sequencer=config.get("sequencer", self.sequencer),
        )


DEFAULT = Policy()


def encode_config(policies: dict[str, str] | None = None, default: str | None = None,
                  sync: list[str] | None = None, sequencer: str | None = None,
                  clear_sync: bool = False, enroll: dict[str, str] | None = None,
                  revoke: list[str] | None = None) -> bytes:
    """Return the canonical payload of a config revision (only the fields given)."""
    body: dict[str, Any] = {}
    if policies:
        body["policies"] = {c: _check_policy(p) for c, p in policies.items()}
    if default is not None:
        body["default"] = _check_policy(default)
    if sync is not None or clear_sync:
        body["sync"] = None if sync is None else sorted(sync)
    if sequencer is not None:
        body["sequencer"] = sequencer
    if enroll:
        body["enroll"] = dict(enroll)
    if revoke:
        body["revoke"] = sorted(revoke)
    return canonical(body)


def decode_config(payload: bytes) -> dict[str, Any]:
    """Parse and check a config payload."""
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise MalformedPayload(f"config payload is not JSON: {exc}") from exc
    if not isinstance(body, dict) or set(body) - {"policies", "default", "sync", "sequencer",
                                                  "enroll", "revoke"}:
        raise MalformedPayload("a config payload is an object with policies, default, sync,"
                               " sequencer, enroll and revoke")
    enroll, revoke = body.get("enroll", {}), body.get("revoke", [])
    if not (isinstance(enroll, dict) and all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in enroll.items())):
        raise MalformedPayload("config enroll must map peer ids to public keys")
    for text in enroll.values():
        public_from_text(text)
    if not (isinstance(revoke, list) and all(isinstance(k, str) for k in revoke)):
        raise MalformedPayload("config revoke must be a list of key ids")
    for p in body.get("policies", {}).values():
        _check_policy(p)
    if "default" in body:
        _check_policy(body["default"])
    return body
