"""A plain checkout runs with nothing installed: `PYTHONPATH=. python -m mochi_hub.cli train ...` trains, exports
(the card template is found beside the package) and probes, as on a device machine that gets a copy of the tree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runs import clean_env

pytestmark = pytest.mark.ci
REPO = Path(__file__).resolve().parents[2]

# The editable install's finder would map mochi_hub.cli and mochi_hub.model_cards whatever the tree holds: drop it.
WITHOUT_INSTALL = (
    "import runpy, sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in (getattr(f, '__module__', '') or '')]\n"
    "sys.argv = ['mochi', *sys.argv[1:]]\n"
    "runpy.run_module('mochi_hub.cli', run_name='__main__', alter_sys=True)\n"
)


def plain_copy(target: Path) -> Path:
    """The tracked files of the working tree, as `git archive` would give them (uncommitted edits included)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


def mochi(tree: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_INSTALL, *args],
        cwd=cwd,
        env=clean_env(PYTHONPATH=str(tree)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_plain_checkout_trains_exports_and_probes(tmp_path):
    tree = plain_copy(tmp_path / "tree")
    work = tmp_path / "work"
    work.mkdir()
    where = mochi(tree, "--version", cwd=work)  # the CLI itself came from the copy
    assert where.stdout.strip()
    mochi(
        tree,
        "train",
        "--dataset",
        "fashion-mnist",
        "--model",
        "test_resnet",
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--queue-size",
        "64",
        "--mochi",
        "8,8,4",
        "--epochs",
        "2",
        "--mixing-warmup-epochs",
        "1",
        "--max-train-images",
        "32",
        "--workers",
        "0",
        "--report-to",
        "none",
        "--output",
        "run",
        cwd=work,
    )
    export = work / "run" / "export"
    card = (export / "README.md").read_text()
    assert "library_name: timm" in card and "MoCHi" in card
    assert json.loads((export / "config.json").read_text())["architecture"] == "test_resnet"
    probe = mochi(
        tree,
        "probe",
        "run",
        "--protocol",
        "knn",
        "--image-size",
        "32",
        "--max-images",
        "40",
        "--workers",
        "0",
        "--cache-dir",
        "cache",
        cwd=work,
    )
    assert "top-1" in probe.stdout.lower() or "top1" in probe.stdout.lower(), probe.stdout
    # The modules that ran were the copy's, not the checkout's.
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_INSTALL.split("sys.argv")[0] + "import mochi_hub.cli.app, mochi_hub.model_cards as m\n"
            "print(mochi_hub.cli.app.__file__); print(list(m.__path__)[0])",
        ],
        cwd=work,
        env=clean_env(PYTHONPATH=str(tree)),
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert loaded == [str(tree / "cli" / "app.py"), str(tree / "model_cards")]
