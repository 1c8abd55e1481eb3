"""`mochi import`: MoCo / MoCHi, Lightning, torchvision and timm checkpoints, written at test time as their training
code writes them (tests/helpers/checkpoints.py), come in as timm folders whose features equal the source network's
loaded the way its own evaluation code loads it; probe, export and push take them; bad files are refused in one
line with nothing written; a pickle with a code payload is refused without running it."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from checkpoints import (
    LightlyMoCo,
    SoloLearnMoCo,
    lightning_checkpoint,
    main_lincls_backbone,
    save_moco_checkpoint,
)
from huggingface_hub import ModelCard, constants
from images import small
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from mochi_hub.cli.app import app
from mochi_hub.evaluate.probe import run_probe
from mochi_hub.publish.export import export_run
from mochi_hub.publish.hub import push
from mochi_hub.publish.importer import Declared, import_checkpoint
from mochi_hub.publish.sources import load_backbone

from hub_server import ALICE, TOKENS, LocalHub
from runs import assert_close

IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def mochi_import(*args: str):
    result = CliRunner().invoke(app, ["import", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def torchvision_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """torchvision's ResNet stage by stage: the stride 4..32 maps timm's features_only gives at out_indices 1..4."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    maps = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        maps.append(x)
    return maps


def assert_same_network(folder: Path, reference: nn.Module) -> None:
    """timm's local-dir loader on the folder gives the reference's pooled features and stage maps."""
    with torch.no_grad():
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert model.num_classes == 0
        assert_close(model(IMAGES), reference(IMAGES))
        features = timm.create_model(
            f"local-dir:{folder}", pretrained=True, features_only=True, out_indices=(1, 2, 3, 4)
        )
        for ours, theirs in zip(features.eval()(IMAGES), torchvision_maps(reference, IMAGES)):
            assert_close(ours, theirs)


def parts(folder: Path) -> dict[str, tuple[int, bool]]:
    provenance = json.loads((folder / "config.json").read_text())["provenance"]
    return {p["what"]: (p["tensors"], p["kept"]) for p in provenance["kept"] + provenance["dropped"]}


# --- MoCo / MoCHi ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moco_ddp(tmp_path_factory) -> Path:
    """main_moco.py --mlp under DistributedDataParallel: module.encoder_q.*, module.encoder_k.*, queue, optimizer."""
    return save_moco_checkpoint(tmp_path_factory.mktemp("moco") / "checkpoint_0199.pth.tar", ddp=True, mlp=True)


@pytest.fixture(scope="module")
def moco_single(tmp_path_factory) -> Path:
    """The single-process variant without --mlp, in the pre-1.6 serialization of the 2020 releases."""
    path = tmp_path_factory.mktemp("moco1") / "moco_v1_200ep_pretrain.pth.tar"
    return save_moco_checkpoint(path, ddp=False, mlp=False, legacy=True)


def test_moco_ddp_checkpoint_imports_with_main_lincls_features(moco_ddp, tmp_path):
    out = tmp_path / "mochi-r18"
    result = mochi_import(
        moco_ddp, "--output", out, "--method", "mochi", "--mochi", "512,1024,512", "--license", "cc-by-nc-4.0",
        "--source-url", "https://example.org/mochi_512_1024_512_e1000.pth.tar", "--dataset", "imagenet-1k",
        "--quote", "ImageNet-1K linear top-1 (%)=68.7", "--quote-source", "Kalantidis et al. 2020, Table 3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "read checkpoint_0199.pth.tar: MoCo (main_moco.py, DistributedDataParallel); arch resnet18, epoch 200" in (
        result.output
    )
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not list(tmp_path.glob("*.tmp"))
    assert_same_network(out, main_lincls_backbone(moco_ddp))

    assert parts(out) == {
        "backbone": (120, True),  # resnet18's 122 entries without fc.weight, fc.bias
        "projection head": (4, False),  # fc.0 and fc.2, weight and bias
        "key encoder": (124, False),
        "queue": (2, False),
        "optimizer": (0, False),
    }
    config = json.loads((out / "config.json").read_text())
    provenance = config["provenance"]
    assert provenance["sha256"] == hashlib.sha256(moco_ddp.read_bytes()).hexdigest()
    assert provenance["file"] == "checkpoint_0199.pth.tar" and provenance["size_bytes"] == moco_ddp.stat().st_size
    assert provenance["loaded_with"] == "torch.load(weights_only=True)"
    assert provenance["from_file"] == {"arch": "resnet18", "epoch": 200}
    assert provenance["declared"] == {"method": "mochi", "mochi": [512, 1024, 512], "dataset": "imagenet-1k"}
    assert (config["method"], config["mochi"], config["epochs"]) == ("MoCHi", [512, 1024, 512], 200)
    cfg = config["pretrained_cfg"]
    assert (cfg["license"], cfg["paper_ids"], cfg["num_classes"], cfg["input_size"]) == (
        "cc-by-nc-4.0",
        "arXiv:2010.01028",
        0,
        [3, 224, 224],
    )

    card = ModelCard((out / "README.md").read_text())
    assert card.data.license == "cc-by-nc-4.0" and card.data.eval_results is None  # nothing measured yet
    text = card.text
    assert "mochi-hub did not train these weights" in text
    assert f"| sha256 | `{provenance['sha256']}` |" in text
    assert "| Recorded in the file | arch resnet18, epoch 200 |" in text
    assert "| dropped | key encoder | 124 | `module.encoder_k.*` |" in text
    assert "| ImageNet-1K linear top-1 (%) | 68.7 | Kalantidis et al. 2020, Table 3 |" in text
    assert text.index("Quoted, not measured here") < text.index("| ImageNet-1K linear top-1 (%) | 68.7")
    assert "No evaluation was run on these weights" in text


def test_single_process_legacy_file_and_kept_head(moco_single, tmp_path):
    assert moco_single.read_bytes()[:2] == b"\x80\x02"  # the old serialization, not a zip archive
    out = tmp_path / "moco-v1"
    report = import_checkpoint(moco_single, out, keep_head=True, declared=Declared(method="moco", epochs=200))
    assert report.layout == "MoCo (main_moco.py, one process)" and report.architecture == "resnet18"
    assert_same_network(out, main_lincls_backbone(_with_module_prefix(moco_single, tmp_path)))
    assert parts(out)["projection head"] == (2, True)

    head = load_file(out / "projection_head.safetensors")
    state = torch.load(moco_single, weights_only=True)["state_dict"]
    assert head.keys() == {"weight", "bias"} and torch.equal(head["weight"], state["encoder_q.fc.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["projection_head"]["module"] == "nn.Linear(512, 128)"
    assert config["method"] == "MoCo" and config["pretrained_cfg"]["paper_ids"] == "arXiv:1911.05722"
    assert config["pretrained_cfg"]["license"] == "unknown"
    text = (out / "README.md").read_text()
    assert "head = nn.Linear(512, 128)" in text and "License | not stated" in text


def _with_module_prefix(path: Path, tmp_path: Path) -> Path:
    """main_lincls.py reads only module.encoder_q.*: the single-process file as DDP would have named it."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {f"module.{k}": v for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "as-ddp.pth.tar")
    return tmp_path / "as-ddp.pth.tar"


# --- Lightning, torchvision, timm --------------------------------------------------------------------------------


def _resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.mark.parametrize("project", ["lightly", "solo-learn"])
def test_lightning_checkpoints_with_a_backbone_prefix(project, tmp_path):
    resnet = _resnet18(1)
    module = LightlyMoCo(resnet) if project == "lightly" else SoloLearnMoCo(resnet)
    hparams = {"method": "mocov2plus" if project == "solo-learn" else "moco", "max_epochs": 100, "lr": 0.06}
    torch.save(lightning_checkpoint(module.state_dict(), hparams), tmp_path / "last.ckpt")
    out = tmp_path / "out"
    report = import_checkpoint(tmp_path / "last.ckpt", out, keep_head=True)
    assert report.architecture == "resnet18"  # the file does not say it: the one ResNet its weights fill
    resnet.fc = nn.Identity()
    assert_same_network(out, resnet)
    found = parts(out)
    if project == "lightly":
        assert report.layout == "Lightning (backbone.*, an nn.Sequential of the network's children)"
        assert found == {
            "backbone": (120, True),
            "projection head": (4, True),
            "key encoder (momentum)": (120, False),
            "key encoder's head": (4, False),
            "optimizer": (0, False),
            "learning-rate scheduler": (0, False),
            "Lightning callbacks": (0, False),
            "Lightning loop state": (0, False),
        }
    else:
        assert report.layout == "Lightning (backbone.*)"
        assert found["queue"] == (2, False) and found["online classifier"] == (2, False)
        assert found["key encoder (momentum)"] == (120, False) and found["projection head"] == (4, True)
    assert report.from_file["hyper_parameters"] == hparams and report.from_file["epoch"] == 99
    assert "`method=" in (out / "README.md").read_text()  # the settings the file records, on the card


def test_torchvision_and_timm_state_dicts(tmp_path):
    resnet = _resnet18(2)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    report = import_checkpoint(tmp_path / "resnet18.pth", tmp_path / "tv")
    assert report.layout == "a network's state dict" and parts(tmp_path / "tv")["classifier (10 classes)"] == (2, False)
    resnet.fc = nn.Identity()
    assert_same_network(tmp_path / "tv", resnet)

    # timm: an architecture outside the ResNets (its classifier is called "classifier"), in a safetensors file.
    torch.manual_seed(3)
    source = timm.create_model("test_efficientnet", num_classes=7).eval()
    save_file(source.state_dict(), tmp_path / "effnet.safetensors")
    result = mochi_import(tmp_path / "effnet.safetensors", "--output", tmp_path / "nope")
    assert result.exit_code == 1 and "does not say its architecture" in result.output and "--arch" in result.output
    assert not (tmp_path / "nope").exists()
    report = import_checkpoint(tmp_path / "effnet.safetensors", tmp_path / "effnet", arch="test_efficientnet")
    assert report.from_file == {} and report.parts[1].what == "classifier (7 classes)"
    assert json.loads((tmp_path / "effnet" / "config.json").read_text())["provenance"]["loaded_with"] == "safetensors"
    with torch.no_grad():
        model = timm.create_model(f"local-dir:{tmp_path / 'effnet'}", pretrained=True).eval()
        assert_close(model(IMAGES), source.forward_head(source.forward_features(IMAGES), pre_logits=True))


# --- bad input: one line, exit 1 (2 for bad options), nothing written ---------------------------------------------


def _bad_files(tmp_path: Path, moco: Path) -> dict[str, tuple[Path, list[str], str]]:
    good = moco.read_bytes()
    (tmp_path / "notes.txt").write_text("these are not weights\n" * 20)
    (tmp_path / "cut.pth.tar").write_bytes(good[: len(good) // 2])
    legacy = tmp_path / "legacy.pth"
    torch.save({"a": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "cut-legacy.pth").write_bytes(legacy.read_bytes()[:-40])
    save_file({"w": torch.ones(1000)}, tmp_path / "w.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:-100])
    torch.save({"student": {"backbone.x": torch.ones(1)}, "teacher": {}, "epoch": 3}, tmp_path / "dino.pth")
    state = _resnet18(4).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # a CIFAR stem
    torch.save(state, tmp_path / "cifar-stem.pth")
    return {
        "missing": (tmp_path / "absent.pth", [], "no such file"),
        "a folder": (tmp_path, [], "not a file"),
        "text": (tmp_path / "notes.txt", [], "not a checkpoint (neither a file torch.save wrote nor safetensors"),
        "truncated zip": (tmp_path / "cut.pth.tar", [], "truncated or damaged"),
        "truncated legacy": (tmp_path / "cut-legacy.pth", [], "truncated or damaged"),
        "truncated safetensors": (tmp_path / "cut.safetensors", [], "a truncated or damaged safetensors file"),
        "unknown layout": (tmp_path / "dino.pth", [], "unknown layout; found the keys student, teacher, epoch"),
        "wrong arch": (
            moco,
            ["--arch", "resnet34"],
            "does not fit timm's resnet34: 80 weights missing: layer1.2.conv1.weight",
        ),
        "shapes": (
            tmp_path / "cifar-stem.pth",
            ["--arch", "resnet18"],
            "1 shapes differ: conv1.weight (file [64, 3, 3, 3], model [64, 3, 7, 7])",
        ),
        "unknown arch": (moco, ["--arch", "resnet5O"], "--arch: unknown timm architecture 'resnet5O'; did you mean"),
        "no head": (tmp_path / "cifar-stem.pth", ["--arch", "resnet18", "--keep-head"], "has no projection head"),
    }


def test_bad_files_fail_in_one_line_and_write_nothing(moco_ddp, tmp_path):
    for name, (path, options, message) in _bad_files(tmp_path, moco_ddp).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        result = mochi_import(path, "--output", out, *options)
        assert result.exit_code == 1, (name, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], (name, lines)
        assert not out.exists() and not list(tmp_path.glob(".*tmp")), name


def test_bad_options_are_usage_errors(moco_ddp, tmp_path):
    cases = [
        (["--quote", "top-1=68"], "--quote needs --quote-source"),
        (["--quote", "68", "--quote-source", "x"], "--quote takes METRIC=VALUE"),
        (["--method", "moco-v2", "--mochi", "512,1024,512"], "contradicts --mochi 512,1024,512, which is MoCHi"),
        (["--mochi", "1,2"], "--mochi takes three integers"),
    ]
    for options, message in cases:
        result = mochi_import(moco_ddp, "--output", tmp_path / "out", *options)
        assert result.exit_code == 2 and message in result.output, (options, result.output)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    result = mochi_import(moco_ddp, "--output", tmp_path / "mine")
    assert result.exit_code == 2 and "a folder with other files in it" in result.output
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


# --- pickles that need more than tensors --------------------------------------------------------------------------


class Payload:
    """Unpickling this calls open(marker, "w"): the file appears only if the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_code_payload_is_refused_without_running(tmp_path, caplog):
    marker = tmp_path / "payload-ran"
    checkpoint = {"arch": "resnet18", "state_dict": _resnet18(5).state_dict(), "note": Payload(marker)}
    torch.save(checkpoint, tmp_path / "evil.pth.tar")
    assert not marker.exists()

    result = mochi_import(tmp_path / "evil.pth.tar", "--output", tmp_path / "out")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "holds Python objects (io.open)" in result.output
    assert "pass --allow-unsafe-pickle" in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()  # refused, and nothing in the file ran

    # The same file with the opt-in: the payload is live (the marker appears), with a warning first.
    with caplog.at_level("WARNING"):
        report = import_checkpoint(tmp_path / "evil.pth.tar", tmp_path / "out", allow_unsafe_pickle=True)
    assert marker.exists() and "--allow-unsafe-pickle: unpickling evil.pth.tar" in caplog.text
    assert report.loaded_with.startswith("torch.load(weights_only=False)")
    assert "Read with | torch.load(weights_only=False)" in (tmp_path / "out" / "README.md").read_text()


def test_argparse_namespace_needs_the_opt_in_and_its_settings_reach_the_card(tmp_path):
    """MoCo forks that save `args` (an argparse.Namespace) beside the weights."""
    path = save_moco_checkpoint(tmp_path / "with-args.pth.tar", ddp=False)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["args"] = argparse.Namespace(arch="resnet18", moco_k=65536, mlp=True, epochs=800, data="/data/in1k")
    torch.save(checkpoint, path)
    result = mochi_import(path, "--output", tmp_path / "out")
    assert result.exit_code == 1 and "(argparse.Namespace)" in result.output
    report = import_checkpoint(path, tmp_path / "out", allow_unsafe_pickle=True)
    assert report.from_file["args"] == {
        "arch": "resnet18",
        "moco_k": 65536,
        "mlp": True,
        "epochs": 800,
        "data": "/data/in1k",
    }
    text = (tmp_path / "out" / "README.md").read_text()
    assert "`moco_k=65536`" in text and "`data=<local>/in1k`" in text  # local paths redacted


# --- downstream: probe, results on the card, export, push ---------------------------------------------------------


@pytest.fixture(scope="module")
def hub():
    server = LocalHub(TOKENS).start()
    yield server
    server.stop()


def test_probe_results_export_and_push_of_an_import(moco_ddp, fmnist_folder, hub, tmp_path, monkeypatch):
    out = tmp_path / "imported"
    declared = Declared(method="mochi", mochi=(512, 1024, 512), license="cc-by-nc-4.0")
    import_checkpoint(moco_ddp, out, keep_head=True, declared=declared)
    _, info = load_backbone(str(out))
    assert info["kind"] == "timm-folder"

    probe = run_probe(str(out), small(tmp_path, dataset=str(fmnist_folder), protocol="knn"), show=False)
    assert probe["source_info"]["weights_sha256"] == info["weights_sha256"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**probe, "source_info": {"weights_sha256": "0" * 64}}))
    with pytest.raises(ValueError, match="measured on other weights"):
        import_checkpoint(moco_ddp, out, declared=declared, results=[other])
    import_checkpoint(moco_ddp, out, keep_head=True, declared=declared, results=[tmp_path / "out.json"])
    card = ModelCard((out / "README.md").read_text())
    assert card.data.eval_results is None  # measured on a local folder: in the card's table, not the model-index
    row = f"| kNN | `{fmnist_folder.name}` (local folder) | val | - | 80 / 30 | {probe['top1']:.2f} | {probe['top5']:.2f} |"
    assert row in card.text and "No evaluation was run" not in card.text

    # torchvision and detectron2 weights from the imported folder
    weights = export_run(out, format="torchvision")
    assert weights == tmp_path / "imported-torchvision" / "torchvision_resnet18.safetensors"
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    resnet.load_state_dict(load_file(weights))
    assert_close(resnet.eval()(IMAGES), main_lincls_backbone(moco_ddp)(IMAGES))
    assert "License of the weights: cc-by-nc-4.0." in (weights.parent / "README.md").read_text()
    detectron2 = export_run(out, format="detectron2")
    assert detectron2.name == "model_detectron2.pkl" and detectron2.stat().st_size > 40e6
    assert not (out / "export").exists() and sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "projection_head.safetensors",
    ]

    # the Hub: every file of the folder in one commit, the card re-rendered, timm's hf-hub loader reads it back
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets when huggingface_hub is imported
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    result = push(out, "alice/mochi-r18", endpoint=hub.url, token=ALICE, license="other")
    files = hub.files("alice/mochi-r18")
    assert set(files) == {p.name for p in out.iterdir()} | {".gitattributes"}
    assert json.loads(files["config.json"])["pretrained_cfg"]["license"] == "other"  # --license on push
    pushed = ModelCard(files["README.md"].decode())
    assert pushed.data.license == "other" and 'name = "hf-hub:alice/mochi-r18"' in pushed.text
    assert result.commit_oid
    with torch.no_grad():
        maps = timm.create_model("hf-hub:alice/mochi-r18", pretrained=True, features_only=True).eval()(IMAGES)
    assert [m.shape[1] for m in maps] == [64, 64, 128, 256, 512]
    assert os.listdir(tmp_path / "hf-cache")
