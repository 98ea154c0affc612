"""Structured logging: JSON lines, request ids, fatal level and stdlib/uvicorn routing."""

from __future__ import annotations

import io
import logging
import logging.config
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import structlog
import uvicorn.config
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sharedcare.logs import configure_logging, get_logger
from sharedcare.metrics.health import health_routes
from sharedcare.metrics.middleware import RequestIdMiddleware
from sharedcare.metrics.registry import render_metrics

pytestmark = pytest.mark.anyio

_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio only."""
    return "asyncio"


@contextmanager
def restored_logging() -> Iterator[None]:
    """Undo configure_logging's process-wide changes, within the test's own call phase."""
    # A context manager rather than a fixture: pytest swaps its capture handlers per phase, so a
    # snapshot taken at fixture setup would resurrect stale ones at teardown.
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    saved_uvicorn = {
        name: (lg.handlers[:], lg.propagate, lg.level)
        for name in _UVICORN_LOGGERS
        for lg in [logging.getLogger(name)]
    }
    try:
        yield
    finally:
        root.handlers[:] = saved_root[0]
        root.setLevel(saved_root[1])
        for name, (handlers, propagate, level) in saved_uvicorn.items():
            lg = logging.getLogger(name)
            lg.handlers[:] = handlers
            lg.propagate = propagate
            lg.setLevel(level)
        logging.captureWarnings(False)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


@contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Yield a stream that configure_logging(level="debug") writes to, restoring logging after."""
    stream = io.StringIO()
    with restored_logging():
        configure_logging(level="debug", stream=stream)
        yield stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Parse every line written so far, failing if any is not a JSON object."""
    out = []
    for raw in stream.getvalue().splitlines():
        parsed = orjson.loads(raw)
        assert isinstance(parsed, dict), raw
        out.append(parsed)
    return out


def fatal_total() -> float:
    """Current value of sharedcare_log_fatal_total."""
    for family in text_string_to_metric_families(render_metrics()[0].decode()):
        for sample in family.samples:
            if sample.name == "sharedcare_log_fatal_total":
                return sample.value
    raise AssertionError("sharedcare_log_fatal_total not exported")


# --- JSON lines -----------------------------------------------------------------------------


def test_every_line_is_json_with_standard_fields() -> None:
    """Each event is one JSON object carrying timestamp (UTC ISO), level, event and logger."""
    with captured_logs() as logs:
        log = get_logger("sharedcare.test")
        log.debug("debugging", n=1)
        log.info("hello %s", "world", answer=42)
        log.warning("careful")
        log.error("bad")

        records = lines(logs)
        assert [(r["level"], r["event"]) for r in records] == [
            ("debug", "debugging"),
            ("info", "hello world"),
            ("warning", "careful"),
            ("error", "bad"),
        ]
        for record in records:
            assert record["logger"] == "sharedcare.test"
            assert list(record)[:4] == ["timestamp", "level", "logger", "event"]
            assert record["timestamp"].endswith("Z")
            stamp = datetime.fromisoformat(record["timestamp"])
            assert stamp.utcoffset() == timedelta(0)
        assert records[1]["answer"] == 42


def test_reconfiguring_replaces_the_handler() -> None:
    """Calling configure_logging again moves output instead of duplicating it."""
    first, second = io.StringIO(), io.StringIO()
    with restored_logging():
        configure_logging(stream=first)
        configure_logging(stream=second)
        get_logger("sharedcare.test").info("once")
    assert first.getvalue() == ""
    assert [r["event"] for r in lines(second)] == ["once"]


def test_level_filters_and_unknown_level_is_rejected() -> None:
    """Events below the configured level are dropped; a bad level name is an error."""
    stream = io.StringIO()
    with restored_logging():
        configure_logging(level="WARNING", stream=stream)
        log = get_logger("sharedcare.test")
        log.info("dropped")
        logging.getLogger("some.library").info("dropped too")
        log.warning("kept")
        with pytest.raises(ValueError, match="unknown log level"):
            configure_logging(level="verbose", stream=stream)
    assert [r["event"] for r in lines(stream)] == ["kept"]


def test_exceptions_render_as_a_traceback_field() -> None:
    """exc_info becomes a traceback string in "exception", for structlog and stdlib alike."""
    with captured_logs() as logs:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            get_logger("sharedcare.test").exception("division failed")
            logging.getLogger("plain.stdlib").exception("stdlib failed")

        structlog_line, stdlib_line = lines(logs)
        for record, event in ((structlog_line, "division failed"), (stdlib_line, "stdlib failed")):
            assert record["event"] == event
            assert record["level"] == "error"
            assert "Traceback (most recent call last)" in record["exception"]
            assert "ZeroDivisionError" in record["exception"]
            assert "exc_info" not in record


def test_awkward_values_never_break_the_line() -> None:
    """Newlines, bytes, sets, arbitrary objects and huge ints still give one valid JSON line."""
    with captured_logs() as logs:
        log = get_logger("sharedcare.test")
        log.info(
            "multi\nline", blob=b"\x00\xff", items={1, 2}, thing=object(), key_obj={(1, 2): "x"}
        )
        log.info("huge", number=2**80)
        records = lines(logs)
        assert [r["event"] for r in records] == ["multi\nline", "huge"]
        assert records[1]["number"] == 2**80


# --- fatal ----------------------------------------------------------------------------------


def test_fatal_renders_as_fatal_and_is_counted() -> None:
    """fatal (structlog) and CRITICAL (stdlib) both render as "fatal" and bump the counter."""
    with captured_logs() as logs:
        before = fatal_total()
        get_logger("sharedcare.test").fatal("database gone", attempt=3)
        get_logger("sharedcare.test").critical("also fatal")
        logging.getLogger("some.library").critical("stdlib critical")
        records = lines(logs)
        assert [r["level"] for r in records] == ["fatal", "fatal", "fatal"]
        assert '"level":"fatal"' in logs.getvalue().splitlines()[0]
        assert fatal_total() - before == 3


def test_fatal_is_a_level_name_and_counts_in_console_mode() -> None:
    """level="fatal" is accepted, and console rendering counts fatal events too."""
    stream = io.StringIO()
    with restored_logging():
        configure_logging(level="fatal", json=False, stream=stream)
        before = fatal_total()
        get_logger("sharedcare.test").error("below threshold")
        get_logger("sharedcare.test").fatal("console fatal")
        assert fatal_total() - before == 1
    output = stream.getvalue()
    assert "console fatal" in output and "fatal" in output
    assert "below threshold" not in output


# --- stdlib and uvicorn ---------------------------------------------------------------------


def test_uvicorn_loggers_come_out_as_json_even_after_uvicorn_configured_them() -> None:
    """uvicorn's dictConfig handlers are taken over, so its lines are JSON too."""
    stream = io.StringIO()
    with restored_logging():
        # What uvicorn.run() does by default before our configure_logging runs in the worker.
        logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)
        configure_logging(stream=stream)
        logging.getLogger("uvicorn.error").error("worker %s crashed", 7)
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d', "1.2.3.4:5", "GET", "/", "1.1", 200
        )
        logging.getLogger("some.library").warning("library warning")
    records = lines(stream)
    assert [(r["logger"], r["level"], r["event"]) for r in records] == [
        ("uvicorn.error", "error", "worker 7 crashed"),
        ("uvicorn.access", "info", '1.2.3.4:5 - "GET / HTTP/1.1" 200'),
        ("some.library", "warning", "library warning"),
    ]
    assert all(r["timestamp"].endswith("Z") for r in records)


def test_python_warnings_are_logged_as_json() -> None:
    """warnings.warn output goes through logging instead of raw stderr text."""
    with captured_logs() as logs:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("old api", DeprecationWarning, stacklevel=1)
        (record,) = lines(logs)
        assert record["logger"] == "py.warnings"
        assert record["level"] == "warning"
        assert "old api" in record["event"]


# --- request ids in logs --------------------------------------------------------------------


async def _handler(request: Request) -> Response:
    """Log from inside a request."""
    get_logger("sharedcare.handler").info("handling", resource="Patient")
    logging.getLogger("plain.stdlib").info("stdlib inside request")
    return PlainTextResponse("ok")


async def _boom(request: Request) -> Response:
    """Fail inside a request."""
    raise RuntimeError("handler exploded")


async def _ready() -> tuple[bool, dict[str, Any]]:
    """Always ready."""
    return True, {"database": "ok"}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for a small app behind RequestIdMiddleware."""
    app = Starlette(
        routes=[Route("/work", _handler), Route("/boom", _boom), *health_routes(_ready)],
        middleware=[Middleware(RequestIdMiddleware)],
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def test_logs_inside_a_request_carry_the_request_id(client: httpx.AsyncClient) -> None:
    """structlog and stdlib lines emitted during a request carry its id; the access line follows."""
    with captured_logs() as logs:
        response = await client.get("/work?name=Smith", headers={"X-Request-ID": "req-42"})
        assert response.status_code == 200
        get_logger("sharedcare.test").info("after the request")

        # httpx logs its own "HTTP Request" line from the client side; not ours to check.
        handling, stdlib_line, access, after = [r for r in lines(logs) if r["logger"] != "httpx"]
        assert handling["event"] == "handling" and handling["request_id"] == "req-42"
        assert (
            stdlib_line["event"] == "stdlib inside request"
            and stdlib_line["request_id"] == "req-42"
        )
        assert access["logger"] == "sharedcare.access"
        assert access["level"] == "info"
        assert access["request_id"] == "req-42"
        assert (access["method"], access["path"], access["status"]) == ("GET", "/work", 200)
        assert isinstance(access["duration_ms"], float) and access["duration_ms"] >= 0
        assert "Smith" not in orjson.dumps(access).decode()  # query strings stay out of the logs
        assert "request_id" not in after  # bound only for the request's duration


async def test_probe_requests_log_at_debug(client: httpx.AsyncClient) -> None:
    """Access lines for /livez, /readyz and /metrics are debug, others info."""
    with captured_logs() as logs:
        for path in ("/livez", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200
        assert (await client.get("/nowhere")).status_code == 404
        access = [r for r in lines(logs) if r["logger"] == "sharedcare.access"]
        assert [(r["path"], r["level"], r["status"]) for r in access] == [
            ("/livez", "debug", 200),
            ("/readyz", "debug", 200),
            ("/metrics", "debug", 200),
            ("/nowhere", "info", 404),
        ]


async def test_failed_request_logs_error_with_traceback_and_request_id(
    client: httpx.AsyncClient,
) -> None:
    """An exception in a handler yields an error access line with traceback and request id."""
    with captured_logs() as logs:
        response = await client.get("/boom", headers={"X-Request-ID": "req-boom"})
        assert response.status_code == 500
        failed = [r for r in lines(logs) if r["logger"] == "sharedcare.access"]
        assert len(failed) == 1
        (record,) = failed
        assert record["level"] == "error"
        assert record["status"] == 500
        assert record["request_id"] == "req-boom"
        assert "RuntimeError: handler exploded" in record["exception"]
