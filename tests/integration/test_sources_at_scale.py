"""Sources at scale, on real photos written at test time: Parquet shards in the Hub's layout (map-style and
streamed, each process its own shards, resumed mid-epoch), and ImageNet-100 as a view of an ImageNet-1K folder or of
its shards (`--data-root`), in CMC's class order, for train and probe alike."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from images import PHOTOS, folder_rows, write_shards
from PIL import Image
from timm.data import ImageNetInfo

from mochi_hub.config import ProbeConfig
from mochi_hub.data.datasets import IMAGENET100_CMC_CLASSES, ImageFolder, resolve_dataset
from mochi_hub.data.shards import ShardStream, resolve_stream
from mochi_hub.data.views import PretrainingLoader, open_dataset, pretraining_views
from mochi_hub.evaluate.probe import _resolve_sources
from mochi_hub.training.pretrain import train

from runs import tiny_config

SYNSETS_1K = ImageNetInfo("imagenet-1k").label_names()  # the 1000 synsets in the standard order


@pytest.fixture(scope="module")
def photo_shards(photo_jpegs, tmp_path_factory) -> Path:
    """The photo folder's images as 2 train and 2 validation shards (data/train-0000k-of-00002.parquet)."""
    names = list(PHOTOS)
    rows = {"train": folder_rows(photo_jpegs / "train", names), "validation": folder_rows(photo_jpegs / "val", names)}
    return write_shards(tmp_path_factory.mktemp("photo-shards"), rows, names, shards=2)


@pytest.fixture(autouse=True)
def no_pause_after_a_stream(monkeypatch):
    """datasets sleeps 5 s whenever a Parquet stream is closed (a workaround for apache/arrow#45214): a cost per epoch
    and worker at scale, most of these tests' time at this size."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def trained(tmp_path: Path, **overrides) -> dict:
    run_dir = train(tiny_config(tmp_path / "run", **({"augment_on": "device", "max_steps": 2} | overrides)))
    return json.loads((run_dir / "run.json").read_text())


def test_a_folder_of_shards_trains_map_style_and_streamed(photo_shards, tmp_path):
    source = resolve_dataset(str(photo_shards), "train")
    assert len(source) == 64 and source.classes == list(PHOTOS)
    raw, label = source.read(0)
    assert isinstance(raw, bytes) and raw[:2] == b"\xff\xd8" and label == 0  # the JPEG file, undecoded
    assert len(resolve_dataset(str(photo_shards), "val")) == 16  # the Hub's "validation"
    for streaming in (False, True):
        run = trained(
            tmp_path / str(streaming), dataset=str(photo_shards), streaming=streaming, workers=2, max_train_images=None
        )
        assert run["dataset_images"] == 64 and run["summary"]["images_seen"] == 32 and not run["summary"]["bad_files"]


def test_each_process_streams_its_own_shards(photo_shards, tmp_path):
    """2 processes, 2 shards: split_dataset_by_node gives each one shard; together they are the split."""
    stream = resolve_stream(str(photo_shards), "train")
    assert isinstance(stream, ShardStream) and len(stream) == 64
    config = tiny_config(
        tmp_path, dataset=str(photo_shards), streaming=True, batch_size=16, workers=0, max_train_images=None
    )
    seen = []
    for rank in (0, 1):
        loader = PretrainingLoader(pretraining_views(stream, config, "bytes"), config, rank=rank, world=2)
        files = [bytes(b["images"].encoded) for b in loader.epoch(0)]
        assert len(files) == 4  # 64 images / global batch 16 per epoch, on every process
        seen.append(set(files[:4]))
    assert not seen[0] & seen[1]  # their own shards: no batch in common


def test_a_stream_resumed_mid_epoch_continues_with_the_rows_the_straight_run_reads(photo_shards, tmp_path):
    """Exact with the same processes and workers: each of 2 workers skips the rows it had delivered."""
    config = tiny_config(
        tmp_path, dataset=str(photo_shards), streaming=True, batch_size=8, workers=2, max_train_images=None
    )
    views = pretraining_views(open_dataset(config), config, "views")  # PIL views seeded by their place in the stream
    loader = PretrainingLoader(views, config)
    straight = list(loader.epoch(1))
    resumed = list(loader.epoch(1, start=3))
    assert len(straight) == 8 and len(resumed) == 5
    for a, b in zip(straight[3:], resumed):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["images"][0], b["images"][0])
    assert not torch.equal(straight[0]["images"][0], list(loader.epoch(0))[0]["images"][0])  # epochs differ


@pytest.fixture(scope="module")
def imagenet_1k(tmp_path_factory) -> Path:
    """An ImageNet-1K-shaped folder: train/ and val/ with every CMC synset plus two others, one small JPEG each."""
    root = tmp_path_factory.mktemp("imagenet")
    for split in ("train", "val"):
        for n, synset in enumerate([*IMAGENET100_CMC_CLASSES, "n01440764", "n15075141"]):
            (root / split / synset).mkdir(parents=True)
            Image.new("RGB", (48, 40), (n, 255 - n, 7)).save(root / split / synset / f"{synset}_1.JPEG", quality=90)
    return root


def test_imagenet100_is_a_view_of_an_imagenet1k_folder_in_cmc_order(imagenet_1k, tmp_path):
    source = resolve_dataset("imagenet-100", "train", data_root=str(imagenet_1k))
    assert isinstance(source, ImageFolder) and source.classes == IMAGENET100_CMC_CLASSES and len(source) == 100
    assert {Path(path).parent.name: label for path, label in source.files} == {
        synset: i for i, synset in enumerate(IMAGENET100_CMC_CLASSES)
    }  # CMC's order, the two other synsets left alone, the files where they are
    train_source, val_source = _resolve_sources(
        ProbeConfig(dataset="imagenet-100", data_root=str(imagenet_1k), image_size=32)
    )
    assert train_source.classes == val_source.classes == IMAGENET100_CMC_CLASSES and len(val_source) == 100
    run = trained(tmp_path, dataset="imagenet-100", data_root=str(imagenet_1k), max_train_images=None, max_steps=1)
    assert run["dataset_images"] == 100 and run["config"]["data_root"] == str(imagenet_1k)

    broken = tmp_path / "broken"
    shutil.copytree(imagenet_1k / "val", broken / "val")
    shutil.rmtree(broken / "val" / IMAGENET100_CMC_CLASSES[7])
    with pytest.raises(ValueError, match=f"has no folder {IMAGENET100_CMC_CLASSES[7]}, one of the 100 classes"):
        resolve_dataset("imagenet-100", "val", data_root=str(broken))
    with pytest.raises(ValueError, match="--data-root is for the named sources"):
        resolve_dataset(str(imagenet_1k), "train", data_root=str(imagenet_1k))


@pytest.mark.parametrize("names", ["synsets", "descriptions"])
def test_imagenet100_is_a_view_of_imagenet1k_shards(imagenet_1k, tmp_path, names):
    """Shards whose ClassLabel names are the synsets, or ImageNet-1K's class descriptions as the Hub's copy names
    them (mapped by the standard index order); map-style and streamed alike."""
    info = ImageNetInfo("imagenet-1k")
    descriptions = [info.index_to_description(i) for i in range(1000)]
    unique = [d if descriptions.count(d) == 1 else f"{d} {i}" for i, d in enumerate(descriptions)]  # "crane" x2
    label_names = SYNSETS_1K if names == "synsets" else unique
    rows = folder_rows(imagenet_1k / "train", SYNSETS_1K)  # 100 CMC images + 2 others, labelled by 1K index
    root = write_shards(tmp_path / "shards", {"train": rows}, label_names, shards=2)
    for source in (
        resolve_dataset("imagenet-100", "train", data_root=str(root)),
        resolve_stream("imagenet-100", "train", data_root=str(root)),
    ):
        assert source.classes == IMAGENET100_CMC_CLASSES and len(source) == 100
    source = resolve_dataset("imagenet-100", "train", data_root=str(root))
    for index in (0, 50, 99):
        raw, label = source.read(index)
        synset = IMAGENET100_CMC_CLASSES[label]
        n = IMAGENET100_CMC_CLASSES.index(synset)
        assert Image.open(io.BytesIO(raw)).getpixel((5, 5))[:2] == pytest.approx((n, 255 - n), abs=3)
