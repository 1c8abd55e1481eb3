"""What a user sees while work runs: rich progress bars and `logging` messages, both on stderr.

Library modules log through `logging.getLogger(__name__)` and never print; the `mochi` command (and the
demo) call `setup_logging` so that messages appear as plain lines, warnings prefixed with "warning:".
Results (tables, file lists) are the only thing commands write to stdout.
"""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner swaps it per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: int = logging.INFO) -> None:
    """mochi_hub's messages as plain lines on stderr (idempotent; records still propagate to the root logger,
    which has no handler unless the caller configured one)."""
    logger = logging.getLogger("mochi_hub")
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        logger.addHandler(handler)


def progress_bar(enabled: bool = True, *, fields: str = "") -> Progress:
    """A progress display on stderr: description, bar, done/total, elapsed, remaining, then `fields`
    (a format string over the task's fields, e.g. "{task.fields[loss]}")."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if fields:
        columns.append(TextColumn(fields))
    return Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False)
