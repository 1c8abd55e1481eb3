"""A disk that fills up, for real: a small tmpfs mounted for the test (as root; skipped otherwise; the same faults
injected at the write layer run everywhere in tests/unit/test_core.py). train, export and detect each end in one
line naming the file and what survived, exit 1, and leave no `.tmp` and no empty folder; a run resumes once there is
room again."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from detection import canvases, tiny_timm_folder
from typer.testing import CliRunner

from mochi_hub.cli.app import app
from mochi_hub.training.checkpoint import list_checkpoints

from runs import make_run

PAGE = 4096


class SmallDisk:
    """A tmpfs of `size` bytes at `path`; `fill()` takes every byte left, `free()` gives them back."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def mount(self, size: int) -> SmallDisk:
        size = -(-size // PAGE) * PAGE
        options = f"size={size}" if not os.path.ismount(self.path) else f"remount,size={size}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)], check=True)
        return self

    def fill(self) -> None:
        with self.filler.open("ab", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * PAGE)
            except OSError as error:
                assert error.errno == errno.ENOSPC

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def left(self) -> list[str]:
        """Everything on the disk but the filler, as paths relative to it."""
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p != self.filler)


@pytest.fixture
def disk(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (tests/unit/test_core.py injects the same faults)")
    path = tmp_path / "disk"
    path.mkdir()
    small = SmallDisk(path)
    try:
        small.mount(PAGE * 16)
    except subprocess.CalledProcessError:
        pytest.skip("this machine does not let the tests mount a tmpfs")
    yield small
    subprocess.run(["umount", "-l", str(path)], check=False)


def mochi(*args) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


TRAIN = ["--dataset", "fashion-mnist", "--model", "test_resnet", "--image-size", "32", "--epochs", "2",
         "--batch-size", "16", "--queue-size", "64", "--mochi", "0,0,0", "--mixing-warmup-epochs", "0",
         "--max-train-images", "64", "--workers", "0", "--report-to", "none", "--bn-splits", "2",
         "--save-every-steps", "2", "--keep-checkpoints", "3"]  # fmt: skip


def folder_bytes(folder: Path) -> int:
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in folder.rglob("*") if p.is_file())


def test_train_stops_at_a_full_disk_with_one_line_and_resumes_when_there_is_room(disk, tmp_path):
    # The same run on a roomy disk says how much its first checkpoint takes; the small disk holds it and not a second.
    probe = tmp_path / "probe"
    assert mochi("train", *TRAIN, "--max-steps", "2", "--output", probe).exit_code == 0
    first = folder_bytes(probe) - folder_bytes(probe / "export")
    checkpoint = folder_bytes(list_checkpoints(probe)[0])
    disk.mount(first + checkpoint // 2)

    run = disk.path / "run"
    result = mochi("train", *TRAIN, "--output", run)
    line = error_line(result)
    assert result.exit_code == 1 and line.startswith(f"Error: disk full while writing {run}/"), line
    assert line.endswith(f"the last complete checkpoint is {run}/checkpoints/step-0000002 (--resume auto continues "
                         "from it once there is room)"), line  # fmt: skip
    assert not [p for p in disk.left() if p.endswith(".tmp")], disk.left()  # no step-N.tmp/, no temporary file
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]

    disk.mount(64 * 1024 * 1024)  # room again: nothing was lost
    result = mochi("train", *TRAIN, "--output", run, "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert [p.name for p in list_checkpoints(run)][-1] == "step-0000008" and (run / "export" / "config.json").is_file()


def test_export_to_a_full_disk_leaves_an_earlier_export_as_it_was(disk, tmp_path):
    run = make_run(tmp_path / "run")
    result = mochi("export", run, "--output", disk.path / "export")  # 64 kB: not even one export fits
    line = error_line(result)
    assert (
        result.exit_code == 1
        and line == f"Error: disk full while writing {disk.path / 'export'}; nothing was left behind"
    )
    assert disk.left() == []  # no empty export folder, no staging folder

    assert mochi("export", run, "--output", tmp_path / "sized").exit_code == 0
    size = folder_bytes(tmp_path / "sized")
    disk.mount(size * 3 // 2)  # one export and a half: the first fits, a second beside it does not
    assert mochi("export", run, "--output", disk.path / "export").exit_code == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (disk.path / "export").iterdir()}
    result = mochi("export", run, "--output", disk.path / "export")
    assert result.exit_code == 1 and "its files are as they were" in error_line(result)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (disk.path / "export").iterdir()} == before
    assert disk.left() == sorted(["export", *(f"export/{name}" for name in before)])  # no staging folder


def test_detect_on_a_full_disk_is_one_line_and_leaves_no_folder(disk, tmp_path):
    data = canvases(tmp_path / "canvases", train=4, val=2)
    source = tiny_timm_folder(tmp_path / "tiny")
    disk.fill()
    out = disk.path / "detect"
    result = mochi("detect", source, "--data", data, "--output", out, "--image-size", "128", "--batch-size", "2",
                   "--fpn-channels", "32", "--workers", "0", "--epochs", "1", "--warmup-iters", "0")  # fmt: skip
    line = error_line(result)
    assert result.exit_code == 1 and line.startswith(f"Error: disk full while writing {out}/"), line
    assert line.endswith("; no epoch was complete yet"), line
    assert disk.left() == []  # no state/epoch-N.tmp, no empty --output
