"""The installed `mochi` pushes to the local Hub endpoint through HF_ENDPOINT; timm's REAL `hf-hub:` loader reads
it back in fresh subprocesses, then again offline from the populated cache with the server stopped."""

import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from mochi_hub.publish.export import export_run, load_run_backbone

from hub_server import ALICE, EXPORT_FILES, TOKENS, LocalHub, assert_clean_upload
from runs import (
    clean_env,
    make_run,
    mochi_command,
    run,
    sample_images,
)


@pytest.fixture(scope="module")
def hub():
    server = LocalHub(TOKENS).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("hub") / "run")
    export_run(run_dir)
    return run_dir


LOADER = r"""
import json, sys
import timm, torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from mochi_hub.publish.card import usage_snippet

repo, reference = sys.argv[1], load_file(sys.argv[2])
images = reference["images"]
with torch.no_grad():
    model = timm.create_model(f"hf-hub:{repo}", pretrained=True).eval()
    out = {"diff": (model(images) - reference["features"]).abs().max().item(),
           "num_classes": model.num_classes, "cfg": {k: model.pretrained_cfg.get(k) for k in
           ("license", "paper_ids", "tag", "hf_hub_id", "input_size", "mean", "std", "test_input_size")}}
    head = timm.create_model(f"hf-hub:{repo}", pretrained=True, num_classes=7).eval()
    backbone = model.state_dict()
    out["head"] = list(head(images).shape)
    out["head_keeps_backbone"] = all(torch.equal(t, backbone[k]) for k, t in head.state_dict().items()
                                     if not k.startswith("fc."))
    features = timm.create_model(f"hf-hub:{repo}@v1", pretrained=True, features_only=True).eval()
    out["channels"] = features.feature_info.channels()
    out["reduction"] = features.feature_info.reduction()
    out["maps"] = [list(m.shape) for m in features(images)]
# The card's usage snippet, exactly as published.
namespace = {}
exec(usage_snippet(open(hf_hub_download(repo, "README.md")).read()), namespace)
out["snippet"] = {"features": list(namespace["features"].shape), "classes": namespace["classifier"].num_classes,
                  "channels": namespace["backbone"].feature_info.channels()}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.ci
def test_mochi_push_then_timm_loads_from_hub_and_offline_cache(tmp_path):
    """The installed `mochi` pushes through HF_ENDPOINT; timm's hf-hub loader, in a fresh process and a fresh
    HF_HOME, gets the same outputs as the exported backbone, a new head and feature maps; then the same
    from the cache with HF_HUB_OFFLINE=1 once the endpoint is gone."""
    run_dir = make_run(tmp_path / "run")
    hub = LocalHub(TOKENS).start()
    try:
        push_home = tmp_path / "hf-home-push"
        result = run(
            [*mochi_command(), "push", str(run_dir), "--repo-id", "mochi-org/test-resnet-mochi", "--tag", "v1"],
            clean_env(HF_ENDPOINT=hub.url, HF_TOKEN=ALICE, HF_HOME=str(push_home)),
        )
        assert result.returncode == 0, result.stderr
        assert "exported the newest checkpoint" in result.stderr  # a run directory: exported first
        assert 'timm.create_model("hf-hub:mochi-org/test-resnet-mochi", pretrained=True)' in result.stdout
        assert ALICE not in result.stdout + result.stderr
        files = hub.files("mochi-org/test-resnet-mochi")
        assert set(files) == EXPORT_FILES | {".gitattributes"}
        assert_clean_upload(files, run_dir)
        for path in [*push_home.rglob("*"), *(run_dir / "export").rglob("*")]:  # the token is written nowhere
            if path.is_file():
                assert ALICE.encode() not in path.read_bytes(), path

        backbone, *_ = load_run_backbone(run_dir)
        images = sample_images(3)
        with torch.no_grad():
            save_file({"images": images, "features": backbone(images)}, tmp_path / "reference.safetensors")
        home = tmp_path / "hf-home-user"
        loader = [sys.executable, "-c", LOADER, "mochi-org/test-resnet-mochi", str(tmp_path / "reference.safetensors")]
        online = run(loader, clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(home)))
        assert online.returncode == 0, online.stderr
    finally:
        hub.stop()
    offline = run(loader, clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_OFFLINE="1"))
    assert offline.returncode == 0, offline.stderr

    for output in (online, offline):
        out = json.loads(output.stdout.split("RESULT ", 1)[1])
        assert out["diff"] <= 1e-5 and out["num_classes"] == 0
        assert out["cfg"]["license"] == "apache-2.0" and out["cfg"]["paper_ids"] == "arXiv:2010.01028"
        assert out["cfg"]["tag"] is None and out["cfg"]["test_input_size"] is None
        assert out["cfg"]["input_size"] == [3, 32, 32]
        assert out["head"] == [3, 7] and out["head_keeps_backbone"]
        assert out["channels"] == [32, 32, 48, 192, 96] and out["reduction"] == [2, 4, 8, 16, 32]
        assert out["maps"] == [[3, c, 32 // r, 32 // r] for c, r in zip(out["channels"], out["reduction"])]
        assert out["snippet"] == {"features": [2, 96], "classes": 10, "channels": [32, 32, 48, 192, 96]}


@pytest.mark.ci
def test_the_local_endpoint_a_user_starts_takes_a_push(run_dir, tmp_path):
    """README's recipe for trying `mochi push` offline: start the endpoint, export what it prints, push."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mochi_hub.publish.local_hub", "--port", "0", "--user", "me"],
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        lines = [server.stdout.readline() for _ in range(2)]
        exported = dict(pair.split("=", 1) for pair in lines[1].split("export ", 1)[1].split())
        assert set(exported) == {"HF_ENDPOINT", "HF_TOKEN"} and exported["HF_ENDPOINT"].startswith("http://127.0.0.1:")
        env = clean_env(**exported, HF_HOME=str(tmp_path / "hf-home"))
        pushed = run([*mochi_command(), "push", str(run_dir), "--repo-id", "me/mochi-demo"], env)
        assert pushed.returncode == 0, pushed.stderr
        assert "verified: the remote files and sizes match" in pushed.stdout and exported["HF_TOKEN"] not in (
            pushed.stdout + pushed.stderr
        )
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
