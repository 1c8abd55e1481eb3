"""bench/gpu.py cannot rot: its CPU smoke runs every part (step, data path, end-to-end train, train + probe +
export) at toy sizes in seconds and writes the JSON the GPU run writes."""

from __future__ import annotations

import json

import pytest
from bench_runs import ROOT, failure, run_bench


@pytest.mark.ci
def test_gpu_bench_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    done = run_bench("gpu", "--smoke", "--out", out, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    assert done.returncode == 0, failure(done)
    result = json.loads(out.read_text())
    for part in ("step", "data", "train", "smoke"):
        assert "error" not in result[part], result[part]
    steps = {(r["variant"], r["K"]) for r in result["step"]["rows"]}
    assert steps == {("MoCo-v2", 64), ("MoCHi", 64)}
    assert {(r["augment_on"], r["workers"]) for r in result["data"]["rows"]} == {
        (a, w) for a in ("workers", "device") for w in (0, 2)
    }
    assert all(r["images_per_sec"] > 0 for r in result["train"]["rows"])
    assert "model.safetensors" in result["smoke"]["export_files"] and 0 <= result["smoke"]["knn_top1"] <= 100
    assert set(result["targets"]) == {"mochi_step_over_moco", "device_over_tensors_only", "device_over_workers"}
