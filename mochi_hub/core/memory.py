"""Memory a job will hold, checked before its first step against what the device has free: a size that cannot fit
(a queue of a billion keys, 100,000-pixel crops) is one line naming its option, not a traceback minutes later or a
machine swapping itself to a halt.

The sizes are lower bounds (the tensors a step must hold, not what allocators and libraries add), so a refusal is
certain to be right; a job that passes may still run short on a device that is nearly full.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mochi_hub.errors import OptionError


@dataclass(frozen=True)
class Need:
    """Bytes a job needs for one thing, and the option that sets them."""

    option: str  # as the user wrote it: "--queue-size 1000000000"
    what: str  # "the queue (K x 128, fp32)"
    bytes: int


def size_text(n: float) -> str:
    """Bytes for people: 512.0 GB, 3.2 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_memory(device: torch.device) -> tuple[int, str]:
    """(bytes this process may use on `device`, where they were read): a GPU's free memory, else the RAM available on
    this machine, shared by the processes launched on it."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    import psutil

    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = f" to each of its {local} processes" if local > 1 else ""
    return psutil.virtual_memory().available // local, f"of RAM this machine has available{share}"


def check_fits(needs: list[Need], device: torch.device) -> None:
    """Raise OptionError, naming the option behind the largest need, when the needs together exceed what `device`
    has free."""
    free, where = free_memory(device)
    total = sum(n.bytes for n in needs)
    if total <= free:
        return
    largest = max(needs, key=lambda n: n.bytes)
    parts = "; ".join(f"{n.what} {size_text(n.bytes)}" for n in sorted(needs, key=lambda n: -n.bytes))
    raise OptionError(
        f"{largest.option}: needs at least {size_text(total)} ({parts}), more than the {size_text(free)} {where}"
    )
