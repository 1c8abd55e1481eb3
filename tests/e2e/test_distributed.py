"""Several processes (torchrun, gloo on the CPU) compute what one process computes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
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
    weights = [load_file(Path(r["state_dir"]) / "epoch-0002" / "model.safetensors") for r in (single, double)]
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

    def every_image_to_every_rank(images):  # the reference: MoCo's gather of the whole batch, then one slice
        everything = accelerator.gather(images)
        perm = torch.randperm(everything.shape[0], generator=generator(0, "shuffle_bn", 0))
        keys = accelerator.gather(key(everything[perm].chunk(2)[rank], splits=2))[perm.argsort()]
        return keys.chunk(2)[rank], keys

    out["reference_mine"], out["reference_everyone"] = every_image_to_every_rank(images)
    last = images.contiguous(memory_format=torch.channels_last)
    key.to(memory_format=torch.channels_last)
    out["mine_cl"], out["everyone_cl"] = shuffled_keys(key, last, accelerator, generator(0, "shuffle_bn", 0), splits=2)
    out["reference_mine_cl"], out["reference_everyone_cl"] = every_image_to_every_rank(last)
    save_file({k: v.clone() for k, v in out.items()}, f"{sys.argv[1]}/rank{rank}.safetensors")
    accelerator.end_training()
""")


@pytest.mark.ci
def test_shuffle_bn_unshuffles_row_for_row_across_two_processes(tmp_path):
    """torchrun, 2 CPU processes: shuffle-BN sends each image to the rank whose shuffled slice holds it, embeds
    the slice and gathers the keys back, equal row for row to gathering the whole batch on every rank (NCHW and
    channels_last). In eval mode (BatchNorm independent of its group) every rank must get exactly its own
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
    # Each image travels only to the rank that embeds it, yet the keys are the whole-batch gather's, row for row.
    for ranked in (rank0, rank1):
        for suffix in ("", "_cl"):
            mine = ranked["mine_train" if not suffix else "mine_cl"]
            everyone = ranked["everyone_train" if not suffix else "everyone_cl"]
            assert torch.equal(mine, ranked[f"reference_mine{suffix}"]), suffix
            assert torch.equal(everyone, ranked[f"reference_everyone{suffix}"]), suffix


TRAIN_OPTIONS = dict(
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
    report_to="none",
    bn_splits=2,
)


def torchrun(*args: str, node_rank: int | None = None, cwd: Path | None = None, port: int) -> subprocess.Popen:
    """torchrun on 127.0.0.1: 2 processes on one node, or (node_rank given) this node's 1 process of 2 nodes."""
    layout = (
        ["--nproc_per_node=2"]
        if node_rank is None
        else ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}"]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_"))}
    env["OMP_NUM_THREADS"] = "1"  # torchrun sets it for 2 processes a node, not for 1: kernels' sums would differ
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("torchrun")),
            *layout,
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *args,
        ],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def train_distributed(out: Path, *, nodes: int) -> tuple[dict, dict]:
    """helpers/dist_train.py under torchrun (one node of 2 processes, or 2 nodes of 1); each rank's tensors."""
    options = [f"{k}={v}" for k, v in {**TRAIN_OPTIONS, "output": out}.items()]
    script = str(Path(__file__).parents[1] / "helpers" / "dist_train.py")
    port = free_port()
    ranks = [None] if nodes == 1 else list(range(nodes))
    launched = [torchrun(script, *options, node_rank=r, port=port) for r in ranks]
    for process in launched:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    return tuple(load_file(out / f"rank{r}.safetensors") for r in (0, 1))


@pytest.mark.ci
def test_two_processes_share_one_queue_and_one_model(tmp_path):
    """torchrun, 2 CPU processes (gloo): the ranks end identical, and the queue holds the gathered keys in order."""
    out = tmp_path / "dist"
    rank0, rank1 = train_distributed(out, nodes=1)
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


@pytest.mark.ci
def test_two_nodes_train_what_one_node_of_two_processes_trains(tmp_path):
    """torchrun --nnodes 2, one process each, on 127.0.0.1 with one shared --output: the same keys, queue and
    weights, bit for bit, as one node running both processes."""
    one_node = train_distributed(tmp_path / "one-node", nodes=1)
    two_nodes = train_distributed(tmp_path / "two-nodes", nodes=2)
    for single, split in zip(one_node, two_nodes):
        assert single.keys() == split.keys()
        for name in single:
            assert torch.equal(single[name], split[name]), name


@pytest.mark.ci
def test_nodes_that_do_not_share_the_output_fail_at_once_with_one_line(tmp_path):
    """Two nodes, each with its own disk (here: its own working folder and a relative --output): every rank
    stops within a minute with one line saying so, instead of resuming differently and hanging."""
    port, started = free_port(), time.monotonic()
    args = ["-m", "mochi_hub.cli", "train", *(f"--{k.replace('_', '-')}={v}" for k, v in TRAIN_OPTIONS.items())]
    nodes = []
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        nodes.append(torchrun(*args, "--output=run", node_rank=rank, cwd=tmp_path / f"node{rank}", port=port))
    outputs = [process.communicate(timeout=120) for process in nodes]
    assert time.monotonic() - started < 60
    for process, (_, stderr) in zip(nodes, outputs):
        assert process.returncode != 0
        lines = [line for line in stderr.splitlines() if line.startswith("Error: --output run:")]
        assert len(lines) == 1 and "process(es) 1 do not see the folder process 0 writes" in lines[0], stderr[-2000:]


@pytest.mark.ci
def test_a_feature_cache_one_node_cannot_read_stops_every_rank_with_one_line(tmp_path, tiny_export):
    """The cache hit is rank 0's decision; a node that cannot read the entry (its own --cache-dir) stops them all
    at once with one line, instead of extracting while the others train (a hang)."""
    options = ["--dataset=fashion-mnist", "--protocol=fast", "--max-images=32", "--batch-size=16", "--workers=0"]
    options += ["--epochs=1", "--cache-dir=cache"]
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_"))}
    warm = subprocess.run(
        [sys.executable, "-m", "mochi_hub.cli", "probe", str(tiny_export), *options, "--output=alone.json"],
        cwd=tmp_path / "node0",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert warm.returncode == 0, warm.stderr[-2000:]  # node 0's cache now holds the features
    port, started = free_port(), time.monotonic()
    nodes = [
        torchrun(
            "-m",
            "mochi_hub.cli",
            "probe",
            str(tiny_export),
            *options,
            node_rank=r,
            cwd=tmp_path / f"node{r}",
            port=port,
        )
        for r in (0, 1)
    ]
    outputs = [process.communicate(timeout=120) for process in nodes]
    assert time.monotonic() - started < 60
    for process, (_, stderr) in zip(nodes, outputs):
        assert process.returncode != 0
        lines = [line for line in stderr.splitlines() if line.startswith("Error: --cache-dir cache:")]
        assert len(lines) == 1 and "every node shares" in lines[0], stderr[-2000:]
