"""bench/probe.py keeps running: a --quick smoke run in a subprocess writes every protocol's row."""

import json

from bench_runs import failure, run_bench


def test_probe_benchmark_quick_run_writes_every_protocol(tmp_path):
    out = tmp_path / "probe.json"
    done = run_bench("probe", "--quick", "--threads", "1", "--workers", "0", "--out", out, timeout=300)
    assert done.returncode == 0, failure(done)
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
