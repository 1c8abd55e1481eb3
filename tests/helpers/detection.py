"""Shared helpers of the detection tests: real-image canvases in the COCO layout, a tiny detector config, a tiny
timm folder, and reading box AP back from a model card. Imported by name (tests/conftest.py puts tests/helpers
on sys.path)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import timm
from images import tiny_backbone

from mochi_hub.config import DetectConfig, resolve_detect_config

sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))  # bench/canvases.py: the benchmark's data
from canvases import write_canvas_dataset


def canvases(root: Path, *, train: int = 4, val: int = 2, seed: int = 0, **kwargs: Any) -> Path:
    """Fashion-MNIST items on 128 px canvases (train items from the training split, val from the test split)."""
    return write_canvas_dataset(root, train=train, val=val, size=128, seed=seed, **kwargs)


def tiny_detect_config(data: Path, output: Path, **overrides: Any) -> DetectConfig:
    """A CPU-seconds fine-tuning: 128 px, batch 2, a 32-channel FPN, every stage trained, a short warm-up."""
    values = dict(
        data=str(data),
        output=str(output),
        epochs=2,
        batch_size=2,
        lr=0.02,
        lr_milestones=(100,),
        warmup_iters=2,
        image_size=128,
        fpn_channels=32,
        trainable_layers=5,
        workers=0,
    )
    return resolve_detect_config(**(values | overrides))


def tiny_timm_folder(folder: Path, seed: int = 0) -> Path:
    """tests/helpers/images.tiny_backbone saved by timm itself: a timm folder SOURCE."""
    timm.models.save_for_hf(tiny_backbone(seed), str(folder), safe_serialization=True)
    return folder


def edit_annotations(root: Path, split: str, edit) -> None:
    """Rewrite DIR/annotations/instances_<split>.json through edit(data) (which changes data in place)."""
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def copy_of(root: Path, target: Path) -> Path:
    return Path(shutil.copytree(root, target))


def detection_from_card(card) -> dict[tuple, dict[str, float]]:
    """A card's model-index -> {(dataset, split, setting): {"box AP": .., "box AP50": ..}} for object detection."""
    found: dict[tuple, dict[str, float]] = {}
    for result in card.data.eval_results or []:
        if result.task_type == "object-detection":
            key = (result.dataset_name, result.dataset_split, result.metric_config)
            found.setdefault(key, {})[result.metric_name] = result.metric_value
    return found
