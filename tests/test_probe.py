"""`mochi probe` on real Fashion-MNIST images (as PNG imagefolders and as a `datasets` Dataset) with a tiny
timm backbone (test_resnet, 96 features) at 32 px, plus hand-computed kNN cases."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from mochi_hub import probe as probe_module
from mochi_hub.augment import MEAN, STD, eval_transform
from mochi_hub.checkpoint import finish_checkpoint, save_checkpoint
from mochi_hub.cli import probe as cli_probe
from mochi_hub.cli.app import app
from mochi_hub.config import ProbeConfig, TrainConfig, resolve_probe_config
from mochi_hub.data import (DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, IMAGENET100_CMC_CLASSES, BadImageError,
                            DecodedImages, FashionMNIST, HubImages, resolve_dataset)
from mochi_hub.features import load_cached
from mochi_hub.model import Encoder, create_backbone, make_key_encoder
from mochi_hub.probe import FrozenBackboneError, check_frozen, knn_scores, lr_at, run_probe, snapshot, topk_hits
from mochi_hub.queue import NegativeQueue
from mochi_hub.sources import load_backbone

needs_fmnist = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                  reason="needs Debian's dataset-fashion-mnist (make test installs it)")
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3  # 80 training and 30 validation images


# --- fixtures: real images, a tiny backbone ---------------------------------------------------------------

def fmnist_subset(split: str, per_class: int) -> list[tuple[np.ndarray, int]]:
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
        ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p, mode="L") for _, (p, _) in rows],
                                         "label": [label for _, (_, label) in rows]}, features=features)
        path = tmp_path_factory.mktemp("arrow") / split
        ds.save_to_disk(str(path))
        loaded.append(HubImages(datasets.load_from_disk(str(path)), "fmnist-arrow"))
    return loaded[0], loaded[1]


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


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "tiny"
    timm.models.save_for_hf(tiny_backbone(), str(folder), safe_serialization=True)
    return folder


def small(tmp_path: Path, **overrides) -> ProbeConfig:
    values = dict(dataset="fashion-mnist", image_size=32, epochs=2, batch_size=16, lr=0.5, lr_milestones=(1,),
                  workers=0, cache_dir=str(tmp_path / "cache"), output=str(tmp_path / "out.json"))
    return resolve_probe_config(**(values | overrides))


# --- config ---------------------------------------------------------------------------------------------

def test_presets_follow_the_paper_and_dataset_selects_its_preset():
    in100 = resolve_probe_config(dataset="imagenet-100")
    assert (in100.epochs, in100.lr, in100.batch_size, in100.lr_milestones) == (60, 10.0, 128, (30, 40, 50))
    assert (in100.sgd_momentum, in100.weight_decay, in100.lr_gamma, in100.image_size) == (0.9, 0.0, 0.1, 224)
    in1k = resolve_probe_config(dataset="imagenet-1k")
    assert (in1k.epochs, in1k.lr, in1k.batch_size, in1k.lr_milestones) == (100, 30.0, 512, (60, 80))
    assert resolve_probe_config(preset="imagenet-100", dataset="/data/in100", lr=3.0).lr == 3.0  # options win
    assert resolve_probe_config(dataset="/data/in100").preset is None
    assert resolve_probe_config(lr_milestones="5, 8").lr_milestones == (5, 8)
    assert [lr_at(e, in100) for e in (0, 29, 30, 39, 40, 50, 59)] == pytest.approx([10, 10, 1, 1, 0.1, 0.01, 0.01])
    for bad in (dict(protocol="svm"), dict(lr_milestones="40,30"), dict(split="test"), dict(knn_k=0)):
        with pytest.raises(ValueError):
            resolve_probe_config(**bad)


# --- the frozen-backbone check --------------------------------------------------------------------------

def test_check_frozen_catches_an_optimizer_step_a_bn_statistic_and_train_mode():
    backbone = probe_module.freeze(tiny_backbone())
    before = snapshot(backbone)
    check_frozen(before, backbone)  # untouched: passes

    backbone.requires_grad_(True)  # broken: an optimizer over the backbone
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
    backbone(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    with pytest.raises(FrozenBackboneError, match=r"tensor\(s\) changed.*conv"):
        check_frozen(before, backbone)

    backbone = probe_module.freeze(tiny_backbone())
    before = snapshot(backbone)
    backbone.train()  # broken: BatchNorm updating its running statistics
    with torch.no_grad():
        backbone(torch.randn(4, 3, 32, 32))
    with pytest.raises(FrozenBackboneError, match=r"running_mean.*train mode"):
        check_frozen(before, backbone)


@needs_fmnist
def test_linear_probe_raises_when_batchnorm_is_left_in_train_mode(tmp_path, fmnist_folder, export_dir, monkeypatch):
    config = small(tmp_path, dataset=str(fmnist_folder), epochs=1, lr_milestones=())
    result = run_probe(str(export_dir), config, show=False)
    assert result["frozen_backbone_check"].startswith("passed")

    def broken_freeze(backbone):  # requires_grad off, but BatchNorm still in train mode
        backbone.requires_grad_(False)
        return backbone.train()

    monkeypatch.setattr(probe_module, "freeze", broken_freeze)
    with pytest.raises(FrozenBackboneError, match="running_"):
        run_probe(str(export_dir), dataclasses.replace(config, output=str(tmp_path / "broken.json")), show=False)
    assert not (tmp_path / "broken.json").exists()  # no result is written for an unfrozen backbone


# --- kNN: exactly computable cases ----------------------------------------------------------------------

def unit_at(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_knn_votes_are_similarity_weighted_and_limited_to_k():
    # Bank: class 0 at 0 deg; class 1 twice at +-30 deg; class 2 at 90 deg. Query at 0 deg.
    bank = torch.tensor([unit_at(0), unit_at(30), unit_at(-30), unit_at(90)]) * 3.0  # norms do not matter
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([unit_at(0)])
    c30 = math.cos(math.radians(30))
    # k=3, T=0.5: class 0 gets e^(1/0.5) = 7.389, class 1 gets 2 e^(0.866/0.5) = 11.31: two near votes beat one exact.
    votes = knn_scores(bank, labels, query, 3, k=3, temperature=0.5)
    assert votes[0].tolist() == pytest.approx([math.exp(2.0), 2 * math.exp(c30 / 0.5), 0.0], rel=1e-5)
    assert votes.argmax(1).item() == 1
    # T=0.1: e^10 = 22026 against 2 e^8.66 = 11534: the sharper temperature lets the exact match win.
    assert knn_scores(bank, labels, query, 3, k=3, temperature=0.1).argmax(1).item() == 0
    # k=1: only the nearest votes. k=4: class 2 (cos 90 = 0) adds e^0 = 1.
    assert knn_scores(bank, labels, query, 3, k=1, temperature=0.5)[0].tolist() == pytest.approx([math.exp(2), 0, 0])
    assert knn_scores(bank, labels, query, 3, k=4, temperature=0.5)[0, 2].item() == pytest.approx(1.0)
    assert knn_scores(bank, labels, query, 3, k=200, temperature=0.5).shape == (1, 3)  # k capped at the bank size
    # top-k hits: scores [0.1, 0.7, 0.2] -> ranking 1, 2, 0.
    hits = topk_hits(torch.tensor([[0.1, 0.7, 0.2]] * 3), torch.tensor([1, 2, 0]), ks=(1, 2))
    assert hits.tolist() == [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]


class ColourMean(nn.Module):
    """A 'backbone' whose feature is the image's mean RGB colour in [0, 1] (normalisation undone)."""

    num_features = 3

    def forward(self, x):
        mean = torch.tensor(MEAN, device=x.device)[:, None, None]
        std = torch.tensor(STD, device=x.device)[:, None, None]
        return (x * std + mean).mean(dim=(2, 3))


def solid_folder(root: Path, images: dict[str, dict[str, list[tuple[int, int, int]]]]) -> Path:
    for split, classes in images.items():
        for name, colours in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for n, colour in enumerate(colours):
                Image.new("RGB", (8, 8), colour).save(root / split / name / f"{n}.png")
    return root


def test_knn_end_to_end_gives_the_hand_computed_accuracy(tmp_path):
    """Solid colours through the whole image path; features are the colours, so every vote is computable.

    Train: a = {red, red}; b = {green, yellow}. With k = 3 (unit vectors):
      orange (1, .5, 0), true b: yellow .949, red .894, red .894 -> a: 2 e^(.894/T), b: e^(.949/T);
                                 b wins iff (.949 - .894) / T > ln 2, i.e. T < 0.079.
      red, true a: red 1, red 1, yellow .707 -> a.            cyan (0, 1, 1), true b: green .707, yellow .5, red 0 -> b.
      purple (1, 0, 1), true b: red .707, red .707, yellow .5 -> a (wrong at any T).
    So top-1 = 3/4 at T = 0.07 and 2/4 at T = 0.1; top-5 (k capped at 2 classes) = 100%.
    """
    red, green, yellow = (255, 0, 0), (0, 255, 0), (255, 255, 0)
    orange, cyan, purple = (255, 128, 0), (0, 255, 255), (255, 0, 255)
    root = solid_folder(tmp_path / "colours", {"train": {"a": [red, red], "b": [green, yellow]},
                                               "val": {"a": [red], "b": [orange, cyan, purple]}})
    o = np.array(orange) / np.linalg.norm(orange)
    margin = o @ (np.array(yellow) / np.linalg.norm(yellow)) - o @ np.array([1.0, 0, 0])
    assert 0.07 < margin / math.log(2) < 0.1  # the hand computation above: T* = 0.079
    info = {"kind": "test", "num_features": 3, "weights_sha256": "colour-mean"}
    for temperature, expected in ((0.07, 75.0), (0.1, 50.0)):
        config = small(tmp_path, dataset=str(root), protocol="knn", knn_k=3, knn_temperature=temperature, image_size=8)
        result = run_probe("colour-mean", config, backbone=(ColourMean(), info), show=False)
        assert (result["top1"], result["top5"], result["top5_k"]) == (expected, 100.0, 2)
        assert result["knn"] == {"k": 3, "temperature": temperature}


def test_unusable_images_are_reported_or_stop_the_probe_under_strict_data(tmp_path):
    root = solid_folder(tmp_path / "colours", {"train": {"a": [(255, 0, 0)] * 2, "b": [(0, 255, 0)] * 2},
                                               "val": {"a": [(250, 5, 5)], "b": [(5, 250, 5)]}})
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    info = {"kind": "test", "num_features": 3, "weights_sha256": "colour-mean"}
    for protocol in ("knn", "linear"):
        config = small(tmp_path, dataset=str(root), protocol=protocol, knn_k=2, image_size=8, epochs=1,
                       lr_milestones=(), batch_size=5)
        result = run_probe("colour-mean", config, backbone=(ColourMean(), info), show=False)
        assert result["skipped_images"] == 1 and "broken.png" in result["skipped_examples"][0], protocol
        assert result["train_images"] == 5 and result["eval_images"] == 2
    with pytest.raises(BadImageError, match="broken.png"):
        run_probe("colour-mean", dataclasses.replace(config, strict_data=True), backbone=(ColourMean(), info), show=False)


# --- fast (cached features) against linear ---------------------------------------------------------------

@needs_fmnist
def test_cached_features_train_the_same_classifier_as_on_the_fly(tmp_path, fmnist_folder, export_dir):
    common = dict(dataset=str(fmnist_folder), augment=False, epochs=3, lr_milestones=(2,), batch_size=16, lr=0.5)
    linear = run_probe(str(export_dir), small(tmp_path, protocol="linear", output=str(tmp_path / "linear.json"), **common),
                       show=False)
    fast = run_probe(str(export_dir), small(tmp_path, protocol="fast", output=str(tmp_path / "fast.json"), **common),
                     show=False)
    weights = [load_file(Path(r["state_dir"]) / "epoch-0003" / "classifier.safetensors") for r in (linear, fast)]
    for name in ("weight", "bias"):
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-5)
    assert fast["epoch_losses"] == pytest.approx(linear["epoch_losses"], rel=1e-4)
    assert (fast["top1"], fast["top5"]) == (linear["top1"], linear["top5"])
    assert linear["paper_protocol"] is False and "NOT the paper" in fast["note"]  # augmentation was off
    assert json.loads((tmp_path / "fast.json").read_text())["feature_cache"]["train"]["hit"] is False
    again = run_probe(str(export_dir), small(tmp_path, protocol="fast", output=str(tmp_path / "fast2.json"), **common),
                      show=False)
    assert again["feature_cache"]["train"]["hit"] and again["feature_cache"]["val"]["hit"]
    assert again["top1"] == fast["top1"]


@needs_fmnist
def test_a_datasets_dataset_gives_the_same_features_as_the_png_folder(tmp_path, fmnist_folder, fmnist_arrow, export_dir):
    config = small(tmp_path, dataset=str(fmnist_folder), protocol="knn", knn_k=5)
    from_folder = run_probe(str(export_dir), config, show=False)
    from_arrow = run_probe(str(export_dir), dataclasses.replace(config, dataset="fmnist-arrow"), sources=fmnist_arrow,
                           show=False)
    cache = Path(config.cache_dir)
    for split in ("train", "val"):
        keys = [r["feature_cache"][split]["key"] for r in (from_folder, from_arrow)]
        assert keys[0] != keys[1]  # different datasets, different cache entries ...
        (f0, l0), (f1, l1) = (load_cached(cache, key) for key in keys)
        assert torch.equal(l0, l1) and torch.equal(f0, f1)  # ... with the same features
    assert (from_arrow["top1"], from_arrow["top5"]) == (from_folder["top1"], from_folder["top5"])
    assert from_arrow["train_images"] == 10 * TRAIN_PER_CLASS and from_arrow["eval_images"] == 10 * VAL_PER_CLASS


@needs_fmnist
def test_resume_continues_to_the_same_classifier(tmp_path, fmnist_folder, export_dir, monkeypatch):
    config = small(tmp_path, dataset=str(fmnist_folder), protocol="fast", epochs=3, lr_milestones=(2,),
                   output=str(tmp_path / "full.json"))
    full = run_probe(str(export_dir), config, show=False)
    expected = load_file(Path(full["state_dir"]) / "epoch-0003" / "classifier.safetensors")

    real_save, saves = probe_module.save_state, []

    def crash_after_first_epoch(root, epoch, *args, **kwargs):
        saves.append(epoch)
        real_save(root, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt

    interrupted = dataclasses.replace(config, output=str(tmp_path / "part.json"))
    monkeypatch.setattr(probe_module, "save_state", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_probe(str(export_dir), interrupted, show=False)
    resumed = run_probe(str(export_dir), dataclasses.replace(interrupted, resume=True), show=False)
    assert saves == [1, 2, 3] and resumed["resumed_from_epoch"] == 1
    got = load_file(Path(resumed["state_dir"]) / "epoch-0003" / "classifier.safetensors")
    for name in ("weight", "bias"):
        assert torch.equal(got[name], expected[name])
    assert resumed["top1"] == full["top1"]
    with pytest.raises(ValueError, match="lr: saved 0.5, now 0.25"):
        run_probe(str(export_dir), dataclasses.replace(interrupted, resume=True, lr=0.25), show=False)


# --- ImageNet-100 class order ---------------------------------------------------------------------------

def test_a_local_imagenet100_folder_takes_the_cmc_class_order(tmp_path):
    assert len(IMAGENET100_CMC_CLASSES) == len(set(IMAGENET100_CMC_CLASSES)) == 100
    assert IMAGENET100_CMC_CLASSES[:3] == ["n02869837", "n01749939", "n02488291"]
    assert IMAGENET100_CMC_CLASSES[-1] == "n02090622"
    synsets = ["n02090622", "n01749939", "n02869837", "n04336792"]  # sorted order would number them differently
    for split in ("train", "val"):
        for synset in synsets:
            (tmp_path / "in100" / split / synset).mkdir(parents=True)
            Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "in100" / split / synset / "x.png")
    for split in ("train", "val"):
        source = resolve_dataset(str(tmp_path / "in100"), split)
        labels = {Path(path).parent.name: label for path, label in source.files}
        assert labels == {s: IMAGENET100_CMC_CLASSES.index(s) for s in synsets}
        assert labels == {"n02090622": 99, "n01749939": 1, "n02869837": 0, "n04336792": 93}
        assert source.classes == IMAGENET100_CMC_CLASSES
    (tmp_path / "in100" / "train" / "n99999999").mkdir()  # not an ImageNet-100 synset: sorted folder names
    Image.new("RGB", (4, 4)).save(tmp_path / "in100" / "train" / "n99999999" / "x.png")
    assert resolve_dataset(str(tmp_path / "in100"), "train").classes == sorted(synsets + ["n99999999"])


# --- SOURCE: run directory, exported folder, hf-hub: ----------------------------------------------------

def make_run_dir(root: Path, backbone: nn.Module) -> Path:
    query = Encoder(backbone)
    modules = {"query": query, "key": make_key_encoder(query), "queue": NegativeQueue(64, 128)}
    optimizer = torch.optim.SGD(query.parameters(), lr=0.1, momentum=0.9)
    config = TrainConfig(model="test_resnet", image_size=32, batch_size=8, queue_size=64, mochi=(0, 0, 0), warmup_epochs=0)
    final = save_checkpoint(root, 8, modules=modules, optimizer=optimizer,
                            state={"step": 8, "epoch": 1, "config": config.to_dict()}, is_main=True, rank=0)
    finish_checkpoint(final, keep=2)
    (root / "run.json").write_text(json.dumps({"config": config.to_dict(), "num_processes": 1, "global_batch_size": 8}))
    return root


def hf_cache_layout(hf_home: Path, repo_id: str, folder: Path, commit: str) -> None:
    """What huggingface_hub's cache holds after downloading `folder` at `commit` (files copied, no symlinks)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot_dir = repo / "snapshots" / commit
    snapshot_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot_dir / name).write_bytes((folder / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


HUB_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from mochi_hub.sources import load_backbone
    out = {}
    for i, source in enumerate(sys.argv[2:]):
        backbone, info = load_backbone(source)
        with torch.no_grad():
            save_file({"features": backbone(load_file(sys.argv[1])["images"])}, f"{sys.argv[1]}.{i}")
        out[source] = info
    print(json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.ci
@needs_fmnist
def test_all_three_source_forms_give_identical_features(tmp_path):
    backbone = tiny_backbone(seed=3)
    run_dir = make_run_dir(tmp_path / "run", backbone)
    export = tmp_path / "export"
    timm.models.save_for_hf(backbone, str(export), safe_serialization=True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    hf_cache_layout(tmp_path / "hf", "mochi-test/tiny", export, commit)

    images = DecodedImages(FashionMNIST("val"), eval_transform(32), indices=list(range(12)))
    batch = torch.stack([images[i].image for i in range(len(images))])  # [12, 3, 32, 32], real images
    with torch.no_grad():
        reference = backbone(batch)

    features, infos = {}, {}
    for source in (str(run_dir), str(export)):
        module, info = load_backbone(source)
        assert not module.training
        with torch.no_grad():
            features[source], infos[source] = module(batch), info
    assert infos[str(run_dir)]["kind"] == "run-checkpoint" and infos[str(export)]["kind"] == "timm-folder"

    save_file({"images": batch}, str(tmp_path / "batch.safetensors"))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    hub_sources = ["hf-hub:mochi-test/tiny", f"hf-hub:mochi-test/tiny@{commit}"]
    child = subprocess.run([sys.executable, "-c", HUB_CHILD, str(tmp_path / "batch.safetensors"), *hub_sources],
                           env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    hub_infos = json.loads(child.stdout.strip().splitlines()[-1])
    for i, source in enumerate(hub_sources):
        features[source] = load_file(str(tmp_path / f"batch.safetensors.{i}"))["features"]
        infos[source] = hub_infos[source]
    assert hub_infos[hub_sources[1]]["revision"] == commit

    for source, value in features.items():
        assert torch.equal(value, reference), source
        assert infos[source]["weights_sha256"] == infos[str(export)]["weights_sha256"], source
        assert infos[source]["architecture"] == "test_resnet" and infos[source]["num_features"] == 96

    # A run directory with an export/ uses it, and remembers its probe results under RUN/probes/.
    (run_dir / "export").mkdir()
    for name in ("config.json", "model.safetensors"):
        (run_dir / "export" / name).write_bytes((export / name).read_bytes())
    config = resolve_probe_config(dataset="fashion-mnist", protocol="knn", max_images=40, workers=0, batch_size=20,
                                  cache_dir=str(tmp_path / "cache"))
    result = run_probe(str(run_dir), config, show=False)
    assert result["source_info"]["kind"] == "run-export"
    saved = json.loads((run_dir / "probes" / "knn-fashion-mnist-val-max40.json").read_text())
    assert saved["top1"] == result["top1"] and saved["source"] == str(run_dir)


def test_bad_sources_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="not a folder and not hf-hub"):
        load_backbone(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a run directory"):
        load_backbone(str(tmp_path / "empty"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": {"model": "test_resnet"}}))
    with pytest.raises(ValueError, match="neither export/ nor a complete checkpoint"):
        load_backbone(str(tmp_path / "run"))


# --- the command line -----------------------------------------------------------------------------------

def test_cli_options_map_one_to_one_onto_probe_config(monkeypatch):
    import inspect

    params = inspect.signature(cli_probe.probe).parameters
    fields = {f.name for f in dataclasses.fields(ProbeConfig)}
    assert set(params) - {"source", "config_file"} == fields

    # Every option given a value that is not its default must arrive in the field of the same name.
    values = dict(dataset="org/data", protocol="fast", split="train", epochs=7, batch_size=12, lr=0.25,
                  lr_milestones=(3, 5), lr_gamma=0.5, sgd_momentum=0.8, weight_decay=0.001, augment=False, crop_min_scale=0.3, image_size=48,
                  knn_k=20, knn_temperature=0.1, seed=3, workers=1, output="o.json", resume=True, cache_dir="c",
                  max_images=99, mixed_precision="bf16", strict_data=True, preset="imagenet-1k")
    assert set(values) == fields
    defaults = ProbeConfig()
    assert all(values[f] != getattr(defaults, f) for f in fields)
    args = ["probe", "SRC"]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            args += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    seen = {}
    monkeypatch.setattr(probe_module, "run_probe", lambda source, config: seen.update(source=source, config=config))
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    assert seen["source"] == "SRC"
    assert seen["config"].to_dict() == {**values, "lr_milestones": [3, 5]}

    outcome = CliRunner().invoke(app, ["probe", "SRC", "--protocol", "svm"])
    assert outcome.exit_code == 2 and "--protocol must be one of" in outcome.output


@needs_fmnist
def test_cli_knn_end_to_end_writes_json_and_a_table(tmp_path, fmnist_folder, export_dir):
    out = tmp_path / "result.json"
    outcome = CliRunner().invoke(app, ["probe", str(export_dir), "--dataset", str(fmnist_folder), "--protocol", "knn",
                                       "--max-images", "50", "--image-size", "32", "--workers", "0", "--batch-size", "25",
                                       "--cache-dir", str(tmp_path / "cache"), "--output", str(out)])
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(out.read_text())
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert (result["train_images"], result["eval_images"]) == (50, 10 * VAL_PER_CLASS)
    assert result["source"] == str(export_dir) and result["dataset"] == str(fmnist_folder)
    assert result["hyperparameters"]["knn_k"] == 200 and result["knn"]["k"] == 50  # k capped at the bank
    assert result["seed"] == 0 and result["time"]["seconds"] > 0 and result["protocol"] == "knn"
    assert "top-1" in outcome.output and f"{result['top1']:.2f}" in outcome.output
    assert "not the paper's linear protocol" in outcome.output


# --- several processes ----------------------------------------------------------------------------------

DIST_CHILD = textwrap.dedent("""
    import json, sys
    from mochi_hub.config import resolve_probe_config
    from mochi_hub.probe import run_probe
    result = run_probe(sys.argv[1], resolve_probe_config(**json.loads(sys.argv[2])), show=False)
    assert result["num_processes"] == 2, result["num_processes"]
""")


@pytest.mark.slow
@needs_fmnist
def test_two_processes_train_the_classifier_one_process_trains(tmp_path, export_dir):
    """torchrun, 2 CPU processes (gloo): each global batch is split over the ranks and DDP averages the
    gradients, and each image's augmentation depends on (seed, epoch, index) only, so the classifier and
    the accuracy equal a single process's."""
    import socket

    options = dict(dataset="fashion-mnist", max_images=64, epochs=2, lr_milestones="1", batch_size=16, lr=0.5,
                   workers=0, cache_dir=str(tmp_path / "cache"))
    single = run_probe(str(export_dir), resolve_probe_config(**options, output=str(tmp_path / "one.json")), show=False)
    script = tmp_path / "dist_probe.py"
    script.write_text(DIST_CHILD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    done = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", f"--master_port={port}",
                           str(script), str(export_dir), json.dumps({**options, "output": str(tmp_path / "two.json")})],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads((tmp_path / "two.json").read_text())
    assert double["num_processes"] == 2 and (double["train_images"], double["eval_images"]) == (64, 64)
    weights = [load_file(Path(r["state_dir"]) / "epoch-0002" / "classifier.safetensors") for r in (single, double)]
    for name in ("weight", "bias"):
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-5)
    assert (double["top1"], double["top5"]) == (single["top1"], single["top5"])


@needs_fmnist
@pytest.mark.slow
def test_a_linear_probe_killed_twice_resumes_to_the_uninterrupted_classifier(tmp_path, fmnist_folder, export_dir):
    """kill -9 after an epoch's state and during a state save; `--resume` ends bit-identical (every draw
    is seeded by (seed, epoch, index) and the CPU kernels are deterministic, so no tolerance)."""
    import signal
    import time

    def command(output: Path) -> list[str]:
        return [sys.executable, "-m", "mochi_hub.cli", "probe", str(export_dir), "--dataset", str(fmnist_folder),
                "--protocol", "linear", "--image-size", "32", "--epochs", "6", "--batch-size", "16", "--lr", "0.5",
                "--lr-milestones", "4", "--workers", "0", "--output", str(output), "--resume",
                "--cache-dir", str(tmp_path / "cache")]

    subprocess.run(command(tmp_path / "full.json"), check=True, capture_output=True, timeout=300)
    expected = load_file(tmp_path / "full.state" / "epoch-0006" / "classifier.safetensors")

    states = tmp_path / "part.state"
    kill_when = [lambda: (states / "epoch-0002").is_dir(),
                 lambda: states.is_dir() and any(p.name.endswith(".tmp") for p in os.scandir(states))]
    for when in kill_when:
        process = subprocess.Popen(command(tmp_path / "part.json"), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while process.poll() is None and not when() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert process.poll() is None, "the probe finished before the kill point"
        process.send_signal(signal.SIGKILL)
        process.wait()
    subprocess.run(command(tmp_path / "part.json"), check=True, capture_output=True, timeout=300)
    result = json.loads((tmp_path / "part.json").read_text())
    assert result["resumed_from_epoch"] >= 2
    summary = result["summary"]
    assert summary["resumes"] == 1 and summary["images_skipped"] == 0
    assert summary["images_seen"] == (6 - result["resumed_from_epoch"]) * 80 + 30  # 80 train, 30 val images
    got = load_file(states / "epoch-0006" / "classifier.safetensors")
    for name in ("weight", "bias"):
        assert torch.equal(got[name], expected[name])
    assert result["top1"] == json.loads((tmp_path / "full.json").read_text())["top1"]
