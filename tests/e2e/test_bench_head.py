"""bench/head.py keeps running: a --quick smoke run in a subprocess writes the three variants."""

import json

from bench_runs import failure, run_bench


def test_head_benchmark_quick_run_writes_three_variants(tmp_path):
    out = tmp_path / "head.json"
    done = run_bench("head", "--quick", "--threads", "1", "--out", out, timeout=120)
    assert done.returncode == 0, failure(done)
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"mochi", "reference", "moco"}
    for row in rows.values():
        assert row["median_ms"] > 0 and all(t > 0 for t in row["times_ms"])
        assert row["peak_extra_mib"] >= 0
    assert [r["K"] for r in result["ratios"]] == [1024]
    assert result["threads"] == 1 and {row["threads"] for row in rows.values()} == {1}
    assert all(row["memory_method"].endswith("mallopt(M_MMAP_THRESHOLD, 65536)") for row in rows.values())
    assert "| variant | K |" in done.stdout and result["versions"]["torch"]  # the Markdown table; common.environment
