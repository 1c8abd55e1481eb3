"""bench/train.py --quick: smoke runs of the training benchmark (tiny backbone, a few steps) and the structure of
the JSON it writes. The numbers themselves are not checked, only that they exist and are positive (the real
measurement is `python bench/train.py` on a quiet machine); what is checked exactly is that the bench's step
reproduces the losses train() logs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train.py"
LIGHTLY = importlib.util.find_spec("lightly") is not None


def run_bench(*args: str, hide_lightly: bool = False) -> subprocess.CompletedProcess:
    """Run the bench in a fresh interpreter; with hide_lightly, as if lightly were not installed."""
    if hide_lightly:
        code = (
            "import runpy, sys; sys.modules['lightly'] = None; "
            f"sys.argv = [{str(BENCH)!r}, *{list(args)!r}]; runpy.run_path({str(BENCH)!r}, run_name='__main__')"
        )
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, str(BENCH), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=BENCH.parents[1])


def positive_numbers(values) -> bool:
    return len(values) > 0 and all(isinstance(v, (int, float)) and v > 0 for v in values)


@pytest.mark.ci
def test_quick_step_is_the_loops_step(tmp_path):
    out = tmp_path / "train.json"
    done = run_bench("--quick", "--parts", "step", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Training step" in done.stdout and "| MoCo-v2 (0, 0, 0) |" in done.stdout  # the Markdown table
    result = json.loads(out.read_text())
    assert result["quick"] is True and "bench/train.py" in result["command"] and "--quick" in result["command"]
    for name in ("python", "torch", "torchvision", "timm", "accelerate", "lightly"):
        assert name in result["versions"]
    assert result["cpu"]["logical_cpus"] >= 1 and result["cpu"]["torch_threads"] >= 1
    assert len(result["loadavg_before"]) == len(result["loadavg_after"]) == 3

    # Both variants timed on every pair, the summary consistent with the raw times.
    step = result["step"]
    times = step["raw"]["times_ms"]
    assert set(times) == {"moco", "mochi"}
    assert len(times["moco"]) == len(times["mochi"]) == step["summary"]["pairs"] >= 1
    assert positive_numbers(times["moco"]) and positive_numbers(times["mochi"])
    assert all(positive_numbers(step["raw"]["cpu_times_ms"][v]) for v in ("moco", "mochi"))
    summary = step["summary"]
    assert positive_numbers(
        [
            summary["moco_median_ms"],
            summary["mochi_median_ms"],
            summary["ratio_of_medians"],
            summary["median_paired_ratio"],
        ]
    )
    assert summary["ratio_of_medians"] == pytest.approx(summary["mochi_median_ms"] / summary["moco_median_ms"])
    assert isinstance(summary["met"], bool)
    assert step["raw"]["batchnorm_groups"] == 2  # --quick runs the loop's BatchNorm groups too

    # --quick checks that the bench's step reproduces the losses mochi_hub.training.pretrain.train logs.
    check = step["loop_check"]
    assert check["steps"] >= 2 and check["match"] is True
    for variant in ("moco", "mochi"):
        assert check["variants"][variant]["bench_step"] == pytest.approx(check["variants"][variant]["loop"], rel=1e-4)


def test_quick_data_and_throughput_write_every_measurement(tmp_path):
    out = tmp_path / "train.json"
    done = run_bench("--quick", "--parts", "data,throughput", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for heading in ("Data pipeline", "Training images/s"):
        assert heading in done.stdout
    result = json.loads(out.read_text())

    # Diagnostic: the data pipelines' cost per image (lightly's: torchvision's FashionMNIST + MoCoV2Transform).
    data = result["data"]
    assert positive_numbers(data["raw"]["per_image_ms"]["ours"]) and data["summary"]["ours_median_ms_per_image"] > 0
    if LIGHTLY:
        assert positive_numbers(data["raw"]["per_image_ms"]["lightly"])
        assert data["summary"]["ours_over_lightly_cost"] > 0

    # Every implementation in every precision, one window more than measured (the dropped first).
    throughput = result["throughput"]
    expected = {"ours_moco", "ours_mochi"} | ({"lightly_moco"} if LIGHTLY else set())
    assert throughput["lightly"] is LIGHTLY
    for precision in ("fp32", "bf16+cl"):
        runs = [run for run in throughput["runs"] if run["precision"] == precision]
        assert {run["impl"] for run in runs} == expected
        for run in runs:
            assert len(run["window_images_per_sec"]) == throughput["windows"] + 1
            assert positive_numbers(run["window_images_per_sec"]) and run["wall_s"] > 0
        rows = throughput["summary"][precision]
        for impl in expected:
            assert rows[impl]["median_images_per_sec"] > 0
        if LIGHTLY:
            assert rows["ours_over_lightly"] > 0 and isinstance(rows["met"], bool)
            assert rows["ours_over_lightly"] == pytest.approx(
                rows["ours_moco"]["median_images_per_sec"] / rows["lightly_moco"]["median_images_per_sec"]
            )


def test_quick_run_without_lightly_skips_the_comparison(tmp_path):
    out = tmp_path / "train.json"
    done = run_bench(
        "--quick",
        "--parts",
        "throughput",
        "--precisions",
        "fp32",
        "--no-mochi-info",
        "--out",
        str(out),
        hide_lightly=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "lightly not installed" in done.stdout
    throughput = json.loads(out.read_text())["throughput"]
    assert throughput["lightly"] is False and "skipped" in throughput["lightly_note"]
    assert {run["impl"] for run in throughput["runs"]} == {"ours_moco"}
    assert throughput["summary"]["fp32"]["ours_moco"]["median_images_per_sec"] > 0


def test_full_run_without_lightly_refuses_with_a_clear_message(tmp_path):
    done = run_bench("--parts", "throughput", "--out", str(tmp_path / "train.json"), hide_lightly=True)
    assert done.returncode == 2
    assert "lightly is not installed" in done.stderr and ".[bench]" in done.stderr
    assert not (tmp_path / "train.json").exists()


@pytest.mark.ci
def test_quick_groups_times_both_batchnorm_paths(tmp_path):
    out = tmp_path / "train.json"
    done = run_bench("--quick", "--parts", "groups", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| one backbone pass per group |" in done.stdout  # the Markdown table
    groups = json.loads(out.read_text())["groups"]
    assert groups["groups"] == 2 and groups["one_pass"] is True  # test_resnet's BatchNorm2d: the single pass
    times, summary = groups["times_ms"], groups["summary"]
    assert len(times["one_pass"]) == len(times["per_group"]) == summary["pairs"] >= 1
    assert positive_numbers(times["one_pass"]) and positive_numbers(times["per_group"])
    assert summary["ratio_of_medians"] == pytest.approx(summary["per_group_median_ms"] / summary["one_pass_median_ms"])
