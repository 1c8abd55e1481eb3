"""`mochi export`: the timm folder loads with timm's own `local-dir:` loader and carries our metadata only;
the torchvision and detectron2 formats load where they are meant to. Real weights from a real checkpoint."""

import json
import pickle
import re
import shutil

import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from timm.models import PretrainedCfg
from typer.testing import CliRunner

from mochi_hub.cli.app import app
from mochi_hub.data.augment import MEAN, STD
from mochi_hub.errors import OptionError
from mochi_hub.method.model import create_backbone
from mochi_hub.publish.card import redact_local_paths
from mochi_hub.publish.convert import ConversionError, to_detectron2, torchvision_state_dict
from mochi_hub.publish.export import clean_pretrained_cfg, export_run
from mochi_hub.training.runs import RunError, describe_host, load_run_backbone

from runs import PROBES, assert_close, make_run, sample_images

# What timm's default cfgs for resnet18/50 and test_resnet say about *their* supervised weights.
TIMM_SUPERVISED_METADATA = (
    "a1_in1k",
    "r160_in1k",
    "arXiv:2110.00476",
    "rsb-weights",
    "test_input_size",
    "hf_hub_id",
    "timm/",
    "bicubic",
    "origin_url",
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "demo")


@pytest.fixture(scope="module")
def export_dir(run_dir):
    return export_run(run_dir)


@pytest.fixture(scope="module")
def run18(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run18") / "r18", model="resnet18", steps=1, probes=[], metrics=False)


def test_timm_folder_holds_backbone_and_timm_config(run_dir, export_dir):
    assert export_dir == run_dir / "export"
    assert sorted(p.name for p in export_dir.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "training_curves.png",
    ]
    backbone, config, _, _ = load_run_backbone(run_dir)
    weights = load_file(export_dir / "model.safetensors")
    assert weights.keys() == backbone.state_dict().keys()
    assert not any(k.startswith("fc.") for k in weights)
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(weights[name], tensor), name

    cfg = json.loads((export_dir / "config.json").read_text())
    assert (cfg["architecture"], cfg["num_classes"], cfg["num_features"], cfg["global_pool"]) == (
        "test_resnet",
        0,
        96,
        "avg",
    )
    assert cfg["method"] == "MoCHi" and cfg["mochi"] == [16, 16, 8]
    assert cfg["epochs"] == 2 and cfg["dataset"] == "fashion-mnist"
    assert cfg["training_config"] == redact_local_paths(config.to_dict())
    assert cfg["probe_results"] == redact_local_paths(PROBES)
    assert cfg["run"]["checkpoint_step"] == 3 and cfg["run"]["num_processes"] == 1
    hosts = cfg["run"]["summary"]["hosts"]
    assert hosts == [describe_host(torch.device("cpu"), 1)]
    card = (export_dir / "README.md").read_text()  # the card names the hardware and the time it trained
    assert f"Hardware: {hosts[0]}." in card and re.search(r"on 1 process\(es\) for \d+\.\d minutes\.", card)
    assert cfg["feature_info"] == {"channels": [32, 32, 48, 192, 96], "reduction": [2, 4, 8, 16, 32]}


def test_pretrained_cfg_is_ours_not_timms_supervised_metadata(export_dir):
    cfg = json.loads((export_dir / "config.json").read_text())["pretrained_cfg"]
    PretrainedCfg(**cfg)  # no key timm does not know
    assert cfg["license"] == "apache-2.0" and cfg["paper_ids"] == "arXiv:2010.01028"
    assert cfg["mean"] == list(MEAN) and cfg["std"] == list(STD) and cfg["input_size"] == [3, 32, 32]
    assert cfg["num_classes"] == 0
    text = (export_dir / "config.json").read_text()
    for marker in TIMM_SUPERVISED_METADATA:
        assert marker not in text, marker


def test_resnet_cfg_drops_a1_in1k():
    fresh = timm.create_model("resnet18", num_classes=0)
    assert fresh.pretrained_cfg["tag"] == "a1_in1k"  # what a fresh timm model carries
    cfg = clean_pretrained_cfg(fresh, 224)
    text = json.dumps(cfg)
    for marker in TIMM_SUPERVISED_METADATA:
        assert marker not in text, marker
    assert cfg["first_conv"] == "conv1" and cfg["classifier"] == "fc" and cfg["pool_size"] == [7, 7]


def test_local_dir_loads_with_timm(run_dir, export_dir):
    backbone, *_ = load_run_backbone(run_dir)
    images = sample_images()
    with torch.no_grad():
        expected = backbone(images)
        model = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
        assert_close(model(images), expected)
    assert model.num_classes == 0
    loaded_cfg = str(model.pretrained_cfg)
    assert "arXiv:2010.01028" in loaded_cfg and not any(m in loaded_cfg for m in ("a1_in1k", "r160_in1k"))

    head = timm.create_model(f"local-dir:{export_dir}", pretrained=True, num_classes=5)
    assert head.get_classifier().out_features == 5
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(head.state_dict()[name], tensor), name

    features = timm.create_model(f"local-dir:{export_dir}", pretrained=True, features_only=True).eval()
    assert features.feature_info.channels() == [32, 32, 48, 192, 96]
    assert features.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        maps = features(images)
    assert [tuple(m.shape) for m in maps] == [
        (2, c, 32 // r, 32 // r) for c, r in zip([32, 32, 48, 192, 96], [2, 4, 8, 16, 32])
    ]


def test_training_curves_png(export_dir, tmp_path):
    with Image.open(export_dir / "training_curves.png") as image:
        assert image.format == "PNG" and image.width >= 800
    assert "](training_curves.png)" in (export_dir / "README.md").read_text()

    bare = make_run(tmp_path / "bare", metrics=False, probes=[])
    out = export_run(bare)
    assert not (out / "training_curves.png").exists()
    assert "training_curves.png" not in (out / "README.md").read_text()


def test_no_absolute_local_path_in_export(run_dir, export_dir):
    for name in ("config.json", "README.md"):
        text = (export_dir / name).read_text()
        assert str(run_dir) not in text and "/tmp/" not in text, name
    assert "<local>/step-0000006" in (export_dir / "config.json").read_text()  # the probes' source, redacted


def test_run_without_run_json_uses_checkpoint_config(tmp_path):
    out = export_run(make_run(tmp_path / "r", run_json=False, metrics=False, probes=[]), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architecture"] == "test_resnet"


def test_run_whose_local_dataset_is_gone_still_exports(tmp_path):
    data = tmp_path / "my-images"
    run = make_run(tmp_path / "r", dataset=str(data), metrics=False, probes=[])
    shutil.rmtree(data)  # exported later, on a machine without the training data
    cfg = json.loads((export_run(run) / "config.json").read_text())
    assert cfg["dataset"] == "<local>/my-images" and cfg["training_config"]["dataset"] == "<local>/my-images"


def test_torchvision_format_loads_strictly(run18, tmp_path):
    path = export_run(run18, tmp_path / "tv", format="torchvision")
    assert path.name == "torchvision_resnet18.safetensors"
    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(load_file(path), strict=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(load_file(path), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    backbone, *_ = load_run_backbone(run18)
    images = sample_images(size=64)
    with torch.no_grad():
        assert_close(reference.eval()(images), backbone(images))
    assert "torchvision.models.resnet18()" in (tmp_path / "tv" / "README.md").read_text()


def test_torchvision_and_detectron2_refuse_non_torchvision_layouts(run_dir):
    with pytest.raises(ConversionError, match="ResNet-family"):
        export_run(run_dir, format="torchvision")
    with pytest.raises(ConversionError, match="no torchvision counterpart|does not match"):
        torchvision_state_dict(create_backbone("resnet18d"), "resnet18d")


def _detectron2_names(blocks: list[int], bottleneck: bool) -> set[str]:
    """detectron2's ResNet naming (modeling/backbone/resnet.py: stem.conv1, res2..res5, convN with .norm,
    shortcut on each stage's first block), written out independently of the conversion."""
    norm = ("weight", "bias", "running_mean", "running_var")
    names = {"stem.conv1.weight"} | {f"stem.conv1.norm.{n}" for n in norm}
    for stage, count in zip(range(2, 6), blocks):
        for block in range(count):
            for conv in range(1, 4 if bottleneck else 3):
                names |= {f"res{stage}.{block}.conv{conv}.weight"}
                names |= {f"res{stage}.{block}.conv{conv}.norm.{n}" for n in norm}
            if block == 0 and (bottleneck or stage > 2):
                names |= {f"res{stage}.0.shortcut.weight"} | {f"res{stage}.0.shortcut.norm.{n}" for n in norm}
    return names


def test_detectron2_names_for_resnet50():
    backbone = create_backbone("resnet50")
    converted = to_detectron2(torchvision_state_dict(backbone, "resnet50"))
    assert converted["matching_heuristics"] is True and converted["__author__"]
    model = converted["model"]
    assert set(model) == _detectron2_names([3, 4, 6, 3], bottleneck=True)
    shapes = {k: tuple(v.shape) for k, v in model.items()}
    assert shapes["stem.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["res2.0.conv1.weight"] == (64, 64, 1, 1)
    assert shapes["res2.0.shortcut.weight"] == (256, 64, 1, 1)
    assert shapes["res5.2.conv3.weight"] == (2048, 512, 1, 1)
    assert shapes["res5.0.conv2.weight"] == (512, 512, 3, 3)


def test_detectron2_pickle_from_a_run(run18, tmp_path):
    path = export_run(run18, tmp_path / "d2", format="detectron2")
    with open(path, "rb") as handle:
        obj = pickle.load(handle)
    assert set(obj) == {"model", "__author__", "matching_heuristics"} and obj["matching_heuristics"] is True
    assert set(obj["model"]) == _detectron2_names([2, 2, 2, 2], bottleneck=False)
    backbone, *_ = load_run_backbone(run18)
    state = backbone.state_dict()
    assert (
        obj["model"]["res3.0.shortcut.norm.running_var"] == state["layer2.0.downsample.1.running_var"].numpy()
    ).all()
    assert (obj["model"]["stem.conv1.weight"] == state["conv1.weight"].numpy()).all()
    notes = (tmp_path / "d2" / "README.md").read_text()
    assert "STRIDE_IN_1X1: False" in notes and "DEPTH: 18" in notes
    assert "RES2_OUT_CHANNELS: 64" in notes  # detectron2 asserts it for ResNet-18/34


def test_export_errors(tmp_path):
    with pytest.raises(OptionError, match="no such run directory"):
        export_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no complete checkpoint"):
        export_run(tmp_path / "empty")
    with pytest.raises(OptionError, match="--format"):
        export_run(tmp_path / "empty", format="onnx")


def test_cli_export(run_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run_dir), "--output", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in result.stdout and "local-dir:" in result.stdout
    assert (tmp_path / "cli" / "config.json").is_file()

    (tmp_path / "nothing").mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert "no complete checkpoint" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(app, ["export", str(run_dir), "--format", "onnx"])
    assert result.exit_code == 2  # click's own usage error names the allowed values


def test_license_option_reaches_config_and_card(run_dir, tmp_path):
    result = CliRunner().invoke(
        app, ["export", str(run_dir), "--output", str(tmp_path / "e"), "--license", "cc-by-4.0"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-4.0"
    assert "license: cc-by-4.0" in (tmp_path / "e" / "README.md").read_text()
