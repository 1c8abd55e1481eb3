"""What every downstream evaluation shares (`mochi probe`, `mochi detect`; a third task is an encoder and a head
on this skeleton, not a third copy of it):

    Job (source, config, accelerator, the weights' info, the clock)
      -> EpochStates: a state after each finished epoch; resumed only when the settings match (one policy)
      -> the task's own training and scoring
      -> Job.result: the task's numbers inside one envelope (source, hyperparameters, processes, versions, time)
      -> Job.write: the output file, and for a run directory RUN/<folder>/<name>.json (`mochi export` cards it)

A result's name ends in a digest of every setting that moves its number (`config.result_settings`), so a result
of other settings never overwrites another's and the same settings do. Printing a result is the CLI's business.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from mochi_hub.config import result_settings, resume_differences
from mochi_hub.core import persist
from mochi_hub.errors import OptionError
from mochi_hub.version import __version__

log = logging.getLogger(__name__)

STATE_PREFIX = "epoch"  # epoch-0003: the state after 3 epochs
STATE_MODEL = "model.safetensors"
STATE_OPTIMIZER = "optimizer.safetensors"


@dataclass
class EpochStates:
    """A job's per-epoch states under `root`, the newest kept: its model and optimizer (safetensors + JSON, never a
    pickle) and the job's `settings`, which a resumed job must share (`resume_differences`)."""

    root: Path
    settings: dict[str, Any]
    accelerator: Accelerator

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, resume: bool) -> dict[str, Any]:
        """With `resume` and a saved state: load it into model, optimizer (and the grad scaler) and return its meta
        ("epoch": epochs done, and what the job saved with it). Otherwise a fresh start: older states are stale
        and removed; returns {"epoch": 0}."""
        states = persist.complete_folders(self.root, STATE_PREFIX) if resume else []
        if not states:
            if self.accelerator.is_main_process:
                shutil.rmtree(self.root, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            return {"epoch": 0}
        path, meta = states[-1], persist.read_json(states[-1] / persist.STATE)
        if different := resume_differences(meta.get("settings", {}), self.settings):
            raise OptionError(
                f"--resume {path}: the saved state was trained differently ({'; '.join(different)}); "
                "run without --resume to start over"
            )
        model.load_state_dict(persist.load_tensors(path / STATE_MODEL))
        tensors = persist.load_tensors(path / STATE_OPTIMIZER)
        optimizer.load_state_dict(persist.join_state(tensors, meta["optimizer"]))
        if self.accelerator.scaler is not None and meta.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(meta["grad_scaler"])
        if self.accelerator.is_main_process:
            log.info("resumed from %s (epoch %d)", path, meta["epoch"])
        return meta

    def save(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, **meta: Any) -> None:
        """After `epoch` epochs (every process calls it; the main process writes), older states removed."""
        if self.accelerator.is_main_process:
            final = self.root / f"{STATE_PREFIX}-{epoch:04d}"
            with persist.staging(final) as tmp:  # a save that fails (a full disk) leaves no epoch-N.tmp/ behind
                persist.save_tensors(tmp / STATE_MODEL, model.state_dict())
                tensors, optimizer_meta = persist.split_state(optimizer.state_dict())
                persist.save_tensors(tmp / STATE_OPTIMIZER, tensors)
                scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None
                persist.write_json(
                    tmp / persist.STATE,
                    {
                        **meta,
                        "epoch": epoch,
                        "settings": self.settings,
                        "optimizer": optimizer_meta,
                        "grad_scaler": scaler,
                    },
                )
            persist.publish(final)
            persist.prune(self.root, STATE_PREFIX, keep=1)
        self.accelerator.wait_for_everyone()


def slug(spec: str) -> str:
    """A name for a dataset in file names: a folder's own name, else the spec, lower case, [a-z0-9.-] only."""
    path = Path(spec).expanduser()
    name = path.resolve().name if path.is_dir() else spec
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "dataset"


def result_name(config: Any, *parts: Any) -> str:
    """parts-<digest>, the digest over every setting that moves the number (config.result_settings)."""
    digest = hashlib.sha256(json.dumps(result_settings(config), sort_keys=True, default=str).encode()).hexdigest()
    return "-".join([*map(str, parts), digest[:8]])


def versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "mochi_hub": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }


@dataclass
class Job:
    """One evaluation: what it evaluates (SOURCE and what load_backbone says of the weights), how (its config), on
    which processes, and its clock."""

    source: str
    config: Any  # ProbeConfig or DetectConfig
    accelerator: Accelerator
    info: dict[str, Any]
    _: KW_ONLY
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    clock: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """The seconds of the block, reported as time.<name>_s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[f"{name}_s"] = time.perf_counter() - start

    def result(self, numbers: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
        """The task's `numbers` inside the envelope every result shares. `summary`: the task's counts; the wall
        time, the resumes and, when it counts images_seen, the throughput are added."""
        elapsed = time.perf_counter() - self.clock
        summary = {**summary, "resumes": int(numbers.get("resumed_from_epoch") is not None)}
        summary["wall_time_s"] = round(elapsed, 2)
        if "images_seen" in summary:
            summary["images_per_sec"] = round(summary["images_seen"] / elapsed, 2)
        return {
            **numbers,
            "source": self.source,
            "source_info": self.info,
            "hyperparameters": self.config.to_dict(),
            "num_processes": self.accelerator.num_processes,
            "device": str(self.accelerator.device),
            "versions": versions(),
            "summary": summary,
            "time": {
                "started": self.started_at.isoformat(timespec="seconds"),
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(elapsed, 3),
                **{k: round(v, 3) for k, v in self.timings.items()},
            },
        }

    def write(self, result: dict[str, Any], output: Path | None, *, run_folder: str, name: str) -> None:
        """On the main process: the result to `output` (when given) and, when SOURCE is a run directory and the
        result is kept (--card, the default), to RUN/<run_folder>/<name>.json, where `mochi export` finds it for the
        card."""
        if not self.accelerator.is_main_process:
            return
        if output is not None:
            persist.write_json(output, result)
        if "run_dir" in self.info and self.config.card:
            kept = Path(self.info["run_dir"]) / run_folder
            kept.mkdir(parents=True, exist_ok=True)
            persist.write_json(kept / f"{name}.json", result)
