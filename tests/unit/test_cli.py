"""The CLI maps every option onto its config field and reports bad input in one line."""

from __future__ import annotations

import dataclasses

from typer.testing import CliRunner

from mochi_hub.cli import probe as cli_probe
from mochi_hub.cli.app import app
from mochi_hub.config import ProbeConfig, TrainConfig
from mochi_hub.evaluate import probe as probe_module
from mochi_hub.training import pretrain as train_module


def test_cli_options_map_one_to_one_onto_probe_config(monkeypatch):
    import inspect

    params = inspect.signature(cli_probe.probe).parameters
    fields = {f.name for f in dataclasses.fields(ProbeConfig)}
    assert set(params) - {"source", "config_file", "print_config"} == fields

    # Every option given a value that is not its default must arrive in the field of the same name.
    values = dict(
        dataset="org/data",
        protocol="fast",
        split="train",
        epochs=7,
        batch_size=12,
        lr=0.25,
        lr_milestones=(3, 5),
        lr_gamma=0.5,
        sgd_momentum=0.8,
        weight_decay=0.001,
        augment=False,
        crop_min_scale=0.3,
        image_size=48,
        knn_k=20,
        knn_temperature=0.1,
        seed=3,
        workers=1,
        output="o.json",
        resume=True,
        cache_dir="c",
        max_images=99,
        mixed_precision="bf16",
        strict_data=True,
        preset="imagenet-1k",
    )
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
    assert outcome.exit_code == 2 and "--protocol" in outcome.output and "'linear', 'knn', 'fast'" in outcome.output


CLI_VALUES = {  # a non-default value for every TrainConfig field
    "dataset": "some/dataset",
    "model": "resnet18",
    "image_size": "64",
    "epochs": "3",
    "batch_size": "32",
    "queue_size": "512",
    "mochi": "16,8,4",
    "mixing_warmup_epochs": "1",
    "lr": "0.5",
    "temperature": "0.1",
    "key_momentum": "0.99",
    "seed": "7",
    "workers": "1",
    "output": "out/dir",
    "max_steps": "11",
    "save_every_steps": "5",
    "resume": "auto",
    "mixed_precision": "bf16",
    "preset": "demo",
    "proj_dim": "64",
    "weight_decay": "0.0005",
    "sgd_momentum": "0.8",
    "beta_max": "0.4",
    "channels_last": None,
    "log_every_steps": "3",
    "keep_checkpoints": "4",
    "strict_data": None,
    "max_train_images": "100",
    "report_to": "none",
    "on_nonfinite": "skip",
    "init": "timm",
    "bn_splits": "4",
    "lr_warmup_epochs": "1",
    "augment_on": "device",
    "compile": None,
}


def test_cli_maps_onto_the_config_one_to_one(monkeypatch):
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(CLI_VALUES) == set(fields)
    received = []
    monkeypatch.setattr(train_module, "train", received.append)
    args = ["train"]
    for name, value in CLI_VALUES.items():
        args += [f"--{name.replace('_', '-')}"] + ([value] if value is not None else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (config,) = received
    for name, value in CLI_VALUES.items():
        default = getattr(TrainConfig(), name)
        got = getattr(config, name)
        assert got != default, name  # the option reached its field
        assert str(got).replace(" ", "").strip("()") == (value or "True"), name


def test_cli_reports_bad_options_without_a_traceback():
    result = CliRunner().invoke(app, ["train", "--dataset", "fashion-mnist", "--queue-size", "8", "--batch-size", "16"])
    assert result.exit_code == 2
    assert "--queue-size (K = 8) must be at least the global --batch-size (16)" in result.output
    assert "Traceback" not in result.output
