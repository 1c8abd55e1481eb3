"""bench/probe.py keeps running: a --quick smoke run in a subprocess writes every protocol's row."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mochi_hub.data import DEBIAN_FASHION_MNIST

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_probe_benchmark_quick_run_writes_every_protocol(tmp_path):
    out = tmp_path / "probe.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "probe.py"),
            "--quick",
            "--threads",
            "1",
            "--workers",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {row["protocol"]: row for row in result["rows"]}
    assert set(rows) == {"fast (cold)", "fast (warm)", "linear", "knn"}
    for row in rows.values():
        assert row["seconds"] > 0 and 0 <= row["top1"] <= row["top5"] <= 100
    assert rows["fast (warm)"]["top1"] == rows["fast (cold)"]["top1"]  # the cache changes the time, not the result
    assert set(result["targets"]) == {
        "fast_speedup_at_least_10x",
        "fast_top1_within_2_points",
        "fast_minus_linear_top1",
    }
    assert (result["train_images"], result["eval_images"]) == (300, 100)
