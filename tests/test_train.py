"""`mochi train` end to end on real Fashion-MNIST images with a tiny timm backbone."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mochi_hub import train as train_module
from mochi_hub.cli.app import app
from mochi_hub.config import TrainConfig
from mochi_hub.data import DEBIAN_FASHION_MNIST
from mochi_hub.train import GlobalBatches, cosine_lr, train

pytestmark = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                reason="needs Debian's dataset-fashion-mnist (make test installs it)")


def tiny(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    """4 steps an epoch: 64 real images, global batch 16, K = 64."""
    values = dict(dataset="fashion-mnist", model="test_resnet", image_size=32, epochs=2, batch_size=16,
                  queue_size=64, mochi=(8, 8, 4), warmup_epochs=1, max_train_images=64, workers=0,
                  output=str(tmp_path / name), log_every_steps=1, report_to="none", keep_checkpoints=5)
    return TrainConfig(**(values | overrides))


def snapshot(info) -> dict[str, torch.Tensor]:
    tensors = {f"query.{k}": v.detach().clone() for k, v in info["query"].state_dict().items()}
    tensors.update({f"queue.{k}": v.detach().clone() for k, v in info["queue"].state_dict().items()})
    return tensors


def run_recording(config: TrainConfig) -> dict[int, dict[str, torch.Tensor]]:
    states = {}
    train(config, on_step=lambda step, info: states.__setitem__(step, snapshot(info)))
    return states


def test_cosine_schedule_and_global_batches():
    assert cosine_lr(0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_lr(50, 100, 0.3) == pytest.approx(0.15)
    assert cosine_lr(100, 100, 0.3) == pytest.approx(0.0)
    ranks = [list(GlobalBatches(50, 8, seed=1, epoch=2, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == 6  # 50 // 8 global batches, the last partial one dropped
    merged = [ranks[0][b] + ranks[1][b] for b in range(6)]  # rank 0 holds the first half of each batch
    assert sorted(i for batch in merged for i in batch) == sorted(set(i for batch in merged for i in batch))
    assert list(GlobalBatches(50, 8, seed=1, epoch=2, rank=1, world=2, start=4)) == ranks[1][4:]
    assert list(GlobalBatches(50, 8, seed=1, epoch=3, rank=0, world=2)) != ranks[0]


def test_mochi_on_and_off_are_identical_through_warmup_then_differ(tmp_path):
    mochi = run_recording(tiny(tmp_path, "mochi"))
    moco = run_recording(tiny(tmp_path, "moco", mochi=(0, 0, 0)))
    assert sorted(mochi) == list(range(1, 9))
    for step in range(1, 5):  # epoch 0: warm-up, no mixing
        for name, tensor in mochi[step].items():
            assert torch.equal(tensor, moco[step][name]), (step, name)
    assert not torch.equal(mochi[8]["query.backbone.conv1.0.weight"], moco[8]["query.backbone.conv1.0.weight"])
    lines = [json.loads(line) for line in (tmp_path / "mochi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mixing"] for r in lines if r["kind"] == "step"] == [False] * 4 + [True] * 4


def test_false_negative_rate_reads_the_labels_the_hard_set_was_chosen_from(tmp_path):
    """K = B and N = K: every step overwrites the whole queue and the hard set is the whole queue, so the logged
    rate is exactly the share of (query, queue entry) pairs whose labels match, with the queue of the previous step."""
    config = tiny(tmp_path, mochi=(0, 0, 0), warmup_epochs=0, queue_size=16, epochs=1)  # 4 steps of 16
    queue_labels = {}  # step -> the queue's labels after that step's enqueue (in batch order: K = B)
    train(config, on_step=lambda step, info: queue_labels.__setitem__(step, info["queue"].labels.clone()))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["false_negative_rate"] for r in rows if r["kind"] == "step"}

    assert logged[1] is None  # the queue holds no labelled key before the first enqueue
    after_enqueue = []
    for step in (2, 3, 4):
        batch, before = queue_labels[step], queue_labels[step - 1]  # [B], [K]
        expected = (batch[:, None] == before[None, :]).float().mean().item()
        assert logged[step] == pytest.approx(expected, abs=1e-6)
        after_enqueue.append((batch[:, None] == batch[None, :]).float().mean().item())
    assert after_enqueue != pytest.approx([logged[s] for s in (2, 3, 4)])  # the test tells the two readings apart


def test_resume_continues_exactly(tmp_path):
    straight = run_recording(tiny(tmp_path, "straight", save_every_steps=3))
    interrupted = tiny(tmp_path, "resumed", save_every_steps=3, max_steps=5)
    train(interrupted)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [
        "step-0000003", "step-0000004", "step-0000005"]
    resumed = run_recording(dataclasses.replace(interrupted, max_steps=None, resume="auto"))
    assert sorted(resumed) == [6, 7, 8]
    # Same data order, augmentations, plans, optimizer state and RNG: bit-identical on this CPU.
    for name, tensor in straight[8].items():
        assert torch.equal(resumed[8][name], tensor), name
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "step"] == list(range(1, 9))
    run = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert run["summary"]["resumes"] == 1 and run["summary"]["images_seen"] == 8 * 16


def test_resume_refuses_an_incompatible_config(tmp_path):
    config = tiny(tmp_path, max_steps=2, epochs=1, warmup_epochs=0)
    train(config)
    with pytest.raises(ValueError, match="incompatible config.*queue_size"):
        train(dataclasses.replace(config, queue_size=128, resume="auto"))
    with pytest.raises(ValueError, match="already holds checkpoints: pass --resume auto"):
        train(config)  # a fresh run never mixes its checkpoints with an older run's


CLI_VALUES = {  # a non-default value for every TrainConfig field
    "dataset": "some/dataset", "model": "resnet18", "image_size": "64", "epochs": "3", "batch_size": "32",
    "queue_size": "512", "mochi": "16,8,4", "warmup_epochs": "1", "lr": "0.5", "temperature": "0.1",
    "key_momentum": "0.99", "seed": "7", "workers": "1", "output": "out/dir", "max_steps": "11",
    "save_every_steps": "5", "resume": "auto", "mixed_precision": "bf16", "preset": "demo", "proj_dim": "64",
    "weight_decay": "0.0005", "sgd_momentum": "0.8", "beta_max": "0.4", "channels_last": None,
    "log_every_steps": "3", "keep_checkpoints": "4", "strict_data": None, "max_train_images": "100",
    "report_to": "none", "on_nonfinite": "skip",
}


def test_cli_maps_onto_the_config_one_to_one(monkeypatch):
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(CLI_VALUES) == set(fields)
    received = []
    monkeypatch.setattr(train_module, "train", received.append)
    args = ["train"]
    for name, value in CLI_VALUES.items():
        args += [f"--{name.replace('_', '-')}"] + ([value] if value is not None else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (config,) = received
    for name, value in CLI_VALUES.items():
        default = getattr(TrainConfig(), name)
        got = getattr(config, name)
        assert got != default, name  # the option reached its field
        assert str(got).replace(" ", "").strip("()") == (value or "True"), name


def test_cli_reports_bad_options_without_a_traceback():
    result = CliRunner().invoke(app, ["train", "--queue-size", "8", "--batch-size", "16"])
    assert result.exit_code == 2
    assert "--queue-size (K = 8) must be at least the global --batch-size (16)" in result.output
    assert "Traceback" not in result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ci
def test_two_processes_share_one_queue_and_one_model(tmp_path):
    """torchrun, 2 CPU processes (gloo): the ranks end identical, and the queue holds the gathered keys in order."""
    out = tmp_path / "dist"
    torchrun = Path(sys.executable).with_name("torchrun")
    options = [f"{k}={v}" for k, v in dict(
        dataset="fashion-mnist", model="test_resnet", image_size=32, epochs=2, batch_size=16, queue_size=40,
        mochi="8,8,4", warmup_epochs=1, max_train_images=64, workers=0, output=out, report_to="none").items()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    subprocess.run([str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}",
                    str(Path(__file__).parent / "helpers" / "dist_train.py"), *options],
                   check=True, env=env, timeout=300)
    rank0, rank1 = (load_file(out / f"rank{r}.safetensors") for r in (0, 1))
    for name in rank0:
        if not name.startswith("keys."):
            assert torch.equal(rank0[name], rank1[name]), name
    run = json.loads((out / "run.json").read_text())
    assert run["num_processes"] == 2 and run["global_batch_size"] == 16 and run["per_process_batch_size"] == 8
    # 8 steps of 16 gathered keys (rank 0's 8, then rank 1's) wrote 128 rows into K = 40 rows.
    written = [torch.cat([rank0[f"keys.{i}"], rank1[f"keys.{i}"]]) for i in range(8)]
    stream = torch.cat(written)  # [128, D] in enqueue order
    expected = torch.empty_like(rank0["queue.keys"])
    for row, key in enumerate(stream):
        expected[row % 40] = key
    torch.testing.assert_close(rank0["queue.keys"], expected, rtol=0, atol=0)
    assert int(rank0["queue.ptr"]) == 128 % 40


def heldout_contrastive(query, key, images_q, images_k, temperature=0.2):
    """In-batch InfoNCE and top-1 on held-out pairs: the same negatives for any pair of encoders."""
    with torch.no_grad():
        logits = query.train()(images_q) @ key.train()(images_k).T / temperature  # [B, B]
    labels = torch.arange(len(logits))
    return torch.nn.functional.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


@pytest.mark.slow
@pytest.mark.ci
def test_short_real_run_learns_and_exports_for_timm(tmp_path):
    """128 steps of CPU are far from the paper's regime: within the run, the training loss first rises as
    the queue fills with real keys (lightly's MoCo does the same here, see the issue notes). What a short
    run does show: on held-out images, the trained encoders separate positives from other images better
    than the initial ones, and the proxy task is learned during the warm-up."""
    from mochi_hub.augment import TwoViews, moco_v2_transform
    from mochi_hub.checkpoint import latest_checkpoint, load_checkpoint
    from mochi_hub.data import DecodedImages, collate_samples, resolve_dataset
    from mochi_hub.model import Encoder, create_backbone, make_key_encoder
    from mochi_hub.queue import NegativeQueue
    from mochi_hub.train import SeededAugment

    config = tiny(tmp_path, epochs=8, warmup_epochs=4, max_train_images=512, batch_size=64, queue_size=256,
                  mochi=(32, 32, 16), lr=0.3, key_momentum=0.9, log_every_steps=4)
    run_dir = train(config)

    views = SeededAugment(DecodedImages(resolve_dataset("fashion-mnist", "val"), TwoViews(moco_v2_transform(32)),
                                        indices=list(range(256))), seed=123)
    images_q, images_k = collate_samples([views[i] for i in range(256)])["images"]
    torch.manual_seed(config.seed)  # the initial weights, as train() draws them
    initial = Encoder(create_backbone(config.model), config.proj_dim)
    trained = Encoder(create_backbone(config.model), config.proj_dim)
    trained_key = make_key_encoder(trained)
    load_checkpoint(latest_checkpoint(run_dir), modules={"query": trained, "key": trained_key,
                                                         "queue": NegativeQueue(256, config.proj_dim)},
                    optimizer=None, rank=0)
    exported = load_file(run_dir / "export" / "model.safetensors")
    for name, tensor in trained.backbone.state_dict().items():
        assert torch.equal(exported[name], tensor), name  # the export is the newest checkpoint's backbone
    loss_before, _ = heldout_contrastive(initial, make_key_encoder(initial), images_q, images_k)
    loss_after, _ = heldout_contrastive(trained, trained_key, images_q, images_k)
    assert loss_after < loss_before - 0.1

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warmup = [r for r in lines if r["kind"] == "step" and not r["mixing"]]
    assert max(r["proxy_top1"] for r in warmup) > warmup[0]["proxy_top1"] + 0.3
    assert all(r["mixing"] for r in lines if r["kind"] == "step" and r["epoch"] >= 4)

    model = timm.create_model(f"local-dir:{run_dir / 'export'}", pretrained=True)
    features = timm.create_model(f"local-dir:{run_dir / 'export'}", pretrained=True, features_only=True)
    x = torch.randn(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, model.num_features)
    assert len(features.eval()(x)) == len(features.feature_info.channels())
