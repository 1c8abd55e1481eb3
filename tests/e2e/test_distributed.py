"""Several processes (torchrun, gloo on the CPU) compute what one process computes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mochi_hub.config import resolve_probe_config
from mochi_hub.evaluate.probe import run_probe

DIST_CHILD = textwrap.dedent("""
    import json, sys
    from mochi_hub.config import resolve_probe_config
    from mochi_hub.evaluate.probe import run_probe
    result = run_probe(sys.argv[1], resolve_probe_config(**json.loads(sys.argv[2])), show=False)
    assert result["num_processes"] == 2, result["num_processes"]
""")


def test_two_processes_train_the_classifier_one_process_trains(tmp_path, tiny_export):
    """torchrun, 2 CPU processes (gloo): each global batch is split over the ranks and DDP averages the
    gradients, and each image's augmentation depends on (seed, epoch, index) only, so the classifier and
    the accuracy equal a single process's."""
    import socket

    options = dict(
        dataset="fashion-mnist",
        max_images=64,
        epochs=2,
        lr_milestones="1",
        batch_size=16,
        lr=0.5,
        workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    single = run_probe(str(tiny_export), resolve_probe_config(**options, output=str(tmp_path / "one.json")), show=False)
    script = tmp_path / "dist_probe.py"
    script.write_text(DIST_CHILD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("torchrun")),
            "--nproc_per_node=2",
            f"--master_port={port}",
            str(script),
            str(tiny_export),
            json.dumps({**options, "output": str(tmp_path / "two.json")}),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads((tmp_path / "two.json").read_text())
    assert double["num_processes"] == 2 and (double["train_images"], double["eval_images"]) == (64, 64)
    weights = [load_file(Path(r["state_dir"]) / "epoch-0002" / "classifier.safetensors") for r in (single, double)]
    for name in ("weight", "bias"):
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-5)
    assert (double["top1"], double["top5"]) == (single["top1"], single["top5"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHUFFLE_CHILD = textwrap.dedent("""
    import sys, torch
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from mochi_hub.core.distributed import shuffled_keys
    from mochi_hub.method.model import Encoder, create_backbone, make_key_encoder
    from mochi_hub.core.seeding import generator
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)  # the same key encoder on both ranks
    key = make_key_encoder(Encoder(create_backbone("test_resnet"), 16))
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(100 + rank))  # this rank's 6
    out = {"alone": key.eval()(images)}
    out["mine"], out["everyone"] = shuffled_keys(key, images, accelerator, generator(0, "shuffle_bn", 0), splits=2)
    key.train()
    out["mine_train"], out["everyone_train"] = shuffled_keys(
        key, images, accelerator, generator(0, "shuffle_bn", 0), splits=2
    )
    out["alone_train"] = key(images, splits=2)
    save_file({k: v.clone() for k, v in out.items()}, f"{sys.argv[1]}/rank{rank}.safetensors")
    accelerator.end_training()
""")


@pytest.mark.ci
def test_shuffle_bn_unshuffles_row_for_row_across_two_processes(tmp_path):
    """torchrun, 2 CPU processes: shuffle-BN gathers both ranks' images, embeds a shuffled slice on each and
    gathers back. In eval mode (BatchNorm independent of its group) every rank must get exactly its own
    images' keys, row for row, and the queue's global keys are rank 0's then rank 1's; in train mode the keys
    come from groups that mix the ranks' images, so they differ from each rank's own groups."""
    script = tmp_path / "child.py"
    script.write_text(SHUFFLE_CHILD)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    subprocess.run(
        [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", str(script), str(tmp_path)],
        check=True,
        env=env,
        timeout=300,
    )
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    for ranked in (rank0, rank1):
        torch.testing.assert_close(ranked["mine"], ranked["alone"], rtol=0, atol=1e-6)
        assert not torch.allclose(ranked["mine_train"], ranked["alone_train"], atol=1e-4)
    for name in ("everyone", "everyone_train"):
        assert torch.equal(rank0[name], rank1[name]), name  # one permutation, one gathered batch on every rank
    torch.testing.assert_close(rank0["everyone"], torch.cat([rank0["alone"], rank1["alone"]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(rank0["everyone_train"], torch.cat([rank0["mine_train"], rank1["mine_train"]]))


@pytest.mark.ci
def test_two_processes_share_one_queue_and_one_model(tmp_path):
    """torchrun, 2 CPU processes (gloo): the ranks end identical, and the queue holds the gathered keys in order."""
    out = tmp_path / "dist"
    torchrun = Path(sys.executable).with_name("torchrun")
    options = [
        f"{k}={v}"
        for k, v in dict(
            dataset="fashion-mnist",
            model="test_resnet",
            image_size=32,
            epochs=2,
            batch_size=16,
            queue_size=40,
            mochi="8,8,4",
            mixing_warmup_epochs=1,
            max_train_images=64,
            workers=0,
            output=out,
            report_to="none",
            bn_splits=2,
        ).items()
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK"))}
    subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(Path(__file__).parents[1] / "helpers" / "dist_train.py"),
            *options,
        ],
        check=True,
        env=env,
        timeout=300,
    )
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
