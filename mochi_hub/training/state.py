"""The training state, built once: the device choices, the Accelerator, both encoders, the queue, the optimiser.

`train()` and every benchmark build it here, so a benchmark times exactly what `mochi train` runs.

Device choices (`resolve_device_defaults`, a pure function): an option left at auto/None is chosen for the device,
an explicit value (or `accelerate launch --mixed_precision`) wins, and each choice comes with the reason the start
summary prints. On a GPU: bf16 autocast where the GPU has it, channels_last, cuDNN's autotuner, the views drawn on
the device, loader workers from the CPUs each local process has. On a CPU: fp32, NCHW, views in the workers
(the settings the CPU study measured).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from mochi_hub.config import TrainConfig
from mochi_hub.core.distributed import launched_accelerator, local_bn_splits
from mochi_hub.core.seeding import generator
from mochi_hub.method.model import Encoder, backbone_args, create_backbone, make_key_encoder
from mochi_hub.method.queue import NegativeQueue
from mochi_hub.method.step import StepOutput, StepSettings, training_step

MAX_AUTO_WORKERS = 16  # beyond this a loader rarely gains on one GPU, and each worker holds a copy of the dataset


def resolve_device_defaults(
    config: TrainConfig,
    device_type: str,
    *,
    cpus: int,
    local_processes: int,
    launcher_precision: str | None = None,
    bf16_supported: bool = True,
) -> tuple[TrainConfig, list[str]]:
    """The config with every auto choice made for `device_type` ("cuda" or "cpu"), and one reason per choice made.

    cpus: CPUs this machine gives the job; local_processes: processes on this machine (each gets its share);
    launcher_precision: what `accelerate launch --mixed_precision` (ACCELERATE_MIXED_PRECISION) asked for.
    """
    gpu = device_type == "cuda"
    chosen: dict[str, Any] = {}
    reasons = []
    if config.mixed_precision == "auto":
        if launcher_precision not in (None, "", "no"):  # `accelerate launch` always sets it, "no" unless asked
            chosen["mixed_precision"] = launcher_precision
            reasons.append(f"mixed precision {launcher_precision} (from accelerate launch)")
        elif gpu and bf16_supported:
            chosen["mixed_precision"] = "bf16"
            reasons.append("mixed precision bf16 (auto: a GPU with bf16)")
        else:
            chosen["mixed_precision"] = "no"
            reasons.append(f"fp32 (auto: {'this GPU has no bf16' if gpu else 'CPU'})")
    if config.channels_last is None:
        chosen["channels_last"] = gpu
        reasons.append(f"{'channels_last' if gpu else 'NCHW'} (auto: {'GPU' if gpu else 'CPU'})")
    if config.workers is None:
        share = max(1, cpus // max(1, local_processes))
        # On a GPU the main process only queues kernels: the rest of its share decodes. On a CPU the workers
        # compete with training for the same cores.
        chosen["workers"] = min(MAX_AUTO_WORKERS, max(1, share - 1)) if gpu else min(4, share)
        reasons.append(f"{chosen['workers']} loader workers (auto: {cpus} CPUs, {local_processes} local process(es))")
    if config.augment_on == "auto":
        chosen["augment_on"] = "device" if gpu else "workers"
        reasons.append(f"views drawn in the {chosen['augment_on']} (auto: {'GPU' if gpu else 'CPU'})")
    return dataclasses.replace(config, **chosen), reasons


def launch(
    config: TrainConfig, accelerator: Accelerator | None = None, **accelerator_args: Any
) -> tuple[TrainConfig, Accelerator, list[str]]:
    """The Accelerator for whatever was launched and the config resolved for its device (see the module doc)."""
    use_gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    if accelerator is not None:
        use_gpu = accelerator.device.type == "cuda"
    resolved, reasons = resolve_device_defaults(
        config,
        "cuda" if use_gpu else "cpu",
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        launcher_precision=os.environ.get("ACCELERATE_MIXED_PRECISION") if accelerator is None else None,
        bf16_supported=use_gpu and torch.cuda.is_bf16_supported(),
    )
    accelerator = launched_accelerator(
        config.batch_size, accelerator=accelerator, mixed_precision=resolved.mixed_precision, **accelerator_args
    )
    if accelerator.mixed_precision != resolved.mixed_precision:  # a caller's own Accelerator decides
        resolved = dataclasses.replace(resolved, mixed_precision=accelerator.mixed_precision)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN picks the fastest kernels once
        reasons.append("cuDNN autotuner on")
    return resolved, accelerator, reasons


@dataclass
class TrainingState:
    """What one training step needs, small and explicit. `query` is what Accelerate prepared (DDP-wrapped when
    distributed); `modules` are what a checkpoint saves."""

    accelerator: Accelerator
    query: nn.Module
    key: Encoder
    queue: NegativeQueue
    optimizer: torch.optim.Optimizer
    settings: StepSettings
    bn_splits: int  # BatchNorm groups this process runs
    memory_format: torch.memory_format
    backbone_args: dict[str, Any]  # what timm.create_model was given (run.json and the export record it)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"query": self.accelerator.unwrap_model(self.query), "key": self.key, "queue": self.queue}

    def train(self) -> None:
        self.query.train()
        self.key.train()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, images_q: Tensor, images_k: Tensor, labels: Tensor, *, step: int, mixing: bool) -> StepOutput:
        return training_step(
            self.query,
            self.key,
            self.queue,
            self.optimizer,
            self.accelerator,
            images_q,
            images_k,
            labels,
            step=step,
            mixing=mixing,
            settings=self.settings,
            bn_splits=self.bn_splits,
        )


def initial_encoder(config: TrainConfig) -> tuple[Encoder, dict[str, Any]]:
    """The query encoder at step 0 and the arguments its backbone was built with. Its `.backbone` is the exact
    untrained reference every claim of learning is measured against (same architecture, same init, same seed)."""
    build = backbone_args(config.model, init=config.init, image_size=config.image_size)
    torch.manual_seed(config.seed)  # timm initialises from the global generator
    return Encoder(create_backbone(config.model, **build), config.proj_dim), build


def build_training_state(config: TrainConfig, accelerator: Accelerator) -> TrainingState:
    """Both encoders from the same seeded weights on every rank, the queue, SGD, prepared by Accelerate; with
    `config.compile`, compiled after DDP wraps the query (so its gradient all-reduce overlaps the backward)."""
    query, build = initial_encoder(config)
    key = make_key_encoder(query)
    queue = NegativeQueue(config.queue_size, config.proj_dim, generator=generator(config.seed, "queue_init"))
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    query.to(memory_format=memory_format)
    key.to(accelerator.device, memory_format=memory_format)
    queue.to(accelerator.device)
    optimizer = torch.optim.SGD(
        query.parameters(), lr=config.base_lr, momentum=config.sgd_momentum, weight_decay=config.weight_decay
    )
    query, optimizer = accelerator.prepare(query, optimizer)
    if config.compile:  # in place, so state dicts keep their names; Accelerate would compile only the query
        query.compile()
        key.compile()
    return TrainingState(
        accelerator=accelerator,
        query=query,
        key=key,
        queue=queue,
        optimizer=optimizer,
        settings=StepSettings.of(config),
        bn_splits=local_bn_splits(config.batchnorm_groups, accelerator.num_processes, config.batch_size),
        memory_format=memory_format,
        backbone_args=build,
    )
