"""What every bench shares: the standard options (--quick, --out, --threads), the machine, versions and
command recorded in each JSON, writing that JSON, Markdown tables, and running one measurement in a process
of its own, forked from the bench after its imports, with its console output in a log."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PACKAGES = ("torch", "torchvision", "timm", "accelerate", "lightly", "mochi-hub")


def parser(
    doc: str,
    name: str,
    *,
    quick: str,
    threads: int | None,
    threads_help: str,
    sized: dict[str, tuple[type, Any, Any, str]] | None = None,
) -> argparse.ArgumentParser:
    """An ArgumentParser described by the bench's docstring, with --quick, --out and --threads, and `sized`
    options {name: (type, quick default, full default, help)} that `parse` fills in when not given."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument(
        "--out", type=Path, default=RESULTS / f"{name}.json", help=f"JSON output (default bench/results/{name}.json)"
    )
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    p.set_defaults(sized=sized or {})
    for option, (kind, small, full, text) in (sized or {}).items():
        default = "none" if full is None else full
        p.add_argument("--" + option.replace("_", "-"), type=kind, help=f"{text} (default {default}; quick {small})")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    for option, (_, small, full, _) in args.sized.items():
        if getattr(args, option) is None:
            setattr(args, option, small if args.quick else full)
    del args.sized
    return args


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def environment(script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """The command line, git commit, package versions, CPU and load average, for the JSON."""
    import torch

    from mochi_hub.training.runs import cpu_model

    args = sys.argv if argv is None else [script, *argv]
    cpuinfo = ""
    with contextlib.suppress(OSError):
        cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return dict(
        command=" ".join(shlex.quote(x) for x in [sys.executable, *args]),
        git=_git(),
        versions={"python": platform.python_version(), **{name: _version(name) for name in PACKAGES}},
        cpu=dict(
            model=cpu_model(),
            machine=platform.machine(),
            logical_cpus=os.cpu_count(),
            usable_cpus=usable_cpus(),
            torch_threads=torch.get_num_threads(),
            torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
            avx512_bf16=" avx512_bf16" in flags,
            amx_bf16=" amx_bf16" in flags,
        ),
        loadavg_before=list(os.getloadavg()),
    )


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git() -> dict[str, Any] | None:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        return dict(commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.CalledProcessError):
        return None


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Add the load average after the run and write the JSON."""
    result["loadavg_after"] = list(os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nwrote {path}; load average (1 min) {result['loadavg_before'][0]:.2f} before, "
        f"{result['loadavg_after'][0]:.2f} after (the machine may be shared)"
    )


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (first column left-aligned, the others right), for the console and BENCHMARKS.md."""
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def run_forked(target: Callable[[dict], dict], settings: dict, log_path: Path) -> dict:
    """target(settings) in a child forked from this process, its stdout and stderr in log_path, its result
    (or traceback) back through a pipe. The bench process itself only imports, never computes (an OpenMP
    pool or Accelerate's per-process state must not cross a fork); settings["threads"] sets torch's threads."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(target, settings, str(log_path), send))
    process.start()
    send.close()
    try:
        message = receive.recv()
    except EOFError:
        message = None
    process.join()
    if message is None or not message["ok"]:
        tail = log_path.read_text()[-3000:] if log_path.is_file() else ""
        raise RuntimeError(
            f"{target.__name__} failed (exit code {process.exitcode}); log {log_path}:\n"
            f"{message['error'] if message else tail}"
        )
    return message["result"]


def _child(target: Callable[[dict], dict], settings: dict, log_path: str, conn) -> None:
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        try:
            if settings.get("threads"):
                import torch

                torch.set_num_threads(settings["threads"])
            conn.send(dict(ok=True, result=target(settings)))
        except BaseException:  # everything goes back to the parent, with its traceback
            traceback.print_exc()
            conn.send(dict(ok=False, error=traceback.format_exc()))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
