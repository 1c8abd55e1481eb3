"""Detection data in the COCO layout and box AP.

    DIR/annotations/instances_train.json    images, annotations (bbox [x, y, width, height]), categories
    DIR/annotations/instances_val.json
    DIR/train/<file_name>, DIR/val/<file_name>   the images, named as the JSON names them

- `load_split` reads and checks one split up front: every image listed exists, every box lies inside its
  image, every category id is declared; each problem is one ValueError line naming the file and the entry.
  Images are decoded later, one at a time (`DetectionImages`).
- `evaluate_boxes` computes COCO box AP with a maintained evaluator: faster-coco-eval when installed (a C++
  port of the reference, the same numbers, several times faster), else pycocotools (the reference).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mochi_hub.core.seeding import generator
from mochi_hub.errors import InputError, OptionError, UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
LAYOUT = "annotations/instances_train.json, annotations/instances_val.json, images under train/ and val/"
BOX_TOLERANCE = 1.0  # pixels a box may reach past its image's border (rounding in converters); clipped to it
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # COCOeval.stats


def annotation_file(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


# --- one split, checked up front -------------------------------------------------------------------------


@dataclass
class CocoSplit:
    """A checked split: the JSON as read (`gt`, what the evaluator gets), the images in file order, and the
    training targets per image (crowd and zero-area boxes left out, as torchvision's reference does)."""

    root: Path
    split: str
    gt: dict[str, Any]
    images: list[dict[str, Any]]
    boxes: dict[int, list[tuple[list[float], int]]]  # image id -> [(x1, y1, x2, y2), category id]
    categories: list[dict[str, Any]]
    dropped: int = 0  # zero-area boxes: kept for the evaluator, left out of the training targets
    files_bytes: int = 0

    @property
    def folder(self) -> Path:
        return self.root / self.split

    @property
    def num_annotations(self) -> int:
        return sum(len(b) for b in self.boxes.values())

    def fingerprint(self) -> dict[str, Any]:
        """sha256 of the annotation file's bytes, image count and their total size (no image is read)."""
        return {
            "annotations_sha256": hashlib.sha256(annotation_file(self.root, self.split).read_bytes()).hexdigest(),
            "images": len(self.images),
            "annotations": len(self.gt["annotations"]),
            "image_bytes": self.files_bytes,
        }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read(path: Path, where: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{where}: {path.relative_to(path.parents[1])} is missing (the COCO layout: {LAYOUT})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(
            f"{where}: {path.name} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{where}: {path.name} is not readable ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{where}: {path.name} must hold an object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(
                f"{where}: {path.name} has no {key!r} list (a COCO file has images, annotations, categories)"
            )
    return data


def load_split(root: str | Path, split: str) -> CocoSplit:
    """Read DIR/annotations/instances_<split>.json and check it against DIR/<split>/; ValueError, one line each."""
    root = Path(root).expanduser()
    where = f"--data {root}"
    if not root.is_dir():
        raise OptionError(f"{where}: not a folder (expected the COCO layout: {LAYOUT})")
    path = annotation_file(root, split)
    data = _read(path, where)
    name = path.name

    categories = data["categories"]
    category_ids: set[int] = set()
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or "name" not in category:
            raise InputError(f"{where}: {name}: categories[{i}] needs an integer 'id' and a 'name'")
        if category["id"] in category_ids:
            raise InputError(f"{where}: {name}: category id {category['id']} is declared twice")
        category_ids.add(category["id"])
    if not categories:
        raise InputError(f"{where}: {name} declares no categories")

    images: dict[int, dict[str, Any]] = {}
    files_bytes = 0
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise InputError(f"{where}: {name}: images[{i}] is not an object")
        for key, kind in (("id", int), ("file_name", str), ("width", int), ("height", int)):
            if not isinstance(image.get(key), kind) or isinstance(image.get(key), bool):
                raise InputError(f"{where}: {name}: images[{i}] needs {key!r} ({kind.__name__})")
        if image["width"] <= 0 or image["height"] <= 0:
            raise InputError(f"{where}: {name}: image {image['file_name']} has size {image['width']}x{image['height']}")
        if image["id"] in images:
            raise InputError(f"{where}: {name}: image id {image['id']} is listed twice")
        file = root / split / image["file_name"]
        try:
            files_bytes += file.stat().st_size
        except OSError:
            raise InputError(
                f"{where}: image {image['file_name']} (id {image['id']}) is listed in {name} but {file} does not exist"
            ) from None
        images[image["id"]] = image
    if not images:
        raise InputError(f"{where}: {name} lists no images: the {split} set is empty")

    boxes: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images}
    dropped, annotation_ids = 0, set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
            raise InputError(f"{where}: {name}: annotations[{i}] needs an integer 'id'")
        label = f"{where}: {name}: annotation id {ann['id']}"
        if ann["id"] in annotation_ids:
            raise InputError(f"{label} is listed twice")
        annotation_ids.add(ann["id"])
        image = images.get(ann["image_id"]) if isinstance(ann.get("image_id"), int) else None
        if image is None:
            raise InputError(f"{label} refers to image id {ann.get('image_id')!r}, which {name} does not list")
        if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in category_ids:
            known = sorted(category_ids)
            raise InputError(
                f"{label} has category_id {ann.get('category_id')!r}, which is not in 'categories' "
                f"(ids {known[0]}..{known[-1]})"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise InputError(f"{label}: bbox must be [x, y, width, height] (4 numbers), got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        width, height = image["width"], image["height"]
        if w < 0 or h < 0:
            raise InputError(f"{label}: bbox {bbox} has a negative width or height")
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            raise InputError(f"{label}: box {bbox} lies outside its image {image['file_name']} ({width}x{height})")
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(width), x + w), min(float(height), y + h)
        if ann.get("iscrowd", 0):
            continue  # crowd regions only excuse detections at evaluation
        if x2 <= x1 or y2 <= y1:
            dropped += 1
            continue
        boxes[image["id"]].append(([x1, y1, x2, y2], ann["category_id"]))
    split_data = CocoSplit(root, split, data, list(images.values()), boxes, categories, dropped, files_bytes)
    if split_data.num_annotations == 0:
        raise InputError(
            f"{where}: {name} has no usable annotations: nothing to {'learn' if split == 'train' else 'evaluate'}"
        )
    return split_data


def load_dataset(root: str | Path) -> tuple[CocoSplit, CocoSplit]:
    """Both splits, checked, with the same categories (a model predicts train's; val is scored on them)."""
    train, val = load_split(root, "train"), load_split(root, "val")
    key = lambda cats: sorted((c["id"], c["name"]) for c in cats)  # noqa: E731
    if key(train.categories) != key(val.categories):
        raise InputError(f"--data {root}: instances_val.json declares other categories than instances_train.json")
    for split in (train, val):
        if split.dropped:
            log.warning("%s: %d zero-area box(es) left out of the training targets", split.split, split.dropped)
    return train, val


# --- images and targets, decoded lazily -------------------------------------------------------------------


class DetectionImages(Dataset):
    """Item i -> (image [3, H, W] float in [0, 1], target {"boxes" [n, 4] x1 y1 x2 y2, "labels" [n], "image_id"}),
    as torchvision's detection models take them. Labels are 1..C (0 is the background) in category-id order.
    `flip_seed`: a horizontal flip with probability 0.5 drawn from (seed, epoch, index), never a running RNG."""

    def __init__(self, split: CocoSplit, *, flip_seed: tuple[int, int] | None = None):
        self.split, self.flip_seed = split, flip_seed
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(sorted(split.categories, key=lambda c: c["id"]))}

    def __len__(self) -> int:
        return len(self.split.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        info = self.split.images[index]
        path = self.split.folder / info["file_name"]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise InputError(f"image {path}: not readable ({error})") from None
        if image.size != (info["width"], info["height"]):
            raise InputError(
                f"image {path}: {image.size[0]}x{image.size[1]} pixels, but its annotation file says "
                f"{info['width']}x{info['height']}"
            )
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)  # [3, H, W]
        found = self.split.boxes[info["id"]]
        boxes = torch.tensor([b for b, _ in found], dtype=torch.float32).reshape(-1, 4)  # [n, 4]
        labels = torch.tensor([self.label_of[c] for _, c in found], dtype=torch.int64)  # [n]
        if self.flip_seed is not None:
            seed, epoch = self.flip_seed
            if torch.rand((), generator=generator(seed, "detect_order", 2, epoch, index)) < 0.5:
                pixels = pixels.flip(-1)
                boxes = torch.stack(
                    [info["width"] - boxes[:, 2], boxes[:, 1], info["width"] - boxes[:, 0], boxes[:, 3]], 1
                )
        return pixels, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(info["id"])}


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images of any size stay a list: the detector's transform resizes and batches them."""
    return [image for image, _ in batch], [target for _, target in batch]


# --- box AP -----------------------------------------------------------------------------------------------


def evaluator() -> tuple[str, str]:
    """(name, version) of the evaluator `evaluate_boxes` uses."""
    for package, module in (("faster-coco-eval", "faster_coco_eval"), ("pycocotools", "pycocotools")):
        try:
            __import__(module)
            return package, version(package)
        except (ImportError, PackageNotFoundError):
            continue
    raise UserError(
        "no COCO evaluator is installed: pip install 'mochi-hub[detect]' (faster-coco-eval, or pycocotools)"
    )


def evaluate_boxes(
    gt: dict[str, Any], detections: list[dict[str, Any]], *, prefer: str | None = None
) -> dict[str, Any]:
    """COCO box AP of `detections` ([{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]) against the
    annotation file's content `gt`. Returns AP, AP50, AP75, APs, APm, APl (and AR1..ARl) in %, None where the
    evaluator finds nothing to score (e.g. no large objects), plus {"evaluator": {"name", "version"}}.
    `prefer`: "pycocotools" or "faster-coco-eval", else the faster one installed."""
    name, ver = (prefer, version(prefer)) if prefer else evaluator()
    gt = {"info": {}, **gt}  # pycocotools' loadRes copies gt["info"] when present; older files lack it
    log_lines = io.StringIO()
    with contextlib.redirect_stdout(log_lines):  # both evaluators print their progress; the library logs instead
        if name == "faster-coco-eval":
            from faster_coco_eval import COCO, COCOeval_faster

            truth = COCO(gt)
            found = truth.loadRes(detections) if detections else None
            stats = _stats(COCOeval_faster(truth, found, iouType="bbox", print_function=log.debug), found)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            truth = COCO()
            truth.dataset = gt
            truth.createIndex()
            found = truth.loadRes(detections) if detections else None
            stats = _stats(COCOeval(truth, found, iouType="bbox"), found)
    log.debug("%s", log_lines.getvalue())
    if stats is None:  # no detection at all: every range with ground truth scores 0
        stats = _empty_stats(gt)
    result: dict[str, Any] = {
        key: (round(100.0 * float(value), 4) if value >= 0 else None) for key, value in zip(METRICS, stats)
    }
    result["evaluator"] = {"name": name, "version": ver}
    return result


def _stats(evaluation: Any, found: Any) -> list[float] | None:
    if found is None:
        return None
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return [float(v) for v in evaluation.stats[: len(METRICS)]]


def _empty_stats(gt: dict[str, Any]) -> list[float]:
    """What COCOeval reports for no detections: 0 where a range has ground truth, -1 where it has none."""
    areas = [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in gt["annotations"] if not a.get("iscrowd", 0)]
    ranges = {
        "s": any(a < 32**2 for a in areas),
        "m": any(32**2 <= a < 96**2 for a in areas),
        "l": any(a >= 96**2 for a in areas),
    }
    has = [bool(areas)] * 3 + [ranges["s"], ranges["m"], ranges["l"]]
    return [0.0 if h else -1.0 for h in has + has]


def to_coco_detections(
    outputs: list[dict[str, Tensor]], image_ids: list[int], category_of: dict[int, int]
) -> list[dict[str, Any]]:
    """torchvision's predictions (x1 y1 x2 y2, label 1..C, score) -> COCO results (x y w h, category id)."""
    found = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().float().cpu()  # [n, 4]
        wh = boxes[:, 2:] - boxes[:, :2]  # [n, 2]
        for box, size, label, score in zip(
            boxes.tolist(), wh.tolist(), output["labels"].tolist(), output["scores"].tolist()
        ):
            found.append(
                {
                    "image_id": int(image_id),
                    "category_id": category_of[int(label)],
                    "bbox": [round(box[0], 3), round(box[1], 3), round(size[0], 3), round(size[1], 3)],
                    "score": round(float(score), 5),
                }
            )
    return found
