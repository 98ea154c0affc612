"""Metrics, request-id middleware and health endpoints, exercised over real ASGI HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from sharedcare.metrics.health import health_routes
from sharedcare.metrics.middleware import MetricsMiddleware, RequestIdMiddleware
from sharedcare.metrics.registry import (
    MULTIPROC_ENV,
    is_multiprocess,
    record_store_read,
    record_store_write,
    render_metrics,
    setup_multiprocess_dir,
)

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parents[2]
HEX32 = re.compile(r"[0-9a-f]{32}")

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio only."""
    return "asyncio"


async def _ok() -> tuple[bool, dict[str, Any]]:
    """Readiness that always passes."""
    return True, {"database": "ok", "migrations": "current"}


async def _item(request: Request) -> Response:
    """Echo the path parameter."""
    return PlainTextResponse(request.path_params["id"])


async def _hello(request: Request) -> Response:
    """Answer a plain route."""
    return PlainTextResponse("hello")


async def _boom(request: Request) -> Response:
    """Fail with a message that must never reach a client."""
    raise RuntimeError("kaboom: secret internals")


async def _whoami(request: Request) -> Response:
    """Return the request id the middleware put into request.state."""
    return PlainTextResponse(request.state.request_id)


def make_app(readiness: Readiness = _ok, *, timeout: float | None = 5.0) -> Starlette:
    """Build a small app with a path-param route, a failing route, a mount and the health routes."""
    return Starlette(
        routes=[
            Route("/hello", _hello, methods=["GET"]),
            Route("/fhir/{type}/{id}", _item),
            Route("/boom", _boom),
            Route("/whoami", _whoami),
            Mount("/api", routes=[Route("/things/{id}", _item)]),
            *health_routes(readiness, timeout=timeout),
        ],
        middleware=[Middleware(RequestIdMiddleware), Middleware(MetricsMiddleware)],
    )


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client speaking to make_app() in-process."""
    transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


def parse_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Index every sample of a Prometheus text exposition by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Return a sample's value, 0 when absent (counters start at zero)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics and parse it."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    return parse_samples(response.text)


# --- HTTP metrics ---------------------------------------------------------------------------


async def test_requests_are_counted_by_route_template_and_status(client: httpx.AsyncClient) -> None:
    """The counter uses route templates (never raw paths) and the real status codes."""
    before = await scrape(client)

    assert (await client.get("/fhir/Patient/p1")).status_code == 200
    assert (await client.get("/fhir/Observation/o-2")).status_code == 200
    assert (await client.get("/no/such/thing")).status_code == 404
    assert (await client.get("/boom")).status_code == 500
    assert (await client.post("/hello")).status_code == 405
    assert (await client.get("/api/things/7")).status_code == 200
    assert (await client.request("BREW", "/hello")).status_code == 405

    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = parse_samples(response.text)

    def delta(**labels: str) -> float:
        name = "sharedcare_http_requests_total"
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(route="/fhir/{type}/{id}", method="GET", status="200") == 2
    assert delta(route="<unmatched>", method="GET", status="404") == 1
    assert delta(route="/boom", method="GET", status="500") == 1
    assert delta(route="/hello", method="POST", status="405") == 1
    assert delta(route="/api/things/{id}", method="GET", status="200") == 1
    assert delta(route="/hello", method="OTHER", status="405") == 1

    routes = {
        dict(labels).get("route") for (name, labels) in after if name.startswith("sharedcare_http_")
    }
    # Other tests' apps share the process registry, so look for this test's raw ids only.
    assert not any(r and ("p1" in r or "o-2" in r or r.endswith("/7")) for r in routes)

    hist = "sharedcare_http_request_duration_seconds"
    labels = {"route": "/fhir/{type}/{id}", "method": "GET"}
    assert value(after, f"{hist}_count", **labels) - value(before, f"{hist}_count", **labels) == 2
    assert value(after, f"{hist}_sum", **labels) > value(before, f"{hist}_sum", **labels)
    for le in ("0.001", "0.1", "5.0", "+Inf"):
        assert (f"{hist}_bucket", frozenset({**labels, "le": le}.items())) in after
    assert value(after, f"{hist}_bucket", **labels, le="+Inf") == value(
        after, f"{hist}_count", **labels
    )


async def test_metrics_endpoint_exports_every_family_from_the_start(
    client: httpx.AsyncClient,
) -> None:
    """All contract metrics are present, with the unlabelled ones at a value."""
    text = (await client.get("/metrics")).text
    for name in (
        "sharedcare_http_requests_total",
        "sharedcare_http_request_duration_seconds",
        "sharedcare_http_requests_in_flight",
        "sharedcare_store_operations_total",
        "sharedcare_log_fatal_total",
    ):
        assert f"# TYPE {name} " in text
    assert re.search(r"^sharedcare_log_fatal_total \d", text, re.MULTILINE)


def test_store_helpers_count_and_reject_wrong_operations() -> None:
    """record_store_read/write label by operation and resource type and refuse foreign ops."""
    name = "sharedcare_store_operations_total"
    before = parse_samples(render_metrics()[0].decode())
    record_store_read("search", "Patient")
    record_store_read("search", "Patient")
    record_store_write("create", "Observation")
    after = parse_samples(render_metrics()[0].decode())
    assert (
        value(after, name, operation="search", resource_type="Patient")
        - value(before, name, operation="search", resource_type="Patient")
        == 2
    )
    assert (
        value(after, name, operation="create", resource_type="Observation")
        - value(before, name, operation="create", resource_type="Observation")
        == 1
    )
    with pytest.raises(ValueError):
        record_store_read("create", "Patient")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        record_store_write("read", "Patient")  # type: ignore[arg-type]


# --- multiprocess mode ----------------------------------------------------------------------


def run_python(code: str, *, multiproc_dir: Path | None, returncode: int = 0) -> str:
    """Run *code* in a fresh interpreter (optionally in multiprocess mode) and return its stdout."""
    env = {k: v for k, v in os.environ.items() if k.lower() != MULTIPROC_ENV.lower()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if multiproc_dir is not None:
        env[MULTIPROC_ENV] = str(multiproc_dir)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == returncode, result.stderr
    return result.stdout


INCREMENT = """
    from sharedcare.metrics.registry import get_metrics, is_multiprocess, record_store_read
    assert is_multiprocess()
    m = get_metrics()
    for _ in range({n}):
        record_store_read("read", "Patient")
    m.http_requests_total.labels(route="/fhir/{{type}}/{{id}}", method="GET", status="200").inc({n})
    m.http_request_duration_seconds.labels(route="/fhir/{{type}}/{{id}}", method="GET").observe(0.003)
    m.http_requests_in_flight.inc()  # never decremented: the exit hook must drop this process's file
    m.log_fatal_total.inc()
"""

RENDER = """
    import sys
    from sharedcare.metrics.registry import render_metrics
    body, content_type = render_metrics()
    sys.stdout.write(body.decode())
"""


def test_multiprocess_values_are_summed_across_processes(tmp_path: Path) -> None:
    """Counters and histograms written by two processes are summed when a third renders."""
    run_python(INCREMENT.format(n=3), multiproc_dir=tmp_path)
    run_python(INCREMENT.format(n=4), multiproc_dir=tmp_path)
    assert list(tmp_path.glob("*.db")), "multiprocess mode should have written mmap files"

    samples = parse_samples(run_python(RENDER, multiproc_dir=tmp_path))

    assert (
        value(
            samples, "sharedcare_store_operations_total", operation="read", resource_type="Patient"
        )
        == 7
    )
    route = {"route": "/fhir/{type}/{id}", "method": "GET"}
    assert value(samples, "sharedcare_http_requests_total", **route, status="200") == 7
    assert value(samples, "sharedcare_http_request_duration_seconds_count", **route) == 2
    assert (
        value(samples, "sharedcare_http_request_duration_seconds_bucket", **route, le="0.005") == 2
    )
    assert value(samples, "sharedcare_log_fatal_total") == 2
    # Both writers exited cleanly, so their live in-flight gauges are gone.
    assert value(samples, "sharedcare_http_requests_in_flight") == 0


@pytest.mark.skipif(os.name != "posix", reason="pid liveness probing is POSIX-only")
def test_live_gauge_of_a_worker_killed_by_sigterm_is_dropped(tmp_path: Path) -> None:
    """A worker dying by signal skips atexit (uvicorn re-raises SIGTERM); rendering prunes its gauge."""
    run_python(
        INCREMENT.format(n=1) + "    import os, signal\n    os.kill(os.getpid(), signal.SIGTERM)\n",
        multiproc_dir=tmp_path,
        returncode=-signal.SIGTERM,
    )
    assert list(tmp_path.glob("gauge_livesum_*.db")), "the killed process should have left its file"

    samples = parse_samples(run_python(RENDER, multiproc_dir=tmp_path))

    assert value(samples, "sharedcare_http_requests_in_flight") == 0
    assert not list(tmp_path.glob("gauge_livesum_*.db"))
    # Counters of dead workers are history, not state: they must stay.
    assert (
        value(
            samples, "sharedcare_store_operations_total", operation="read", resource_type="Patient"
        )
        == 1
    )


def test_setup_multiprocess_dir_cleans_stale_files_and_enables_mode(tmp_path: Path) -> None:
    """Called before metrics are used, setup wipes stale *.db files and the process goes multiprocess."""
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    run_python(INCREMENT.format(n=5), multiproc_dir=mp_dir)  # a "previous run" leaves files behind
    (mp_dir / "keep.txt").write_text("not ours to delete")

    # No PROMETHEUS_MULTIPROC_DIR in the environment: setup_multiprocess_dir must provide it.
    run_python(
        f"""
        import os, sys
        from pathlib import Path
        from sharedcare.metrics.registry import setup_multiprocess_dir, is_multiprocess, record_store_read
        assert "prometheus_client" not in sys.modules  # importing the registry must stay lazy
        setup_multiprocess_dir(Path({str(mp_dir)!r}))
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == {str(mp_dir)!r}
        record_store_read("vread", "Patient")
        assert is_multiprocess()
        """,
        multiproc_dir=None,
    )

    assert (mp_dir / "keep.txt").exists()
    samples = parse_samples(run_python(RENDER, multiproc_dir=mp_dir))
    assert (
        value(
            samples, "sharedcare_store_operations_total", operation="read", resource_type="Patient"
        )
        == 0
    )
    assert (
        value(
            samples, "sharedcare_store_operations_total", operation="vread", resource_type="Patient"
        )
        == 1
    )


def test_setup_after_import_warns_and_keeps_rendering_local_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too late for this process: it warns, and render_metrics still shows the in-memory values."""
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)  # restored by monkeypatch afterwards
    assert not is_multiprocess()
    with pytest.warns(RuntimeWarning, match="after prometheus_client was imported"):
        setup_multiprocess_dir(tmp_path / "late")
    assert os.environ[MULTIPROC_ENV] == str(tmp_path / "late")
    assert (tmp_path / "late").is_dir()

    record_store_read("history", "Encounter")
    samples = parse_samples(render_metrics()[0].decode())
    assert (
        value(
            samples,
            "sharedcare_store_operations_total",
            operation="history",
            resource_type="Encounter",
        )
        >= 1
    )


# --- request ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["abc-123", "trace:1.2_x", "A" * 128, "0"])
async def test_sane_request_id_is_echoed(client: httpx.AsyncClient, request_id: str) -> None:
    """A sane incoming X-Request-ID is kept, stored in request.state and echoed."""
    response = await client.get("/whoami", headers={"X-Request-ID": request_id})
    assert response.headers["x-request-id"] == request_id
    assert response.text == request_id


BAD_REQUEST_IDS: list[bytes] = [
    b"",
    b"A" * 129,
    b"has space",
    b"semi;colon",
    b"slash/es",
    b"<script>",
    b"%0d%0a",
    b'quote"d',
    "\u00fcnicode".encode(),
    b"tab\there",
]


@pytest.mark.parametrize("bad", BAD_REQUEST_IDS, ids=lambda b: repr(b)[:20])
async def test_insane_request_id_is_replaced(client: httpx.AsyncClient, bad: bytes) -> None:
    """An unsafe X-Request-ID is ignored and a fresh uuid4 hex id is used instead."""
    response = await client.get("/whoami", headers=[(b"X-Request-ID", bad)])
    echoed = response.headers["x-request-id"]
    assert HEX32.fullmatch(echoed)
    assert response.text == echoed


async def test_missing_request_id_is_generated_and_unique(client: httpx.AsyncClient) -> None:
    """Without X-Request-ID each request gets its own 32-hex id."""
    first = (await client.get("/whoami")).headers["x-request-id"]
    second = (await client.get("/whoami")).headers["x-request-id"]
    assert HEX32.fullmatch(first) and HEX32.fullmatch(second)
    assert first != second


# --- health ---------------------------------------------------------------------------------


async def _request(app: Starlette, path: str) -> httpx.Response:
    """GET *path* from *app*."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        return await c.get(path)


async def test_livez_is_ok(client: httpx.AsyncClient) -> None:
    """/livez answers 200 {"status": "ok"} uncached."""
    response = await client.get("/livez")
    assert response.status_code == 200
    assert orjson.loads(response.content) == {"status": "ok"}
    assert response.headers["cache-control"] == "no-store"


async def test_readyz_ready_returns_200_with_details(client: httpx.AsyncClient) -> None:
    """/readyz passes the readiness details through with 200 when ready."""
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert orjson.loads(response.content) == {"database": "ok", "migrations": "current"}


async def test_readyz_not_ready_returns_503_with_details() -> None:
    """/readyz answers 503 with the readiness dict when not ready."""

    async def not_ready() -> tuple[bool, dict[str, Any]]:
        return False, {"database": "unreachable", "migrations": "pending"}

    response = await _request(make_app(not_ready), "/readyz")
    assert response.status_code == 503
    assert orjson.loads(response.content) == {"database": "unreachable", "migrations": "pending"}


async def test_readyz_raising_returns_503_with_class_name_only() -> None:
    """A readiness check that raises yields 503 naming only the exception class."""

    async def broken() -> tuple[bool, dict[str, Any]]:
        raise ConnectionRefusedError("postgres://admin:hunter2@db.internal:5432 refused")

    response = await _request(make_app(broken), "/readyz")
    assert response.status_code == 503
    assert orjson.loads(response.content) == {"status": "error", "error": "ConnectionRefusedError"}
    for secret in ("hunter2", "db.internal", "refused", "postgres"):
        assert secret not in response.text


async def test_readyz_hanging_check_times_out_as_503() -> None:
    """A readiness check that hangs becomes a 503 instead of a hung probe."""

    async def hangs() -> tuple[bool, dict[str, Any]]:
        await anyio.sleep(30)
        return True, {}

    with anyio.fail_after(10):
        response = await _request(make_app(hangs, timeout=0.05), "/readyz")
    assert response.status_code == 503
    assert orjson.loads(response.content) == {"status": "error", "error": "TimeoutError"}
