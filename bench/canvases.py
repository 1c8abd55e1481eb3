"""The canvas benchmark in the COCO layout (mochi_hub.evaluate.coco reads it): real Fashion-MNIST items pasted onto
canvases (train canvases from the training split, val canvases from the test split), each box the tight outline of
the item's own (non-zero) pixels, no two boxes touching. Used by bench/detection.py and the detection tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mochi_hub.core.persist import write_json
from mochi_hub.data.datasets import FASHION_MNIST_CLASSES, FashionMNIST
from mochi_hub.evaluate.coco import annotation_file


@dataclass
class _Canvas:
    pixels: np.ndarray  # [size, size, 3] uint8
    boxes: list[list[int]] = field(default_factory=list)  # x, y, w, h (pixel-exact)
    areas: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def _background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    if not photos:
        return np.zeros((size, size, 3), np.uint8)
    photo = photos[int(rng.integers(len(photos)))]
    side = min(photo.shape[:2])
    crop = int(rng.integers(max(1, side // 3), side + 1))
    y, x = int(rng.integers(photo.shape[0] - crop + 1)), int(rng.integers(photo.shape[1] - crop + 1))
    tile = Image.fromarray(photo[y : y + crop, x : x + crop]).resize((size, size), Image.BILINEAR)
    return np.asarray(tile, np.uint8).copy()


def _overlaps(box: list[int], others: list[list[int]], gap: int = 1) -> bool:
    x, y, w, h = box
    return any(
        x < ox + ow + gap and ox < x + w + gap and y < oy + oh + gap and oy < y + h + gap for ox, oy, ow, oh in others
    )


def _canvas(
    rng: np.random.Generator,
    items: Any,
    size: int,
    count: tuple[int, int],
    scale: tuple[float, float],
    photos: list[np.ndarray],
) -> _Canvas:
    """Paste up to `count` items, each scaled, placed where its tight box touches no other box; an item that
    finds no free place in 50 tries is left out (the canvas keeps the ones placed)."""
    canvas = _Canvas(_background(rng, photos, size))
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        index = int(rng.integers(len(items.labels)))
        side = min(size, max(8, round(28 * float(rng.uniform(*scale)))))
        item = np.asarray(Image.fromarray(items.images[index]).resize((side, side), Image.BILINEAR))  # [side, side]
        rows, cols = np.nonzero(item.any(1))[0], np.nonzero(item.any(0))[0]
        if not len(rows):
            continue
        top, left = rows[0], cols[0]
        h, w = rows[-1] - top + 1, cols[-1] - left + 1
        for _ in range(50):
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            if not _overlaps([x, y, w, h], canvas.boxes):
                break
        else:
            continue
        patch = item[top : top + h, left : left + w]  # [h, w], the tight crop
        mask = patch > 0
        canvas.pixels[y : y + h, x : x + w][mask] = patch[
            mask, None
        ]  # the item's own pixels, grey, over the background
        canvas.boxes.append([x, y, int(w), int(h)])
        canvas.areas.append(int(mask.sum()))
        canvas.labels.append(int(items.labels[index]))
    return canvas


def write_canvas_dataset(
    root: str | Path,
    *,
    train: int = 64,
    val: int = 32,
    size: int = 128,
    items: tuple[int, int] = (1, 3),
    seed: int = 0,
    backgrounds: Sequence[str | Path | np.ndarray | Image.Image] | None = None,
    scale: tuple[float, float] = (1.0, 2.5),
) -> Path:
    """Write a detection benchmark in the COCO layout under `root` from Debian's real Fashion-MNIST images.

    `train` canvases take their items from Fashion-MNIST's training split, `val` canvases from its test split,
    so no item is seen in both. Each canvas is `size` x `size` pixels and holds `items` = (min, max) items, each
    resized by a factor drawn from `scale` (28 px -> 28..70 px by default) and pasted where its pixels are
    non-zero; its box is the tight outline of those pixels, its area their count (COCO's segment area), and no
    two boxes overlap or touch. `backgrounds`: photos (paths, arrays, PIL images); each canvas then lies on a
    random crop of one instead of black. The same arguments write the same bytes.
    """
    root = Path(root)
    photos = [
        np.asarray((Image.open(b) if isinstance(b, (str, Path)) else Image.fromarray(np.asarray(b))).convert("RGB"))
        for b in backgrounds or ()
    ]
    categories = [
        {"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(FASHION_MNIST_CLASSES)
    ]
    for number, (split, canvases, source) in enumerate((("train", train, "train"), ("val", val, "test"))):
        items_source = FashionMNIST(source)
        rng = np.random.default_rng([seed, number])
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(canvases):
            canvas = _canvas(rng, items_source, size, items, scale, photos)
            file_name = f"{i:06d}.png"
            Image.fromarray(canvas.pixels if photos else canvas.pixels[..., 0]).save(root / split / file_name)
            images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
            for box, area, label in zip(canvas.boxes, canvas.areas, canvas.labels):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": label + 1,
                        "bbox": box,
                        "area": area,
                        "iscrowd": 0,
                    }
                )
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        info = {
            "description": f"Fashion-MNIST canvases ({split}: items from the {source} split), mochi-hub",
            "size": size,
            "items": list(items),
            "scale": list(scale),
            "seed": seed,
            "backgrounds": len(photos),
        }
        write_json(
            annotation_file(root, split),
            {"info": info, "images": images, "annotations": annotations, "categories": categories},
        )
    return root
