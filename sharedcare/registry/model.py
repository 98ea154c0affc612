"""A participant system as a plain value, its validation, and its FHIR representation.

See the package docstring for the mapping onto Organization and Endpoint resources.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import orjson
import structlog
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey

from sharedcare.iam.scopes import is_valid as is_valid_scope

log = structlog.get_logger("sharedcare.registry")

HUB = "https://sharedcare.example.org/fhir"
CLIENT_ID_SYSTEM = f"{HUB}/Id/client-id"
EXT = f"{HUB}/StructureDefinition/"
HUB_CONNECTION_TYPES = f"{HUB}/CodeSystem/endpoint-connection-type"
SYSTEM_CONNECTION = "smart-backend-services"
HL7_CONNECTION_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
PAYLOAD_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"

KINDS = ("provider", "consumer", "both")
STATUSES = ("active", "suspended")
# No dots: ``{id}.fhir`` and ``{id}.msg`` name the system's other Endpoints and must not collide.
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,57}$")
ODS_RE = re.compile(r"^[A-Za-z0-9]{2,12}$")
MAX_JWKS_KEYS = 20


class RegistryError(ValueError):
    """A participant system that cannot be registered as given."""


@dataclass(frozen=True)
class System:
    """One participant system; ``client_id`` is its OAuth2 client id."""

    client_id: str
    kind: str
    name: str
    scopes: tuple[str, ...]
    organization: str | None = None  # ODS code
    organization_id: str | None = None  # id of the Organization resource
    organization_name: str | None = None
    fhir_base: str | None = None
    identifier_systems: tuple[str, ...] = ()
    messaging_endpoint: str | None = None
    jwks_url: str | None = None
    jwks: dict[str, Any] | None = None
    status: str = "active"
    environment: str = "live"
    keys: KeySet | None = field(default=None, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def is_provider(self) -> bool:
        return self.kind in ("provider", "both")


# -- validation -----------------------------------------------------------------------------
def check_url(value: str, what: str, *, https_unless_local: bool = False) -> str:
    """``value`` if it is an absolute http(s) URL; JWKS URLs must be https except on loopback."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryError(f"{what} must be an absolute http(s) URL, not {value!r}")
    if https_unless_local and parts.scheme != "https" and not _loopback(parts.hostname):
        raise RegistryError(f"{what} must use https (plain http only on this machine): {value!r}")
    return value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_jwks(value: Any) -> KeySet:
    """A client's public JWKS: RSA (≥ 2048 bits) or EC P-384 signing keys, each with a kid."""
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list) or not value["keys"]:
        raise RegistryError('a JWKS is a JSON object {"keys": [...]} with at least one key')
    if len(value["keys"]) > MAX_JWKS_KEYS:
        raise RegistryError(f"a JWKS may hold at most {MAX_JWKS_KEYS} keys")
    kids: set[str] = set()
    for raw in value["keys"]:
        if not isinstance(raw, dict) or not isinstance(raw.get("kid"), str) or not raw["kid"]:
            raise RegistryError("every key in the JWKS needs a kid")
        if raw.get("kty") not in ("RSA", "EC"):
            raise RegistryError(f"key {raw['kid']!r} must be RSA (RS384) or EC P-384 (ES384)")
        if "d" in raw or "p" in raw:
            raise RegistryError(f"key {raw['kid']!r} holds private key material; register public keys only")
        if raw["kid"] in kids:
            raise RegistryError(f"kid {raw['kid']!r} appears twice in the JWKS")
        kids.add(raw["kid"])
    try:
        keys = KeySet.import_key_set(value)  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise RegistryError(f"the JWKS does not parse: {exc}") from None
    for key in keys:
        if isinstance(key, RSAKey):
            if key.raw_value.key_size < 2048:  # type: ignore[union-attr]
                raise RegistryError(f"RSA key {key.kid!r} is shorter than 2048 bits")
        elif not (isinstance(key, ECKey) and key.curve_name == "P-384"):
            raise RegistryError(f"key {key.kid!r} must be RSA (RS384) or EC P-384 (ES384)")
    return keys


def new_system(
    *,
    client_id: str,
    kind: str,
    name: str,
    scopes: str | list[str] | tuple[str, ...],
    organization: str | None = None,
    fhir_base: str | None = None,
    identifier_systems: list[str] | tuple[str, ...] = (),
    messaging_endpoint: str | None = None,
    jwks_url: str | None = None,
    jwks: dict[str, Any] | None = None,
    environment: str = "live",
) -> System:
    """Validate what an operator registers; RegistryError says what to fix."""
    if not CLIENT_ID_RE.match(client_id or ""):
        raise RegistryError(f"id {client_id!r} must be 1-58 letters, digits or hyphens")
    if kind not in KINDS:
        raise RegistryError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not name or not name.strip() or len(name) > 200:
        raise RegistryError("name must be 1-200 characters")
    if organization is not None and not ODS_RE.match(organization):
        raise RegistryError(f"organization {organization!r} is not an ODS code")
    provider = kind in ("provider", "both")
    if provider and not fhir_base:
        raise RegistryError("a provider needs --fhir-base, the base URL of its FHIR API")
    if not provider and (fhir_base or identifier_systems):
        raise RegistryError("only providers have a FHIR base URL and identifier systems")
    if fhir_base:
        check_url(fhir_base, "the FHIR base URL")
    for uri in identifier_systems:
        if not uri or ":" not in uri:
            raise RegistryError(f"identifier system {uri!r} must be a URI")
    if messaging_endpoint:
        check_url(messaging_endpoint, "the messaging endpoint")
    if bool(jwks_url) == bool(jwks):
        raise RegistryError("give exactly one of a JWKS URL and a registered JWKS")
    keys = None
    if jwks_url:
        check_url(jwks_url, "the JWKS URL", https_unless_local=True)
    else:
        keys = parse_jwks(jwks)
        jwks = dict(keys.as_dict(private=False))  # public parts only, normalised
    scope_list = scopes.split() if isinstance(scopes, str) else list(scopes)
    bad = [s for s in scope_list if not is_valid_scope(s)]
    if not scope_list or bad:
        raise RegistryError(
            f"scopes must be SMART system scopes (system/Type.read, system/Type.rs, ...) or "
            f"sharedcare/admin; not {', '.join(bad) or '(none)'}"
        )
    if not environment or len(environment) > 64:
        raise RegistryError("environment must be 1-64 characters")
    return System(
        client_id=client_id,
        kind=kind,
        name=name.strip(),
        scopes=tuple(dict.fromkeys(scope_list)),
        organization=organization,
        fhir_base=fhir_base.rstrip("/") if fhir_base else None,
        identifier_systems=tuple(dict.fromkeys(identifier_systems)),
        messaging_endpoint=messaging_endpoint,
        jwks_url=jwks_url,
        jwks=jwks,
        environment=environment,
        keys=keys,
    )


# -- FHIR representation --------------------------------------------------------------------
def _ref(system: System) -> dict[str, str]:
    ref = {"reference": f"Organization/{system.organization_id}"}
    if system.organization_name:
        ref["display"] = system.organization_name
    return ref


def organization_resource(system: System) -> dict[str, Any]:
    """The Organization for a participant the registry has not seen before."""
    org: dict[str, Any] = {"resourceType": "Organization", "id": system.organization_id}
    if system.organization:
        org["identifier"] = [{"system": ODS_SYSTEM, "value": system.organization}]
    org.update(active=True, name=system.organization_name or system.name)
    return org


def endpoint_resources(system: System) -> list[dict[str, Any]]:
    """The system's Endpoints: its registration, then its FHIR API and messaging addresses."""
    ident = [{"system": CLIENT_ID_SYSTEM, "value": system.client_id}]
    ext: list[dict[str, Any]] = [
        {"url": EXT + "system-kind", "valueCode": system.kind},
        {"url": EXT + "allowed-scopes", "valueString": " ".join(system.scopes)},
        {"url": EXT + "environment", "valueString": system.environment},
    ]
    ext += [{"url": EXT + "identifier-system", "valueUri": u} for u in system.identifier_systems]
    if system.jwks is not None:
        ext.append({"url": EXT + "jwks", "valueString": orjson.dumps(system.jwks).decode()})
    common = {"identifier": ident, "status": system.status, "managingOrganization": _ref(system)}
    out: list[dict[str, Any]] = [
        {
            "resourceType": "Endpoint",
            "id": system.client_id,
            "extension": ext,
            **common,
            "connectionType": {
                "system": HUB_CONNECTION_TYPES,
                "code": SYSTEM_CONNECTION,
                "display": "SMART Backend Services client",
            },
            "name": system.name,
            "payloadType": [{"coding": [{"system": PAYLOAD_TYPES, "code": "none"}]}],
            "address": system.jwks_url or f"urn:sharedcare:client:{system.client_id}",
        }
    ]
    for suffix, code, address, label in (
        ("fhir", "hl7-fhir-rest", system.fhir_base, "FHIR API"),
        ("msg", "hl7-fhir-msg", system.messaging_endpoint, "messaging"),
    ):
        if address:
            out.append(
                {
                    "resourceType": "Endpoint",
                    "id": f"{system.client_id}.{suffix}",
                    **common,
                    "connectionType": {"system": HL7_CONNECTION_TYPES, "code": code},
                    "name": f"{system.name} {label}",
                    "payloadType": [{"coding": [{"system": PAYLOAD_TYPES, "code": "any"}]}],
                    "payloadMimeType": ["application/fhir+json"],
                    "address": address,
                }
            )
    return out


def _connection(endpoint: dict[str, Any]) -> str | None:
    ct = endpoint.get("connectionType") or {}
    return ct.get("code") if isinstance(ct, dict) else None


def _extensions(endpoint: dict[str, Any], name: str) -> list[Any]:
    return [
        next((v for k, v in e.items() if k.startswith("value")), None)
        for e in endpoint.get("extension") or []
        if isinstance(e, dict) and e.get("url") == EXT + name
    ]


def system_from_resources(
    endpoints: list[dict[str, Any]], organizations: dict[str, dict[str, Any]]
) -> System | None:
    """Read a system back from its Endpoints (and Organizations by id); None if not registered.

    Resources edited through the FHIR API are read leniently: an unusable JWKS or scope is
    logged and left out, so a bad edit locks the system out rather than widening access.
    """
    reg = next((e for e in endpoints if _connection(e) == SYSTEM_CONNECTION), None)
    if reg is None:
        return None
    cid = reg["id"]
    others = {_connection(e): e for e in endpoints if e is not reg and e.get("status") != "entered-in-error"}
    org_id = str((reg.get("managingOrganization") or {}).get("reference", "")).removeprefix("Organization/")
    org = organizations.get(org_id) or {}
    ods = next(
        (i.get("value") for i in org.get("identifier") or [] if i.get("system") == ODS_SYSTEM), None
    )
    kind = (_extensions(reg, "system-kind") or ["consumer"])[0]
    scopes = tuple(s for s in str((_extensions(reg, "allowed-scopes") or [""])[0]).split() if is_valid_scope(s))
    keys = jwks = None
    raw_jwks = (_extensions(reg, "jwks") or [None])[0]
    if raw_jwks:
        try:
            jwks = orjson.loads(raw_jwks)
            keys = parse_jwks(jwks)
        except (orjson.JSONDecodeError, RegistryError) as exc:
            log.error("registered JWKS unusable; the system cannot authenticate", client_id=cid, error=str(exc))
            jwks = keys = None
    address = str(reg.get("address", ""))
    status = reg.get("status")
    fhir = others.get("hl7-fhir-rest")
    msg = others.get("hl7-fhir-msg")
    return System(
        client_id=cid,
        kind=kind if kind in KINDS else "consumer",
        name=str(reg.get("name") or cid),
        scopes=scopes,
        organization=ods,
        organization_id=org_id or None,
        organization_name=org.get("name"),
        fhir_base=fhir.get("address") if fhir else None,
        identifier_systems=tuple(str(u) for u in _extensions(reg, "identifier-system") if u),
        messaging_endpoint=msg.get("address") if msg else None,
        jwks_url=address if address.startswith(("https://", "http://")) else None,
        jwks=jwks,
        status="active" if status == "active" else "suspended",
        environment=str((_extensions(reg, "environment") or ["live"])[0]),
        keys=keys,
    )


def with_status(system: System, status: str) -> System:
    if status not in STATUSES:
        raise RegistryError(f"status must be one of {', '.join(STATUSES)}")
    return replace(system, status=status)
