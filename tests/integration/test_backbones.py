"""Any timm backbone: a matrix of families, each trained for two real steps on Fashion-MNIST at 32 px, exported,
and rebuilt by timm's own `local-dir:` loader (and `features_only=True` where timm supports it) with the same
features. Small members of each family keep it to seconds."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from mochi_hub.training.pretrain import train
from mochi_hub.training.runs import load_run_backbone

from runs import tiny_config

FAMILIES = {
    "resnet": "resnet18",
    "resnext": "resnext26ts",
    "mobilenetv3": "mobilenetv3_small_050",  # a conv_head: pooled width 1024, num_features 288
    "efficientnet": "efficientnet_b0",
    "convnext": "convnext_atto",
    "regnet": "regnetx_002",
    "vit": "vit_tiny_patch16_224",  # built for 32 px (img_size), which the export must record
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_exports_and_reloads_with_timm(family, tmp_path):
    model = FAMILIES[family]
    run_dir = train(
        tiny_config(
            tmp_path / family,
            model=model,
            max_steps=2,
            epochs=1,
            mochi=(4, 4, 2),
            mixing_warmup_epochs=0,
            batch_size=8,
            queue_size=16,
            max_train_images=16,
        )
    )
    export = run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["architecture"] == model and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    if family == "vit":
        assert config["model_args"] == {"img_size": 32}

    backbone, *_ = load_run_backbone(run_dir)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    with torch.no_grad():
        expected, got = backbone(images), loaded(images)
    assert got.shape == (2, config["pooled_features"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    if family != "vit":  # timm's feature wrapper for ViTs takes other arguments; CNNs give strided maps
        maps = timm.create_model(f"local-dir:{export}", pretrained=True, features_only=True).eval()
        with torch.no_grad():
            outputs = maps(images)
        assert len(outputs) == len(maps.feature_info.channels())
        assert [o.shape[1] for o in outputs] == maps.feature_info.channels()
