"""bench/gpu.py cannot rot, and always brings figures back: its CPU smoke runs every part at toy sizes in seconds
and writes the JSON the GPU run writes; a failing row is recorded with its error while the others go on; a part
that no longer fits the budget is recorded as skipped; the JSON lands under $OUT when that is set."""

from __future__ import annotations

import json
import sys

import pytest
from bench_runs import ROOT, failure, run_bench

pytestmark = pytest.mark.ci


def rows(result: dict, part: str) -> list[dict]:
    assert "error" not in result[part], result[part]
    return result[part]["rows"]


def test_gpu_bench_smoke_runs_every_part(tmp_path):
    done = run_bench("gpu", "--smoke", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OUT=str(tmp_path))
    assert done.returncode == 0, failure(done)
    result = json.loads((tmp_path / "gpu.json").read_text())  # $OUT/gpu.json by default
    for part in ("smoke", "syncs", "step", "profile", "decode", "data", "train"):
        assert all("error" not in r and "skipped" not in r for r in rows(result, part)), result[part]
    assert [r["what"] for r in rows(result, "smoke")] == ["train", "probe", "export"]
    assert "model.safetensors" in rows(result, "smoke")[2]["files"] and 0 <= rows(result, "smoke")[1]["knn_top1"] <= 100
    assert rows(result, "syncs")[0]["syncs_per_step"] == [0, 0]
    step, one_group = rows(result, "step")
    assert step["K"] == 64 and step["moco_images_per_sec"] > 0 and step["mochi_images_per_sec"] > 0
    assert one_group["bn_groups"] == 1 and one_group["moco_images_per_sec"] > 0  # the reference without groups
    assert rows(result, "profile")[0]["top"] and rows(result, "profile")[0]["busy_ms_per_step"] > 0
    decode = rows(result, "decode")[0]  # the device's side of the bytes path, here on the CPU
    assert decode["decode_and_views_images_per_sec"] > 0 and decode["share_decoded_on_device"] == 1.0
    assert {r["output"] for r in rows(result, "data")} == {"views", "pixels"}  # a GPU gets bytes for the device path
    assert {(r["augment_on"], r["workers"]) for r in rows(result, "data")} == {
        (a, w) for a in ("workers", "device") for w in (0, 2)
    }
    assert all(r["images_per_sec"] > 0 and 0 <= r["data_wait_share"] <= 1 for r in rows(result, "train"))
    assert {"moco_step_images_per_sec", "mochi_over_moco_at_K64", "syncs_per_step"} <= set(result["targets"])
    assert result["photos"]["photos"] == 48 and result["machine"]["torch"]


def test_a_failing_row_is_kept_with_its_error_and_the_rest_go_on(tmp_path, monkeypatch):
    """One data row fails (its loader raises), another part is out of budget: the JSON on disk has every other
    row, the failing one with its error, and the skipped part marked so."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    from mochi_hub.data import views

    real = views.PretrainingLoader

    class FailingWithTwoWorkers(real):
        def __init__(self, views, config, **kwargs):
            if config.workers == 2 and config.augment_on == "device":
                raise RuntimeError("no shared memory for workers")
            super().__init__(views, config, **kwargs)

    monkeypatch.setattr(views, "PretrainingLoader", FailingWithTwoWorkers)
    out = tmp_path / "gpu.json"
    gpu.main(["--smoke", "--parts", "data,train", "--out", str(out), "--budget-s", "40"])
    result = json.loads(out.read_text())
    data = {(r["augment_on"], r["workers"]): r for r in result["data"]["rows"]}
    assert "no shared memory" in data[("device", 2)]["error"] and data[("device", 2)]["where"]
    assert all(r["images_per_sec"] > 0 for key, r in data.items() if key != ("device", 2))
    assert all("skipped" in r for r in result["train"]["rows"])  # 40 s: the data rows fit, a training run (45 s) not
