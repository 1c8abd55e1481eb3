"""The distribution: `cli/` and `model_cards/` install inside mochi_hub, never as a top-level `cli`, and the package
data (the model-card template, the ImageNet-100 class list) with it, both from the editable install (.venv) and from
a built wheel."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ci  # the distribution is what users install: CI checks it

REPO = Path(__file__).resolve().parents[2]
CHECK = """
import importlib.resources, importlib.util, mochi_hub
assert importlib.util.find_spec("cli") is None, "a top-level cli module is importable"
assert importlib.util.find_spec("model_cards") is None, "a top-level model_cards module is importable"
templates = [p.name for p in importlib.resources.files("mochi_hub.model_cards").iterdir() if p.name.endswith(".md")]
assert templates, "no model-card template installed"
synsets = importlib.resources.files("mochi_hub.data").joinpath("imagenet100.txt").read_text().split()
assert len(synsets) == 100, "the ImageNet-100 class list is not installed"
from mochi_hub.cli.app import app
print(mochi_hub.__file__)
"""


def run_python(code: str, cwd: Path, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_editable_install_exposes_only_mochi_hub(tmp_path):
    # From another folder, so the checkout's own cli/ is not on sys.path.
    location = run_python(CHECK, cwd=tmp_path).strip()
    assert Path(location).parent == REPO / "mochi_hub"
    help_text = subprocess.run(
        [str(Path(sys.executable).with_name("mochi")), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    ).stdout
    for command in ("train", "probe", "export", "push"):
        assert command in help_text


def test_built_wheel_installs_cli_and_templates_inside_mochi_hub(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("mochi_hub-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mochi_hub/cli/app.py" in names and "mochi_hub/model_cards/mochi_timm.md" in names
    assert "mochi_hub/data/imagenet100.txt" in names
    assert not [n for n in names if n.startswith(("cli/", "model_cards/", "tests/", "bench/"))]
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mochi = mochi_hub.cli.app:main" in entry_points

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The wheel's copy comes first on sys.path (the editable finder only answers what sys.path does not).
    location = run_python(CHECK, cwd=tmp_path, PYTHONPATH=str(target)).strip()
    assert Path(location).parent == target / "mochi_hub"
