"""bench/study.py --quick: the whole study path (train, probe, aggregate, plot, report) on a tiny budget."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _table(text: str, header_start: str) -> list[list[str]]:
    """The markdown table whose header row starts with `header_start`: rows of cells (header excluded)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    assert re.fullmatch(r"(\|---)+\|", lines[start + 1]), lines[start + 1]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
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
