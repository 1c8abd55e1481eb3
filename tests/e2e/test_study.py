"""bench/study.py --quick: the whole study path (train, probe, references, aggregate, plot, report) on a tiny
budget; resumable; --report-only probes the references it lacks and trains nothing; --compare-with reproduces a
study exactly; --reuse continues from a study.json alone. And the statistics on hand-made records."""

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


def test_quick_study_writes_a_report_with_its_references_and_resumes(tmp_path):
    out, runs = tmp_path / "study", tmp_path / "runs"
    command = [sys.executable, str(ROOT / "bench" / "study.py"), "--quick", "--out", str(out), "--runs-dir", str(runs)]
    quiet = dict(cwd=ROOT, capture_output=True, text=True, timeout=900)
    done = subprocess.run(command, **quiet)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    readme = (out / "README.md").read_text()
    study = json.loads((out / "study.json").read_text())
    assert not study["partial"] and len(study["runs"]) == 2
    for png in ("proxy_top1.png", "uniformity.png", "alignment.png", "false_negative_rate.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in readme
    rows = _table(readme, "| setting | runs |")
    assert [r[0] for r in rows] == [
        "MoCo-v2",
        "MoCHi (128, 64, 32)",
        "untrained (same init and seeds)",
        "raw pixels (centred)",
    ]
    by_setting = {r["setting"]: r for r in study["runs"]}
    untrained = study["references"]["untrained"]["0"]
    for row in rows[:2]:
        knn, gain = float(row[2].split("±")[0]), float(row[4].split("±")[0])
        assert knn == pytest.approx(by_setting[row[0]]["knn"], abs=0.01)
        assert gain == pytest.approx(knn - untrained["knn"], abs=0.02)  # the gain is over the seed's own init
    assert "bench/study.py --quick" in readme and "## The paper's claims at this scale" in readme
    per_run = _table(readme, "| setting | seed |")  # the last column: where each run trained
    assert [r[-1] for r in per_run] == ["; ".join(r["hosts"]) for r in study["runs"]]
    assert all(len(r["hosts"]) == 1 and r["hosts"][0].startswith("1 process(es) on cpu, CPU ") for r in study["runs"])

    again = subprocess.run(command, **quiet)
    assert again.returncode == 0 and again.stdout.count("finished earlier, kept") == 2
    assert "mochi train" not in again.stderr  # nothing was trained again

    shutil.copy(out / "study.json", tmp_path / "before.json")
    references = [runs / "untrained-s0.json", runs / "raw-pixels.json"]
    for path in references:  # as after an interrupted study, which probes its references last
        path.unlink()
    compared = subprocess.run([*command, "--report-only", "--compare-with", str(tmp_path / "before.json")], **quiet)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert all(path.is_file() for path in references) and "mochi train" not in compared.stderr
    rep = json.loads((out / "study.json").read_text())["reproducibility"]
    assert [(r["setting"], r["seed"]) for r in rep["same_runs"]] == [("MoCo-v2", 0), ("MoCHi (128, 64, 32)", 0)]
    assert all(v == 0.0 for r in rep["same_runs"] for v in r["abs_diff"].values())
    readme = (out / "README.md").read_text()
    assert "## Re-running the study" in readme and "--compare-with" not in readme.split("## Command")[1][:300]

    # A new machine: the run directories are gone, the committed study.json remains.
    shutil.rmtree(runs)
    reused = subprocess.run([*command, "--reuse", str(tmp_path / "before.json")], **quiet)
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert "reused 2 runs" in reused.stdout and "mochi train" not in reused.stderr  # nothing trained, nothing probed
    after = json.loads((out / "study.json").read_text())
    before = json.loads((tmp_path / "before.json").read_text())
    assert [{k: v for k, v in r.items() if k != "reused"} for r in after["runs"]] == before["runs"]
    assert after["references"] == before["references"] and after["aggregate"] == before["aggregate"]
    assert after["command"] == before["command"]  # --reuse is how it resumed, not part of the study
    other = subprocess.run([*command, "--reuse", str(tmp_path / "before.json"), "--set", "temperature=0.1"], **quiet)
    assert other.returncode != 0 and "--reuse: MoCo-v2 seed 0 trained another recipe (temperature" in other.stderr


def _load_study():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("study", ROOT / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_statistics_on_hand_made_records():
    study = _load_study()
    keys = [c[0] for c in study.COLUMNS] + list(study.EXTRA)

    def run(setting, seed, knn):
        return {
            "setting": setting,
            "seed": seed,
            **dict.fromkeys(keys, 0.5),
            "knn": knn,
            "curves": {k: [] for k, _ in study.CURVES},
        }

    settings = {"MoCo-v2": (0, 0, 0), "MoCHi": (1, 1, 1)}
    records = [run("MoCo-v2", 0, 60.0), run("MoCo-v2", 1, 62.0), run("MoCHi", 0, 70.0), run("MoCHi", 1, 72.0)]
    agg = study.aggregate(records, settings)
    c = study.compare(agg, "knn", "MoCo-v2", "MoCHi")
    assert c["diff"] == pytest.approx(10.0) and c["se"] == pytest.approx((2 / 2 + 2 / 2) ** 0.5)  # var 2 each
    assert study.verdict(c, +1) == "holds" and study.verdict(c, -1) == "opposite"
    same = study.compare(agg, "fast", "MoCo-v2", "MoCHi")  # every value 0.5: no spread at all
    assert same["se"] == 0 and study.verdict(same, +1) == "no spread to judge (one seed, or identical values)"
    assert study.versus_value(agg["MoCHi"]["knn"], 69.0) == "above"  # mean 71, SE 1: z = 2
    assert study.versus_value(agg["MoCHi"]["knn"], 70.5) == "within 2 SE"
    assert study.versus_value(agg["MoCHi"]["knn"], 73.0) == "below"

    previous = {"aggregate": agg, "runs": records, "git_commit": "abc"}
    shifted = [dict(r, knn=r["knn"] + 10.0) if r["seed"] == 0 else r for r in records]
    rep = study.reproducibility(study.aggregate(shifted, settings), shifted, previous)
    knn = rep["settings"]["MoCo-v2"]["knn"]
    assert knn["diff"] == pytest.approx(5.0) and knn["spread"] == pytest.approx(32**0.5)  # stdev(70, 62)
    assert knn["within_spread"]
    moved = [dict(r, knn=r["knn"] + 10.0) for r in records]
    rep = study.reproducibility(study.aggregate(moved, settings), moved, previous)
    assert not rep["settings"]["MoCo-v2"]["knn"]["within_spread"]  # 10 > the spread of sqrt(2)
    assert [(r["setting"], r["seed"], r["abs_diff"]["knn"]) for r in rep["same_runs"]][:1] == [("MoCo-v2", 0, 10.0)]
