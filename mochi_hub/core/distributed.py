"""Processes: the Accelerator for whatever was launched, shuffle-BN for the key encoder, and the few
collectives the loop needs. The only module besides train/probe/detect that touches accelerate."""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn


def launched_accelerator(global_batch: int, *, accelerator: Accelerator | None = None, **kwargs: Any) -> Accelerator:
    """Accelerate on whatever was launched (one process, accelerate launch, torchrun), or the caller's own.

    Without GPUs, several processes need `cpu=True` to form a real gloo group; a plain Accelerator would
    silently run independent single-process copies of the job, so a group of the wrong size is refused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator is None:
        accelerator = Accelerator(cpu=world > 1 and not torch.cuda.is_available(), **kwargs)
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"{world} processes were launched but Accelerate formed a group of "
            f"{accelerator.num_processes}: refusing to run independent copies of the job"
        )
    if global_batch % accelerator.num_processes:
        raise ValueError(
            f"--batch-size ({global_batch}) is the global batch and must divide evenly "
            f"over {accelerator.num_processes} processes"
        )
    return accelerator


def local_bn_splits(bn_splits: int, world: int, global_batch: int) -> int:
    """BatchNorm groups each process runs: the global batch is cut into `bn_splits` groups, as on the paper's
    8 GPUs; with as many processes or more, each process is one group (its own BatchNorm, as under DDP)."""
    if global_batch % bn_splits:
        raise ValueError(f"--bn-splits ({bn_splits}) must divide --batch-size ({global_batch})")
    if bn_splits <= world:
        return 1
    if bn_splits % world:
        raise ValueError(f"--bn-splits ({bn_splits}) must be a multiple of the number of processes ({world})")
    return bn_splits // world


@torch.no_grad()
def shuffled_keys(
    key_encoder: nn.Module, images: Tensor, accelerator: Accelerator, generator: torch.Generator, *, splits: int
) -> tuple[Tensor, Tensor]:
    """Key embeddings with shuffle-BN. Returns (this process's keys [L, D], every process's keys [G, D]
    in global batch order, for the queue).

    Every image of the global batch is gathered, permuted by one permutation (the same seeded generator on
    every rank), each process embeds its slice in `splits` BatchNorm groups, and the keys are gathered back
    and unshuffled. So a key's BatchNorm statistics never come from the group that holds its query (the
    query encoder runs the unshuffled batch in groups of the same size).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    all_images = accelerator.gather(images) if world > 1 else images  # [G, C, H, W]
    perm = torch.randperm(all_images.shape[0], generator=generator, device=generator.device).to(images.device)  # [G]
    mine = all_images[perm].chunk(world)[rank]  # [L, C, H, W]
    keys_shuffled = key_encoder(mine, splits=splits)  # [L, D]
    if world > 1:
        keys_shuffled = accelerator.gather(keys_shuffled)  # [G, D]
    keys = keys_shuffled[perm.argsort()]  # [G, D] global order
    return keys.chunk(world)[rank], keys


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
