"""Where images come from: a Hub dataset id, Parquet shards in the Hub's layout, a local imagefolder, or a named
source (imagenet-100 also as a view of an ImageNet-1K folder or shards, `--data-root`).

Every source is a map-style dataset with `classes`, `describe(i)` (a path or an id, for error reports) and
`read(i)`: the image as its encoded bytes (a file, a shard's `image` column) or, where there is no file, a PIL
image, with its label; `source[i]` is the decoded RGB image. Nothing is decoded until asked for: a folder of 1.28M
JPEGs is a file list, not an Arrow conversion, and a JPEG read as bytes can still be decoded at a reduced scale
(`decode_rgb(..., min_side)`) or handed to the GPU undecoded (mochi_hub.data.decode). `DecodedImages` decides per
image: a file that cannot be decoded is reported (by its path) and replaced by the next good one, so batches keep
their shape and an epoch never dies halfway; with `strict` it raises at the first one instead. Streaming shards
(`--streaming`) are mochi_hub.data.shards'.
"""

from __future__ import annotations

import gzip
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from mochi_hub.errors import InputError, OptionError, UserError

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
# The named sources that are subsets of a bigger one: `--dataset NAME --data-root DIR` reads them out of DIR.
SUBSETS = {"imagenet-100": IMAGENET100_CMC_CLASSES}
# What --data-root may hold for each named source (the subset's parent set, or the set itself).
DATA_ROOT_SOURCES = ("imagenet-100", "imagenet-1k")
SPLITS = ("train", "val")
HUB_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "test")}


# What an unusable image raises while it is read and decoded (PIL: OSError, SyntaxError, DecompressionBombError).
UNUSABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class BadImageError(UserError):
    """An image that cannot be used, with its path; raised only under --strict-data."""


Raw = bytes | Image.Image  # an encoded image file, or a PIL image where the source holds pixels, not files


class ImageSource(Protocol):
    classes: list[str]

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...
    def read(self, index: int) -> tuple[Raw, int]: ...
    def describe(self, index: int) -> str: ...


def open_image(raw: Raw) -> Image.Image:
    """Encoded bytes -> a PIL image whose pixels are not decoded yet (so `draft` can still shrink a JPEG)."""
    if isinstance(raw, Image.Image):
        return raw
    try:
        return Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:  # PIL's message names the buffer's address: one per read, so never the same
        raise UnidentifiedImageError("cannot identify image file") from None


def decode_rgb(raw: Raw, min_side: int | None = None) -> Image.Image:
    """An image -> decoded 8-bit RGB. min_side: a JPEG whose shorter side is longer is decoded at 1/2, 1/4 or 1/8
    scale (libjpeg's DCT scaling, `Image.draft`: several times cheaper than a full decode), the smallest that keeps
    the shorter side >= min_side; other formats are decoded whole."""
    image = open_image(raw)
    if min_side is not None and image.format == "JPEG" and min(image.size) > min_side:
        scale = min_side / min(image.size)
        image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    image.load()  # decode now, so a truncated file fails here and not inside a transform
    return to_rgb(image)


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

    read = __getitem__  # pixels, not files: nothing to decode

    def describe(self, index: int) -> str:
        return f"fashion-mnist:{self.split}[{index}]"


class ImageFolder(Dataset):
    """root/<class>/<image>: a sorted file list; nothing is opened until asked for.

    Every regular, non-hidden file counts, so a stray non-image file is reported rather than ignored. `classes`
    gives the label order; with `subset`, only those class folders are read (the others are left alone) and each
    must exist: ImageNet-100 as a view of an ImageNet-1K folder.
    """

    def __init__(self, root: str | Path, classes: list[str] | None = None, *, subset: bool = False):
        self.root = Path(root)
        self.split_name = self.root.name  # train/ or val/ of a split folder, else the folder's own name
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not found:
            loose = [p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")]
            what = f"{len(loose)} files but no class sub-folders" if loose else "no class sub-folders"
            raise InputError(
                f"--dataset {self.root}: {what}; expected {self.root}/<class>/<image> "
                "(one sub-folder per class; for unlabelled images, one folder such as unlabelled/)"
            )
        self.classes = classes if classes is not None else found
        if subset:
            if missing := [name for name in self.classes if name not in set(found)]:
                raise InputError(
                    f"--data-root: {self.root} has no folder {missing[0]}, one of the {len(self.classes)} classes "
                    f"asked for ({len(missing)} missing)"
                )
            found = self.classes
        elif missing := sorted(set(found) - set(self.classes)):
            raise InputError(f"{self.root}: class folders {missing[:5]} are not in the class list")
        index = {name: i for i, name in enumerate(self.classes)}
        self.files: list[tuple[str, int]] = []
        for name in sorted(found):
            for dirpath, dirnames, filenames in os.walk(self.root / name):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                self.files += [
                    (os.path.join(dirpath, f), index[name]) for f in sorted(filenames) if not f.startswith(".")
                ]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        raw, label = self.read(index)
        return decode_rgb(raw), label

    def read(self, index: int) -> tuple[bytes, int]:
        path, label = self.files[index]
        with open(path, "rb") as f:
            return f.read(), label

    def describe(self, index: int) -> str:
        return self.files[index][0]


class HubImages(Dataset):
    """A `datasets.Dataset` (a Hub dataset, or Parquet/Arrow shards) with an image column and a class-label column,
    read as encoded bytes. `keep`: class names to keep, in their label order (a named subset of a bigger set, e.g.
    ImageNet-100's synsets out of ImageNet-1K shards); the rows are selected by an index over the label column, the
    images stay where they are."""

    def __init__(self, dataset: Any, name: str, split_name: str | None = None, *, keep: list[str] | None = None):
        import datasets

        self.name = name
        self.split_name = split_name or str(getattr(dataset, "split", None) or "train")
        features = dataset.features
        self.image_column = next((c for c in ("image", "img", "jpg", "png") if c in features), None)
        self.label_column = next((c for c in ("label", "labels", "cls", "fine_label") if c in features), None)
        if self.image_column is None:
            raise InputError(f"--dataset {name}: no image column among {list(features)}")
        if isinstance(features[self.image_column], datasets.Image):  # bytes, not a decoded PIL image
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        label_feature = features.get(self.label_column) if self.label_column else None
        self.classes = list(getattr(label_feature, "names", None) or [])
        self.label_map: dict[int, int] | None = None
        if keep is not None:
            self.label_map = subset_labels(self.classes, keep, name)
            wanted = set(self.label_map)
            dataset = dataset.filter(
                lambda labels: [label in wanted for label in labels],
                input_columns=self.label_column,
                batched=True,
                batch_size=100_000,
                desc=f"selecting {len(keep)} classes",
            )
            self.classes = list(keep)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        raw, label = self.read(index)
        return decode_rgb(raw), label

    def read(self, index: int) -> tuple[Raw, int]:
        row = self.dataset[index]
        return image_bytes(row[self.image_column]), self.label(row)

    def label(self, row: dict[str, Any]) -> int:
        if not self.label_column:
            return -1
        label = int(row[self.label_column])
        return self.label_map[label] if self.label_map is not None else label

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


def image_bytes(value: Any) -> Raw:
    """A row's image as `datasets` stores it ({"bytes", "path"}: the bytes, else the file) -> the encoded file."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        with open(value["path"], "rb") as f:
            return f.read()
    return value  # bytes already, or a PIL image


def subset_labels(names: list[str], keep: list[str], where: str) -> dict[int, int]:
    """Label index in the bigger set -> index in `keep`. The bigger set's labels are synsets, or ImageNet-1K's
    1000 classes in the standard (sorted synset) order under any names, as the Hub's ImageNet-1K names them."""
    if len(names) == 1000 and not all(n.startswith("n") and n[1:].isdigit() for n in names):
        from timm.data import ImageNetInfo  # the 1000 synsets in the standard order, shipped with timm

        names = ImageNetInfo("imagenet-1k").label_names()
    index = {name: i for i, name in enumerate(names)}
    if missing := [name for name in keep if name not in index]:
        raise InputError(
            f"--data-root: {where} has no class {missing[0]}, one of the {len(keep)} asked for ({len(missing)} missing)"
        )
    return {index[name]: i for i, name in enumerate(keep)}


def load_split(name: str, split: str, *, streaming: bool) -> tuple[Any, str]:
    """(datasets.Dataset or IterableDataset, the split's name there) for our split (train / val), trying the
    names the Hub uses for a validation split."""
    import datasets

    errors = []
    for hub_split in HUB_SPLIT_NAMES[split]:
        try:
            return datasets.load_dataset(name, split=hub_split, streaming=streaming), hub_split
        except ValueError as error:  # unknown split: try the next name
            errors.append(str(error))
        except Exception as error:
            raise InputError(
                f"--dataset {name}: could not load split {hub_split!r} from the Hub, the HF cache or the folder "
                f"({type(error).__name__}: {error})"
            ) from error
    raise InputError(f"--dataset {name}: no split among {HUB_SPLIT_NAMES[split]}: {errors[-1]}")


def load_hub_dataset(name: str, split: str, *, keep: list[str] | None = None) -> HubImages:
    """A Hub dataset (or its copy in the HF cache), or a local folder of shards in the Hub's layout, through
    `datasets` (map-style: converted once into its Arrow cache)."""
    dataset, hub_split = load_split(name, split, streaming=False)
    return HubImages(dataset, name, split_name=hub_split, keep=keep)


def known_class_order(folder: Path) -> list[str] | None:
    """A local ImageNet-100 (every class folder a CMC synset) takes CMC's order, so its labels agree with the
    Hub copy and the paper; any other folder keeps its sorted folder names (None)."""
    found = {d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")}
    return IMAGENET100_CMC_CLASSES if found and found <= set(IMAGENET100_CMC_CLASSES) else None


def check_dataset_spec(spec: str, data_root: str | None = None) -> None:
    """Fail fast, when the config is built, on a `--dataset` that names nothing we know how to read."""
    if data_root is not None:
        if spec not in DATA_ROOT_SOURCES:
            raise OptionError(
                f"--data-root is for the named sources {', '.join(DATA_ROOT_SOURCES)}; for --dataset {spec}, "
                "give the folder as --dataset"
            )
        if not Path(data_root).expanduser().is_dir():
            raise OptionError(f"--data-root {data_root}: not a folder")
        return
    path = Path(spec).expanduser()
    if path.is_dir() or spec in HUB_SOURCES:
        return
    if path.exists():
        raise OptionError(
            f"--dataset {spec}: is a file; expected a folder of class sub-folders "
            "(root/<class>/<image>, or root/train/<class>/...), a folder of shards (root/data/train-*.parquet), "
            f"a Hub dataset id (org/name), or one of {', '.join(HUB_SOURCES)}"
        )
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return  # a Hub id: whether it exists is known only when it is loaded
    raise OptionError(
        f"--dataset {spec!r}: not a folder, not a Hub dataset id (org/name), and not one of the "
        f"named sources {', '.join(HUB_SOURCES)}"
    )


def is_shard_folder(path: Path) -> bool:
    """A local folder in the Hub's layout: data/<split>-NNNNN-of-MMMMM.parquet (or .arrow)."""
    data = path / "data"
    return data.is_dir() and any(f.suffix in (".parquet", ".arrow") for f in data.iterdir())


def resolve_dataset(
    spec: str, split: str = "train", *, classes: list[str] | None = None, data_root: str | None = None
) -> ImageSource:
    """`--dataset` -> an image source. spec: named source, local folder (images or shards), or Hub dataset id;
    with data_root, a named source read out of that folder (`source_in_root`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_dataset_spec(spec, data_root)
    if data_root is not None:
        return source_in_root(spec, split, Path(data_root).expanduser())
    path = Path(spec).expanduser()
    if is_shard_folder(path):
        return load_hub_dataset(str(path), split)
    if path.is_dir():
        folder = path / split if (path / "train").is_dir() else path
        if not folder.is_dir():
            raise OptionError(f"--dataset {spec}: no {split}/ folder (expected {path}/train and {path}/val)")
        return ImageFolder(folder, classes=classes if classes is not None else known_class_order(folder))
    if spec == "fashion-mnist" and (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        return FashionMNIST(split)
    if spec in HUB_SOURCES:
        return load_hub_dataset(HUB_SOURCES[spec], split)
    return load_hub_dataset(spec, split)  # an org/name id (check_dataset_spec let nothing else through)


def train_and_val(spec: str, data_root: str | None = None) -> tuple[ImageSource, ImageSource]:
    """A dataset's train and val splits, val's labels meaning what train's do (a folder's classes come from train/)."""
    train = resolve_dataset(spec, "train", data_root=data_root)
    classes = train.classes if isinstance(train, ImageFolder) else None
    return train, resolve_dataset(spec, "val", classes=classes, data_root=data_root)


def num_classes(source: ImageSource) -> int:
    """How many classes a labelled source has (its class list, else the largest label + 1)."""
    if source.classes:
        return len(source.classes)
    if isinstance(source, HubImages) and source.label_column:
        return int(max(source.dataset[source.label_column])) + 1
    raise InputError("the dataset has no class labels: kNN and linear evaluation need labelled images")


def source_in_root(name: str, split: str, root: Path) -> ImageSource:
    """`--dataset imagenet-100 --data-root DIR`: the named source as a view of what DIR holds, an ImageNet-1K
    folder (DIR/train/<synset>/, DIR/val/<synset>/) or its shards (DIR/data/train-*.parquet), nothing copied. A
    subset keeps its own class order (ImageNet-100: CMC's) and needs every one of its classes in DIR."""
    keep = SUBSETS.get(name)
    if is_shard_folder(root):
        return load_hub_dataset(str(root), split, keep=keep)
    folder = root / split
    if not folder.is_dir():
        raise InputError(
            f"--data-root {root}: no {split}/ folder and no shards (expected {root}/{split}/<synset>/<image> "
            f"or {root}/data/{split}-00000-of-NNNNN.parquet)"
        )
    return ImageFolder(folder, classes=keep, subset=keep is not None)


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
    name: str = ""  # the image's path or id (source.describe)


class DecodedImages(Dataset):
    """source -> transform(decode(raw image)), replacing each undecodable image by the next good one.

    decode: the source's raw image (bytes, or a PIL image) -> what the transform takes; by default the whole image
    as RGB (`decode_rgb`); None hands the raw image to the transform."""

    def __init__(
        self,
        source: ImageSource,
        transform: Callable,
        *,
        strict: bool = False,
        indices: list[int] | None = None,
        decode: Callable[[Raw], Any] | None = decode_rgb,
    ):
        self.source = source
        self.transform = transform
        self.decode = decode
        self.strict = strict
        self.indices = indices if indices is not None else list(range(len(source)))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        skipped = []
        for step in range(len(self.indices)):
            source_index = self.indices[(index + step) % len(self.indices)]
            try:
                raw, label = self.source.read(source_index)
                image = self.transform(raw if self.decode is None else self.decode(raw))
                return Sample(image, label, skipped, self.source.describe(source_index))
            except UNUSABLE as error:
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
