"""bench/loader.py cannot rot: its quick run times every path through the library's own functions on real JPEGs
and writes the table's figures and targets to its JSON."""

from __future__ import annotations

import json

import pytest
from bench_runs import ROOT, failure, run_bench

pytestmark = pytest.mark.ci


def test_loader_bench_quick_measures_every_path(tmp_path):
    out = tmp_path / "loader.json"
    done = run_bench("loader", "--quick", "--rounds", "1", "--seconds", "0.1", "--out", str(out), PYTHONPATH=str(ROOT))
    assert done.returncode == 0, failure(done)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"pil_views", "device_cpu_decode", "bytes_only"}
    assert all(row["images_per_sec_per_core"] > 0 and row["cores_for_3000_per_sec"] >= 1 for row in rows.values())
    assert rows["pil_views"]["over_pil_views_median"] == 1.0
    assert set(result["targets"]) == {"bytes_only", "device_cpu_decode"} and result["photos"]["photos"] == 32
    assert "| bytes_only |" in done.stdout and result["loadavg_before"] and result["command"]
