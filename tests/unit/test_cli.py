"""The CLI maps every option onto its config field, its help comes from the field's declaration, and bad input is
reported in one line."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import typer
from fields import command_line, other_values
from typer.testing import CliRunner

from mochi_hub.cli import detect as cli_detect
from mochi_hub.cli import probe as cli_probe
from mochi_hub.cli import train as cli_train
from mochi_hub.cli.app import app
from mochi_hub.cli.options import help_text, print_table
from mochi_hub.config import (
    DETECT_PRESETS,
    PROBE_PRESETS,
    TRAIN_PRESETS,
    DetectConfig,
    ProbeConfig,
    TrainConfig,
    _Config,
    config_class,
    option,
    result_settings,
)
from mochi_hub.evaluate import detect as detect_module
from mochi_hub.evaluate import probe as probe_module
from mochi_hub.training import pretrain as train_module

COMMANDS = {  # command: config class, presets, the command's function, where it is called, fields that must agree
    "train": (TrainConfig, TRAIN_PRESETS, cli_train.train, (train_module, "train"), {"batch_size": 32, "bn_splits": 4}),
    "probe": (
        ProbeConfig,
        PROBE_PRESETS,
        cli_probe.probe,
        (probe_module, "run_probe"),
        {"dataset": "imagenet-100", "data_root": "/"},
    ),
    "detect": (DetectConfig, DETECT_PRESETS, cli_detect.detect, (detect_module, "run_detect"), {}),
}
# What the train preflight checks must exist here (--data-root: a folder, for a named dataset; probe's too).
REAL = {"dataset": "imagenet-100", "data_root": "/", "model": "resnet18"}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_reaches_its_field(command, monkeypatch, tmp_path):
    cls, presets, function, (module, name), together = COMMANDS[command]
    params = inspect.signature(function).parameters
    assert set(params) - {"source", "config_file", "print_config"} == {f.name for f in dataclasses.fields(cls)}
    values = other_values(cls, presets, **together, **(REAL if cls is TrainConfig else {}))
    assert all(values[f.name] != f.default for f in dataclasses.fields(cls))
    received = []

    def receive(*args):  # what the library would have been called with; the command stops there
        received.append(args)
        raise typer.Exit(0)

    monkeypatch.setattr(module, name, receive)
    (tmp_path / "config.json").write_text("{}")  # an export folder that records nothing it was trained on
    source = [] if cls is TrainConfig else [str(tmp_path)]
    result = CliRunner().invoke(app, [command, *source, *command_line(values)])
    assert result.exit_code == 0, result.output
    (args,) = received
    assert list(args[:-1]) == source
    assert args[-1].to_dict() == cls(**values).to_dict()


def test_help_shows_the_default_and_the_presets_that_differ():
    probe = {f.name: f for f in dataclasses.fields(ProbeConfig)}
    assert help_text(probe["epochs"], PROBE_PRESETS).endswith("[default: 60; imagenet-1k 100; fashion-mnist 20]")
    assert help_text(probe["lr_milestones"], PROBE_PRESETS).endswith(
        "[default: 30,40,50; imagenet-1k 60,80; fashion-mnist 12,16]"
    )
    assert help_text(probe["augment"], PROBE_PRESETS).endswith("[default: on]")
    # A None default says what it means; a preset named after the value it sets is not repeated.
    assert help_text(probe["dataset"], PROBE_PRESETS).endswith("[default: the dataset SOURCE was trained on]")
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert help_text(train["lr"], TRAIN_PRESETS).endswith(
        "[default: 0.03 x batch-size / 256; fashion-mnist 0.015; demo 0.015]"
    )
    assert "imagenet-100, imagenet-1k, fashion-mnist, demo" in help_text(train["preset"], TRAIN_PRESETS)
    assert "[" not in help_text(train["max_steps"], TRAIN_PRESETS)  # None, and no preset sets it


def test_a_field_without_help_or_a_number_without_range_is_refused_where_it_is_declared():
    with pytest.raises(TypeError, match=r"Broken.epochs: a number needs its range"):

        @config_class
        class Broken(_Config):
            epochs: int = option(1, "Epochs.")

    with pytest.raises(TypeError, match=r"Bare.name: declare it with option"):

        @config_class
        class Bare(_Config):
            name: str = "x"


def test_a_field_at_its_legacy_value_leaves_result_names_as_they_were():
    @config_class
    class Before(_Config):
        lr: float = option(0.1, "Learning rate.", within="(0, inf)")

    @config_class
    class After(_Config):  # a new option whose default reproduces what Before computed
        lr: float = option(0.1, "Learning rate.", within="(0, inf)")
        crop_pct: float = option(0.875, "Evaluation crop.", within="(0, 1]", legacy=0.875)

    assert result_settings(After()) == result_settings(Before()) == {"lr": 0.1}
    assert result_settings(After(crop_pct=1.0)) == {"lr": 0.1, "crop_pct": 1.0}


def test_cli_reports_bad_options_without_a_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # an export folder as SOURCE
    result = CliRunner().invoke(app, ["train", "--dataset", "fashion-mnist", "--queue-size", "8", "--batch-size", "16"])
    assert result.exit_code == 2
    assert "--queue-size (K = 8) must be at least the global --batch-size (16)" in result.output
    assert "Traceback" not in result.output
    for value in ("nan", "inf", "-inf"):
        result = CliRunner().invoke(
            app, ["probe", str(tmp_path), "--dataset", "d", "--image-size", "32", "--lr", value]
        )
        assert result.exit_code == 2 and f"--lr must be a number > 0, got {value}" in result.output
    result = CliRunner().invoke(app, ["probe", "nowhere", "--dataset", "d"])
    assert result.exit_code == 2 and "SOURCE nowhere: no such folder" in result.output
    result = CliRunner().invoke(app, ["detect", "SRC", "--data", "d", "--batch-norm", "sync-ish"])
    assert result.exit_code == 2 and "--batch-norm" in result.output
    result = CliRunner().invoke(app, ["probe", "SRC", "--protocol", "svm"])
    assert result.exit_code == 2 and "--protocol" in result.output and "'linear', 'knn', 'fast'" in result.output


@pytest.mark.parametrize("width", [60, 80, 200])
def test_the_command_list_is_never_cut_and_arguments_are_named_alike(width):
    listing = CliRunner().invoke(app, ["--help"], terminal_width=width).stdout
    commands = listing.split("Commands:")[1]
    assert "..." not in commands and all(f"  {c}" in commands for c in ("train", "probe", "push", "presets"))
    usage = {c: CliRunner().invoke(app, [c, "--help"]).stdout.splitlines()[0] for c in ("probe", "export", "import")}
    assert usage == {
        "probe": "Usage: mochi probe [OPTIONS] {SOURCE}",
        "export": "Usage: mochi export [OPTIONS] {RUN_DIR}",
        "import": "Usage: mochi import [OPTIONS] {CHECKPOINT}",
    }
    assert CliRunner().invoke(app, ["push", "--help"]).stdout.startswith("Usage: mochi push [OPTIONS] {SOURCE}")


def test_the_cache_dir_default_reads_as_a_path():
    probe = {f.name: f for f in dataclasses.fields(ProbeConfig)}
    assert help_text(probe["cache_dir"], PROBE_PRESETS).endswith(
        "[default: $MOCHI_HUB_CACHE/features, else $XDG_CACHE_HOME/mochi-hub/features, else ~/.cache/mochi-hub/features]"
    )


def test_a_result_table_never_cuts_a_value_in_two(capsys, monkeypatch):
    row = {"protocol": "knn", "dataset": "fashion-mnist", "split": "val", "top-1 %": "71.25", "top-5 %": "97.50"}
    row |= {"train": "60000", "eval": "10000", "seconds": "12.5"}
    for width in ("80", "200"):
        monkeypatch.setenv("COLUMNS", width)
        print_table("mochi probe: runs/demo", row, text_columns=3)
        shown = capsys.readouterr().out
        assert max(len(line) for line in shown.splitlines()) <= int(width)
        assert all(value in shown for value in row.values()), shown  # "fashion-mnist", not "fashion-mnis" / "t"
