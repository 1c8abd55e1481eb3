"""`mochi probe` on real Fashion-MNIST images (PNG imagefolders and a `datasets` Dataset) with a tiny
timm backbone (test_resnet, 96 features) at 32 px, plus hand-computed kNN cases."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from images import TRAIN_PER_CLASS, VAL_PER_CLASS, small
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from mochi_hub.cli.app import app
from mochi_hub.data.augment import MEAN, STD
from mochi_hub.data.datasets import (
    IMAGENET100_CMC_CLASSES,
    BadImageError,
    resolve_dataset,
)
from mochi_hub.evaluate import probe as probe_module
from mochi_hub.evaluate.features import load_cached
from mochi_hub.evaluate.frozen import FrozenBackboneError
from mochi_hub.evaluate.job import EpochStates
from mochi_hub.evaluate.probe import run_probe
from mochi_hub.publish.sources import EXPORT, HUB, RUN, Source, load_backbone


def test_linear_probe_raises_when_batchnorm_is_left_in_train_mode(tmp_path, fmnist_folder, tiny_export, monkeypatch):
    config = small(tmp_path, dataset=str(fmnist_folder), epochs=1, lr_milestones=())
    result = run_probe(str(tiny_export), config, show=False)
    assert result["frozen_backbone_check"].startswith("passed")

    def broken_freeze(backbone):  # requires_grad off, but BatchNorm still in train mode
        backbone.requires_grad_(False)
        return backbone.train()

    monkeypatch.setattr(probe_module, "freeze", broken_freeze)
    with pytest.raises(FrozenBackboneError, match="running_"):
        run_probe(str(tiny_export), dataclasses.replace(config, output=str(tmp_path / "broken.json")), show=False)
    assert not (tmp_path / "broken.json").exists()  # no result is written for an unfrozen backbone


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
    root = solid_folder(
        tmp_path / "colours",
        {"train": {"a": [red, red], "b": [green, yellow]}, "val": {"a": [red], "b": [orange, cyan, purple]}},
    )
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
    root = solid_folder(
        tmp_path / "colours",
        {"train": {"a": [(255, 0, 0)] * 2, "b": [(0, 255, 0)] * 2}, "val": {"a": [(250, 5, 5)], "b": [(5, 250, 5)]}},
    )
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    info = {"kind": "test", "num_features": 3, "weights_sha256": "colour-mean"}
    for protocol in ("knn", "linear"):
        config = small(
            tmp_path,
            dataset=str(root),
            protocol=protocol,
            knn_k=2,
            image_size=8,
            epochs=1,
            lr_milestones=(),
            batch_size=5,
        )
        result = run_probe("colour-mean", config, backbone=(ColourMean(), info), show=False)
        assert result["skipped_images"] == 1 and "broken.png" in result["skipped_examples"][0], protocol
        assert result["train_images"] == 5 and result["eval_images"] == 2
    with pytest.raises(BadImageError, match="broken.png"):
        run_probe(
            "colour-mean", dataclasses.replace(config, strict_data=True), backbone=(ColourMean(), info), show=False
        )


def test_cached_features_train_the_same_classifier_as_on_the_fly(tmp_path, fmnist_folder, tiny_export):
    common = dict(dataset=str(fmnist_folder), augment=False, epochs=3, lr_milestones=(2,), batch_size=16, lr=0.5)
    linear = run_probe(
        str(tiny_export), small(tmp_path, protocol="linear", output=str(tmp_path / "linear.json"), **common), show=False
    )
    fast = run_probe(
        str(tiny_export), small(tmp_path, protocol="fast", output=str(tmp_path / "fast.json"), **common), show=False
    )
    weights = [load_file(Path(r["state_dir"]) / "epoch-0003" / "model.safetensors") for r in (linear, fast)]
    for name in ("weight", "bias"):
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-5)
    assert fast["epoch_losses"] == pytest.approx(linear["epoch_losses"], rel=1e-4)
    assert (fast["top1"], fast["top5"]) == (linear["top1"], linear["top5"])
    assert linear["paper_protocol"] is False and "NOT the paper" in fast["note"]  # augmentation was off
    assert json.loads((tmp_path / "fast.json").read_text())["feature_cache"]["train"]["hit"] is False
    again = run_probe(
        str(tiny_export), small(tmp_path, protocol="fast", output=str(tmp_path / "fast2.json"), **common), show=False
    )
    assert again["feature_cache"]["train"]["hit"] and again["feature_cache"]["val"]["hit"]
    assert again["top1"] == fast["top1"]


def test_a_datasets_dataset_gives_the_same_features_as_the_png_folder(
    tmp_path, fmnist_folder, fmnist_arrow, tiny_export
):
    config = small(tmp_path, dataset=str(fmnist_folder), protocol="knn", knn_k=5)
    from_folder = run_probe(str(tiny_export), config, show=False)
    from_arrow = run_probe(
        str(tiny_export), dataclasses.replace(config, dataset="fmnist-arrow"), sources=fmnist_arrow, show=False
    )
    cache = Path(config.cache_dir)
    for split in ("train", "val"):
        keys = [r["feature_cache"][split]["key"] for r in (from_folder, from_arrow)]
        assert keys[0] != keys[1]  # different datasets, different cache entries ...
        (f0, l0), (f1, l1) = (load_cached(cache, key) for key in keys)
        assert torch.equal(l0, l1) and torch.equal(f0, f1)  # ... with the same features
    assert (from_arrow["top1"], from_arrow["top5"]) == (from_folder["top1"], from_folder["top5"])
    assert from_arrow["train_images"] == 10 * TRAIN_PER_CLASS and from_arrow["eval_images"] == 10 * VAL_PER_CLASS


def test_resume_continues_to_the_same_classifier(tmp_path, fmnist_folder, tiny_export, monkeypatch):
    config = small(
        tmp_path,
        dataset=str(fmnist_folder),
        protocol="fast",
        epochs=3,
        lr_milestones=(2,),
        output=str(tmp_path / "full.json"),
    )
    full = run_probe(str(tiny_export), config, show=False)
    expected = load_file(Path(full["state_dir"]) / "epoch-0003" / "model.safetensors")

    real_save, saves = EpochStates.save, []

    def crash_after_first_epoch(states, epoch, *args, **kwargs):
        saves.append(epoch)
        real_save(states, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt

    interrupted = dataclasses.replace(config, output=str(tmp_path / "part.json"))
    monkeypatch.setattr(EpochStates, "save", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_probe(str(tiny_export), interrupted, show=False)
    resumed = run_probe(str(tiny_export), dataclasses.replace(interrupted, resume=True), show=False)
    assert saves == [1, 2, 3] and resumed["resumed_from_epoch"] == 1
    got = load_file(Path(resumed["state_dir"]) / "epoch-0003" / "model.safetensors")
    for name in ("weight", "bias"):
        assert torch.equal(got[name], expected[name])
    assert resumed["top1"] == full["top1"]
    with pytest.raises(ValueError, match="lr: saved 0.5, now 0.25"):
        run_probe(str(tiny_export), dataclasses.replace(interrupted, resume=True, lr=0.25), show=False)


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


def test_bad_sources_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="no such folder, and not hf-hub"):
        load_backbone(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a run directory"):
        load_backbone(str(tmp_path / "empty"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": {"model": "test_resnet", "image_size": 32}}))
    with pytest.raises(ValueError, match="neither export/ nor a complete checkpoint"):
        load_backbone(str(tmp_path / "run"))


def test_a_source_is_parsed_once_into_what_it_names(tmp_path):
    assert Source.parse("hf-hub:org/name@v1") == Source("hf-hub:org/name@v1", HUB, repo_id="org/name", revision="v1")
    assert Source.parse("hf-hub:org/name").revision is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": {"dataset": "fashion-mnist", "image_size": 32}}))
    run = Source.parse(f"local-dir:{tmp_path / 'run'}")
    assert (run.kind, run.path) == (RUN, (tmp_path / "run").resolve())
    assert run.trained_on() == {"dataset": "fashion-mnist", "image_size": 32}
    (tmp_path / "export").mkdir()  # an export records the input size; a local dataset is redacted to nothing here
    training = {"dataset": "<local>/photos", "image_size": 64}
    config = {"training_config": training, "pretrained_cfg": {"input_size": [3, 48, 48]}}
    (tmp_path / "export" / "config.json").write_text(json.dumps(config))
    export = Source.parse(str(tmp_path / "export"))
    assert export.kind == EXPORT and export.trained_on() == {"image_size": 48}


def test_cli_knn_end_to_end_writes_json_and_a_table(tmp_path, fmnist_folder, tiny_export):
    out = tmp_path / "result.json"
    outcome = CliRunner().invoke(
        app,
        [
            "probe",
            str(tiny_export),
            "--dataset",
            str(fmnist_folder),
            "--protocol",
            "knn",
            "--max-images",
            "50",
            "--image-size",
            "32",
            "--workers",
            "0",
            "--batch-size",
            "25",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--output",
            str(out),
        ],
    )
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(out.read_text())
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0
    assert (result["train_images"], result["eval_images"]) == (50, 10 * VAL_PER_CLASS)
    assert result["source"] == str(tiny_export) and result["dataset"] == str(fmnist_folder)
    assert result["hyperparameters"]["knn_k"] == 200 and result["knn"]["k"] == 50  # k capped at the bank
    assert result["seed"] == 0 and result["time"]["seconds"] > 0 and result["protocol"] == "knn"
    assert "top-1" in outcome.output and f"{result['top1']:.2f}" in outcome.output
    assert "not the paper's linear protocol" in outcome.output
