"""bench/study.py --quick: the whole study path (train, probe, aggregate, plot, report) on a tiny budget."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _table(text: str, header_start: str) -> list[list[str]]:
    """The markdown table whose header row starts with `header_start`: rows of cells (header excluded)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    assert re.fullmatch(r"(\|---)+\|", lines[start + 1]), lines[start + 1]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_quick_study_writes_a_parsable_report(tmp_path):
    pytest.importorskip("timm")
    from mochi_hub.data import DEBIAN_FASHION_MNIST

    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    out, runs = tmp_path / "study", tmp_path / "runs"
    command = [sys.executable, str(ROOT / "bench" / "study.py"), "--quick", "--out", str(out), "--runs-dir", str(runs)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    readme = (out / "README.md").read_text()
    study = json.loads((out / "study.json").read_text())
    assert not study["partial"] and len(study["runs"]) == 2
    for png in ("proxy_top1.png", "uniformity.png", "alignment.png", "false_negative_rate.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in readme

    rows = _table(readme, "| setting | runs |")
    assert [r[0] for r in rows[:2]] == ["MoCo-v2", "MoCHi (128, 64, 32)"]
    for row in rows[:2]:
        assert row[1] == "1"
        knn, fast = (float(cell.split("±")[0]) for cell in row[2:4])
        assert 0.0 <= knn <= 100.0 and 0.0 <= fast <= 100.0
    by_setting = {r["setting"]: r for r in study["runs"]}
    assert float(rows[0][2].split("±")[0]) == pytest.approx(by_setting["MoCo-v2"]["knn_top1"], abs=0.01)
    assert study["runs"][0]["curves"]["proxy_top1"], "no curve read from metrics.jsonl"
    assert "bench/study.py --quick" in readme and "## The paper's claims at this scale" in readme
    assert study["machine"]["versions"]["torch"] and study["machine"]["cpu_model"]

    # Resumable: a second invocation finds every run finished and trains nothing.
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, kept") == 2
    assert "mochi train" not in again.stderr

    # --compare-with: the same runs read again reproduce themselves exactly, and the option is not part of the
    # study's command (it only shapes the report).
    shutil.copy(out / "study.json", tmp_path / "before.json")
    compared = subprocess.run(
        command + ["--report-only", "--compare-with", str(tmp_path / "before.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    rep = json.loads((out / "study.json").read_text())["reproducibility"]
    assert [(r["setting"], r["seed"]) for r in rep["same_runs"]] == [("MoCo-v2", 0), ("MoCHi (128, 64, 32)", 0)]
    assert all(v == 0.0 for r in rep["same_runs"] for v in r["max_abs_diff"].values())
    readme = (out / "README.md").read_text()
    assert "## Re-running the study" in readme and "--compare-with" not in readme.split("## Command")[1][:300]


def _load_study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproducibility_compares_seed_means_against_the_spread_and_same_runs_exactly():
    study = _load_study()
    columns = [key for key, _, _ in study.TABLE_COLUMNS]

    def record(setting, seed, knn, fast):
        return {
            "setting": setting,
            "seed": seed,
            "knn_top1": knn,
            "fast_top1": fast,
            **{k: 0.5 for k in columns if k not in ("knn_top1", "fast_top1")},
        }

    settings = {"MoCo-v2": (0, 0, 0)}
    before = [record("MoCo-v2", 0, 60.0, 70.0), record("MoCo-v2", 1, 62.0, 72.0)]  # knn std sqrt(2)
    now = [record("MoCo-v2", 0, 60.0, 70.0), record("MoCo-v2", 2, 65.0, 78.0)]  # knn std sqrt(12.5)
    for r in before + now:
        r["curves"] = {key: [] for key, _ in study.CURVES}
        for key, _, _ in study.EXTRA_COLUMNS:
            r[key] = 1.0
    previous = {"aggregate": study.aggregate(before, settings), "runs": before, "git_commit": "abc", "started": "then"}
    rep = study.reproducibility(study.aggregate(now, settings), now, previous)

    knn = rep["settings"]["MoCo-v2"]["knn_top1"]
    assert knn["diff"] == pytest.approx(62.5 - 61.0)
    assert knn["spread"] == pytest.approx(12.5**0.5)
    assert knn["within_spread"]  # 1.5 <= 3.54
    fast = rep["settings"]["MoCo-v2"]["fast_top1"]
    assert fast["diff"] == pytest.approx(74.0 - 71.0) and fast["spread"] == pytest.approx(32**0.5)
    assert rep["settings"]["MoCo-v2"]["final_uniformity"] == {
        "now": 0.5,
        "before": 0.5,
        "diff": 0.0,
        "spread": 0.0,
        "n": [2, 2],
        "within_spread": True,
    }
    # Only seed 0 ran in both: compared value by value.
    assert [(r["setting"], r["seed"]) for r in rep["same_runs"]] == [("MoCo-v2", 0)]
    assert rep["same_runs"][0]["max_abs_diff"]["knn_top1"] == 0.0

    # A shift larger than both spreads is reported as outside.
    shifted = [dict(r, knn_top1=r["knn_top1"] + 10.0) for r in now]
    rep = study.reproducibility(study.aggregate(shifted, settings), shifted, previous)
    assert not rep["settings"]["MoCo-v2"]["knn_top1"]["within_spread"]
    assert "**outside spread**" in "\n".join(study.reproducibility_section(rep, "before.json"))


def test_dynamics_quick_run_compares_both_loops_at_the_same_steps(tmp_path):
    pytest.importorskip("lightly.loss")
    from mochi_hub.data import DEBIAN_FASHION_MNIST

    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    out = tmp_path / "dynamics.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dynamics.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert sorted(result["ours"]) == sorted(result["lightly"]) == ["2", "4"]
    for loop in ("ours", "lightly"):
        for row in result[loop].values():
            assert 0.0 <= row["proxy_top1"] <= 1.0 and 0.0 <= row["alignment"] <= 4.0
            assert -8.0 <= row["uniformity"] <= 0.0 and 0.0 < row["loss"] < 2 * result["ln_k_plus_1"]
    assert result["config"]["queue_size"] == 128 and result["config"]["batch_size"] == 32  # the study's --quick
