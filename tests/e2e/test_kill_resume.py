"""kill -9 during training and probing, then resume: the same weights as an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mochi_hub.config import TrainConfig
from mochi_hub.training.checkpoint import latest_checkpoint
from mochi_hub.training.pretrain import train

from runs import tiny_config


def test_a_linear_probe_killed_twice_resumes_to_the_uninterrupted_classifier(tmp_path, fmnist_folder, tiny_export):
    """kill -9 after an epoch's state and during a state save; `--resume` ends bit-identical (every draw
    is seeded by (seed, epoch, index) and the CPU kernels are deterministic, so no tolerance)."""
    import signal
    import time

    def command(output: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mochi_hub.cli",
            "probe",
            str(tiny_export),
            "--dataset",
            str(fmnist_folder),
            "--protocol",
            "linear",
            "--image-size",
            "32",
            "--epochs",
            "6",
            "--batch-size",
            "16",
            "--lr",
            "0.5",
            "--lr-milestones",
            "4",
            "--workers",
            "0",
            "--output",
            str(output),
            "--resume",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]

    subprocess.run(command(tmp_path / "full.json"), check=True, capture_output=True, timeout=300)
    expected = load_file(tmp_path / "full.state" / "epoch-0006" / "model.safetensors")

    states = tmp_path / "part.state"
    kill_when = [
        lambda: (states / "epoch-0002").is_dir(),
        lambda: states.is_dir() and any(p.name.endswith(".tmp") for p in os.scandir(states)),
    ]
    for when in kill_when:
        process = subprocess.Popen(
            command(tmp_path / "part.json"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
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
    got = load_file(states / "epoch-0006" / "model.safetensors")
    for name in ("weight", "bias"):
        assert torch.equal(got[name], expected[name])
    assert result["top1"] == json.loads((tmp_path / "full.json").read_text())["top1"]


REPO = Path(__file__).resolve().parents[2]


def cli_args(config: TrainConfig) -> list[str]:
    args = [sys.executable, "-m", "mochi_hub.cli", "train"]
    for name, value in config.to_dict().items():
        if value is None or isinstance(value, bool) and not value:
            continue
        flag = f"--{name.replace('_', '-')}"
        args += (
            [flag] if value is True else [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        )
    return args


def logged_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def saving(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.endswith(".tmp") for p in os.scandir(root))


def run_and_kill(args: list[str], run_dir: Path, when) -> bool:
    """Start the CLI; SIGKILL it as soon as when(run_dir) holds. True if killed, False if it finished."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the reference runs in-process on one thread (tests/conftest.py)
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=env)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if when(run_dir):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    assert process.poll() == 0, process.stderr.read().decode()[-3000:]
    return False


@pytest.mark.ci
def test_kill_9_at_five_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Tolerance: none. Every random draw is seeded by (seed, epoch or step, index) and the CPU kernels
    are deterministic, so a resumed run repeats the killed steps bit for bit."""
    config = tiny_config(tmp_path / "killed", epochs=3, max_train_images=96, save_every_steps=2)  # 18 steps
    reference = train(dataclasses.replace(config, output=str(tmp_path / "straight")))

    args = cli_args(config) + ["--resume", "auto"]
    kill_points = [
        lambda d: logged_step(d) >= 3,
        lambda d: logged_step(d) >= 7,
        saving,
        lambda d: logged_step(d) >= 13,
        lambda d: logged_step(d) >= 16,
    ]
    kills = 0
    for when in kill_points:
        killed = run_and_kill(args, tmp_path / "killed", when)
        if not killed:
            break
        kills += 1
        newest = latest_checkpoint(tmp_path / "killed")
        if newest is not None:  # whatever the moment, the newest complete checkpoint loads
            assert set(load_file(newest / "model.safetensors")) and json.loads((newest / "state.json").read_text())
    assert kills == 5
    assert not run_and_kill(args, tmp_path / "killed", lambda d: False)

    final, expected = (load_file(latest_checkpoint(d) / "model.safetensors") for d in (tmp_path / "killed", reference))
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    summary = json.loads((tmp_path / "killed" / "run.json").read_text())["summary"]
    assert summary["resumes"] >= 4  # a kill before the first checkpoint restarts from scratch
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "killed" / "checkpoints").iterdir())


@pytest.mark.ci
def test_ctrl_c_says_where_the_newest_checkpoint_is_and_exits_130(tmp_path):
    config = tiny_config(tmp_path / "run", epochs=50, save_every_steps=2, max_train_images=64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A job started in the background by a non-interactive shell (`make test &`) inherits SIGINT ignored, and
    # Python then never raises KeyboardInterrupt: give the child the default disposition, as a terminal would.
    process = subprocess.Popen(
        cli_args(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while latest_checkpoint(tmp_path / "run") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    (line,) = [line for line in stderr.splitlines() if "interrupted at step" in line]
    assert "newest checkpoint is" in line and "checkpoints/step-" in line and "--resume auto" in line
    assert "Traceback" not in stderr
