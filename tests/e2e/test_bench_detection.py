"""bench/detection.py keeps running: a --quick run in a subprocess builds the canvases, fine-tunes each backbone
and its untrained twin, and writes a row per backbone."""

import json

from bench_runs import failure, run_bench
from detection import tiny_timm_folder


def test_detection_benchmark_quick_run_writes_a_row_per_backbone(tmp_path):
    source = tiny_timm_folder(tmp_path / "tiny")
    out = tmp_path / "detection.json"
    done = run_bench(
        "detection",
        "--quick",
        source,
        "--threads",
        "1",
        "--workers",
        "0",
        "--out",
        out,
        timeout=300,
        OMP_NUM_THREADS="1",
    )
    assert done.returncode == 0, failure(done)
    result = json.loads(out.read_text())
    assert [row["backbone"] for row in result["rows"]] == [str(source), "untrained test_resnet (MoCo init)"]
    for row in result["rows"]:
        (run,) = row["runs"]
        assert run["seed"] == 0 and run["seconds"] > 0 and 0 <= run["AP"] <= run["AP50"] <= 100
    first, second = (row["weights_sha256"] for row in result["rows"])
    assert first != second  # the baseline is a different, untrained network
    assert result["config"]["preset"] == "canvas" and result["config"]["image_size"] == 128
    assert "| backbone | AP % | AP50 % |" in done.stdout
