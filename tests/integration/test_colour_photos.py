"""The real image pipeline on colour photos that a package ships: scikit-image's bundled sample photos, written
as JPEG files into an imagefolder, decoded by PIL, augmented by MoCo-v2's transform, trained on and probed."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from mochi_hub.config import TrainConfig, resolve_probe_config
from mochi_hub.data.augment import MEAN, STD
from mochi_hub.data.datasets import DEBIAN_FASHION_MNIST, HubImages, missing_classes_note, resolve_dataset
from mochi_hub.data.views import pretraining_views
from mochi_hub.evaluate.probe import run_probe
from mochi_hub.training.pretrain import train

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # files inside the scikit-image wheel: no download


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """train/ and val/ with one class per photo: 12 + 4 square crops of it, as JPEG files."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        photo = Image.fromarray(getattr(skimage.data, name)())
        side = int(min(photo.size) * 0.6)
        for split, count in (("train", 12), ("val", 4)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                x, y = (int(rng.integers(0, limit - side + 1)) for limit in photo.size)
                photo.crop((x, y, x + side, y + side)).save(folder / f"{i}.jpg", quality=90)
    return root


def gray_share(dataset: str, count: int) -> float:
    """Share of MoCo-v2 views (2 per image, seeded) whose three channels are equal, i.e. gray."""
    images = pretraining_views(
        resolve_dataset(dataset, "train"), TrainConfig(dataset=dataset, image_size=32, max_train_images=count, seed=0)
    )
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    gray = []
    for i in range(count):
        for view in images[i].image:
            pixels = (view * std + mean).mul(255).round()  # [3, H, W], back to 8-bit values
            gray.append(bool((pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all()))
    return sum(gray) / len(gray)


def test_colour_augmentation_acts_on_colour_photos_and_not_on_grayscale_images(photo_folder):
    # Colour photos: only RandomGrayscale (p = 0.2) makes a view gray; jitter keeps the colour.
    assert 0.1 <= gray_share(str(photo_folder), 48) <= 0.3  # 96 seeded views; the expected share is 0.2
    # Fashion-MNIST (R = G = B): every view stays gray, so saturation, hue and grayscale do nothing (docs/study).
    if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        assert gray_share("fashion-mnist", 16) == 1.0


def test_train_and_probe_on_a_folder_of_colour_jpegs(photo_folder, tmp_path):
    config = TrainConfig(
        dataset=str(photo_folder),
        model="test_resnet",
        image_size=32,
        epochs=2,
        batch_size=16,
        queue_size=32,
        mochi=(8, 8, 4),
        mixing_warmup_epochs=1,
        workers=0,
        output=str(tmp_path / "run"),
        log_every_steps=1,
        report_to="none",
        bn_splits=2,
    )
    run_dir = train(config)
    summary = json.loads((run_dir / "run.json").read_text())["summary"]
    assert summary["images_seen"] == 2 * 3 * 16 and summary["images_skipped"] == 0  # 48 images: 3 batches an epoch
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["mixing"] for r in steps if r["kind"] == "step"] == [False] * 3 + [True] * 3

    result = run_probe(
        str(run_dir),
        resolve_probe_config(dataset=str(photo_folder), protocol="knn", split="val", image_size=32, workers=0),
        show=False,
    )
    assert (result["train_images"], result["eval_images"]) == (48, 16)
    # Crops of four different photos: even a barely trained backbone's features separate them well.
    assert result["top1"] >= 75.0


def test_a_subset_that_leaves_out_classes_of_a_sorted_folder_is_warned_about(photo_folder, tmp_path, caplog):
    source = resolve_dataset(str(photo_folder), "train")  # 4 classes x 12 images, class by class
    assert missing_classes_note(source, 48) is None and missing_classes_note(source, 37) is None
    assert "cover 2 of the 4 classes" in missing_classes_note(source, 16)  # 12 astronaut + 4 chelsea
    hub = datasets.Dataset.from_dict(
        {"image": [Image.open(next((photo_folder / "val" / "coffee").iterdir()))] * 5, "label": [0, 0, 0, 1, 2]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}),
    )
    assert "cover 1 of the 3 classes" in missing_classes_note(HubImages(hub, "org/photos"), 3)
    assert missing_classes_note(HubImages(hub, "org/photos"), 5) is None
    if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():  # shuffled: the study's subset is fine
        assert missing_classes_note(resolve_dataset("fashion-mnist", "train"), 16384) is None

    train(
        TrainConfig(
            dataset=str(photo_folder),
            model="test_resnet",
            image_size=32,
            epochs=1,
            batch_size=8,
            queue_size=16,
            mochi=(0, 0, 0),
            mixing_warmup_epochs=0,
            workers=0,
            max_train_images=16,
            max_steps=1,
            output=str(tmp_path / "run"),
            report_to="none",
            bn_splits=2,
        )
    )
    assert "--max-train-images 16 takes the first 16 images, which cover 2 of the 4 classes" in caplog.text
