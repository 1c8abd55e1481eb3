"""`mochi import` without weights: the options reach the library one to one, and the imported card keeps measured
numbers (model-index) apart from quoted ones, and says "not stated" for what nobody said."""

from pathlib import Path

from huggingface_hub import ModelCard
from typer.testing import CliRunner

from mochi_hub.cli.app import app
from mochi_hub.publish import importer
from mochi_hub.publish.card import model_card_from_export
from mochi_hub.publish.importer import Declared, ImportReport, Quote

from runs import PROBES, probes_by_key, probes_from_card

DETECTION = {
    "AP": 31.5,
    "AP50": 52.25,
    "AP75": 33.0,
    "APs": None,
    "APm": 30.0,
    "APl": 40.0,
    "dataset_name": "canvas",
    "split": "val",
    "train_images": 64,
    "val_images": 16,
    "hyperparameters": {"image_size": 128, "epochs": 2},
}


def imported_config(**overrides) -> dict:
    """config.json of an import, as importer.import_checkpoint writes it (a resnet18 with nothing stated)."""
    config = {
        "architecture": "resnet18",
        "num_classes": 0,
        "num_features": 512,
        "global_pool": "avg",
        "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.485], "std": [0.229], "license": "unknown"},
        "method": None,
        "mochi": None,
        "epochs": None,
        "dataset": None,
        "pooled_features": 512,
        "num_params": 11176512,
        "feature_info": {"channels": [64, 64, 128, 256, 512], "reduction": [2, 4, 8, 16, 32]},
        "provenance": {
            "file": "resnet18.pth",
            "sha256": "ab" * 32,
            "size_bytes": 46_800_000,
            "source_url": None,
            "layout": "a network's state dict",
            "loaded_with": "torch.load(weights_only=True)",
            "from_file": {},
            "declared": {},
            "kept": [{"what": "backbone", "where": "* without the classifier", "tensors": 120, "kept": True}],
            "dropped": [{"what": "classifier (1000 classes)", "where": "fc.*", "tensors": 2, "kept": False}],
            "notes": [],
            "imported_with": "mochi-hub 0.2.0",
        },
        "projection_head": None,
        "quoted_results": [],
        "probe_results": [],
        "detection_results": [],
        "mochi_hub_version": "0.2.0",
    }
    return config | overrides


def test_card_of_an_import_with_nothing_stated_claims_nothing():
    card = ModelCard(str(model_card_from_export(imported_config())))
    assert card.data.license == "unknown" and card.data.eval_results is None
    assert "moco" not in card.data.tags and "mochi" not in card.data.tags
    text = card.text
    for row in (
        "| Pretraining | not stated |",
        "| Pretraining epochs | not stated |",
        "| Pretraining data | not stated |",
    ):
        assert row in text, row
    assert "| License | not stated: check the terms" in text and "| Source | not stated |" in text
    assert "| dropped | classifier (1000 classes) | 2 | `fc.*` |" in text
    assert "Paper |" not in text and "## Citation" not in text and "Quoted" not in text
    assert "No evaluation was run on these weights" in text


def test_measured_numbers_in_the_model_index_quoted_ones_only_in_the_text():
    quoted = [{"metric": "ImageNet-1K linear top-1 (%)", "value": 71.1, "source": "facebookresearch/moco README"}]
    config = imported_config(
        method="MoCo-v2", probe_results=PROBES, detection_results=[DETECTION], quoted_results=quoted
    )
    card = ModelCard(str(model_card_from_export(config, repo_id="alice/moco-v2")))
    assert probes_by_key(PROBES).items() <= probes_from_card(card).items()
    values = [r.metric_value for r in card.data.eval_results]
    assert 71.1 not in values and 31.5 not in values  # quoted, and measured on a local folder: in the text only
    text = card.text
    assert "| ImageNet-1K linear top-1 (%) | 71.1 | facebookresearch/moco README |" in text
    assert "| kNN | fashion-mnist | val | - |" in text and "| `canvas` (local folder) | val |" in text
    assert "@article{chen2020mocov2" in text and "kalantidis2020hard" not in text
    assert set(card.data.tags) >= {"moco", "self-supervised"} and 'name = "hf-hub:alice/moco-v2"' in text


def test_cli_maps_every_option_onto_import_checkpoint(monkeypatch, tmp_path):
    received = {}

    def fake_import(checkpoint, output, **options):
        received.update(checkpoint=checkpoint, output=output, **options)
        output.mkdir()
        return ImportReport(output, "resnet50", "MoCo", "0" * 64, [], {"arch": "resnet50"}, ["a note"], "safe")

    monkeypatch.setattr(importer, "import_checkpoint", fake_import)
    args = ["import", "in.pth.tar", "-o", str(tmp_path / "out"), "--arch", "resnet50", "--image-size", "160"]
    args += ["--keep-head", "--allow-unsafe-pickle", "--method", "mochi", "--mochi", "512,1024,512", "--epochs", "1000"]
    args += ["--dataset", "imagenet-1k", "--source-url", "https://example.org/m.pth.tar", "--license", "cc-by-nc-4.0"]
    args += ["--quote", "top-1 (%)=68.0", "--quote", "AP=39.4", "--quote-source", "the paper"]
    args += ["--results", "a.json", "--results", "b.json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert received == {
        "checkpoint": Path("in.pth.tar"),
        "output": tmp_path / "out",
        "arch": "resnet50",
        "image_size": 160,
        "keep_head": True,
        "allow_unsafe_pickle": True,
        "declared": Declared(
            method="mochi",
            mochi=(512, 1024, 512),
            epochs=1000,
            dataset="imagenet-1k",
            source_url="https://example.org/m.pth.tar",
            license="cc-by-nc-4.0",
            quoted=(Quote("top-1 (%)", 68.0, "the paper"), Quote("AP", 39.4, "the paper")),
        ),
        "results": [Path("a.json"), Path("b.json")],
    }
    assert "read in.pth.tar: MoCo; arch resnet50" in result.output and "note: a note" in result.output
