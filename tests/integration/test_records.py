"""Records that say what happened: run.json holds the lr that ran and a local dataset as the folder it is, results
go on a card only when kept, and what a probe reports is what it did."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from mochi_hub.cli.app import app
from mochi_hub.training.checkpoint import latest_checkpoint
from mochi_hub.training.pretrain import train

from runs import tiny_config, write_image_folder


def mochi(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_the_lr_that_runs_is_recorded_and_a_resume_may_repeat_it(tmp_path):
    printed = yaml.safe_load(
        mochi("train", "--dataset", "fashion-mnist", "--batch-size", "32", "--print-config").stdout
    )
    assert printed["lr"] == 0.03 * 32 / 256  # resolved, not null
    assert yaml.safe_load(mochi("presets", "imagenet-100").stdout.split("# mochi probe")[0])["lr"] == 0.03

    config = tiny_config(tmp_path / "run", max_steps=2)  # lr left to the linear scaling rule
    train(config)
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["config"]["lr"]
    assert recorded == 0.03 * 16 / 256
    train(dataclasses.replace(config, lr=recorded, max_steps=3, resume="auto"))  # the lr the start line printed
    state = latest_checkpoint(tmp_path / "run") / "state.json"
    saved = json.loads(state.read_text())
    state.write_text(json.dumps({**saved, "config": {**saved["config"], "lr": None}}))  # as older versions saved it
    train(dataclasses.replace(config, max_steps=4, resume="auto"))


def test_a_relative_dataset_is_recorded_as_the_folder_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image_folder(Path("data/color/train"), per_class=16)
    args = ["--model", "test_resnet", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--queue-size", "16",
            "--mochi", "0,0,0", "--mixing-warmup-epochs", "0", "--workers", "0", "--report-to", "none", "--bn-splits",
            "2", "--max-steps", "2"]  # fmt: skip
    printed = yaml.safe_load(mochi("train", "--dataset", "data/color", *args, "--print-config").stdout)
    folder = str((tmp_path / "data" / "color").resolve())
    assert printed["dataset"] == folder
    assert mochi("train", "--dataset", "data/color", *args, "--output", "run").exit_code == 0
    assert json.loads(Path("run/run.json").read_text())["config"]["dataset"] == folder

    monkeypatch.chdir(tmp_path / "data")  # from another folder, the run still names its images
    run = tmp_path / "run"
    assert yaml.safe_load(mochi("probe", run, "--protocol", "knn", "--print-config").stdout)["dataset"] == folder
    card = ModelCard.load(run / "export" / "README.md")
    assert card.data.datasets is None and "a local image folder (`color`)" in card.text  # never "data/color"
    assert "data/color" not in str(card)


def test_a_trial_with_no_card_stays_off_the_card(tmp_path):
    folder = write_image_folder(tmp_path / "images" / "train", per_class=16).parent
    write_image_folder(folder / "val", per_class=4)
    run = train(tiny_config(tmp_path / "run", dataset=str(folder), max_train_images=None, max_steps=2))
    args = ["--protocol", "knn", "--knn-k", "3", "--cache-dir", tmp_path / "cache", "--workers", "0"]
    trial = mochi("probe", run, *args, "--split", "train", "--no-card", "--output", tmp_path / "trial.json")
    assert trial.exit_code == 0, trial.output
    assert (tmp_path / "trial.json").is_file() and not list((run / "probes").glob("*.json"))
    kept = mochi("probe", run, *args)
    assert kept.exit_code == 0, kept.output
    (result,) = [json.loads(p.read_text()) for p in (run / "probes").glob("*.json")]
    assert result["split"] == "val" and result["hyperparameters"]["augment"] is False  # knn never augments
    assert mochi("export", run).exit_code == 0
    card = (run / "export" / "README.md").read_text()
    assert "| kNN | `images` (local folder) | val |" in card and "| kNN | `images` (local folder) | train |" not in card
