"""``sharedcare loadtest``: open-loop, constant-rate load against any deployment (issue 6).

Open loop: request *i* is scheduled at ``start + i / rate`` and sent then, whether or not earlier
requests have been answered, so a slow server cannot slow the generator down and hide its own
slowness. Latency is measured from the *scheduled* time, not the moment a connection became free,
which avoids coordinated omission (Gil Tene, "How NOT to measure latency"; wrk2 does the same):
a request that waited for a connection because the server was stalled counts that wait.

Each request ends in one class: ``ok`` (2xx with a FHIR JSON resource), ``connect`` (could not
connect, or the connection failed mid-request), ``timeout`` (no answer within ``timeout`` of its
scheduled time), ``4xx``, ``5xx`` or ``invalid-body`` (2xx that is not FHIR JSON). An ``ok``
searchset carrying OperationOutcome entries (``search.mode = outcome``: an impaired provider) is
also counted as ``partial``.

In-process use (benchmarks)::

    plan = LoadPlan(base_url, paths=("/fhir/Observation?...",), rate=200, duration=10)
    result = run_load(plan, token=StaticToken("..."))
    result.percentile(99), result.errors
"""

from __future__ import annotations

import asyncio
import json
import math
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Protocol

import orjson
import typer
from rich.console import Console
from rich.table import Table

__all__ = [
    "ERROR_CLASSES",
    "LoadPlan",
    "LoadResult",
    "StaticToken",
    "expand_paths",
    "loadtest_app",
    "run_load",
    "run_load_async",
    "schedule",
]

ERROR_CLASSES: Final = ("connect", "timeout", "4xx", "5xx", "invalid-body")
DEFAULT_PATH: Final = "/fhir/Observation?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}"
DEFAULT_END_USER: Final = (
    '{"requesting_user":{"id":"C123456","name":"Dr Ann Example","role":"R8000"},'
    '"requesting_organization":"RR8","reason_for_access":"TREAT"}'
)
# Histogram bucket upper bounds (ms): 1-2-5 steps, like an HdrHistogram summary at a glance.
BUCKETS_MS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000)

TokenProvider = Callable[[], Awaitable[str]]


class StaticToken:
    """A token given up front (``--token``)."""

    def __init__(self, token: str):
        self.token = token

    async def __call__(self) -> str:
        return self.token


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What to send: request targets (used in turn), rate (per second) and duration (s)."""

    base_url: str
    paths: tuple[str, ...]
    rate: float
    duration: float
    connections: int = 32
    timeout: float = 10.0  # per request, from its scheduled time
    headers: tuple[tuple[str, str], ...] = ()
    client: str = "auto"  # "httpx", "aiohttp" (faster, if installed) or "auto"

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.duration <= 0:
            raise ValueError("rate and duration must be positive")
        if self.connections < 1 or self.timeout <= 0:
            raise ValueError("connections must be >= 1 and timeout positive")
        if not self.paths:
            raise ValueError("give at least one request path")
        if self.client not in ("auto", "httpx", "aiohttp"):
            raise ValueError("client must be auto, httpx or aiohttp")

    @property
    def planned(self) -> int:
        """Requests the plan sends: one every 1/rate seconds for ``duration`` seconds."""
        return max(1, math.floor(self.rate * self.duration + 1e-9))


def schedule(plan: LoadPlan) -> list[float]:
    """Each request's send time, in seconds from the start: a fixed timetable."""
    return [i / plan.rate for i in range(plan.planned)]


def expand_paths(template: str, nhs_numbers: Sequence[str]) -> tuple[str, ...]:
    """Request targets from a template with ``{nhs}``, one per NHS number (in the given order)."""
    if "{nhs}" not in template:
        return (template,)
    if not nhs_numbers:
        raise ValueError("the path uses {nhs}: give NHS numbers (--nhs-numbers or --demo-json)")
    return tuple(template.replace("{nhs}", n) for n in nhs_numbers)


@dataclass
class LoadResult:
    """Counts by outcome and the latency of every ``ok`` request (ms, from its scheduled time)."""

    plan: LoadPlan
    sent: int = 0
    ok: int = 0
    partial: int = 0
    resources: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    elapsed_s: float = 0.0  # first scheduled send to the last request's end
    sending_s: float = 0.0  # first scheduled send to the last send
    max_dispatch_lag_ms: float = 0.0  # how late the generator itself sent a request
    examples: dict[str, str] = field(default_factory=dict)  # one message per error class

    @property
    def completed(self) -> int:
        return self.ok + sum(self.errors.values())

    def percentile(self, p: float) -> float:
        """The p-th percentile (nearest rank) of ok latencies in ms; NaN with none."""
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        rank = max(0, math.ceil(p / 100 * len(ordered)) - 1)
        return ordered[min(rank, len(ordered) - 1)]

    def histogram(self) -> list[tuple[float, int]]:
        """(upper bound ms, count) per bucket; the last bound is infinity."""
        counts = [0] * (len(BUCKETS_MS) + 1)
        for value in self.latencies_ms:
            index = next((i for i, b in enumerate(BUCKETS_MS) if value <= b), len(BUCKETS_MS))
            counts[index] += 1
        return list(zip([*map(float, BUCKETS_MS), math.inf], counts, strict=True))

    def to_dict(self) -> dict[str, Any]:
        def finite(v: float) -> float | None:
            return None if math.isnan(v) else round(v, 3)

        lat = self.latencies_ms
        return {
            "base_url": self.plan.base_url,
            "rate": self.plan.rate,
            "duration_s": self.plan.duration,
            "connections": self.plan.connections,
            "timeout_s": self.plan.timeout,
            "distinct_paths": len(self.plan.paths),
            "planned": self.plan.planned,
            "sent": self.sent,
            "completed": self.completed,
            "ok": self.ok,
            "partial": self.partial,
            "errors": {c: self.errors.get(c, 0) for c in ERROR_CLASSES},
            "error_examples": self.examples,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "elapsed_s": round(self.elapsed_s, 3),
            "sending_s": round(self.sending_s, 3),
            # sends per second over the sending window (the last send closes a 1/rate interval)
            "achieved_rate": round(self.sent / (self.sending_s + 1 / self.plan.rate), 2),
            "max_dispatch_lag_ms": round(self.max_dispatch_lag_ms, 3),
            "resources_per_response": round(self.resources / self.ok, 2) if self.ok else 0.0,
            "latency_ms": {
                "min": finite(min(lat) if lat else math.nan),
                "mean": finite(sum(lat) / len(lat) if lat else math.nan),
                **{f"p{p:g}": finite(self.percentile(p)) for p in (50, 75, 90, 99, 99.9)},
                "max": finite(max(lat) if lat else math.nan),
            },
            "histogram": [
                {"le_ms": None if math.isinf(b) else b, "count": c} for b, c in self.histogram()
            ],
        }


# -- HTTP clients: one small adapter per library --------------------------------------------
class _Failure(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Client(Protocol):
    async def get(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]: ...
    async def close(self) -> None: ...


class _Httpx:
    def __init__(self, connections: int):
        import httpx

        self.httpx = httpx
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        # No httpx timeout: the deadline counts from the scheduled time, enforced around the call.
        self.client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None))

    async def get(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        try:
            response = await self.client.get(url, headers=headers)
        except self.httpx.TransportError as exc:
            raise _Failure("connect", f"{type(exc).__name__}: {exc}") from None
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


class _Aiohttp:
    def __init__(self, connections: int):
        import aiohttp

        self.aiohttp = aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent",),
        )

    async def get(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        try:
            async with self.session.get(url, headers=headers) as response:
                return response.status, await response.read()
        except self.aiohttp.ClientError as exc:
            raise _Failure("connect", f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        await self.session.close()


def _client(kind: str, connections: int) -> _Client:
    if kind in ("auto", "aiohttp"):
        try:
            return _Aiohttp(connections)
        except ImportError:
            if kind == "aiohttp":
                raise ValueError("--client aiohttp needs aiohttp: pip install aiohttp") from None
    return _Httpx(connections)


def _classify_body(body: bytes) -> tuple[bool, int, bool]:
    """(is FHIR JSON, match entries, has outcome entries) for a 2xx body."""
    try:
        resource = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False, 0, False
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return False, 0, False
    if resource["resourceType"] != "Bundle":
        return True, 1, False
    entries = resource.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return False, 0, False
    modes = Counter((e.get("search") or {}).get("mode", "match") for e in entries)
    return True, modes["match"] + modes["include"], modes["outcome"] > 0


# -- the run ----------------------------------------------------------------------------------
async def run_load_async(
    plan: LoadPlan,
    token: TokenProvider | None = None,
    progress: Callable[[LoadResult], None] | None = None,
) -> LoadResult:
    """Send ``plan.planned`` requests on the fixed timetable; returns when all have ended."""
    result = LoadResult(plan)
    client = _client(plan.client, plan.connections)
    base = plan.base_url.rstrip("/")
    if base.endswith("/fhir") and all(p.startswith("/fhir/") for p in plan.paths):
        base = base[: -len("/fhir")]  # a FHIR base given with /fhir/... paths: join at the root
    loop = asyncio.get_running_loop()
    static = dict(plan.headers)
    static.setdefault("Accept", "application/fhir+json")
    # Requests beyond the connections wait here, not in the HTTP client's pool (httpcore's pool
    # scheduling is quadratic in waiting requests); the wait still counts in their latency.
    slots = asyncio.Semaphore(plan.connections)

    async def one(index: int, at: float) -> None:
        path = plan.paths[index % len(plan.paths)]
        url = path if path.startswith(("http://", "https://")) else f"{base}/{path.lstrip('/')}"
        kind, message = "ok", ""
        try:
            async with asyncio.timeout_at(at + plan.timeout), slots:
                headers = dict(static)
                if token is not None:
                    try:
                        headers["Authorization"] = f"Bearer {await token()}"
                    except (TimeoutError, asyncio.CancelledError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - a refresh failed mid-run
                        raise _Failure("connect", f"token endpoint: {exc}") from None
                status, body = await client.get(url, headers)
        except TimeoutError:
            kind, message = "timeout", f"no answer within {plan.timeout} s"
        except _Failure as failure:
            kind, message = failure.kind, str(failure)
        else:
            result.statuses[status] += 1
            if status >= 500:
                kind, message = "5xx", body[:200].decode("utf-8", "replace")
            elif status >= 400:
                kind, message = "4xx", body[:200].decode("utf-8", "replace")
            else:
                valid, entries, impaired = _classify_body(body)
                if not valid:
                    kind, message = "invalid-body", body[:200].decode("utf-8", "replace")
                else:
                    result.resources += entries
                    result.partial += impaired
        if kind == "ok":
            result.ok += 1
            result.latencies_ms.append((loop.time() - at) * 1000)
        else:
            result.errors[kind] += 1
            result.examples.setdefault(kind, message)

    if token is not None:
        await token()  # fail before the timetable starts when the credential is wrong
    tasks: set[asyncio.Task[None]] = set()
    start = loop.time() + 0.01
    last_report = start
    try:
        for index, offset in enumerate(schedule(plan)):
            at = start + offset
            if (delay := at - loop.time()) > 0:
                await asyncio.sleep(delay)
            result.max_dispatch_lag_ms = max(result.max_dispatch_lag_ms, (loop.time() - at) * 1000)
            task = asyncio.create_task(one(index, at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            result.sent += 1
            if progress is not None and loop.time() - last_report >= 1.0:
                last_report = loop.time()
                progress(result)
        result.sending_s = loop.time() - start
        while tasks:
            await asyncio.wait(set(tasks), timeout=1.0)
            if progress is not None:
                progress(result)
    finally:
        for task in tasks:
            task.cancel()
        await client.close()
    result.elapsed_s = loop.time() - start
    return result


def run_load(
    plan: LoadPlan,
    token: TokenProvider | None = None,
    progress: Callable[[LoadResult], None] | None = None,
) -> LoadResult:
    """:func:`run_load_async` in a new event loop (call it from a thread or process of its own)."""
    return asyncio.run(run_load_async(plan, token, progress))


# -- report -----------------------------------------------------------------------------------
def render(result: LoadResult, console: Console) -> None:
    """The latency percentiles, histogram and errors as Rich tables."""
    data = result.to_dict()
    summary = Table(
        title=f"Load: {result.plan.rate:g}/s for {result.plan.duration:g} s", show_header=False
    )
    summary.add_column("", style="bold")
    summary.add_column("", justify="right")
    for label, value in (
        ("target", result.plan.base_url),
        (
            "planned / sent / completed",
            f"{result.plan.planned} / {result.sent} / {result.completed}",
        ),
        ("ok (partial: impaired provider)", f"{result.ok} ({result.partial})"),
        ("achieved rate", f"{data['achieved_rate']}/s"),
        ("max generator lag", f"{data['max_dispatch_lag_ms']:.1f} ms"),
        ("resources per ok response", f"{data['resources_per_response']}"),
    ):
        summary.add_row(label, str(value))
    console.print(summary)

    latency = Table(title="Latency of ok requests (ms, from scheduled time)")
    for name in data["latency_ms"]:
        latency.add_column(name, justify="right")
    latency.add_row(*("-" if v is None else f"{v:.1f}" for v in data["latency_ms"].values()))
    console.print(latency)

    histogram = Table(title="Latency histogram (ok requests)")
    histogram.add_column("≤ ms", justify="right")
    histogram.add_column("count", justify="right")
    histogram.add_column("cumulative", justify="right")
    histogram.add_column("")
    total = max(result.ok, 1)
    peak = max((c for _, c in result.histogram()), default=0) or 1
    running = 0
    for bound, count in result.histogram():
        if not count and not running:
            continue
        running += count
        histogram.add_row(
            "∞" if math.isinf(bound) else f"{bound:g}", str(count),
            f"{100 * running / total:.2f}%", "█" * round(30 * count / peak),
        )  # fmt: skip
        if running == result.ok:
            break
    console.print(histogram)

    errors = Table(title="Errors by class")
    errors.add_column("class")
    errors.add_column("count", justify="right")
    errors.add_column("example")
    for kind in ERROR_CLASSES:
        errors.add_row(kind, str(result.errors.get(kind, 0)), result.examples.get(kind, "")[:100])
    console.print(errors)


# -- CLI --------------------------------------------------------------------------------------
loadtest_app = typer.Typer(
    help="Open-loop load generation against a running hub.", no_args_is_help=True
)
console = Console(stderr=True)


def _read_people(nhs_numbers: Path | None, demo: dict[str, Any], given: list[str]) -> list[str]:
    people = list(given)
    if nhs_numbers is not None:
        lines = nhs_numbers.read_text(encoding="utf-8").splitlines()
        people += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if demo and not people:
        people = [str(p["nhs_number"]) for p in demo.get("people", [])]
    return people


def _token(
    base_url: str,
    demo: dict[str, Any],
    token: str | None,
    client_id: str | None,
    key: Path | None,
    kid: str | None,
    token_url: str | None,
    scope: str | None,
    end_user: str,
) -> TokenProvider | None:
    from sharedcare.simulators.registration import SmartToken, load_private_key

    if token:
        return StaticToken(token)
    consumer = demo.get("consumer") or {}
    client_id = client_id or consumer.get("client_id")
    key_file = key or (
        Path(consumer["private_key_file"]) if consumer.get("private_key_file") else None
    )
    if not client_id or key_file is None:
        return None
    private = load_private_key(key_file, kid or (None if key else consumer.get("kid")))
    claims = json.loads(end_user) if end_user.strip() else None
    return SmartToken(
        base_url, client_id, private, scope or consumer.get("scopes") or "system/*.rs",
        end_user=claims, token_url=token_url or demo.get("token_url"),
    )  # fmt: skip


@loadtest_app.command("query")
def query(
    rate: Annotated[float, typer.Option(min=0.001, help="Requests per second (constant).")],
    duration: Annotated[float, typer.Option(min=0.001, help="Seconds to send for.")] = 10.0,
    connections: Annotated[int, typer.Option(min=1, help="Most connections open at once.")] = 32,
    base_url: Annotated[
        str | None, typer.Option(help="The hub's base URL (default: demo.json's base_url).")
    ] = None,
    path: Annotated[
        str, typer.Option(help="Request target; {nhs} is replaced by each NHS number in turn.")
    ] = DEFAULT_PATH,
    nhs_numbers: Annotated[
        Path | None, typer.Option(help="File of NHS numbers, one a line.")
    ] = None,
    nhs_number: Annotated[
        list[str] | None, typer.Option(help="An NHS number (repeatable).")
    ] = None,
    demo_json: Annotated[
        Path | None,
        typer.Option(help="A demo.json: base URL, consumer credential and people from it."),
    ] = None,
    token: Annotated[str | None, typer.Option(help="A bearer token to send as it is.")] = None,
    client_id: Annotated[str | None, typer.Option(help="client_id to get tokens as.")] = None,
    key: Annotated[Path | None, typer.Option(help="Private key file (PEM or JWK JSON).")] = None,
    kid: Annotated[
        str | None, typer.Option(help="kid of a PEM --key (default: its JWK thumbprint).")
    ] = None,
    token_url: Annotated[
        str | None, typer.Option(help="Token endpoint (default: from the SMART configuration).")
    ] = None,
    scope: Annotated[str | None, typer.Option(help="Scopes to ask for.")] = None,
    end_user: Annotated[
        str, typer.Option(help="End-user claims for the token, as JSON ('' for none).")
    ] = DEFAULT_END_USER,
    header: Annotated[
        list[str] | None, typer.Option(help="Extra header 'Name: value' (repeatable).")
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds from a request's scheduled time to give up.")
    ] = 10.0,
    client: Annotated[
        str, typer.Option(help="HTTP client: auto (aiohttp if installed), httpx or aiohttp.")
    ] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Open-loop, constant-rate queries: latency histogram and errors by class."""
    try:
        demo = json.loads(demo_json.read_text(encoding="utf-8")) if demo_json else {}
        base = base_url or demo.get("base_url")
        if not base:
            raise ValueError("give --base-url (or --demo-json)")
        headers = []
        for line in header or []:
            name, colon, value = line.partition(":")
            if not colon or not name.strip():
                raise ValueError(f"--header {line!r}: use 'Name: value'")
            headers.append((name.strip(), value.strip()))
        plan = LoadPlan(
            base_url=base,
            paths=expand_paths(path, _read_people(nhs_numbers, demo, nhs_number or [])),
            rate=rate, duration=duration, connections=connections, timeout=timeout,
            headers=tuple(headers), client=client,
        )  # fmt: skip
        provider = _token(base, demo, token, client_id, key, kid, token_url, scope, end_user)
    except (OSError, ValueError, KeyError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if provider is None:
        console.print("[yellow]No credentials given: sending requests without a token.[/yellow]")

    def progress(r: LoadResult) -> None:
        console.print(
            f"sent {r.sent}/{plan.planned}  ok {r.ok}  errors {sum(r.errors.values())}",
            highlight=False,
        )

    console.print(
        f"Sending {plan.planned} requests at {rate:g}/s to {base} "
        f"({len(plan.paths)} distinct targets, up to {connections} connections)…"
    )
    try:
        result = run_load(plan, provider, progress)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - e.g. no token: say why, no traceback
        console.print(f"[red]Load test could not start:[/red] {exc}")
        raise typer.Exit(1) from None
    render(result, Console())
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        console.print(f"Results written to {json_out}")
    if result.ok == 0:
        raise typer.Exit(1)
