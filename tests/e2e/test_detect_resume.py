"""kill -9 during `mochi detect`, then --resume: the same detector, bit for bit, as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from detection import canvases, tiny_timm_folder
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def command(source: Path, data: Path, output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mochi_hub.cli",
        "detect",
        str(source),
        "--data",
        str(data),
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--lr",
        "0.02",
        "--lr-milestones",
        "2",
        "--warmup-iters",
        "2",
        "--image-size",
        "128",
        "--fpn-channels",
        "32",
        "--trainable-layers",
        "5",
        "--workers",
        "0",
        "--output",
        str(output),
        "--resume",
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_until(args: list[str], when) -> None:
    """Start the CLI and SIGKILL it as soon as when() holds; it must still be running then."""
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=ENV)
    deadline = time.monotonic() + 300
    while process.poll() is None and not when() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert process.poll() is None, "detect finished before the kill point: " + process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.ci
def test_detect_killed_after_an_epoch_and_during_a_save_resumes_to_the_uninterrupted_detector(tmp_path):
    """Tolerance: none. The data order, flips and the detector's box sampling are seeded by (seed, epoch), the
    state holds the weights and SGD's momentum, and the CPU kernels are deterministic on one thread."""
    data = canvases(tmp_path / "data", train=6, val=2)  # 3 steps an epoch
    source = tiny_timm_folder(tmp_path / "tiny")
    straight = tmp_path / "straight"
    done = subprocess.run(
        command(source, data, straight), capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    states = killed / "state"
    run_until(command(source, data, killed), lambda: (states / "epoch-0001").is_dir())
    run_until(
        command(source, data, killed),
        lambda: states.is_dir() and any(p.name.endswith(".tmp") for p in os.scandir(states)),
    )
    done = subprocess.run(command(source, data, killed), capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((killed / "results.json").read_text())
    reference = json.loads((straight / "results.json").read_text())
    assert result["resumed_from_epoch"] >= 1 and result["summary"]["resumes"] == 1
    got, expected = load_file(killed / "detector.safetensors"), load_file(straight / "detector.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert result["AP"] == reference["AP"] and result["epoch_losses"] == reference["epoch_losses"]
    assert not any(p.name.endswith(".tmp") for p in states.iterdir())
