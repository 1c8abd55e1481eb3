"""Importing is light: `import mochi_hub`, `import mochi_hub.config` and `mochi --help` load no torch, timm,
accelerate or datasets (each costs seconds); the public names load their modules on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.ci
HEAVY = ("torch", "timm", "accelerate", "datasets", "huggingface_hub")


def loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_package_config_and_help_load_nothing_heavy():
    assert loaded_after("import mochi_hub") == []
    assert loaded_after("import mochi_hub.config; mochi_hub.config.TrainConfig(); mochi_hub.config.ProbeConfig()") == []
    help_text = (
        "from typer.testing import CliRunner\nfrom mochi_hub.cli.app import app\n"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0 and 'train' in r.output\n"
        "r = CliRunner().invoke(app, ['train', '--help']); assert r.exit_code == 0 and '--queue-size' in r.output"
    )
    assert loaded_after(help_text) == []


def test_public_names_are_the_functions():
    code = (
        "from mochi_hub import TrainConfig, ProbeConfig, train, run_probe, export_run, push\n"
        "import inspect, mochi_hub.training.pretrain\n"
        "assert inspect.isfunction(train) and train is mochi_hub.training.pretrain.train\n"
        "assert all(inspect.isfunction(f) for f in (run_probe, export_run, push))\n"
        "assert TrainConfig().model == 'resnet50' and ProbeConfig().protocol == 'linear'\n"
    )
    assert "torch" in loaded_after(code)
