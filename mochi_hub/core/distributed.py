"""Processes: the Accelerator for whatever was launched, shuffle-BN for the key encoder, and the few
collectives the loop needs. The only module besides train/probe/detect that touches accelerate."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn

from mochi_hub.errors import OptionError, UserError

T = TypeVar("T")


def launched_accelerator(global_batch: int, *, accelerator: Accelerator | None = None, **kwargs: Any) -> Accelerator:
    """Accelerate on whatever was launched (one process, accelerate launch, torchrun), or the caller's own.

    Without GPUs, several processes need `cpu=True` to form a real gloo group; a plain Accelerator would
    silently run independent single-process copies of the job, so a group of the wrong size is refused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator is None:
        accelerator = Accelerator(cpu=world > 1 and not torch.cuda.is_available(), **kwargs)
    if accelerator.num_processes != world:
        raise UserError(
            f"{world} processes were launched but Accelerate formed a group of "
            f"{accelerator.num_processes}: refusing to run independent copies of the job"
        )
    if global_batch % accelerator.num_processes:
        raise OptionError(
            f"--batch-size ({global_batch}) is the global batch and must divide evenly "
            f"over {accelerator.num_processes} processes"
        )
    return accelerator


def on_main_process(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 alone and its answer given to every rank: decisions read from disk (resume from
    which checkpoint, is a cache complete) must be one decision, or ranks start from different steps and hang."""
    if accelerator.num_processes == 1:
        return decide()
    answer = [decide() if accelerator.is_main_process else None]
    torch.distributed.broadcast_object_list(answer, src=0)
    return answer[0]


def check_shared_folder(path: Path, accelerator: Accelerator, option: str) -> None:
    """Every process must see the folder rank 0 writes (checkpoints, the export, resume): rank 0 leaves a token
    there and every rank looks for it. On nodes without a shared filesystem this fails at once, on every rank,
    with one line, instead of hanging when the ranks' decisions diverge."""
    if accelerator.num_processes == 1:
        return
    token = on_main_process(accelerator, lambda: f".shared-{uuid.uuid4().hex}")
    if accelerator.is_main_process:
        (path / token).write_text("")
    accelerator.wait_for_everyone()
    seen = gather_object([(path / token).is_file()])  # [world] bool, on every rank
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / token).unlink()
    if not all(seen):
        blind = ", ".join(str(rank) for rank, ok in enumerate(seen) if not ok)
        raise OptionError(
            f"{option} {path}: process(es) {blind} do not see the folder process 0 writes to; with several nodes "
            f"{option} must be one folder every node shares (a network filesystem), given as an absolute path"
        )


def local_bn_splits(bn_splits: int, world: int, global_batch: int) -> int:
    """BatchNorm groups each process runs: the global batch is cut into `bn_splits` groups, as on the paper's
    8 GPUs; with as many processes or more, each process is one group (its own BatchNorm, as under DDP)."""
    if global_batch % bn_splits:
        raise OptionError(f"--bn-splits ({bn_splits}) must divide --batch-size ({global_batch})")
    if bn_splits <= world:
        return 1
    if bn_splits % world:
        raise OptionError(f"--bn-splits ({bn_splits}) must be a multiple of the number of processes ({world})")
    return bn_splits // world


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """Host -> device without making the host wait: on CUDA a copy from pageable memory blocks, so the tensor
    is page-locked first (PyTorch's caching host allocator makes that cheap)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@torch.no_grad()
def shuffled_keys(
    key_encoder: nn.Module, images: Tensor, accelerator: Accelerator, generator: torch.Generator, *, splits: int
) -> tuple[Tensor, Tensor]:
    """Key embeddings with shuffle-BN. Returns (this process's keys [L, D], every process's keys [G, D]
    in global batch order, for the queue).

    One permutation of the global batch, drawn from the host `generator` (seeded alike on every rank: CUDA's
    Philox output depends on the GPU, the host's does not), decides which process embeds which image: process r
    embeds shuffled positions [r L, (r + 1) L) in `splits` BatchNorm groups. Each image travels only to the process
    that embeds it (one all-to-all; MoCo gathers the whole batch to every process), the keys are gathered back
    and unshuffled. So a key's BatchNorm statistics never come from the group that holds its query (the query
    encoder runs the unshuffled batch in groups of the same size).
    """
    world, rank, local = accelerator.num_processes, accelerator.process_index, images.shape[0]
    perm = torch.randperm(world * local, generator=generator)  # [G] on the host: shuffled position -> image
    if world > 1:
        mine = _images_for_my_positions(images, perm, rank, world)  # [L, C, H, W]
        keys_shuffled = accelerator.gather(key_encoder(mine, splits=splits))  # [G, D] in shuffled order
    else:
        keys_shuffled = key_encoder(images[to_device(perm, images.device)], splits=splits)  # [L, D]
    keys = keys_shuffled[to_device(perm.argsort(), images.device)]  # [G, D] global order
    return keys.chunk(world)[rank], keys


def _images_for_my_positions(images: Tensor, perm: Tensor, rank: int, world: int) -> Tensor:
    """The images of this rank's shuffled positions, in shuffled order, by one all_to_all: each rank sends every
    one of its images to the rank whose slice of the permutation holds it. All index arithmetic is on the host
    (every rank knows the permutation), so no counts are exchanged."""
    local = images.shape[0]
    owner = torch.arange(perm.numel()) // local  # [G] rank that embeds shuffled position p
    source = perm // local  # [G] rank that holds image perm[p]
    # Sent in increasing p, so grouped by owner (owner grows with p); received grouped by source, then p.
    sending = (source == rank).nonzero()[:, 0]  # [n] positions whose image is here
    send_counts = torch.bincount(owner[sending], minlength=world).tolist()
    mine = torch.arange(rank * local, (rank + 1) * local)  # [L] this rank's positions
    arrival = torch.sort(source[mine], stable=True).indices  # [L] received j-th is position mine[arrival[j]]
    receive_counts = torch.bincount(source[mine], minlength=world).tolist()
    send = images[to_device(perm[sending] - rank * local, images.device)]  # [n, C, H, W]
    received = images.new_empty(images.shape)  # [L, C, H, W]
    torch.distributed.all_to_all_single(received, send.contiguous(), receive_counts, send_counts)
    return received[to_device(arrival.argsort(), images.device)]  # [L, C, H, W] in shuffled order


def all_ranks_true(flag: Tensor, accelerator: Accelerator) -> Tensor:
    """[] bool -> [] bool, true where it is true on every process (a float min: NCCL has no bool reduce)."""
    if accelerator.num_processes == 1:
        return flag
    flag = flag.float()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return flag > 0


def broadcast_buffers(*modules: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics follow each rank's shard), as DDP does at each
    forward, so a checkpoint saved by rank 0 describes every rank."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for module in modules:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)
