"""fovea's one logger. Library code reports progress through it (never ``print``); the CLI shows it on stderr,
and a program using fovea decides with ``logging`` what to show."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("fovea")


def say(message: str) -> None:
    """A progress line (INFO on the ``fovea`` logger)."""
    logger.info(message)


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a handler bound to the stream at creation would keep
    writing to a replaced one)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")
        sys.stderr.flush()


def show_on_stderr(level: int = logging.INFO) -> None:
    """Print fovea's log lines on stderr as plain text (what the CLI does); idempotent."""
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def advance(bar, done: int, total: int) -> None:
    """Move a tqdm ``bar`` to ``done`` of ``total`` (for ``progress(done, total)`` callbacks)."""
    bar.total = total
    bar.update(done - bar.n)
