"""Where images come from: a Hub dataset id, a local imagefolder, or a named source.

Every source is a map-style dataset of (PIL image, label) with `classes` and `describe(i)` (a path or an
id, for error reports). Images are decoded lazily, one at a time: a folder of 1.28M JPEGs is a file list,
not an Arrow conversion. `DecodedImages` turns any source into tensors and decides per image: a file that
cannot be decoded is reported (by its path) and replaced by the next good one, so batches keep their
shape and an epoch never dies halfway; with `strict` it raises at the first one instead.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Named sources: what `--dataset NAME` means. Hub copies are used when no local copy exists.
HUB_SOURCES = {
    "imagenet-100": "clane9/imagenet-100",  # the CMC 100-class subset (Tian et al., arXiv:1906.05849)
    "imagenet-1k": "ILSVRC/imagenet-1k",
    "fashion-mnist": "zalando-datasets/fashion_mnist",
}
# ImageNet-100 as CMC defined it (Tian et al., arXiv:1906.05849; HobbitLong/CMC imagenet100.txt), in CMC's
# order, which is also the label order of the Hub copy clane9/imagenet-100: one synset a line, in the package.
IMAGENET100_CMC_CLASSES = resources.files(__package__).joinpath("imagenet100.txt").read_text().split()
SPLITS = ("train", "val")
HUB_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "test")}


class BadImageError(RuntimeError):
    """An image that cannot be used, with its path; raised only under --strict-data."""


class ImageSource(Protocol):
    classes: list[str]

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...
    def describe(self, index: int) -> str: ...


class FashionMNIST(Dataset):
    """Fashion-MNIST from the original idx gz files (Debian's dataset-fashion-mnist installs them)."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, split: str, root: Path = DEBIAN_FASHION_MNIST):
        prefix = "train" if split == "train" else "t10k"
        self.root = root
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz") as f:
            self.images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)  # [n, 28, 28]
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz") as f:
            self.labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)  # [n]
        self.split = prefix
        self.split_name = "train" if split == "train" else "test"  # what the dataset itself calls the split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L"), int(self.labels[index])

    def describe(self, index: int) -> str:
        return f"fashion-mnist:{self.split}[{index}]"


class ImageFolder(Dataset):
    """root/<class>/<image>: a sorted file list; nothing is opened until asked for.

    Every regular, non-hidden file counts, so a stray non-image file is reported rather than ignored.
    """

    def __init__(self, root: str | Path, classes: list[str] | None = None):
        self.root = Path(root)
        self.split_name = self.root.name  # train/ or val/ of a split folder, else the folder's own name
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            loose = [p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")]
            what = f"{len(loose)} files but no class sub-folders" if loose else "no class sub-folders"
            raise ValueError(
                f"--dataset {self.root}: {what}; expected {self.root}/<class>/<image> "
                "(one sub-folder per class; for unlabelled images, one folder such as unlabelled/)"
            )
        self.classes = classes if classes is not None else found
        missing = sorted(set(found) - set(self.classes))
        if missing:
            raise ValueError(f"{self.root}: class folders {missing[:5]} are not in the class list")
        index = {name: i for i, name in enumerate(self.classes)}
        self.files: list[tuple[str, int]] = []
        for name in found:
            for dirpath, dirnames, filenames in os.walk(self.root / name):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                self.files += [
                    (os.path.join(dirpath, f), index[name]) for f in sorted(filenames) if not f.startswith(".")
                ]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.files[index]
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not inside a transform
        return image, label

    def describe(self, index: int) -> str:
        return self.files[index][0]


class HubImages(Dataset):
    """A `datasets.Dataset` with an image column and a class-label column."""

    def __init__(self, dataset: Any, name: str, split_name: str | None = None):
        self.dataset = dataset
        self.name = name
        self.split_name = split_name or str(getattr(dataset, "split", None) or "train")
        features = dataset.features
        self.image_column = next((c for c in ("image", "img", "jpg", "png") if c in features), None)
        self.label_column = next((c for c in ("label", "labels", "cls", "fine_label") if c in features), None)
        if self.image_column is None:
            raise ValueError(f"--dataset {name}: no image column among {list(features)}")
        label_feature = features.get(self.label_column) if self.label_column else None
        self.classes = list(getattr(label_feature, "names", None) or [])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.dataset[index]
        label = int(row[self.label_column]) if self.label_column else -1
        return row[self.image_column], label

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


def load_hub_dataset(name: str, split: str) -> HubImages:
    """A Hub dataset (or its copy in the HF cache) through `datasets`."""
    import datasets

    errors = []
    for hub_split in HUB_SPLIT_NAMES[split]:
        try:
            return HubImages(datasets.load_dataset(name, split=hub_split), name, split_name=hub_split)
        except ValueError as error:  # unknown split: try the next name
            errors.append(str(error))
        except Exception as error:
            raise ValueError(
                f"--dataset {name}: could not load split {hub_split!r} from the Hub "
                f"or the HF cache ({type(error).__name__}: {error})"
            ) from error
    raise ValueError(f"--dataset {name}: no split among {HUB_SPLIT_NAMES[split]}: {errors[-1]}")


def known_class_order(folder: Path) -> list[str] | None:
    """A local ImageNet-100 (every class folder a CMC synset) takes CMC's order, so its labels agree with the
    Hub copy and the paper; any other folder keeps its sorted folder names (None)."""
    found = {d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")}
    return IMAGENET100_CMC_CLASSES if found and found <= set(IMAGENET100_CMC_CLASSES) else None


def check_dataset_spec(spec: str) -> None:
    """Fail fast, when the config is built, on a `--dataset` that names nothing we know how to read."""
    path = Path(spec).expanduser()
    if path.is_dir() or spec in HUB_SOURCES:
        return
    if path.exists():
        raise ValueError(
            f"--dataset {spec}: is a file; expected a folder of class sub-folders "
            "(root/<class>/<image>, or root/train/<class>/...), a Hub dataset id (org/name), or one of "
            f"{', '.join(HUB_SOURCES)}"
        )
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return  # a Hub id: whether it exists is known only when it is loaded
    raise ValueError(
        f"--dataset {spec!r}: not a folder, not a Hub dataset id (org/name), and not one of the "
        f"named sources {', '.join(HUB_SOURCES)}"
    )


def resolve_dataset(spec: str, split: str = "train", *, classes: list[str] | None = None) -> ImageSource:
    """`--dataset` -> an image source. spec: named source, local folder, or Hub dataset id."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_dataset_spec(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path / split if (path / "train").is_dir() else path
        if not folder.is_dir():
            raise ValueError(f"--dataset {spec}: no {split}/ folder (expected {path}/train and {path}/val)")
        return ImageFolder(folder, classes=classes if classes is not None else known_class_order(folder))
    if spec == "fashion-mnist" and (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        return FashionMNIST(split)
    if spec in HUB_SOURCES:
        return load_hub_dataset(HUB_SOURCES[spec], split)
    return load_hub_dataset(spec, split)  # an org/name id (check_dataset_spec let nothing else through)


def train_and_val(spec: str) -> tuple[ImageSource, ImageSource]:
    """A dataset's train and val splits, val's labels meaning what train's do (a folder's classes come from train/)."""
    train = resolve_dataset(spec, "train")
    classes = train.classes if isinstance(train, ImageFolder) else None
    return train, resolve_dataset(spec, "val", classes=classes)


def num_classes(source: ImageSource) -> int:
    """How many classes a labelled source has (its class list, else the largest label + 1)."""
    if source.classes:
        return len(source.classes)
    if isinstance(source, HubImages) and source.label_column:
        return int(max(source.dataset[source.label_column])) + 1
    raise ValueError("the dataset has no class labels: kNN and linear evaluation need labelled images")


def first_labels(source: ImageSource, count: int) -> list[int] | None:
    """Labels of the first `count` images where they are known without decoding any image, else None."""
    if isinstance(source, ImageFolder):
        return [label for _, label in source.files[:count]]
    if isinstance(source, FashionMNIST):
        return source.labels[:count].tolist()
    if isinstance(source, HubImages) and source.label_column:
        return list(source.dataset.select(range(count))[source.label_column])
    return None


def missing_classes_note(source: ImageSource, count: int) -> str | None:
    """A warning when the first `count` images (--max-train-images) leave out some of the source's classes,
    as they do in a class-sorted folder."""
    labels = first_labels(source, count) if count < len(source) else None
    if not labels or not source.classes:
        return None
    seen = len(set(labels))
    if seen >= len(source.classes):
        return None
    return (
        f"--max-train-images {count} takes the first {count} images, which cover {seen} of the "
        f"{len(source.classes)} classes (the source lists its images class by class)"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16/32-bit grayscale is rescaled, not clipped at 255."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class Sample:
    image: Any  # whatever the transform returns
    label: int
    skipped: list[str]  # sources passed over to reach this sample, with the reason


class DecodedImages(Dataset):
    """source -> transform(RGB image), replacing each undecodable image by the next good one."""

    def __init__(
        self, source: ImageSource, transform: Callable, *, strict: bool = False, indices: list[int] | None = None
    ):
        self.source = source
        self.transform = transform
        self.strict = strict
        self.indices = indices if indices is not None else list(range(len(source)))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        skipped = []
        for step in range(len(self.indices)):
            source_index = self.indices[(index + step) % len(self.indices)]
            try:
                image, label = self.source[source_index]
                return Sample(self.transform(to_rgb(image)), label, skipped)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                reason = f"{self.source.describe(source_index)}: {type(error).__name__}: {error}"
                if self.strict:
                    raise BadImageError(f"unusable image (--strict-data): {reason}") from error
                skipped.append(reason)
        raise BadImageError(f"no usable image in the dataset; first failure: {skipped[0]}")


def collate_samples(samples: list[Sample]) -> dict[str, Any]:
    """Stack images (a tensor or a pair of tensors per sample) and labels; carry the skip reports."""
    first = samples[0].image
    if isinstance(first, tuple):
        images = tuple(torch.stack([s.image[v] for s in samples]) for v in range(len(first)))
    else:
        images = torch.stack([s.image for s in samples])
    return {
        "images": images,
        "labels": torch.tensor([s.label for s in samples], dtype=torch.long),
        "skipped": [reason for s in samples for reason in s.skipped],
    }
