"""Access control on the FHIR API: a pure ASGI middleware in front of every ``/fhir`` route.

For each request it (1) verifies the bearer token (401 with ``WWW-Authenticate``, RFC 6750
§3), (2) refuses a suspended system (401), (3) spends one token of the client's rate bucket
(429 with ``Retry-After``), (4) checks the SMART scope of every interaction the request
makes, Bundle entries included (403, ``insufficient_scope``), (5) requires the end-user
context for patient data (403) and the admin scope for registry writes (403), then puts the
:class:`AccessContext` into ``scope["state"]["access"]``.

Public: ``GET /fhir/metadata`` and ``/fhir/.well-known/smart-configuration``; routes outside
``/fhir`` are not this middleware's business (health, metrics, token endpoint, JWKS).
Directory types (Organization, Practitioner, PractitionerRole, Endpoint) need no end-user
context; every other type is patient data. Writes to Endpoint and Organization (the
participant registry) need ``sharedcare/admin`` as well as the write scope.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sharedcare.fhir.errors import FHIRError, Issue, operation_outcome
from sharedcare.fhir.responses import fhir_json
from sharedcare.iam.context import AccessContext
from sharedcare.iam.metrics import record_request_rejected
from sharedcare.iam.scopes import ADMIN_SCOPE, required_text
from sharedcare.iam.service import Iam, Suspended
from sharedcare.iam.tokens import TokenInvalid

DIRECTORY_TYPES = frozenset({"Organization", "Practitioner", "PractitionerRole", "Endpoint"})
REGISTRY_TYPES = frozenset({"Organization", "Endpoint"})
# Writes a system may make without end-user context: a provider registering the people it
# holds records for (IHE PIXm feed, issue 4) acts as a system, and a create or update releases
# no patient data. The write scope is still required; the pix routes check that the caller is
# a provider writing identifiers it owns, and send anyone else back to the end-user rule.
SYSTEM_WRITES = frozenset({("Patient", "c"), ("Patient", "u")})
PUBLIC_FHIR = frozenset({"/fhir/metadata", "/fhir/.well-known/smart-configuration"})
REALM = 'Bearer realm="sharedcare"'
Interaction = tuple[str, str]  # (resource type, one of "cruds")


def interactions(method: str, path: str, if_none_exist: bool = False) -> list[Interaction]:
    """The (type, permission) pairs a FHIR REST request needs (scopes-and-launch-context.html)."""
    segments = [s for s in path.split("/") if s][1:]  # drop "fhir"
    if len(segments) >= 3 and segments[0] == "providers":  # federated ids: /fhir/providers/{P}/{Type}/...
        segments = segments[2:]
    if not segments:
        return []
    if segments[0] in ("$process-message", "$mailbox"):
        # System-to-system messaging (issue 7): no store interaction and no end-user context;
        # the messaging routes check system/MessageHeader.{c,s,r} themselves.
        return []
    rtype, rest = segments[0], segments[1:]
    if method in ("GET", "HEAD"):
        # search-type and history-type are "s"; read, vread and history-instance are "r".
        searching = not rest or rest[0] == "_history" or rest[0].startswith("$")
        return [(rtype, "s" if searching else "r")]
    if method == "POST":
        if rest and rest[0] == "_search":
            return [(rtype, "s")]
        # A conditional create also searches (If-None-Exist).
        return [(rtype, "c"), (rtype, "s")] if if_none_exist and not rest else [(rtype, "c")]
    if method in ("PUT", "PATCH"):
        return [(rtype, "u")]
    if method == "DELETE":
        return [(rtype, "d")]
    return [(rtype, p) for p in "cud"]  # an unknown method is treated as a write of every kind


def bundle_interactions(body: Any, base: str) -> list[Interaction]:
    """The interactions of a batch/transaction Bundle's entries (read as the processor reads them)."""
    if not isinstance(body, dict) or not isinstance(body.get("entry"), list):
        return []
    out: list[Interaction] = []
    for entry in body["entry"]:
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(request, dict):
            continue
        method = str(request.get("method", "")).upper()
        url = str(request.get("url", ""))
        if url.startswith(base + "/"):
            url = url[len(base) + 1 :]
        path = urlsplit(url).path
        out += interactions(method, "/fhir/" + path.lstrip("/"), bool(request.get("ifNoneExist")))
    return out


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


class AuthMiddleware:
    """Bearer tokens, scopes, end-user context and rate limits on ``/fhir``."""

    def __init__(self, app: ASGIApp, *, iam: Iam, max_body_bytes: int = 16 * 1024 * 1024) -> None:
        self.app = app
        self.iam = iam
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        protected = path == "/fhir" or (path.startswith("/fhir/") and path not in PUBLIC_FHIR)
        if scope["type"] != "http" or not protected:
            await self.app(scope, receive, send)
            return
        try:
            context = await self._authenticate(scope)
        except _Refusal as refusal:
            await refusal.response(scope, receive, send)
            return
        except FHIRError as exc:  # the database is unavailable: say so, with the store's shape
            await fhir_json(exc.outcome(), exc.status, exc.headers)(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if method == "POST" and path.rstrip("/") == "/fhir":
            body = await self._read_body(receive)
            if body is None:
                too_large = Issue("too-costly", f"The request body is larger than {self.max_body_bytes} bytes.")
                await fhir_json(operation_outcome(too_large), 413)(scope, receive, send)
                return
            try:
                needed = bundle_interactions(orjson.loads(body), self.iam.settings.fhir_base)
            except orjson.JSONDecodeError:
                needed = []  # the Bundle processor answers 400 and writes nothing
            receive = _replay(body, receive)
        else:
            needed = interactions(method, path, _header(scope, b"if-none-exist") is not None)
        denied = self._check(context, needed)
        if denied is not None:
            reason, message, wanted = denied
            record_request_rejected(reason, context.client_id)
            # issue 5: a refused patient-data request is on the audit trail before the 403
            from sharedcare.consent.gate import audit_refusal

            await audit_refusal(scope, context, message, [rtype for rtype, _ in needed])
            headers: dict[str, str] = {}
            if wanted:  # RFC 6750 §3.1
                headers["WWW-Authenticate"] = f'{REALM}, error="insufficient_scope", scope="{wanted}"'
            outcome = operation_outcome(Issue("forbidden", message))
            await fhir_json(outcome, 403, headers)(scope, receive, send)
            return
        scope.setdefault("state", {})["access"] = context
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope) -> AccessContext:
        """The caller's context after the token, suspension and rate-limit checks."""
        raw = _header(scope, b"authorization") or b""
        scheme, _, token = raw.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            record_request_rejected("invalid_token")
            raise _Refusal(_unauthorized("A bearer access token is required; get one from /oauth2/token."))
        try:
            context = await self.iam.authenticate(token.strip())
        except Suspended as exc:
            record_request_rejected("suspended", exc.client_id)
            raise _Refusal(_unauthorized(exc.description)) from None
        except TokenInvalid as exc:
            record_request_rejected("expired_token" if exc.expired else "invalid_token", exc.client_id)
            raise _Refusal(_unauthorized(exc.description)) from None
        wait = await self.iam.limiter.take(context.client_id)
        if wait is not None:
            record_request_rejected("rate_limited", context.client_id)
            retry = str(max(1, int(wait + 0.999)))
            outcome = operation_outcome(Issue("throttled", f"Rate limit exceeded; retry in {retry} s."))
            raise _Refusal(fhir_json(outcome, 429, {"Retry-After": retry}))
        return context

    @staticmethod
    def _check(context: AccessContext, needed: list[Interaction]) -> tuple[str, str, str | None] | None:
        """None when allowed, else (metric reason, diagnostics, the scope that would allow it)."""
        grants = context.grants
        for rtype, permission in needed:
            if not grants.allows(rtype, permission):
                wanted = required_text(rtype, permission)
                return "insufficient_scope", f"This request needs the scope {wanted} (or a wider one).", wanted
            if rtype in REGISTRY_TYPES and permission in "cud" and not grants.admin:
                message = f"Changing {rtype} resources (the participant registry) needs the scope {ADMIN_SCOPE}."
                return "insufficient_scope", message, ADMIN_SCOPE
            if rtype not in DIRECTORY_TYPES and not context.has_end_user and (rtype, permission) not in SYSTEM_WRITES:
                message = (
                    f"{rtype} is patient data: the access token must carry requesting_user, "
                    "requesting_organization and reason_for_access."
                )
                return "no_end_user", message, None
        return None

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)



class _Refusal(Exception):
    """A request refused before it reaches the app, with the response to send."""

    def __init__(self, response: Response) -> None:
        self.response = response


def _unauthorized(description: str) -> Response:
    """401 with the RFC 6750 §3 challenge and an OperationOutcome."""
    safe = description.replace('"', "'")
    headers = {"WWW-Authenticate": f'{REALM}, error="invalid_token", error_description="{safe}"'}
    return fhir_json(operation_outcome(Issue("login", description)), 401, headers)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the already-read body to the app, then defers to the client."""
    pending: Iterator[Message] = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def replay() -> Message:
        message = next(pending, None)
        return message if message is not None else await receive()

    return replay
