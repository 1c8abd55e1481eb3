"""bench/learning.py keeps running: a --quick run trains a few steps, draws the kNN curve from the untrained
weights on, and probes the trained backbone beside its references with the real `run_probe`."""

import json

import pytest
from bench_runs import failure, run_bench


@pytest.mark.ci
def test_learning_benchmark_quick_run_writes_the_curve_and_its_references(tmp_path):
    out = tmp_path / "learning.json"
    done = run_bench("learning", "--quick", "--threads", "1", "--runs-dir", tmp_path / "runs", "--out", out)
    assert done.returncode == 0, failure(done)
    result = json.loads(out.read_text())
    assert result["config"]["model"] == "test_resnet" and result["bank"] == 500

    # 256 images of batch 32 for 2 epochs: 16 steps, a point every 4, step 0 being the untrained weights.
    curve = result["curve"]
    assert [p["step"] for p in curve] == [0, 4, 8, 12, 16]
    assert all(0 <= p["knn"] <= 100 for p in curve)
    assert [p["train_s"] for p in curve] == sorted(p["train_s"] for p in curve) and curve[-1]["train_s"] > 0

    references = result["references"]
    assert set(references) == {"untrained", "raw pixels (centred)", "trained"}
    assert all(
        set(r) == {"knn", "fast"} and 0 <= min(r.values()) <= max(r.values()) <= 100 for r in references.values()
    )
    # Each end of the curve is the same number as the real knn probe of the same weights.
    assert abs(curve[-1]["knn"] - references["trained"]["knn"]) <= 0.02 and result["curve_matches_probe"] is True
    assert abs(curve[0]["knn"] - references["untrained"]["knn"]) <= 0.02
    assert "| raw pixels (centred) |" in done.stdout and "| step | kNN top-1 % | training s |" in done.stdout
