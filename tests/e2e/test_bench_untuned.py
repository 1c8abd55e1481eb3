"""bench/untuned.py cannot rot: its quick run builds a set from real Fashion-MNIST images, trains, and probes the run
beside the untrained network and raw pixels."""

from __future__ import annotations

import json

from bench_runs import failure, run_bench


def test_untuned_bench_quick_run_probes_the_run_and_its_references(tmp_path):
    out = tmp_path / "untuned.json"
    done = run_bench("untuned", "--quick", "--runs-dir", tmp_path / "runs", "--out", out)
    assert done.returncode == 0, failure(done)
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert (run["set"], run["method"], run["variant"], run["steps"]) == ("small-2k", "mochi", "fitted", 6)
    assert set(result["references"]["small-2k"]) == {"untrained", "raw pixels (centred)"}
    for probed in (run["trained"], *result["references"]["small-2k"].values()):
        assert 0 < probed["knn"] <= 100 and 0 < probed["fast"] <= 100
