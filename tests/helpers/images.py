"""Real Fashion-MNIST images and a tiny timm backbone for the probe tests (the fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mochi_hub.config import ProbeConfig, resolve_probe_config
from mochi_hub.data.datasets import FASHION_MNIST_CLASSES, FashionMNIST
from mochi_hub.method.model import create_backbone

TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3  # 80 training and 30 validation images


def fmnist_subset(split: str, per_class: int) -> list[tuple[np.ndarray, int]]:
    """The first `per_class` Fashion-MNIST images of each class, in file order."""
    source = FashionMNIST(split)
    picked, count = [], [0] * 10
    for image, label in zip(source.images, source.labels):
        if count[label] < per_class:
            picked.append((image, int(label)))
            count[label] += 1
        if min(count) == per_class:
            return picked
    raise AssertionError("not enough images")


def folder_name(label: int) -> str:
    return f"{label}-{FASHION_MNIST_CLASSES[label].lower().replace('/', '-').replace(' ', '-')}"


def tiny_backbone(seed: int = 0) -> nn.Module:
    """test_resnet with non-trivial BatchNorm statistics, so eval-mode BN is not the identity."""
    torch.manual_seed(seed)
    backbone = create_backbone("test_resnet")
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return backbone.eval()


def small(tmp_path: Path, **overrides) -> ProbeConfig:
    """A probe config for a few real images: 2 epochs, batch 16, the cache and result under tmp_path."""
    values = dict(
        dataset="fashion-mnist",
        image_size=32,
        epochs=2,
        batch_size=16,
        lr=0.5,
        lr_milestones=(1,),
        workers=0,
        cache_dir=str(tmp_path / "cache"),
        output=str(tmp_path / "out.json"),
    )
    return resolve_probe_config(**(values | overrides))


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image's bundled colour photos: no download


def write_photo_jpegs(root: Path, per_class: int, *, seed: int = 0) -> Path:
    """root/train/<photo>/<n>.jpg and root/val/...: real colour photos as JPEGs of mixed sizes, landscape and
    portrait (random crops of scikit-image's photos, shrunk to 40-96 px sides), one class per photo."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)())
        for split, count in (("train", per_class), ("val", max(1, per_class // 4))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                w, h = (int(v) for v in rng.integers(40, 97, 2))
                side = int(min(photo.size) * rng.uniform(0.5, 1.0))
                x, y = (int(rng.integers(0, limit - side + 1)) for limit in photo.size)
                crop = photo.crop((x, y, x + side, y + side)).resize((w, h), Image.Resampling.LANCZOS)
                crop.save(folder / f"{n:03d}.jpg", quality=int(rng.integers(85, 96)))
    return root


def write_shards(root: Path, rows: dict[str, list[tuple[bytes, int]]], names: list[str], shards: int) -> Path:
    """root/data/<split>-NNNNN-of-MMMMM.parquet as `datasets` writes them (push_to_hub's layout): an `image` column
    (encoded bytes) and a `label` ClassLabel, `shards` files per split."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    for split, split_rows in rows.items():
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b, _ in split_rows], "label": [label for _, label in split_rows]},
            features=features,
        )
        for index in range(shards):
            part = table.shard(shards, index, contiguous=True)
            part.to_parquet(str(root / "data" / f"{split}-{index:05d}-of-{shards:05d}.parquet"))
    return root


def folder_rows(folder: Path, names: list[str]) -> list[tuple[bytes, int]]:
    """(file bytes, label) of folder/<class>/<file>, classes numbered by their place in `names`."""
    return [
        (path.read_bytes(), names.index(path.parent.name))
        for path in sorted(folder.glob("*/*"))
        if path.parent.name in names
    ]
