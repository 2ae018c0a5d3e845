"""Logging set-up: structlog, JSON lines when stderr is not a TTY, a console renderer when it is.

Called once by the CLI before anything logs. Standard-library loggers (uvicorn's) go through the
same renderer so that the daemon's output is one stream of JSON objects.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", *, json: bool | None = None) -> None:
    as_json = not sys.stderr.isatty() if json is None else json
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        # filter_by_level first: a call below the level costs its check, not the processors.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The libraries behind the reconcile loop log their routine at INFO: APScheduler each run of
    # a job twice (the reconciler's wake every 30 s: some 5,800 lines a day) and its start-up,
    # watchfiles each change it sees (lmx logs what the change meant). Their warnings and errors
    # stay, and at debug everything does.
    chatter = logging.NOTSET if root.level <= logging.DEBUG else max(root.level, logging.WARNING)
    for name in ("apscheduler", "watchfiles"):
        logging.getLogger(name).setLevel(chatter)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
