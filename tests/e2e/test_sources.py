"""The three SOURCE forms (run directory, timm folder, hf-hub: from the HF cache) give identical features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from images import tiny_backbone
from safetensors.torch import load_file, save_file
from torch import nn

from mochi_hub.config import TrainConfig, resolve_probe_config
from mochi_hub.data.augment import eval_transform
from mochi_hub.data.datasets import (
    DecodedImages,
    FashionMNIST,
)
from mochi_hub.evaluate.probe import run_probe
from mochi_hub.method.model import Encoder, make_key_encoder
from mochi_hub.method.queue import NegativeQueue
from mochi_hub.publish.sources import load_backbone
from mochi_hub.training.checkpoint import finish_checkpoint, save_checkpoint


def make_run_dir(root: Path, backbone: nn.Module) -> Path:
    query = Encoder(backbone)
    modules = {"query": query, "key": make_key_encoder(query), "queue": NegativeQueue(64, 128)}
    optimizer = torch.optim.SGD(query.parameters(), lr=0.1, momentum=0.9)
    config = TrainConfig(
        model="test_resnet", image_size=32, batch_size=8, queue_size=64, mochi=(0, 0, 0), mixing_warmup_epochs=0
    )
    final = save_checkpoint(
        root,
        8,
        modules=modules,
        optimizer=optimizer,
        state={"step": 8, "epoch": 1, "config": config.to_dict()},
        is_main=True,
        rank=0,
    )
    finish_checkpoint(final, keep=2)
    (root / "run.json").write_text(json.dumps({"config": config.to_dict(), "num_processes": 1, "global_batch_size": 8}))
    return root


def hf_cache_layout(hf_home: Path, repo_id: str, folder: Path, commit: str) -> None:
    """What huggingface_hub's cache holds after downloading `folder` at `commit` (files copied, no symlinks)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot_dir = repo / "snapshots" / commit
    snapshot_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot_dir / name).write_bytes((folder / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


HUB_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from mochi_hub.publish.sources import load_backbone
    out = {}
    for i, source in enumerate(sys.argv[2:]):
        backbone, info = load_backbone(source)
        with torch.no_grad():
            save_file({"features": backbone(load_file(sys.argv[1])["images"])}, f"{sys.argv[1]}.{i}")
        out[source] = info
    print(json.dumps(out))
""")


@pytest.mark.ci
def test_all_three_source_forms_give_identical_features(tmp_path):
    backbone = tiny_backbone(seed=3)
    run_dir = make_run_dir(tmp_path / "run", backbone)
    export = tmp_path / "export"
    timm.models.save_for_hf(backbone, str(export), safe_serialization=True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    hf_cache_layout(tmp_path / "hf", "mochi-test/tiny", export, commit)

    images = DecodedImages(FashionMNIST("val"), eval_transform(32), indices=list(range(12)))
    batch = torch.stack([images[i].image for i in range(len(images))])  # [12, 3, 32, 32], real images
    with torch.no_grad():
        reference = backbone(batch)

    features, infos = {}, {}
    for source in (str(run_dir), str(export)):
        module, info = load_backbone(source)
        assert not module.training
        with torch.no_grad():
            features[source], infos[source] = module(batch), info
    assert infos[str(run_dir)]["kind"] == "run-checkpoint" and infos[str(export)]["kind"] == "timm-folder"

    save_file({"images": batch}, str(tmp_path / "batch.safetensors"))
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }  # as this process
    env.pop("HF_HUB_CACHE", None)
    hub_sources = ["hf-hub:mochi-test/tiny", f"hf-hub:mochi-test/tiny@{commit}"]
    child = subprocess.run(
        [sys.executable, "-c", HUB_CHILD, str(tmp_path / "batch.safetensors"), *hub_sources],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    hub_infos = json.loads(child.stdout.strip().splitlines()[-1])
    for i, source in enumerate(hub_sources):
        features[source] = load_file(str(tmp_path / f"batch.safetensors.{i}"))["features"]
        infos[source] = hub_infos[source]
    assert hub_infos[hub_sources[1]]["revision"] == commit

    for source, value in features.items():
        assert torch.equal(value, reference), source
        assert infos[source]["weights_sha256"] == infos[str(export)]["weights_sha256"], source
        assert infos[source]["architecture"] == "test_resnet" and infos[source]["num_features"] == 96

    # A run directory with an export/ uses it, and remembers its probe results under RUN/probes/.
    (run_dir / "export").mkdir()
    for name in ("config.json", "model.safetensors"):
        (run_dir / "export" / name).write_bytes((export / name).read_bytes())
    config = resolve_probe_config(
        dataset="fashion-mnist",
        protocol="knn",
        max_images=40,
        workers=0,
        batch_size=20,
        cache_dir=str(tmp_path / "cache"),
    )
    result = run_probe(str(run_dir), config, show=False)
    assert result["source_info"]["kind"] == "run-export"
    (saved_path,) = (run_dir / "probes").glob("knn-fashion-mnist-val-*px-max40-*.json")
    saved = json.loads(saved_path.read_text())
    assert saved["top1"] == result["top1"] and saved["source"] == str(run_dir)
