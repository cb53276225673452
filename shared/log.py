"""Logging set-up. Only entry points call :func:`configure`; library code just logs
through loguru and binds context (`task_id`, `worker`, `attempt`) with
``logger.contextualize``."""

from __future__ import annotations

import logging
import sys

from loguru import logger


class _InterceptHandler(logging.Handler):
    """Send stdlib logging (uvicorn, aio-pika) through loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def configure(service: str, *, json: bool = False, level: str = "INFO") -> None:
    """Log to stderr: pretty lines in a terminal, one JSON object per line when `json`."""
    logger.remove()
    logger.configure(extra={"service": service})
    if json:
        logger.add(sys.stderr, level=level, serialize=True, enqueue=False)
    else:
        fmt = (
            "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "<cyan>{extra[service]}</cyan> {message} <dim>{extra}</dim>"
        )
        logger.add(sys.stderr, level=level, format=fmt, colorize=sys.stderr.isatty())
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = [_InterceptHandler()]
        logging.getLogger(name).propagate = False
    logging.getLogger("uvicorn.access").disabled = True
