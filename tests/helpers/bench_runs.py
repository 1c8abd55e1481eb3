"""Run a bench script the way a user does: `python bench/NAME.py ARGS` in a fresh interpreter at the repo root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(name: str, *args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """bench/NAME.py with ARGS and extra environment variables; output captured as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


def failure(done: subprocess.CompletedProcess) -> str:
    """The tail of a failed run's output, for an assertion message."""
    return done.stdout[-3000:] + done.stderr[-3000:]
