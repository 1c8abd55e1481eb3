"""`mochi detect` on real images: Fashion-MNIST canvases in the COCO layout, a tiny timm backbone, torchvision's
Faster R-CNN + FPN, box AP from the real evaluator; its bad-input lines; the CLI's mapping; the run directory
and the model card."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from detection import (
    canvases,
    copy_of,
    detection_from_card,
    edit_annotations,
    tiny_detect_config,
    tiny_timm_folder,
    write_canvas_dataset,
)
from huggingface_hub import ModelCard
from PIL import Image
from typer.testing import CliRunner

from mochi_hub.cli.app import app
from mochi_hub.config import DetectConfig
from mochi_hub.evaluate.coco import evaluate_boxes, load_dataset, to_coco_detections
from mochi_hub.evaluate.detect import (
    RESULTS,
    TimmFPN,
    build_detector,
    prepare_backbone,
    resolved_batch_norm,
    result_name,
    run_detect,
)
from mochi_hub.method.model import create_backbone
from mochi_hub.publish.export import export_run
from mochi_hub.training.runs import DETECTION

from runs import make_run

EVALUATORS = [name for name in ("pycocotools", "faster-coco-eval") if importlib.util.find_spec(name.replace("-", "_"))]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return canvases(tmp_path_factory.mktemp("canvases") / "fmnist-canvases", train=4, val=2)


# --- the benchmark's images ------------------------------------------------------------------------------


def test_canvas_boxes_are_the_tight_outline_of_each_items_pixels_and_never_touch(tmp_path):
    root = write_canvas_dataset(tmp_path / "a", train=6, val=3, size=128, items=(2, 3), seed=1)
    train, val = load_dataset(root)
    assert (len(train.images), len(val.images)) == (6, 3)
    for split in (train, val):
        for info in split.images:
            pixels = np.asarray(Image.open(split.folder / info["file_name"]))  # [128, 128], L
            anns = [a for a in split.gt["annotations"] if a["image_id"] == info["id"]]
            covered = np.zeros_like(pixels, dtype=bool)
            for a in anns:
                x, y, w, h = a["bbox"]
                box = pixels[y : y + h, x : x + w] > 0
                # tight: every edge row and column of the box holds one of the item's pixels
                assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
                assert a["area"] == int(box.sum()) and 1 <= a["category_id"] <= 10
                assert not covered[y - 1 : y + h + 1, max(0, x - 1) : x + w + 1].any()  # no overlap, 1 px apart
                covered[y : y + h, x : x + w] = True
            assert not pixels[~covered].any()  # nothing outside the boxes: the background is black
    again = write_canvas_dataset(tmp_path / "b", train=6, val=3, size=128, items=(2, 3), seed=1)
    for name in ("annotations/instances_train.json", "train/000003.png", "val/000002.png"):
        assert (root / name).read_bytes() == (again / name).read_bytes()  # the same arguments, the same bytes


def test_canvases_on_real_photo_backgrounds(tmp_path):
    import skimage.data

    root = write_canvas_dataset(tmp_path / "p", train=2, val=1, backgrounds=[skimage.data.astronaut()], seed=0)
    train, _ = load_dataset(root)
    image = Image.open(train.folder / train.images[0]["file_name"])
    assert image.mode == "RGB" and image.size == (128, 128) and np.asarray(image).std() > 10


# --- the model -------------------------------------------------------------------------------------------


def test_feature_maps_are_timms_features_only_and_layers_freeze_as_asked(tmp_path):
    folder = tiny_timm_folder(tmp_path / "tiny")
    reference = timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True, out_indices=(1, 2, 3, 4))
    backbone = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    fpn = TimmFPN(backbone, 32).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        for ours, theirs in zip(fpn.features(x), reference.eval()(x), strict=True):
            assert torch.equal(ours, theirs)
        assert list(fpn(x)) == ["0", "1", "2", "3", "pool"] and fpn.out_channels == 32

    backbone = create_backbone("test_resnet")
    info = prepare_backbone(backbone, trainable_layers=3, batch_norm="train")
    trains = {name.split(".")[0] for name, p in backbone.named_parameters() if p.requires_grad}
    assert trains == {"layer2", "layer3", "layer4"} and info["stages"] == 5
    bns = {name.split(".")[0] for name, m in backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bns == {"layer2", "layer3", "layer4"}  # the frozen stages' BatchNorm (stem, layer1) is frozen too
    backbone = create_backbone("test_resnet")
    prepare_backbone(backbone, trainable_layers=5, batch_norm="frozen")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert all(p.requires_grad for p in backbone.parameters())
    with pytest.raises(ValueError, match="--trainable-layers 6: this backbone has 5 stages"):
        prepare_backbone(create_backbone("test_resnet"), trainable_layers=6, batch_norm="frozen")


def test_trained_batchnorm_normalises_the_new_layers_and_auto_follows_the_processes(data, tmp_path):
    """MoCo's transfer: with BatchNorm trained, the FPN and the box head are normalised too, every backbone stage
    trains by default; frozen keeps torchvision's supervised layout (no norm in the new layers)."""

    def batchnorms(module: torch.nn.Module) -> int:
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())

    info = {"declared_mean": (0.5,) * 3, "declared_std": (0.25,) * 3}
    config = tiny_detect_config(data, tmp_path / "out", trainable_layers=None, batch_norm="train", fpn_channels=16)
    model, frozen = build_detector(create_backbone("test_resnet"), info, 10, config)
    assert batchnorms(model.backbone.fpn) == 8  # 4 inner + 4 layer convolutions
    assert batchnorms(model.roi_heads.box_head) == 4 and model.roi_heads.box_predictor.cls_score.out_features == 11
    assert all(p.requires_grad for p in model.backbone.body.parameters())  # every stage
    assert frozen["new_layers"].startswith("BatchNorm in the FPN")
    config = tiny_detect_config(data, tmp_path / "out", trainable_layers=3, batch_norm="frozen", fpn_channels=16)
    model, frozen = build_detector(create_backbone("test_resnet"), info, 10, config)
    assert batchnorms(model) == 0 and frozen["new_layers"] == "no norm"

    assert resolved_batch_norm("auto", 8, "cuda") == "sync"
    assert resolved_batch_norm("auto", 1, "cuda") == resolved_batch_norm("auto", 2, "cpu") == "train"
    assert resolved_batch_norm("frozen", 8, "cuda") == "frozen"


# --- box AP: the real evaluator on cases with a known answer ----------------------------------------------


def _one_box_gt() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


@pytest.mark.parametrize("evaluator", EVALUATORS)
def test_ap_known_answers(evaluator):
    gt = _one_box_gt()
    perfect = evaluate_boxes(
        gt, [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9}], prefer=evaluator
    )
    assert (perfect["AP"], perfect["AP50"], perfect["AP75"], perfect["APm"]) == (100.0, 100.0, 100.0, 100.0)
    assert perfect["APs"] is None and perfect["APl"] is None  # no small or large object: nothing to score
    assert perfect["evaluator"]["name"] == evaluator
    # Shifted 8 px: IoU 32/48 = 0.667, a hit at the thresholds 0.50, 0.55, 0.60, 0.65 of ten: AP 40.
    shifted = evaluate_boxes(
        gt, [{"image_id": 1, "category_id": 1, "bbox": [18, 10, 40, 40], "score": 0.9}], prefer=evaluator
    )
    assert (shifted["AP"], shifted["AP50"], shifted["AP75"]) == (40.0, 100.0, 0.0)
    # The right box with the wrong class scores nothing; no detection at all scores 0, not an error.
    gt["categories"].append({"id": 2, "name": "other"})
    wrong = evaluate_boxes(
        gt, [{"image_id": 1, "category_id": 2, "bbox": [10, 10, 40, 40], "score": 0.9}], prefer=evaluator
    )
    assert wrong["AP"] == 0.0
    assert evaluate_boxes(gt, [], prefer=evaluator)["AP"] == 0.0


def test_the_ground_truth_of_real_canvases_predicted_back_scores_100(data):
    """torchvision-format predictions (x1 y1 x2 y2, labels 1..C) -> COCO results: category ids and boxes map back."""
    from mochi_hub.evaluate.coco import DetectionImages

    _, val = load_dataset(data)
    images = DetectionImages(val)
    outputs, ids = [], []
    for i in range(len(images)):
        _, target = images[i]
        outputs.append(
            {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"]))}
        )
        ids.append(int(target["image_id"]))
    category_of = {label: category for category, label in images.label_of.items()}
    detections = to_coco_detections(outputs, ids, category_of)
    scores = evaluate_boxes(val.gt, detections)
    assert scores["AP"] == 100.0 and scores["AP50"] == 100.0
    moved = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 2, *d["bbox"][1:]]} for d in detections]  # IoU 1/3
    assert evaluate_boxes(val.gt, moved)["AP50"] == 0.0


# --- fine-tuning end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detected(tmp_path_factory, data) -> tuple[Path, dict, DetectConfig]:
    """A real run directory (a few pretraining steps), fine-tuned for detection on the canvases."""
    root = tmp_path_factory.mktemp("detect")
    run_dir = make_run(root / "run", probes=[])
    config = tiny_detect_config(data, root / "out", epochs=3)
    return run_dir, run_detect(str(run_dir), config, show=False), config


def test_fine_tuning_lowers_the_loss_and_reports_ap_from_the_real_evaluator(detected):
    run_dir, result, config = detected
    losses = [e["loss"] for e in result["epoch_losses"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    saved = json.loads((Path(config.output) / RESULTS).read_text())
    assert saved == json.loads(json.dumps(result, default=str))
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert saved[key] is None or 0.0 <= saved[key] <= 100.0
    assert saved["evaluator"]["name"] in ("faster-coco-eval", "pycocotools") and saved["evaluator"]["version"]
    assert saved["hyperparameters"] == {**config.to_dict(), "batch_norm": "train"}  # auto, resolved on one CPU process
    assert len(saved["weights_sha256"]) == 64 and saved["weights_sha256"] == saved["source_info"]["weights_sha256"]
    assert set(saved["dataset_fingerprint"]) == {"train", "val"}
    assert saved["dataset_fingerprint"]["val"]["images"] == 2
    assert {"train_s", "predict_s", "evaluate_s", "seconds"} <= set(saved["time"])
    # Re-scored from the saved predictions by the reference evaluator: the same numbers.
    detections = json.loads(Path(saved["detections_file"]).read_text())
    _, val = load_dataset(config.data)
    for evaluator in EVALUATORS:
        assert evaluate_boxes(val.gt, detections, prefer=evaluator)["AP"] == saved["AP"]


def test_a_run_directory_keeps_the_result_and_its_export_cards_it(detected):
    run_dir, result, config = detected
    kept = run_dir / DETECTION / f"{result_name(config)}.json"
    assert json.loads(kept.read_text())["AP"] == result["AP"]
    export = export_run(run_dir)
    exported = json.loads((export / "config.json").read_text())
    (record,) = exported["detection_results"]
    assert record["AP"] == result["AP"] and record["task"] == "object-detection"
    card = ModelCard.load(export / "README.md")
    assert detection_from_card(card) == {}  # a local folder: described in the text, not declared in the model-index
    row = "| `fmnist-canvases` (local folder) | val | Faster R-CNN + FPN (torchvision), 128 px, 3 epochs | 4 / 2 |"
    assert f"{row} {result['AP']:.2f} | {result['AP50']:.2f} |" in card.text
    assert "No evaluation was run" not in card.text


# --- the command line -------------------------------------------------------------------------------------


def _error_line(result) -> str:
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _remove_first_image_file(root: Path) -> None:
    next((root / "val").glob("*.png")).unlink()


def _box_outside(data: dict) -> None:
    data["annotations"][0]["bbox"] = [120, 120, 20, 20]


def _unknown_category(data: dict) -> None:
    data["annotations"][0]["category_id"] = 99


def _empty_val(data: dict) -> None:
    data["images"], data["annotations"] = [], []


BAD_INPUTS = {
    "missing annotations": (
        lambda root: (root / "annotations" / "instances_train.json").unlink(),
        "instances_train.json is missing",
    ),
    "malformed annotations": (
        lambda root: (root / "annotations" / "instances_val.json").write_text('{"images": [,'),
        "instances_val.json is not valid JSON (line 1, column 13",
    ),
    "box outside its image": (
        lambda root: edit_annotations(root, "train", _box_outside),
        "lies outside its image 000000.png (128x128)",
    ),
    "image listed but missing": (_remove_first_image_file, "is listed in instances_val.json but"),
    "category not declared": (
        lambda root: edit_annotations(root, "val", _unknown_category),
        "has category_id 99, which is not in 'categories' (ids 1..10)",
    ),
    "empty val set": (
        lambda root: edit_annotations(root, "val", _empty_val),
        "instances_val.json lists no images: the val set is empty",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_nothing_is_written(case, data, tmp_path):
    damage, message = BAD_INPUTS[case]
    root = copy_of(data, tmp_path / "data")
    damage(root)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["detect", str(tmp_path / "no-source"), "--data", str(root), "--output", str(out)])
    assert result.exit_code == 1
    line = _error_line(result)
    assert message in line and str(root) in line, line
    assert not out.exists()  # the data is checked before anything is written


def test_missing_data_option_and_bad_values_are_usage_errors(tmp_path):
    result = CliRunner().invoke(app, ["detect", "SRC"])
    assert result.exit_code == 2 and "--data DIR is required" in _error_line(result)
    result = CliRunner().invoke(app, ["detect", "SRC", "--data", str(tmp_path), "--image-size", "16"])
    assert result.exit_code == 2 and "--image-size must be an integer >= 32, got 16" in _error_line(result)


def test_a_bad_source_or_too_many_trainable_layers_is_one_line_and_leaves_no_folder(data, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["detect", str(tmp_path / "nowhere"), "--data", str(data), "--output", str(out)])
    assert result.exit_code == 2 and "no such folder, and not hf-hub:org/name" in _error_line(result)
    source = tiny_timm_folder(tmp_path / "tiny")
    result = CliRunner().invoke(
        app, ["detect", str(source), "--data", str(data), "--output", str(out), "--trainable-layers", "6"]
    )
    assert result.exit_code == 2 and "--trainable-layers 6: this backbone has 5 stages" in _error_line(result)
    assert not out.exists()


def test_a_diverging_loss_stops_with_one_line(data, tmp_path):
    source = tiny_timm_folder(tmp_path / "tiny")
    args = ["detect", str(source), "--data", str(data), "--output", str(tmp_path / "out"), "--image-size", "128"]
    args += ["--batch-size", "2", "--fpn-channels", "32", "--workers", "0", "--warmup-iters", "0", "--lr", "1e9"]
    result = CliRunner().invoke(app, args)
    line = _error_line(result)
    assert result.exit_code == 1 and "the detection loss is not finite at epoch" in line and "after 3 rollbacks" in line
    assert not (tmp_path / "out" / RESULTS).exists()


def test_a_non_finite_loss_rolls_back_to_the_epochs_start_with_half_the_lr(data, tmp_path, monkeypatch, caplog):
    """One non-finite loss (injected at epoch 1, step 2): the epoch starts again from its first state with the lr
    halved, the run finishes, and the result says where it rolled back from."""
    import mochi_hub.evaluate.detect as detect_module

    calls, real = [], detect_module.all_ranks_true

    def once_not_finite(flag, accelerator):
        calls.append(1)
        return flag & False if len(calls) == 2 else real(flag, accelerator)

    monkeypatch.setattr(detect_module, "all_ranks_true", once_not_finite)
    config = tiny_detect_config(data, tmp_path / "out", epochs=2)
    result = run_detect(str(tiny_timm_folder(tmp_path / "tiny")), config, show=False)
    assert result["rollbacks"] == [{"epoch": 1, "step": 2}] and len(result["epoch_losses"]) == 2
    assert "back to the start of the epoch with the learning rate x0.5" in caplog.text
