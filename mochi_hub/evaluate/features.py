"""Frozen-backbone features: extracted once per (weights, dataset, split, transform) and cached on disk.

A cache entry is `<cache>/<key>.safetensors` (features [N, D] float32, labels [N] int64) plus
`<key>.json` (what the key was made of). The key is a sha256 of the weights' hash, the dataset's
fingerprint (its spec, size and, for a folder, its file list), the split, the image indices used and
the transform's repr, so a change to any of them is a cache miss and never a stale hit.
Entries are written to a temporary name and renamed: a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mochi_hub.core import persist
from mochi_hub.data.datasets import DecodedImages, FashionMNIST, HubImages, ImageFolder, ImageSource, collate_samples

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    root = (
        os.environ.get("MOCHI_HUB_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mochi-hub"
    )
    return Path(root)


def dataset_fingerprint(source: ImageSource, spec: str) -> dict[str, Any]:
    """What identifies a dataset's content well enough to key a cache, cheaply (no image is read)."""
    fp = {"spec": spec, "type": type(source).__name__, "size": len(source)}
    if isinstance(source, ImageFolder):
        files = hashlib.sha256("\n".join(f"{p}\t{label}" for p, label in source.files).encode()).hexdigest()
        fp.update(root=str(source.root.resolve()), files_sha256=files)
    elif isinstance(source, FashionMNIST):
        fp.update(root=str(source.root), split=source.split)
    elif isinstance(source, HubImages):
        fp.update(name=source.name, fingerprint=getattr(source.dataset, "_fingerprint", None))
    return fp


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str).encode()
    ).hexdigest()[:32]


def load_cached(cache_dir: Path, key: str) -> tuple[Tensor, Tensor] | None:
    """A cache hit, or None (a missing or unreadable entry is a miss: it is extracted again)."""
    path = cache_dir / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = persist.load_tensors(path)
        return tensors["features"], tensors["labels"]
    except (persist.StateFileError, KeyError):
        return None


def save_cached(cache_dir: Path, key: str, features: Tensor, labels: Tensor, parts: dict[str, Any]) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    persist.write_json(cache_dir / f"{key}.json", parts)
    return persist.save_tensors(cache_dir / f"{key}.safetensors", {"features": features, "labels": labels})


class FeatureTensors(Dataset):
    """Cached features as a dataset whose batches are one tensor index each (`__getitems__`), so an epoch
    over 1.28M features costs a few thousand indexing calls rather than a million Python calls."""

    def __init__(self, features: Tensor, labels: Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"inputs": self.features[index], "labels": self.labels[index]}

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return {"inputs": self.features[rows], "labels": self.labels[rows], "skipped": []}


def feature_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """collate_fn for FeatureTensors: `__getitems__` already returns the batch."""
    return batch


def image_batch(samples: list) -> dict[str, Any]:
    """collate_fn for DecodedImages: the same keys as feature batches ("inputs", "labels", "skipped")."""
    batch = collate_samples(samples)
    return {"inputs": batch["images"], "labels": batch["labels"], "skipped": batch["skipped"]}


@torch.no_grad()
def extract(
    backbone: nn.Module,
    images: DecodedImages,
    *,
    accelerator,
    batch_size: int,
    workers: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Features of every image, in dataset order, on every process (each process runs its shard, then
    gather_for_metrics reassembles and drops the padding). Returns (features [N, D] float32 CPU,
    labels [N], skipped-image reports)."""
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=image_batch)
    loader = accelerator.prepare_data_loader(loader)
    features, labels, skipped = [], [], []
    for batch in loader:
        with accelerator.autocast():
            out = backbone(batch["inputs"])  # [b, D]
        out, lab = accelerator.gather_for_metrics((out.float().contiguous(), batch["labels"]))
        features.append(out.cpu())
        labels.append(lab.cpu())
        skipped += batch["skipped"]
        if on_batch is not None:
            on_batch(len(batch["labels"]))
    return torch.cat(features), torch.cat(labels), skipped
