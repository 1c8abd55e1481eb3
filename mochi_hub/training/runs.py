"""A run directory, as `mochi train` writes it and export, probe, push and detect read it.

RUN/run.json          the resolved config, processes, batch sizes, the backbone's build; at the end a summary
                      (RunSummary: counts, time, the hosts it trained on)
RUN/metrics.jsonl     one record per logged step ("kind": "step") and per epoch ("kind": "epoch")
RUN/checkpoints/      mochi_hub.training.checkpoint
RUN/probes/*.json     results of `mochi probe` on this run (the model card reports them)
RUN/detection/*.json  results of `mochi detect` on this run
RUN/export/           the timm folder
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mochi_hub.config import TrainConfig, train_config_from_dict
from mochi_hub.core.persist import StateFileError, append_line, atomic_write, read_json, write_json
from mochi_hub.errors import InputError, OptionError
from mochi_hub.method.model import backbone_args, create_backbone, structural_args
from mochi_hub.training.checkpoint import latest_checkpoint, load_query_backbone_tensors, read_state

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
PROBES = "probes"
DETECTION = "detection"
EXPORT = "export"

log = logging.getLogger(__name__)


class RunError(InputError):
    """A run directory that cannot be used as asked; the message says why."""


@dataclass
class RunSummary:
    """What the run did, saved in every checkpoint and in run.json at the end."""

    images_seen: int = 0
    resumes: int = 0
    nonfinite_steps: int = 0
    wall_time_s: float = 0.0
    bad_files: list[str] = field(default_factory=list)  # "path: reason", each unusable file once
    hosts: list[str] = field(default_factory=list)  # describe_host() of each machine it trained on, once
    knn_monitor: list[dict[str, Any]] = field(default_factory=list)  # {"step", "knn_top1", "of"}: the kNN monitor
    monitor_time_s: float = 0.0  # seconds the kNN monitor took (not in wall_time_s)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        throughput = self.images_seen / self.wall_time_s if self.wall_time_s else 0.0
        return {
            "images_seen": self.images_seen,
            "images_skipped": len(self.bad_files),
            "resumes": self.resumes,
            "nonfinite_steps": self.nonfinite_steps,
            "wall_time_s": round(self.wall_time_s, 2),
            "images_per_sec": round(throughput, 2),
            "bad_files": self.bad_files,
            "hosts": self.hosts,
            "knn_monitor": self.knn_monitor,
            "monitor_time_s": round(self.monitor_time_s, 2),
        }


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux, else what the platform module knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return model or platform.processor() or platform.machine()


def describe_host(device: torch.device, processes: int) -> str:
    """Where a run trains, in one line: speeds (and, across CPU kernels, the last digits) compare only on like hosts."""
    cpu = f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads per process)"
    if device.type == "cuda":
        return f"{processes} x {torch.cuda.get_device_name(device)}, CPU {cpu}"
    return f"{processes} process(es) on {device.type}, CPU {cpu}"


# --- writing -------------------------------------------------------------------------------------------


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    write_json(Path(run_dir) / RUN_JSON, info)


class MetricsLog:
    """metrics.jsonl, appended by the main process; a resume drops what a crashed attempt logged past it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)  # a fresh run in a used folder starts a fresh log

    def truncate(self, step: int) -> None:
        if self.path.is_file():
            kept = "".join(json.dumps(row) + "\n" for row in read_metrics(self.path) if row["step"] <= step)
            atomic_write(self.path, lambda path: path.write_text(kept))

    def append(self, record: dict[str, Any]) -> None:
        append_line(self.path, json.dumps(record))


# --- reading -------------------------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl -> its records with a step (kind "step" or "epoch"); a torn last line is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def read_results(run_dir: str | Path, kind: str = PROBES) -> list[dict[str, Any]]:
    """RUN/probes/*.json (or RUN/detection/*.json), in name order; an unreadable file is reported and skipped."""
    results = []
    for path in sorted((Path(run_dir) / kind).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            log.warning("skipping result file %s: %s", path.name, error)
            continue
        if isinstance(record, dict) and ("top1" in record or "AP" in record):
            results.append(record)
    return results


def is_run_dir(path: Path) -> bool:
    return (path / RUN_JSON).is_file() or (path / "checkpoints").is_dir()


def read_run(run_dir: str | Path) -> tuple[TrainConfig, dict[str, Any], Path]:
    """(config, run.json, newest checkpoint) of a run directory, or a RunError saying what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OptionError(f"no such run directory: {run_dir}")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise RunError(f"{run_dir} holds no complete checkpoint (checkpoints/step-*/): nothing to export")
    try:
        run: dict[str, Any] = read_json(run_dir / RUN_JSON) if (run_dir / RUN_JSON).is_file() else {}
        config_dict = run.get("config") or read_state(checkpoint).get("config")
    except StateFileError as error:
        raise RunError(str(error)) from None
    if not config_dict:
        raise RunError(f"{run_dir} has no run.json and its checkpoint records no config")
    try:
        return train_config_from_dict(config_dict), run, checkpoint
    except (TypeError, ValueError) as error:
        raise RunError(f"the run's saved config is invalid: {error}") from None


def run_backbone_args(config: TrainConfig, run: dict[str, Any]) -> dict[str, Any]:
    """The structural arguments the run's backbone was built with (run.json records them; older runs did not)."""
    built = (run.get("backbone") or {}).get("model_args")
    if built is None:
        built = backbone_args(config.model, init="timm", image_size=config.image_size)
    return structural_args(built)


def load_run_backbone(run_dir: str | Path) -> tuple[nn.Module, TrainConfig, dict[str, Any], Path]:
    """The query encoder's backbone of the newest checkpoint, in eval mode."""
    config, run, checkpoint = read_run(run_dir)
    backbone = create_backbone(config.model, **run_backbone_args(config, run))
    try:
        tensors = load_query_backbone_tensors(checkpoint)
    except StateFileError as error:
        raise RunError(str(error)) from None
    if not tensors:
        raise RunError(f"{checkpoint} holds no query backbone weights (query.backbone.*)")
    try:
        backbone.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise RunError(f"{checkpoint} does not match a {config.model} backbone: {str(error).splitlines()[0]}") from None
    return backbone.eval(), config, run, checkpoint


def default_export(run_dir: str | Path, format: str = "timm") -> Path:
    return Path(run_dir) / (EXPORT if format == "timm" else f"{EXPORT}-{format}")
