"""SMART scopes for backend services, in v1 and v2 syntax, and the checks made against them.

Only the ``system/`` context applies to client-credentials tokens
(hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html). A scope names a resource
type (or ``*``) and a set of permissions from SMART v2's ``cruds`` letters:
c=create, r=read (read, vread, instance history), u=update, d=delete,
s=search (type search, type history). SMART v1's ``read`` is ``rs``, ``write`` is ``cud``
and ``*`` is ``cruds``. ``sharedcare/admin`` is the hub's own scope for registry
management. Granular v2 scopes (``?param=value``) are not supported and are never granted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ADMIN_SCOPE = "sharedcare/admin"
LETTERS = "cruds"
ALL = frozenset(LETTERS)
V1_PERMISSIONS = {"read": frozenset("rs"), "write": frozenset("cud"), "*": ALL}
_SCOPE_RE = re.compile(r"^system/(\*|[A-Z][A-Za-z]{1,63})\.([a-z*]+)$")
MAX_SCOPES = 100


@dataclass(frozen=True, slots=True)
class Scope:
    """One resource scope: a type (or ``*``) and the permissions it grants."""

    resource: str
    permissions: frozenset[str]


def parse_scope(text: str) -> Scope | None:
    """The resource scope ``text`` names, or None if it is not a supported system scope."""
    match = _SCOPE_RE.match(text)
    if match is None:
        return None
    resource, perms = match.groups()
    if perms in V1_PERMISSIONS:
        return Scope(resource, V1_PERMISSIONS[perms])
    # v2: letters in the order c, r, u, d, s, each at most once (scopes-and-launch-context.html#scopes-for-requesting-fhir-resources)
    if not perms or "".join(ch for ch in LETTERS if ch in perms) != perms:
        return None
    return Scope(resource, frozenset(perms))


def is_valid(text: str) -> bool:
    """True for a scope this hub can grant: a system resource scope or the admin scope."""
    return text == ADMIN_SCOPE or parse_scope(text) is not None


@dataclass(frozen=True, slots=True)
class Grants:
    """What a set of scopes allows, precomputed once per token for cheap per-request checks."""

    by_type: dict[str, frozenset[str]] = field(default_factory=dict)
    wildcard: frozenset[str] = frozenset()
    admin: bool = False

    @classmethod
    def of(cls, scopes: list[str] | tuple[str, ...]) -> Grants:
        by_type: dict[str, set[str]] = {}
        wildcard: set[str] = set()
        admin = False
        for text in scopes:
            if text == ADMIN_SCOPE:
                admin = True
                continue
            scope = parse_scope(text)
            if scope is None:
                continue
            if scope.resource == "*":
                wildcard |= scope.permissions
            else:
                by_type.setdefault(scope.resource, set()).update(scope.permissions)
        return cls({k: frozenset(v) for k, v in by_type.items()}, frozenset(wildcard), admin)

    def allows(self, resource: str, permission: str) -> bool:
        """True when ``permission`` (one of ``cruds``) is granted on ``resource``."""
        return permission in self.wildcard or permission in self.by_type.get(resource, ())

    def covers(self, scope: Scope) -> bool:
        """True when every permission of ``scope`` is granted by these grants."""
        if scope.resource == "*":
            return scope.permissions <= self.wildcard
        return scope.permissions <= (self.wildcard | self.by_type.get(scope.resource, frozenset()))


def grant(requested: str, allowed: tuple[str, ...]) -> list[str]:
    """The requested scopes that ``allowed`` covers, in request order (SMART lets a server grant less)."""
    ceiling = Grants.of(allowed)
    out: list[str] = []
    for text in requested.split()[:MAX_SCOPES]:
        if text in out:
            continue
        if text == ADMIN_SCOPE:
            if ceiling.admin:
                out.append(text)
            continue
        scope = parse_scope(text)
        if scope is not None and ceiling.covers(scope):
            out.append(text)
    return out


def required_text(resource: str, permission: str) -> str:
    """The v2 scope a client needs for one permission, for error messages."""
    return f"system/{resource}.{permission}"
