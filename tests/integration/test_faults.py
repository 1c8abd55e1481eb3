"""Faults during training: unusable images, bad settings, unwritable output, non-finite losses."""

import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mochi_hub.data.datasets import BadImageError, FashionMNIST
from mochi_hub.method import step as step_module
from mochi_hub.training.checkpoint import latest_checkpoint, list_checkpoints
from mochi_hub.training.pretrain import NonFiniteLossError, train

from runs import tiny_config


def test_a_save_interrupted_before_its_rename_is_ignored(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, max_steps=2, epochs=1, mixing_warmup_epochs=0, mochi=(0, 0, 0)))
    good = latest_checkpoint(run_dir)
    half = run_dir / "checkpoints" / "step-0000003.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)  # a write cut short by a crash
    assert latest_checkpoint(run_dir) == good
    assert [p.name for p in list_checkpoints(run_dir)] == [good.name]


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


def test_bad_files_are_reported_once_and_counted_and_training_goes_on(tmp_path, caplog):
    bad = write_bad_folder(tmp_path / "images")
    # 2 epochs over every file: each bad file is met twice, reported once.
    config = tiny_config(
        tmp_path / "run",
        dataset=str(tmp_path / "images"),
        max_train_images=None,
        epochs=2,
        batch_size=8,
        queue_size=32,
        mochi=(0, 0, 0),
        mixing_warmup_epochs=0,
    )
    train(config)
    printed = caplog.text
    summary = json.loads((tmp_path / "run" / "run.json").read_text())["summary"]
    assert summary["images_skipped"] == 3
    for path in bad.values():
        assert printed.count(f"skipped unusable image: {path}") == 1
        assert sum(entry.startswith(str(path)) for entry in summary["bad_files"]) == 1
    assert summary["images_seen"] == 2 * (56 // 8) * 8  # 48 good + 5 unusual + 3 bad files -> 7 batches an epoch


def test_strict_data_stops_at_the_first_bad_file_with_its_path(tmp_path):
    bad = write_bad_folder(tmp_path / "images", good_per_class=4)
    config = tiny_config(
        tmp_path / "run",
        dataset=str(tmp_path / "images"),
        max_train_images=None,
        strict_data=True,
        batch_size=8,
        queue_size=32,
        mochi=(0, 0, 0),
        mixing_warmup_epochs=0,
        epochs=1,
    )
    with pytest.raises(BadImageError, match="|".join(re.escape(str(p)) for p in bad.values())):
        train(config)
    assert latest_checkpoint(tmp_path / "run") is None


def test_a_folder_without_a_usable_image_fails_before_training(tmp_path):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(20):
        (folder / f"{i}.jpg").write_bytes(b"garbage")
    config = tiny_config(
        tmp_path / "run",
        dataset=str(tmp_path / "images"),
        max_train_images=None,
        batch_size=8,
        queue_size=32,
        mochi=(0, 0, 0),
        mixing_warmup_epochs=0,
        epochs=1,
    )
    with pytest.raises(BadImageError, match="no usable image"):
        train(config)
    assert latest_checkpoint(tmp_path / "run") is None
    (folder.parent / "b").mkdir()
    few = dataclasses.replace(config, dataset=str(tmp_path / "images"), batch_size=32, queue_size=64)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(few)


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="--output .* not writable"):
        train(tiny_config(blocked / "run"))


def nan_at_step(monkeypatch, bad_step: int) -> None:
    calls = {"n": 0}
    real = step_module.info_nce

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == bad_step else loss

    monkeypatch.setattr(step_module, "info_nce", poisoned)


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 3)
    config = tiny_config(tmp_path / "run", save_every_steps=2, mochi=(0, 0, 0), mixing_warmup_epochs=0)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 2 .*--on-nonfinite skip"):
        train(config)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002"]


def test_a_nan_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 1)
    config = tiny_config(tmp_path / "run", mochi=(0, 0, 0), mixing_warmup_epochs=0)
    with pytest.raises(NonFiniteLossError, match="step 0 .*; no checkpoint was saved before it. Lower --lr"):
        train(config)
    assert list_checkpoints(tmp_path / "run") == []


def test_a_nan_loss_can_be_skipped_and_is_counted(tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 3)
    train(tiny_config(tmp_path / "run", on_nonfinite="skip", mochi=(0, 0, 0), mixing_warmup_epochs=0))
    summary = json.loads((tmp_path / "run" / "run.json").read_text())["summary"]
    assert summary["nonfinite_steps"] == 1
