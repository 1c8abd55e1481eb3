"""Faults during training: kill -9 and resume, unusable images, bad settings, non-finite losses."""

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mochi_hub import train as train_module
from mochi_hub.checkpoint import latest_checkpoint, list_checkpoints
from mochi_hub.config import TrainConfig, resolve_train_config
from mochi_hub.data import DEBIAN_FASHION_MNIST, BadImageError, FashionMNIST, to_rgb
from mochi_hub.train import NonFiniteLossError, train

needs_fashion_mnist = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                         reason="needs Debian's dataset-fashion-mnist (make test installs it)")
REPO = Path(__file__).resolve().parents[1]


def tiny(output: Path, **overrides) -> TrainConfig:
    values = dict(dataset="fashion-mnist", model="test_resnet", image_size=32, epochs=2, batch_size=16,
                  queue_size=64, mochi=(8, 8, 4), warmup_epochs=1, max_train_images=64, workers=0,
                  output=str(output), log_every_steps=1, report_to="none", keep_checkpoints=3)
    return TrainConfig(**(values | overrides))


# --- kill -9 and resume ------------------------------------------------------------------------------

def cli_args(config: TrainConfig) -> list[str]:
    args = [sys.executable, "-m", "mochi_hub.cli", "train"]
    for name, value in config.to_dict().items():
        if value is None or isinstance(value, bool) and not value:
            continue
        flag = f"--{name.replace('_', '-')}"
        args += [flag] if value is True else [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
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
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if when(run_dir):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    assert process.poll() == 0, process.stderr.read().decode()[-3000:]
    return False


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.ci
def test_kill_9_at_five_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Tolerance: none. Every random draw is seeded by (seed, epoch or step, index) and the CPU kernels
    are deterministic, so a resumed run repeats the killed steps bit for bit."""
    config = tiny(tmp_path / "killed", epochs=3, max_train_images=96, save_every_steps=2)  # 18 steps
    reference = train(dataclasses.replace(config, output=str(tmp_path / "straight")))

    args = cli_args(config) + ["--resume", "auto"]
    kill_points = [lambda d: logged_step(d) >= 3, lambda d: logged_step(d) >= 7, saving,
                   lambda d: logged_step(d) >= 13, lambda d: logged_step(d) >= 16]
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


def test_a_save_interrupted_before_its_rename_is_ignored(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny(run_dir, max_steps=2, epochs=1, warmup_epochs=0, mochi=(0, 0, 0)))
    good = latest_checkpoint(run_dir)
    half = run_dir / "checkpoints" / "step-0000003.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)  # a write cut short by a crash
    assert latest_checkpoint(run_dir) == good
    assert [p.name for p in list_checkpoints(run_dir)] == [good.name]


# --- unusable images ---------------------------------------------------------------------------------

def write_bad_folder(root: Path, good_per_class: int = 24) -> dict[str, Path]:
    """Real Fashion-MNIST PNGs in two classes, plus every kind of file a real folder holds."""
    source = FashionMNIST("train")
    for label in (0, 1):
        (root / f"class{label}").mkdir(parents=True)
    written = 0
    for index in range(len(source)):
        image, label = source[index]
        if label in (0, 1) and len(list((root / f"class{label}").iterdir())) < good_per_class:
            image.save(root / f"class{label}" / f"{index}.png")
            written += 1
        if written == 2 * good_per_class:
            break
    photo = Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3))
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG")
    d = root / "class0"
    bad = {"truncated": d / "truncated.jpg", "empty": d / "empty.jpg", "text": d / "notes.txt"}
    bad["truncated"].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("not an image\n")
    # Unusual but valid: these must be converted, not skipped.
    photo.convert("CMYK").save(d / "cmyk.jpg")
    photo.convert("L").save(d / "gray.png")
    Image.fromarray(np.dstack([np.asarray(photo), np.full((64, 64), 128, np.uint8)]), "RGBA").save(d / "rgba.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(d / "gray16.png")
    Image.new("RGB", (10000, 10000), (90, 120, 150)).save(d / "huge.jpg", quality=50)
    return bad


@needs_fashion_mnist
def test_bad_files_are_reported_once_and_counted_and_training_goes_on(tmp_path, capsys):
    bad = write_bad_folder(tmp_path / "images")
    # 2 epochs over every file: each bad file is met twice, reported once.
    config = tiny(tmp_path / "run", dataset=str(tmp_path / "images"), max_train_images=None, epochs=2,
                  batch_size=8, queue_size=32, mochi=(0, 0, 0), warmup_epochs=0)
    train(config)
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "run.json").read_text())["summary"]
    assert summary["images_skipped"] == 3
    for path in bad.values():
        assert printed.count(f"skipped unusable image: {path}") == 1
        assert sum(entry.startswith(str(path)) for entry in summary["bad_files"]) == 1
    assert summary["images_seen"] == 2 * (56 // 8) * 8  # 48 good + 5 unusual + 3 bad files -> 7 batches an epoch


@needs_fashion_mnist
def test_strict_data_stops_at_the_first_bad_file_with_its_path(tmp_path):
    bad = write_bad_folder(tmp_path / "images", good_per_class=4)
    config = tiny(tmp_path / "run", dataset=str(tmp_path / "images"), max_train_images=None, strict_data=True,
                  batch_size=8, queue_size=32, mochi=(0, 0, 0), warmup_epochs=0, epochs=1)
    with pytest.raises(BadImageError, match="|".join(re.escape(str(p)) for p in bad.values())):
        train(config)
    assert latest_checkpoint(tmp_path / "run") is None


def test_to_rgb_rescales_16_bit_grayscale():
    gray16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(gray16))[0, :, 0].tolist() == [0, 127, 255]
    assert to_rgb(Image.new("CMYK", (2, 2))).mode == to_rgb(Image.new("RGBA", (2, 2))).mode == "RGB"


def test_a_folder_without_a_usable_image_fails_before_training(tmp_path):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(20):
        (folder / f"{i}.jpg").write_bytes(b"garbage")
    config = tiny(tmp_path / "run", dataset=str(tmp_path / "images"), max_train_images=None, batch_size=8,
                  queue_size=32, mochi=(0, 0, 0), warmup_epochs=0, epochs=1)
    with pytest.raises(BadImageError, match="no usable image"):
        train(config)
    assert latest_checkpoint(tmp_path / "run") is None
    (folder.parent / "b").mkdir()
    few = dataclasses.replace(config, dataset=str(tmp_path / "images"), batch_size=32, queue_size=64)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(few)


# --- bad settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    (dict(model="resnet5O"), "unknown timm architecture 'resnet5O'; did you mean resnet50"),
    (dict(dataset="imagenet-22k"), "--dataset 'imagenet-22k': not a folder"),
    (dict(warmup_epochs=20, epochs=10), "--warmup-epochs"),
])
def test_bad_settings_fail_when_the_config_is_built(options, match):
    with pytest.raises(ValueError, match=re.escape(match) if "'" in match else match):
        resolve_train_config(**options)


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="--output .* not writable"):
        train(tiny(blocked / "run"))


# --- non-finite losses -------------------------------------------------------------------------------

def nan_at_step(monkeypatch, bad_step: int) -> None:
    calls = {"n": 0}
    real = train_module.info_nce

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == bad_step else loss

    monkeypatch.setattr(train_module, "info_nce", poisoned)


@needs_fashion_mnist
def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 3)
    config = tiny(tmp_path / "run", save_every_steps=2, mochi=(0, 0, 0), warmup_epochs=0)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 2 .*--on-nonfinite skip"):
        train(config)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002"]


@needs_fashion_mnist
def test_a_nan_loss_can_be_skipped_and_is_counted(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 3)
    train(tiny(tmp_path / "run", on_nonfinite="skip", mochi=(0, 0, 0), warmup_epochs=0))
    summary = json.loads((tmp_path / "run" / "run.json").read_text())["summary"]
    assert summary["nonfinite_steps"] == 1


# --- safety --------------------------------------------------------------------------------------------

def test_every_torch_load_is_weights_only():
    calls = [(path, line) for path in (REPO / "mochi_hub").rglob("*.py") for line in path.read_text().splitlines()
             if "torch.load(" in line]
    assert calls, "the checkpoint module reads optimizer state with torch.load"
    for path, line in calls:
        assert "weights_only=True" in line, f"{path}: {line.strip()}"
