"""Who may do what: principals, their grants on resources, and the check itself (pure).

The model follows RocketMQ's ACL 2.0, sized for this service. A *principal* is one client
identity (a service, an operator). It holds *grants*: a resource pattern and the actions allowed
on it. Resources are written ``type:name``:

=====================  ==========================  =============================================
resource               actions                     what they allow
=====================  ==========================  =============================================
``topic:NAME``         ``produce``, ``consume``    send (also delayed, transactional) / receive,
                                                   look up messages by id or key
``group:NAME``         ``consume``, ``reset``      receive, ack, nack, lag / move the offsets
``producer_group:N``   ``check``, ``resolve``      answer check-backs / prepare, commit, rollback
``cluster``            ``admin``, ``metrics``      everything / scrape ``/metrics``
=====================  ==========================  =============================================

A name pattern is exact (``orders``) or a prefix ending in ``*`` (``orders-*``; ``*`` alone is
every name). An admin principal holds every action on every resource. Nothing else is implied:
``reset`` on a group does not allow ``consume`` on it.

This module knows nothing of HTTP or files; :mod:`tempomq.auth.principals` builds principals from
the auth file and :mod:`tempomq.auth.routes` says which resources a request touches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TOPIC = "topic"
GROUP = "group"
PRODUCER_GROUP = "producer_group"
CLUSTER = "cluster"

PRODUCE = "produce"
CONSUME = "consume"
RESET = "reset"
CHECK = "check"
RESOLVE = "resolve"
ADMIN = "admin"
METRICS = "metrics"

#: The actions each resource type has; a grant naming any other is refused when loaded.
ACTIONS: Mapping[str, frozenset[str]] = {
    TOPIC: frozenset({PRODUCE, CONSUME}),
    GROUP: frozenset({CONSUME, RESET}),
    PRODUCER_GROUP: frozenset({CHECK, RESOLVE}),
    CLUSTER: frozenset({ADMIN, METRICS}),
}


def resource(kind: str, name: str = "") -> str:
    """The resource string ``kind:name`` (``cluster`` has no name)."""
    return f"{kind}:{name}" if name else kind


def split_resource(text: str) -> tuple[str, str]:
    """``"topic:orders"`` → ``("topic", "orders")``; raises ValueError for an unknown type."""
    kind, _, name = text.partition(":")
    if kind not in ACTIONS:
        raise ValueError(f"unknown resource type {kind!r} in {text!r}; use {', '.join(ACTIONS)}")
    if kind == CLUSTER:
        if name:
            raise ValueError("'cluster' takes no name")
    elif not name:
        raise ValueError(f"{text!r} needs a name or pattern after '{kind}:'")
    return kind, name


@dataclass(frozen=True, slots=True)
class Grant:
    """Actions on every resource of one type whose name matches ``pattern``."""

    kind: str
    pattern: str
    actions: frozenset[str]

    def matches(self, kind: str, name: str) -> bool:
        if kind != self.kind:
            return False
        if self.pattern.endswith("*"):
            return name.startswith(self.pattern[:-1])
        return name == self.pattern


def parse_grant(resource_text: str, actions: Iterable[str]) -> Grant:
    """A grant from the auth file's ``resource: [actions]``; ValueError names what is wrong."""
    kind, pattern = split_resource(resource_text)
    if "*" in pattern[:-1]:
        raise ValueError(f"{resource_text!r}: '*' may only end a pattern")
    wanted = frozenset(actions)
    unknown = wanted - ACTIONS[kind]
    if unknown or not wanted:
        allowed = ", ".join(sorted(ACTIONS[kind]))
        got = sorted(wanted)
        raise ValueError(f"{resource_text!r}: actions must be some of {allowed}, got {got}")
    return Grant(kind, pattern, wanted)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: ``per_s`` requests a second on average, bursts of up to ``burst``."""

    per_s: float
    burst: float


@dataclass(frozen=True, slots=True)
class Principal:
    """One client identity and what it may do. ``admin`` allows everything."""

    name: str
    admin: bool = False
    grants: tuple[Grant, ...] = ()
    #: Overrides the server's default rate limit for this principal; None: the default.
    rate_limit: RateLimit | None = None
    #: Memo of (kind, name, action) -> allowed; grants are immutable, so answers never change.
    _memo: dict[tuple[str, str, str], bool] = field(
        default_factory=dict, compare=False, repr=False
    )

    def allows(self, action: str, kind: str, name: str = "") -> bool:
        if self.admin:
            return True
        key = (kind, name, action)
        known = self._memo.get(key)
        if known is None:
            known = any(action in g.actions and g.matches(kind, name) for g in self.grants)
            if len(self._memo) < 4096:  # bounded: names come from requests
                self._memo[key] = known
        return known

    def allows_any(self, actions: Iterable[str], kind: str, name: str) -> bool:
        return any(self.allows(a, kind, name) for a in actions)


#: The principal of every request when auth is off; also what an admin token maps to.
ANONYMOUS = Principal("anonymous", admin=True)
