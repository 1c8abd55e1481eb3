"""Shared helpers of the export / card / hub tests: a real run directory (checkpoint written by
mochi_hub.checkpoint, run.json, metrics.jsonl, probes/*.json) with real, briefly trained weights.

Imported explicitly by tests/test_export.py, test_card.py and test_hub.py (not a conftest.py, so that it
never clashes with the suite's own).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mochi_hub.checkpoint import finish_checkpoint, save_checkpoint
from mochi_hub.config import TrainConfig
from mochi_hub.model import Encoder, create_backbone, make_key_encoder, momentum_update
from mochi_hub.queue import NegativeQueue

PROBES = [
    {"top1": 71.25, "top5": 97.5, "protocol": "linear", "dataset": "fashion-mnist", "split": "val",
     "source": "/tmp/somewhere/runs/demo/checkpoints/step-0000006", "epochs": 2, "lr": 10.0, "seed": 0,
     "time": 12.5},
    {"top1": 64.0, "top5": 93.125, "protocol": "knn", "dataset": "fashion-mnist", "split": "val",
     "source": "/tmp/somewhere/runs/demo/checkpoints/step-0000006", "k": 20, "seed": 0, "time": 3.0},
]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is 10x faster than two fighting for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_run(root: Path, model: str = "test_resnet", *, steps: int = 3, probes: list[dict] | None = None,
             metrics: bool = True, run_json: bool = True, mochi=(16, 16, 8), dataset: str = "fashion-mnist",
             image_size: int = 32) -> Path:
    """A run directory as `mochi train` leaves it, from a few real SGD steps of a MoCo-style loss."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(model=model, dataset=dataset, image_size=image_size, epochs=2, batch_size=8,
                         queue_size=64, mochi=mochi, warmup_epochs=1, workers=0, output=str(root), max_steps=steps)
    torch.manual_seed(0)
    query = Encoder(create_backbone(model), config.proj_dim)
    key = make_key_encoder(query)
    queue = NegativeQueue(config.queue_size, config.proj_dim, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(query.parameters(), lr=0.05, momentum=0.9)
    rows = []
    for step in range(1, steps + 1):  # real updates: weights and BN statistics move away from their init
        images = torch.randn(config.batch_size, 3, image_size, image_size)
        q = query(images + 0.1 * torch.randn_like(images))
        with torch.no_grad():
            k = key(images)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.keys.T], dim=1) / config.temperature
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        momentum_update(key, query, config.key_momentum)
        queue.enqueue(k)
        rows.append({"kind": "step", "step": step, "epoch": 0, "loss": loss.item(), "lr": 0.05 * (1 - step / 10),
                     "proxy_top1": float((logits.argmax(1) == 0).float().mean() * 100), "images_per_sec": 100.0})
    rows.append({"kind": "epoch", "step": steps, "epoch": 1, "loss": rows[-1]["loss"], "lr": rows[-1]["lr"],
                 "proxy_top1": rows[-1]["proxy_top1"], "alignment": 0.5, "uniformity": -2.0})
    final = save_checkpoint(root, steps, modules={"query": query, "key": key, "queue": queue}, optimizer=optimizer,
                            state={"step": steps, "epoch": 1, "config": config.to_dict()}, is_main=True, rank=0)
    finish_checkpoint(final, keep=2)
    if run_json:
        (root / "run.json").write_text(json.dumps({
            "config": config.to_dict(), "num_processes": 1, "global_batch_size": config.batch_size,
            "mochi_hub_version": "0.1.0", "summary": {"steps": steps, "wall_time_s": 1.0}}, indent=2))
    if metrics:
        (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
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
    env.update({"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"})
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
        label = "top1" if result.metric_name.startswith("top-1") else "top5"
        found.setdefault(key, {})[label] = result.metric_value
    return found


def probes_by_key(probes: list[dict]) -> dict[tuple, dict]:
    return {(p["protocol"], p["dataset"], p["split"]): {"top1": p["top1"], "top5": p["top5"]} for p in probes}

