"""Process-wide structured logging: one JSON object per line from structlog and stdlib loggers alike."""

from __future__ import annotations

import contextlib
import json as _stdjson
import logging
import sys
from typing import IO, Final

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["LEVELS", "configure_logging", "get_logger"]

LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}
_LEVEL_ALIASES: Final = {"warn": "warning", "critical": "fatal"}

# uvicorn's own dictConfig gives these loggers private handlers and propagate=False; taking them
# over sends uvicorn's lines through the same JSON renderer as everything else.
_UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")

# Rendered first so that lines read well when a human tails them.
_LEADING_KEYS: Final = ("timestamp", "level", "logger", "event")


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a structlog logger backed by the stdlib logger *name*."""
    return structlog.stdlib.get_logger(name)


def configure_logging(
    level: str = "info", json: bool = True, stream: IO[str] | None = None
) -> None:
    """Route structlog and all stdlib logging (uvicorn's too) through one renderer at *level*."""
    numeric = _parse_level(level)
    # Applied to every event: in the structlog chain for structlog calls and as foreign_pre_chain
    # for plain stdlib records, so both kinds carry the same fields.
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            # Only for structlog calls: a stdlib record's stack_info is already a string, whereas
            # this renders the *current* stack, which in the formatter would be the wrong one.
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Safe to cache: nothing above depends on the arguments; level and stream live in stdlib.
        cache_logger_on_first_use=True,
    )

    if stream is None:
        # Resolved per call, not at import, so a replaced sys.stderr (tests, daemons) is honoured;
        # stderr keeps stdout free for CLI output.
        stream = sys.stderr
    final: list[Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        _fatal_level,
    ]
    if json:
        final += [structlog.processors.format_exc_info, _render_json]
    else:
        # ConsoleRenderer formats exc_info itself and warns if format_exc_info ran before it.
        final.append(structlog.dev.ConsoleRenderer(colors=_isatty(stream)))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processors=final, foreign_pre_chain=shared)
    )

    root = logging.getLogger()
    # Exactly one handler: any other one (basicConfig, a library's) would print non-JSON lines,
    # and a second handler would also count each fatal event twice.
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _UVICORN_LOGGERS:
        uv = logging.getLogger(name)
        for old in uv.handlers[:]:
            uv.removeHandler(old)
        uv.propagate = True
        uv.setLevel(logging.NOTSET)
    # warnings.warn() otherwise writes raw text to stderr, breaking the one-object-per-line rule.
    logging.captureWarnings(True)


def _parse_level(level: str) -> int:
    """Map a level name (debug, info, warning, error, fatal) to its stdlib number."""
    name = level.strip().lower()
    name = _LEVEL_ALIASES.get(name, name)
    try:
        return LEVELS[name]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}"
        ) from None


def _fatal_level(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Rename the stdlib CRITICAL level to fatal and count the event."""
    if event_dict.get("level") in ("critical", "fatal"):
        event_dict["level"] = "fatal"
        _count_fatal()
    return event_dict


def _count_fatal() -> None:
    """Increment sharedcare_log_fatal_total without ever failing the log call."""
    # The fatal line itself matters more than its metric: never let counting break the log call.
    with contextlib.suppress(Exception):
        # Imported here, not at module top, so that importing logging does not import
        # prometheus_client before the CLI has had a chance to set PROMETHEUS_MULTIPROC_DIR.
        from sharedcare.metrics.registry import get_metrics

        get_metrics().log_fatal_total.inc()


def _render_json(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
    """Render the event as one JSON line, falling back rather than ever emitting broken JSON."""
    ordered = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    try:
        return orjson.dumps(ordered, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except (TypeError, ValueError):
        pass  # e.g. an int beyond 64 bits or a nested dict orjson refuses
    try:
        return _stdjson.dumps(ordered, default=repr, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        return _stdjson.dumps(
            {
                "timestamp": ordered.get("timestamp"),
                "level": ordered.get("level"),
                "logger": ordered.get("logger"),
                "event": str(ordered.get("event")),
                "render_error": repr(exc),
            }
        )


def _isatty(stream: IO[str]) -> bool:
    """Tell whether *stream* is a terminal, treating odd stream objects as not."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
