"""The suite's tiers, each a folder (its marker is added here), and what every test shares.

    tests/unit         no train(), no subprocess: math, configs, the card, the CLI's mapping (under a minute)
    tests/integration  the real library in this process: train(), probe, export, push to a local Hub endpoint
    tests/e2e          subprocesses: kill -9, torchrun, the installed `mochi`, packaging, the benches

`make test` (CI) runs unit + integration + the e2e tests marked `ci`; `make test-all` runs every test.
Tests outside tests/unit read Debian's real Fashion-MNIST images: without them the session stops with one
line saying how to install them (CI installs them; a skip would hide that nothing real was tested).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from mochi_hub.data.datasets import FASHION_MNIST_CLASSES, HubImages

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "helpers"))  # runs.py, images.py, hub_server.py: shared helpers, imported by name
from images import (  # noqa: E402
    TRAIN_PER_CLASS,
    VAL_PER_CLASS,
    fmnist_subset,
    folder_name,
    tiny_backbone,
    write_photo_jpegs,
)

TIERS = ("unit", "integration", "e2e")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_images = False
    for item in items:
        tier = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
        needs_images |= tier != "unit"
    from mochi_hub.data.datasets import DEBIAN_FASHION_MNIST

    missing = [name for name in FASHION_MNIST_FILES if not (DEBIAN_FASHION_MNIST / name).is_file()]
    if needs_images and missing:
        pytest.exit(
            f"Debian's dataset-fashion-mnist is missing ({DEBIAN_FASHION_MNIST}/{missing[0]}): "
            "`make fashion-mnist` or `apt-get install dataset-fashion-mnist` installs it",
            returncode=3,
        )


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is much faster than two fighting for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- real images and a tiny backbone, shared by the probe tests -------------------------------------------


@pytest.fixture(scope="session")
def photo_jpegs(tmp_path_factory) -> Path:
    """A folder (train/ 4 classes x 16, val/ 4 x 4) of real colour photos as JPEGs of mixed sizes."""
    return write_photo_jpegs(tmp_path_factory.mktemp("photo-jpegs"), per_class=16)


@pytest.fixture(scope="module")
def fmnist_folder(tmp_path_factory) -> Path:
    """root/{train,val}/<class>/<n>.png: real Fashion-MNIST images, the same pixels as `fmnist_arrow`."""
    root = tmp_path_factory.mktemp("fmnist")
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for n, (pixels, label) in enumerate(fmnist_subset(split, per_class)):
            folder = root / split / folder_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(folder / f"{n:04d}.png")
    return root


@pytest.fixture(scope="module")
def fmnist_arrow(tmp_path_factory) -> tuple[HubImages, HubImages]:
    """The same images as a `datasets` Dataset (Image + ClassLabel), saved to disk and loaded back."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)})
    loaded = []
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        rows = fmnist_subset(split, per_class)
        # In the imagefolder's order (sorted by class folder, then file), so indices line up.
        rows = sorted(enumerate(rows), key=lambda r: (r[1][1], r[0]))
        ds = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(p, mode="L") for _, (p, _) in rows], "label": [label for _, (_, label) in rows]},
            features=features,
        )
        path = tmp_path_factory.mktemp("arrow") / split
        ds.save_to_disk(str(path))
        loaded.append(HubImages(datasets.load_from_disk(str(path)), "fmnist-arrow"))
    return loaded[0], loaded[1]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """tiny_backbone() saved by timm itself (save_for_hf): a timm folder that is not ours."""
    folder = tmp_path_factory.mktemp("export") / "tiny"
    timm.models.save_for_hf(tiny_backbone(), str(folder), safe_serialization=True)
    return folder
