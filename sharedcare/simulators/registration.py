"""A provider simulator registering its people with the hub's patient index (IHE PIXm ITI-104).

For each person: ``PUT {hub}/fhir/Patient?identifier={local_system}|{local_id}`` with a Patient
carrying the local and NHS number identifiers, name, birth date, gender and postcode, under a
SMART Backend Services token of the provider system (``system/Patient.u``, no end-user claims).

The hub may not be up yet when a simulator starts (the demo starts everything at once), so the
first token is retried with exponential backoff and jitter for ``ready_timeout`` seconds; each PUT
is retried on connection errors, 429 and 5xx. A 4xx is a rejection: it is not retried, and
:class:`RegistrationError` lists the rejections once every person has been tried.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx

from sharedcare.iam.client import sign_assertion, token_form
from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM

if TYPE_CHECKING:
    from joserfc.jwk import ECKey, RSAKey

    from sharedcare.simulators.clinical import SimPerson
    from sharedcare.simulators.provider import ProviderConfig

TokenProvider = Callable[[], Awaitable[str]]
Progress = Callable[[int, int], None]  # (done, total)
REGISTER_SCOPE: Final = "system/Patient.u"


class RegistrationError(RuntimeError):
    """The hub never became ready, or rejected some people (``failures``: person, reason)."""

    def __init__(
        self, message: str, registered: int = 0, failures: list[tuple[str, str]] | None = None
    ):
        super().__init__(message)
        self.registered = registered
        self.failures = failures or []


class _Retry(Exception):
    """A failure worth trying again (the hub not up, overloaded or restarting)."""


def hub_root(hub_base: str) -> str:
    """The hub's root URL, whether given as ``https://hub`` or ``https://hub/fhir``."""
    base = hub_base.rstrip("/")
    return base.removesuffix("/fhir")


class SmartToken:
    """An access token from the hub's token endpoint (SMART Backend Services), cached until
    30 s before it expires. Await the instance for a token; ``invalidate()`` after a 401."""

    def __init__(
        self,
        hub_base: str,
        client_id: str,
        key: ECKey | RSAKey,
        scope: str = REGISTER_SCOPE,
        *,
        end_user: dict[str, Any] | None = None,
        token_url: str | None = None,
        http: httpx.AsyncClient | None = None,
    ):
        self.hub = hub_root(hub_base)
        self.client_id = client_id
        self.key = key
        self.scope = scope
        self.end_user = end_user
        self.token_url = token_url
        self._http = http
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._token = None

    async def __call__(self) -> str:
        async with self._lock:
            if self._token is None or time.monotonic() > self._expires:
                await self._fetch()
            assert self._token is not None
            return self._token

    async def _fetch(self) -> None:
        http = self._http or httpx.AsyncClient(timeout=10)
        try:
            if self.token_url is None:
                # The assertion's aud must be the token URL the hub advertises.
                config = await http.get(f"{self.hub}/fhir/.well-known/smart-configuration")
                _raise_for_retry(config)
                config.raise_for_status()
                self.token_url = str(config.json()["token_endpoint"])
            assertion = sign_assertion(
                self.key, self.client_id, self.token_url, end_user=self.end_user
            )
            response = await http.post(self.token_url, data=token_form(assertion, self.scope))
            _raise_for_retry(response)
            if response.status_code != 200:
                # invalid_client while the demo is still registering the system: worth a retry
                raise _Retry(
                    f"token endpoint answered {response.status_code}: {response.text[:300]}"
                )
            body = response.json()
            self._token = str(body["access_token"])
            self._expires = time.monotonic() + max(float(body.get("expires_in", 300)) - 30, 5)
        except httpx.TransportError as exc:
            raise _Retry(f"cannot reach the hub at {self.hub}: {exc!r}") from None
        finally:
            if self._http is None:
                await http.aclose()


def _raise_for_retry(response: httpx.Response) -> None:
    if response.status_code == 429 or response.status_code >= 500:
        raise _Retry(f"{response.request.url} answered {response.status_code}")


def pixm_patient(person: SimPerson, identifier_system: str) -> dict[str, Any]:
    """The ITI-104 feed body for one person."""
    return {
        "resourceType": "Patient",
        "identifier": [
            {"system": identifier_system, "value": person.local_id},
            {"system": NHS_NUMBER_SYSTEM, "value": person.nhs_number},
        ],
        "name": [{"family": person.family, "given": list(person.given)}],
        "gender": person.gender,
        "birthDate": person.birth_date,
        "address": [{"postalCode": person.postal_code}],
    }


async def _backoff(attempt: int, deadline: float) -> bool:
    """Sleep before the next attempt; False when the deadline has passed."""
    pause = min(0.2 * 2**attempt, 5.0) * random.uniform(0.5, 1.0)
    if time.monotonic() + pause > deadline:
        return False
    await asyncio.sleep(pause)
    return True


async def register_people(
    config: ProviderConfig,
    hub_base: str,
    token_provider: TokenProvider,
    *,
    people: list[SimPerson] | None = None,
    concurrency: int = 8,
    ready_timeout: float = 60.0,
    attempts: int = 5,
    progress: Progress | None = None,
    http: httpx.AsyncClient | None = None,
) -> int:
    """PUT every person of ``config`` (or ``people``) to the hub; returns how many it accepted.

    Raises :class:`RegistrationError` when no token could be had within ``ready_timeout``
    seconds, or (after trying everyone) when the hub rejected or kept failing some people.
    """
    from sharedcare.simulators.provider import provider_people

    hub = hub_root(hub_base)
    todo = people if people is not None else provider_people(config)
    deadline = time.monotonic() + ready_timeout
    attempt = 0
    while True:  # wait for the hub: the first token proves it is up and knows this system
        try:
            await token_provider()
            break
        except (_Retry, httpx.TransportError) as exc:
            if not await _backoff(attempt, deadline):
                raise RegistrationError(
                    f"the hub at {hub} was not ready within {ready_timeout:.0f} s: {exc}"
                ) from None
            attempt += 1

    done = registered = 0
    failures: list[tuple[str, str]] = []
    limit = asyncio.Semaphore(concurrency)
    client = http or httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency))

    async def one(person: SimPerson) -> None:
        nonlocal done, registered
        url = f"{hub}/fhir/Patient"
        params = {"identifier": f"{config.identifier_system}|{person.local_id}"}
        body = pixm_patient(person, config.identifier_system)
        reason = ""
        async with limit:
            for attempt in range(attempts):
                try:
                    token = await token_provider()
                    response = await client.put(
                        url, params=params, json=body,
                        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
                    )  # fmt: skip
                except (httpx.TransportError, _Retry) as exc:
                    reason = f"{exc!r}"
                else:
                    if response.is_success:
                        registered += 1
                        reason = ""
                        break
                    reason = f"{response.status_code}: {response.text[:300]}"
                    if response.status_code == 401 and isinstance(token_provider, SmartToken):
                        token_provider.invalidate()
                    elif response.status_code != 429 and response.status_code < 500:
                        break  # rejected: trying again would give the same answer
                if attempt + 1 < attempts:
                    await asyncio.sleep(min(0.2 * 2**attempt, 5.0) * random.uniform(0.5, 1.0))
        if reason:
            failures.append((person.nhs_number, reason))
        done += 1
        if progress is not None:
            progress(done, len(todo))

    try:
        await asyncio.gather(*(one(p) for p in todo))
    finally:
        if http is None:
            await client.aclose()
    if failures:
        nhs, reason = failures[0]
        raise RegistrationError(
            f"{len(failures)} of {len(todo)} people were not registered with {hub} "
            f"(first: NHS number {nhs}: {reason})",
            registered,
            failures,
        )
    return registered


def load_private_key(path: Path, kid: str | None = None) -> ECKey | RSAKey:
    """A private signing key from a JWK JSON file (``participants keygen``) or a PEM file.

    A PEM key has no ``kid``: ``kid`` names it (default: its RFC 7638 thumbprint); ``alg`` is
    ES384 for an EC key and RS384 for an RSA key unless the JWK says otherwise.
    """
    from joserfc.errors import InvalidKeyTypeError, JoseError
    from joserfc.jwk import ECKey, RSAKey

    data = path.read_bytes()
    jwk: dict[str, Any] = {}
    try:
        if data.lstrip().startswith(b"{"):
            jwk = json.loads(data)
            kind: type[ECKey | RSAKey] = ECKey if jwk.get("kty") == "EC" else RSAKey
            key: ECKey | RSAKey = kind.import_key(jwk)
        else:
            try:
                key = ECKey.import_key(data)
            except (ValueError, InvalidKeyTypeError):
                key = RSAKey.import_key(data)
        if not key.is_private:
            raise ValueError("it is a public key; registration signs with the private key")
        params = {
            "alg": str(jwk.get("alg") or ("ES384" if isinstance(key, ECKey) else "RS384")),
            "kid": kid or str(jwk.get("kid") or key.thumbprint()),
            "use": "sig",
        }
        return type(key).import_key(key.as_dict(private=True), parameters=params)  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"not an EC or RSA private key (PEM or JWK JSON): {exc}") from None


def register_in_background(
    config: ProviderConfig,
    hub_base: str,
    client_id: str,
    key: ECKey | RSAKey,
    report: Callable[[str], None],
    *,
    ready_timeout: float = 120.0,
) -> threading.Thread:
    """Register ``config``'s people from a daemon thread, reporting progress lines to ``report``."""

    def run() -> None:
        step = max(1, len(provider_people_of(config)) // 10)

        def progress(done: int, total: int) -> None:
            if done % step == 0 or done == total:
                report(f"registered {done}/{total} people with {hub_root(hub_base)}")

        token = SmartToken(hub_base, client_id, key)
        try:
            count = asyncio.run(
                register_people(
                    config, hub_base, token, ready_timeout=ready_timeout, progress=progress
                )
            )
        except RegistrationError as exc:
            report(f"[red]Registration incomplete:[/red] {exc}")
        else:
            report(f"Registration done: the hub's patient index knows {count} people here.")

    thread = threading.Thread(target=run, name=f"register:{config.id}", daemon=True)
    thread.start()
    return thread


def provider_people_of(config: ProviderConfig) -> list[SimPerson]:
    from sharedcare.simulators.provider import provider_people

    return provider_people(config)
