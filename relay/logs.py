"""structlog setup: JSON lines when stderr is not a terminal, readable console otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

from outbox.urls import redact_text

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class RelayLogger:
    """`structlog.get_logger(name)` for the relay's modules, with one difference: while nothing
    has configured structlog (a relay embedded in an app that does not use structlog), the
    relay's own lines below info are dropped. structlog's default wrapper filters nothing, so
    a debug line per batch would reach stderr. Once anyone calls `structlog.configure` (the
    CLI's `configure_logging`, or the app), its wrapper and levels apply. The app's other
    loggers are never touched."""

    def __init__(self, name: str) -> None:
        self._configured = structlog.get_logger(name)
        self._quiet = structlog.wrap_logger(
            None,
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            logger_factory_args=(name,),
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._configured if structlog.is_configured() else self._quiet, name)


def relay_logger(name: str) -> RelayLogger:
    """The logger of one relay module (see RelayLogger)."""
    return RelayLogger(name)


def redact_secrets(
    _: structlog.typing.WrappedLogger, __: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Mask URL passwords and the registered secrets in every string of a log line."""
    for name, value in event.items():
        if isinstance(value, str):
            event[name] = redact_text(value)
    return event


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto", level: str = "info"
) -> None:
    """The relay's own lines go straight from structlog to stderr (its fast path). Records of
    the stdlib `logging` module (aiokafka, asyncpg, redis, uvicorn...) go through a root
    handler that renders them the same way, with their logger name, and the same redaction:
    one stream of JSON lines."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
                structlog.processors.format_exc_info,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "outbox_relay", False)]:
        root.removeHandler(old)
    handler.outbox_relay = True  # type: ignore[attr-defined]  # found again on reconfiguring
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
