"""README's "use the paper's weights in timm", command by command: the installed `mochi import` on a MoCo checkpoint
written as main_moco.py writes it, `mochi push` to the local Hub endpoint, then timm's hf-hub loader in a fresh process
gives the feature maps of the network main_lincls.py would load."""

import json
import sys

import pytest
import torch
from checkpoints import main_lincls_backbone, save_moco_checkpoint
from safetensors.torch import save_file

from hub_server import ALICE, TOKENS, LocalHub
from runs import clean_env, mochi_command, run

LOADER = r"""
import json, sys
import timm, torch
from safetensors.torch import load_file

repo, reference = sys.argv[1], load_file(sys.argv[2])
with torch.no_grad():
    backbone = timm.create_model(f"hf-hub:{repo}", pretrained=True, features_only=True, out_indices=(1, 2, 3, 4))
    maps = backbone.eval()(reference["images"])
diffs = [(m - reference[f"map{i}"]).abs().max().item() for i, m in enumerate(maps)]
print("RESULT " + json.dumps({"diffs": diffs, "channels": backbone.feature_info.channels(),
                              "license": backbone.pretrained_cfg["license"]}))
"""


@pytest.mark.ci
def test_readme_commands_from_checkpoint_to_timm_features(tmp_path):
    checkpoint = save_moco_checkpoint(tmp_path / "mochi_512_1024_512_e1000.pth.tar", epoch=999)
    url = "https://example.org/mochi_512_1024_512_e1000.pth.tar"
    imported = run(
        [*mochi_command(), "import", str(checkpoint), "--output", str(tmp_path / "mochi-r18"), "--method", "mochi",
         "--mochi", "512,1024,512", "--epochs", "1000", "--dataset", "imagenet-1k", "--source-url", url,
         "--license", "cc-by-nc-4.0"],
        clean_env(),
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert "dropped  key encoder" in imported.stdout and "load it with" in imported.stdout

    reference = main_lincls_backbone(checkpoint)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        maps = {}
        for i, layer in enumerate((reference.layer1, reference.layer2, reference.layer3, reference.layer4)):
            maps[f"map{i}"] = x = layer(x)
    save_file({"images": images, **maps}, tmp_path / "reference.safetensors")

    hub = LocalHub(TOKENS).start()
    try:
        pushed = run(
            [*mochi_command(), "push", str(tmp_path / "mochi-r18"), "--repo-id", "alice/resnet18-mochi"],
            clean_env(HF_ENDPOINT=hub.url, HF_TOKEN=ALICE, HF_HOME=str(tmp_path / "hf-push")),
        )
        assert pushed.returncode == 0, pushed.stderr
        card = hub.files("alice/resnet18-mochi")["README.md"].decode()
        loader = [sys.executable, "-c", LOADER, "alice/resnet18-mochi", str(tmp_path / "reference.safetensors")]
        loaded = run(loader, clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-user")))
        assert loaded.returncode == 0, loaded.stderr
    finally:
        hub.stop()
    out = json.loads(loaded.stdout.split("RESULT ", 1)[1])
    assert max(out["diffs"]) <= 1e-5 and out["channels"] == [64, 128, 256, 512]
    assert out["license"] == "cc-by-nc-4.0"
    assert "MoCHi (N, s, s') = (512, 1024, 512)" in card and f"| Source | {url} |" in card
    assert "| Pretraining epochs | 1000 |" in card and 'name = "hf-hub:alice/resnet18-mochi"' in card
