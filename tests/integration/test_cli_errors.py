"""A CLI that never wastes a user's work: each bad input is one line on stderr with the same prefix and exit
code (2 bad usage, 1 runtime failure) before any work starts, and the defaults follow what was trained."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mochi_hub.cli.app import app
from mochi_hub.config import DetectConfig, ProbeConfig, TrainConfig
from mochi_hub.evaluate.probe import result_name
from mochi_hub.publish.sources import probe_config_for
from mochi_hub.training.checkpoint import latest_checkpoint
from mochi_hub.training.pretrain import train

from hub_server import TOKENS, LocalHub
from runs import tiny_config, write_image_folder

REPO = Path(__file__).resolve().parents[2]


def mochi(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run on a folder of real JPEG-free PNGs at 32 px, with its checkpoints kept."""
    root = tmp_path_factory.mktemp("cli")
    folder = write_image_folder(root / "images" / "train", per_class=16)
    return train(
        tiny_config(
            root / "run",
            dataset=str(folder.parent),
            max_train_images=None,
            epochs=1,
            batch_size=8,
            queue_size=16,
            mochi=(0, 0, 0),
            mixing_warmup_epochs=0,
        )
    )


def test_version_help_and_choices():
    from mochi_hub import __version__

    assert mochi("--version").stdout.strip() == f"mochi-hub {__version__}"
    short = mochi("train", "-h")
    assert short.exit_code == 0 and "--mixed-precision" in short.stdout
    assert "[auto|no|bf16|fp16]" in short.stdout.replace(" ", "") or "<auto|no|bf16|fp16>" in short.stdout  # choices
    assert "--install-completion" in mochi("--help").stdout


def test_train_needs_a_dataset_or_a_preset():
    result = mochi("train")
    assert result.exit_code == 2 and "--dataset" in one_error_line(result) and "--preset" in result.stderr


def test_presets_and_print_config_show_resolved_values(tmp_path):
    listed = mochi("presets", "imagenet-100")
    assert listed.exit_code == 0 and "queue_size: 16384" in listed.stdout and "mochi probe --preset" in listed.stdout
    printed = mochi("train", "--preset", "imagenet-1k", "--warmup-epochs", "3", "--print-config")
    values = yaml.safe_load(printed.stdout)
    assert values["queue_size"] == 65536 and values["mixing_warmup_epochs"] == 3  # the old name is an alias
    example = REPO / "docs" / "examples" / "train-fashion-mnist.yaml"
    from_file = yaml.safe_load(mochi("train", "--config", example, "--print-config").stdout)
    assert from_file == {**from_file, **yaml.safe_load(example.read_text())}


def test_a_broken_config_file_is_one_line(tmp_path):
    broken = tmp_path / "bad.yaml"
    broken.write_text("epochs: 3\nlr: [0.1\n")
    result = mochi("train", "--config", broken)
    assert result.exit_code == 2 and "not valid YAML at line" in one_error_line(result)


def test_numbers_in_a_config_file_as_yaml_writes_them(tmp_path):
    config = tmp_path / "wd.yaml"
    config.write_text("weight_decay: 5e-4\nlr: 1e-2\nepochs: 30\n")  # PyYAML (YAML 1.1) reads 5e-4 as a string
    printed = yaml.safe_load(mochi("train", "--config", config, "--print-config").stdout)
    assert (printed["weight_decay"], printed["lr"], printed["epochs"]) == (0.0005, 0.01, 30)
    config.write_text("weight_decay: a little\n")
    result = mochi("train", "--config", config)
    assert result.exit_code == 2 and "--weight-decay must be a number >= 0, got 'a little'" in one_error_line(result)
    config.write_text("epochs: 2.5\n")
    assert "--epochs must be an integer > 0, got 2.5" in one_error_line(mochi("train", "--config", config))


@pytest.mark.parametrize(
    "field, value", [("report_to", "wandbb"), ("augment_on", "gpu"), ("on_nonfinite", "ignore"), ("init", "torch")]
)
def test_a_choice_in_a_config_file_is_checked_as_its_option_is(tmp_path, field, value):
    config = tmp_path / "choice.yaml"
    config.write_text(f"{field}: {value}\n")  # a config file does not pass through typer's choices
    result = mochi("train", "--config", config)
    option = "--" + field.replace("_", "-")
    assert result.exit_code == 2 and f"{option} must be one of" in one_error_line(result)
    assert f"got '{value}'" in one_error_line(result)


def test_a_text_file_or_a_flat_folder_as_dataset(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    result = mochi("train", "--dataset", text)
    assert result.exit_code == 2 and "is a file" in one_error_line(result)
    flat = tmp_path / "flat"
    write_image_folder(tmp_path / "tmp", per_class=2)
    flat.mkdir()
    for png in (tmp_path / "tmp").rglob("*.png"):
        shutil.copy(png, flat / png.name)
    result = mochi(
        "train",
        "--dataset",
        flat,
        "--model",
        "test_resnet",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--queue-size",
        "4",
        "--mochi",
        "0,0,0",
        "--output",
        tmp_path / "r",
    )
    assert result.exit_code == 1 and "4 files but no class sub-folders" in one_error_line(result)


def test_an_image_size_below_the_models_stride_is_refused():
    result = mochi("train", "--dataset", "fashion-mnist", "--image-size", "1")
    assert result.exit_code == 2 and "needs at least 32 px" in one_error_line(result)


def test_a_missing_tracker_is_refused(tmp_path):
    result = mochi(
        "train",
        "--dataset",
        "fashion-mnist",
        "--model",
        "test_resnet",
        "--image-size",
        "32",
        "--report-to",
        "wandb",
        "--output",
        tmp_path / "r",
    )
    assert result.exit_code == 2 and "wandb package is not installed" in one_error_line(result)
    assert not (tmp_path / "r").exists()  # refused before any work: no empty run directory


def test_a_corrupt_checkpoint_under_resume_is_one_line(run_dir, tmp_path):
    for broken_file, garbage, expected in (
        ("model.safetensors", b"\x00garbage", "not a readable safetensors file"),
        ("optimizer.safetensors", None, "not a readable safetensors file"),
        ("state.json", b"{oops", "state.json: not readable JSON"),
    ):
        copy = tmp_path / f"copy-{broken_file}"
        shutil.copytree(run_dir, copy)
        target = latest_checkpoint(copy) / broken_file
        target.write_bytes(garbage if garbage is not None else target.read_bytes()[: target.stat().st_size // 2])
        config = json.loads((copy / "run.json").read_text())["config"]
        result = mochi(
            "train",
            "--dataset",
            config["dataset"],
            "--model",
            "test_resnet",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--queue-size",
            "16",
            "--mochi",
            "0,0,0",
            "--mixing-warmup-epochs",
            "0",
            "--bn-splits",
            "2",
            "--workers",
            "0",
            "--report-to",
            "none",
            "--log-every-steps",
            "1",
            "--keep-checkpoints",
            "3",
            "--output",
            copy,
            "--resume",
            "auto",
        )
        line = one_error_line(result)
        assert result.exit_code == 1 and expected in line and broken_file in line, line


def test_export_to_a_file_is_one_line(run_dir, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("")
    result = mochi("export", run_dir, "--output", target)
    assert result.exit_code == 2 and "is a file, not a folder" in one_error_line(result)


def test_a_bad_probe_output_fails_before_any_work(run_dir, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    cache = tmp_path / "cache"
    result = mochi("probe", run_dir, "--protocol", "knn", "--output", blocker / "r.json", "--cache-dir", cache)
    assert result.exit_code == 2 and "--output" in one_error_line(result)
    assert not cache.exists()  # nothing was extracted


def test_probe_defaults_to_what_the_source_was_trained_on(run_dir, tmp_path):
    trained = json.loads((run_dir / "run.json").read_text())["config"]
    printed = yaml.safe_load(mochi("probe", run_dir, "--protocol", "knn", "--print-config").stdout)
    assert printed["dataset"] == trained["dataset"] and printed["image_size"] == trained["image_size"] == 32
    exported = yaml.safe_load(
        mochi("probe", run_dir / "export", "--dataset", trained["dataset"], "--print-config").stdout
    )
    assert exported["image_size"] == 32  # the export's pretrained_cfg input size
    names = {result_name(probe_config_for(str(run_dir), protocol="knn", image_size=size)) for size in (32, 48)}
    assert len(names) == 2  # another size never overwrites a result


def test_the_start_summary_is_short_and_says_when_mixing_starts(tmp_path, caplog):
    caplog.set_level("INFO", logger="mochi_hub")
    train(tiny_config(tmp_path / "run", max_steps=1))
    lines = [r.getMessage() for r in caplog.records if r.name == "mochi_hub.training.pretrain"]
    summary = "\n".join(lines[:3])
    assert "test_resnet (moco init) on fashion-mnist" in summary and "4 steps/epoch" in summary
    assert "mixing MoCHi (8, 8, 4) from epoch 2 (step 4)" in summary and "lr 0.00" in summary


COMMANDS = {"train": TrainConfig, "probe": ProbeConfig, "detect": DetectConfig}


def _outside(within) -> str:
    """A value just outside a range, as the command line writes it."""
    low, high = within.bounds
    return str(int(low) - 1 if within.text[0] == "[" else int(low)) if high == float("inf") else str(high + 1)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_number_option_refuses_nan_infinity_and_its_range_saying_which(command, tmp_path):
    """From one place (the field's declaration): NaN, infinities (1e400 reads as one) and values outside the range
    are refused with the range stated, before any work."""
    (tmp_path / "config.json").write_text("{}")  # an export folder as SOURCE of probe and detect
    head = {"train": ["train", "--dataset", "fashion-mnist"], "probe": ["probe", tmp_path, "--dataset", "d"]}
    head["detect"] = ["detect", tmp_path, "--data", tmp_path]
    numbers = [f for f in dataclasses.fields(COMMANDS[command]) if f.metadata["within"] is not None]
    assert len(numbers) >= 8
    for field in numbers:
        flag, within = "--" + field.name.replace("_", "-"), field.metadata["within"]
        values = ("nan", "inf", "-inf", "1e400") if field.type.startswith("float") else ()
        for value in (*values, _outside(within)):
            result = mochi(*head[command], flag, value, "--output", tmp_path / "out")
            assert result.exit_code == 2, (flag, value, result.output)
            assert f"{flag} must be " in one_error_line(result) or "Invalid value" in result.output, result.output
            assert str(within) in result.output, (flag, value, result.output)
    assert not (tmp_path / "out").exists()


def test_the_cases_of_the_report_are_refused_and_named():
    result = mochi("train", "--dataset", "fashion-mnist", "--sgd-momentum", "1.5")
    assert result.exit_code == 2 and "--sgd-momentum must be a number in [0, 1), got 1.5" in one_error_line(result)
    result = mochi("detect", "SRC", "--data", "d", "--lr", "nan")
    assert result.exit_code == 2 and "--lr must be a number > 0, got nan" in one_error_line(result)
    result = mochi("train", "--dataset", "fashion-mnist", "--seed", "-1", "--print-config")
    assert result.exit_code == 2 and "--seed must be an integer >= 0, got -1" in one_error_line(result)
    result = mochi("train", "--dataset", "fashion-mnist", "--beta-max", "2")
    assert result.exit_code == 2 and one_error_line(result).startswith("Error: --beta-max must be a number in (0, 1)")


def test_an_output_that_cannot_be_written_is_a_usage_error_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = mochi("train", "--dataset", "fashion-mnist", "--model", "test_resnet", "--image-size", "32",
                   "--output", blocker / "run")  # fmt: skip
    assert result.exit_code == 2 and "--output" in one_error_line(result) and "not writable" in one_error_line(result)


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only errors a user can fix are one line: a ValueError from a bug is not dressed up as bad input."""
    import mochi_hub.training.preflight as preflight

    def broken(config):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(preflight, "preflight", broken)
    result = CliRunner().invoke(app, ["train", "--dataset", "fashion-mnist"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "Error: an internal mistake" not in result.output


def test_probe_checks_its_source_before_anything_else(run_dir, tmp_path, monkeypatch):
    """SOURCE is checked first, whatever it is; a --dataset that names nothing is a usage error as in train."""
    folder = write_image_folder(tmp_path / "images", per_class=2)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    (tmp_path / "empty").mkdir()
    for source, expected in (
        (folder, "neither a run directory"),
        (tmp_path / "typo", "no such folder"),
        (notes, "a file, and not hf-hub:org/name"),
        (tmp_path / "empty", "neither a run directory"),
    ):
        result = mochi("probe", source)
        assert result.exit_code == 2 and f"SOURCE {source}: {expected}" in one_error_line(result), result.output
    result = mochi("probe", run_dir, "--dataset", "nope")
    assert result.exit_code == 2 and "--dataset 'nope': not a folder" in one_error_line(result)

    hub = LocalHub(TOKENS).start()
    try:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        result = mochi("probe", "hf-hub:nobody/nothing")
    finally:
        hub.stop()
    line = one_error_line(result)
    assert result.exit_code == 2 and "SOURCE hf-hub:nobody/nothing: no timm model there on the Hub" in line, line


@pytest.mark.parametrize(
    "option, value, named",
    [("--queue-size", "1000000000", "--queue-size 1000000000: needs at least"),
     ("--image-size", "100000", "--batch-size 256 at --image-size 100000: needs at least")],
)  # fmt: skip
def test_a_size_that_cannot_fit_is_refused_before_the_first_step(tmp_path, option, value, named):
    result = mochi("train", "--dataset", "fashion-mnist", "--model", "test_resnet", "--image-size", "32",
                   "--report-to", "none", option, value, "--output", tmp_path / "run")  # fmt: skip
    line = one_error_line(result)
    assert result.exit_code == 2 and named in line and "of RAM this machine has available" in line, line
    assert not (tmp_path / "run").exists()
