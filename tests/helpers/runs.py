"""Shared helpers of the export / card / hub tests: a real run directory written by the real train() (checkpoint,
run.json, metrics.jsonl) on real images, plus probes/*.json.

Imported by name (tests/conftest.py puts tests/helpers on sys.path).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mochi_hub.config import TrainConfig
from mochi_hub.data.datasets import FashionMNIST
from mochi_hub.training.pretrain import train

PROBES = [
    {
        "top1": 71.25,
        "top5": 97.5,
        "protocol": "linear",
        "dataset": "fashion-mnist",
        "split": "val",
        "source": "/tmp/somewhere/runs/demo/checkpoints/step-0000006",
        "epochs": 2,
        "lr": 10.0,
        "seed": 0,
        "time": 12.5,
    },
    {
        "top1": 64.0,
        "top5": 93.125,
        "protocol": "knn",
        "dataset": "fashion-mnist",
        "split": "val",
        "source": "/tmp/somewhere/runs/demo/checkpoints/step-0000006",
        "k": 20,
        "seed": 0,
        "time": 3.0,
    },
]


def tiny_config(output: Path, **overrides) -> TrainConfig:
    """4 steps an epoch: 64 real Fashion-MNIST images, global batch 16 (2 BatchNorm groups), K = 64."""
    values = dict(
        dataset="fashion-mnist",
        model="test_resnet",
        image_size=32,
        epochs=2,
        batch_size=16,
        queue_size=64,
        mochi=(8, 8, 4),
        mixing_warmup_epochs=1,
        max_train_images=64,
        workers=0,
        output=str(output),
        log_every_steps=1,
        report_to="none",
        bn_splits=2,
        keep_checkpoints=3,
        knn_monitor_every=0,  # tests of the monitor turn it on
    )
    return TrainConfig(**(values | overrides))


def write_image_folder(root: Path, per_class: int = 8, classes: tuple[int, ...] = (0, 1)) -> Path:
    """Real Fashion-MNIST training images as PNGs: root/<class>/<index>.png."""
    source = FashionMNIST("train")
    counts = dict.fromkeys(classes, 0)
    for index in range(len(source)):
        image, label = source[index]
        if label in counts and counts[label] < per_class:
            (root / f"class{label}").mkdir(parents=True, exist_ok=True)
            image.save(root / f"class{label}" / f"{index}.png")
            counts[label] += 1
        if all(c == per_class for c in counts.values()):
            return root
    return root


def make_run(
    root: Path,
    model: str = "test_resnet",
    *,
    steps: int = 3,
    probes: list[dict] | None = None,
    metrics: bool = True,
    run_json: bool = True,
    mochi=(16, 16, 8),
    dataset: str = "fashion-mnist",
    image_size: int = 32,
) -> Path:
    """A run directory as `mochi train` leaves it: the real train() for a few steps on real images (then
    probes/*.json, and a metrics.jsonl torn at the end as a crash leaves it)."""
    root = Path(root)
    if dataset != "fashion-mnist":
        write_image_folder(Path(dataset) / "train")
    config = TrainConfig(
        model=model,
        dataset=dataset,
        image_size=image_size,
        epochs=2,
        batch_size=8,
        queue_size=64,
        mochi=mochi,
        mixing_warmup_epochs=1,
        workers=0,
        output=str(root),
        max_steps=steps,
        max_train_images=16,
        log_every_steps=1,
        report_to="none",
        bn_splits=2,
    )
    train(config)
    if not run_json:
        (root / "run.json").unlink()
    if metrics:
        with (root / "metrics.jsonl").open("a") as f:
            f.write('{"step": 4, "lo')
    else:
        (root / "metrics.jsonl").unlink()
    shutil.rmtree(root / "export")
    for i, probe in enumerate(PROBES if probes is None else probes):
        (root / "probes").mkdir(exist_ok=True)
        (root / "probes" / f"{i}-{probe['protocol']}.json").write_text(json.dumps(probe))
    return root


def sample_images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def mochi_command() -> list[str]:
    """The installed `mochi` console script next to this interpreter (else the same entry point)."""
    script = Path(sys.executable).with_name("mochi")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from mochi_hub.cli.app import main; main()"]


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any Hugging Face setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "TQDM_DISABLE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    diff = (a - b).abs().max().item()
    assert math.isfinite(diff) and diff <= atol, f"max abs difference {diff}"


def probes_from_card(card) -> dict[tuple, dict]:
    """A card's model-index -> {(protocol, dataset, split): {"top1": .., "top5": ..}}, to compare with probe JSON."""
    found: dict[tuple, dict] = {}
    for result in card.data.eval_results:
        key = (result.metric_config, result.dataset_name, result.dataset_split)
        label = "top1" if "top-1" in result.metric_name else "top5"
        found.setdefault(key, {})[label] = result.metric_value
    return found


def probes_by_key(probes: list[dict]) -> dict[tuple, dict]:
    return {(p["protocol"], p["dataset"], p["split"]): {"top1": p["top1"], "top5": p["top5"]} for p in probes}
