"""MoCo-v2 + MoCHi pretraining: the only owner of the Accelerate loop.

One step, as in DESIGN.md: two augmented views -> query encoder (grads) and key encoder (momentum copy,
shuffle-BN) -> l_pos, l_neg, MoCHi synthetic logits -> InfoNCE -> SGD step -> momentum update ->
enqueue the keys gathered from every process. After the last step: the backbone alone, as a timm folder.

Determinism: the data order, each image's augmentation, the shuffle-BN permutation and the MoCHi plan
are all drawn from generators seeded by (seed, epoch or step, index), never from a running RNG, so a
resumed run sees exactly the batches and plans an uninterrupted one would have.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from . import __version__
from .augment import TwoViews, moco_v2_transform
from .checkpoint import finish_checkpoint, latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from .config import TrainConfig, train_config_from_dict
from .data import DecodedImages, ImageSource, collate_samples, missing_classes_note, resolve_dataset
from .loss import contrastive_logits, info_nce
from .metrics import alignment, false_negative_rate, proxy_top1, uniformity
from .mixing import NonFiniteError, hardest_negatives, sample_plan
from .model import Encoder, create_backbone, make_key_encoder, momentum_update
from .queue import NegativeQueue

# Settings a resumed run must share with the checkpoint it continues.
RESUME_MUST_MATCH = ("model", "dataset", "image_size", "batch_size", "queue_size", "proj_dim", "mochi",
                     "warmup_epochs", "epochs", "seed", "max_train_images", "temperature", "key_momentum", "lr")


class NonFiniteLossError(RuntimeError):
    pass


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """MoCo-v2's cosine schedule, per step: base_lr at step 0, 0 at the end."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def seeded(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose stream depends only on `parts` (seed, epoch, step, ...)."""
    return torch.Generator(device=device).manual_seed(hash(tuple(parts)) & 0x7FFF_FFFF_FFFF_FFFF)


class GlobalBatches(Sampler[list[int]]):
    """This process's share of each global batch: a seeded permutation per epoch, last partial batch
    dropped, batches before `start` skipped (resume). Rank r takes rows [r*L, (r+1)*L) of every batch."""

    def __init__(self, size: int, global_batch: int, *, seed: int, epoch: int, rank: int, world: int, start: int = 0):
        self.size, self.global_batch, self.seed, self.epoch = size, global_batch, seed, epoch
        self.rank, self.local = rank, global_batch // world
        self.start = start

    def __len__(self) -> int:
        return self.size // self.global_batch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=seeded(self.seed, self.epoch)).tolist()
        for b in range(self.start, self.size // self.global_batch):
            first = b * self.global_batch + self.rank * self.local
            yield order[first:first + self.local]


class SeededAugment:
    """Each image's augmentation drawn from a generator seeded by (seed, epoch, index): reproducible for
    any number of workers and across resumes. torchvision's transforms draw from torch's global RNG,
    so the CPU generator's state is saved and restored around each call (torch.manual_seed or fork_rng
    would also touch every accelerator's generator, ~0.3 ms an image)."""

    def __init__(self, dataset: DecodedImages, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


def pretraining_views(source: ImageSource, config: TrainConfig) -> SeededAugment:
    """The loop's data: the first config.max_train_images images (all by default), each decoded on demand and
    turned into two MoCo-v2 views seeded by (seed, epoch, index)."""
    count = len(source) if config.max_train_images is None else min(len(source), config.max_train_images)
    return SeededAugment(DecodedImages(source, TwoViews(moco_v2_transform(config.image_size)),
                                       strict=config.strict_data, indices=list(range(count))), config.seed)


def epoch_loader(views: SeededAugment, config: TrainConfig, epoch: int, *, rank: int = 0, world: int = 1,
                 start: int = 0, pin_memory: bool = False) -> DataLoader:
    """This process's batches of one epoch, in the seeded order of GlobalBatches, from batch `start` on."""
    views.epoch = epoch
    return DataLoader(views, batch_sampler=GlobalBatches(len(views), config.batch_size, seed=config.seed, epoch=epoch,
                                                         rank=rank, world=world, start=start),
                      num_workers=config.workers, collate_fn=collate_samples, pin_memory=pin_memory,
                      persistent_workers=False)


def launched_accelerator(global_batch: int, **kwargs: Any) -> Accelerator:
    """Accelerate on whatever was launched (one process, accelerate launch, torchrun). Without GPUs,
    several processes need `cpu=True` to form a real gloo group; a plain Accelerator would silently run
    independent single-process copies of the job, so a group of the wrong size is refused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(cpu=world > 1 and not torch.cuda.is_available(), **kwargs)
    if accelerator.num_processes != world:
        raise RuntimeError(f"{world} processes were launched but Accelerate formed a group of "
                           f"{accelerator.num_processes}: refusing to run independent copies of the job")
    if global_batch % accelerator.num_processes:
        raise ValueError(f"--batch-size ({global_batch}) is the global batch and must divide evenly "
                         f"over {accelerator.num_processes} processes")
    return accelerator


def make_accelerator(config: TrainConfig, run_dir: Path) -> Accelerator:
    return launched_accelerator(config.batch_size, mixed_precision=config.mixed_precision,
                                log_with=_trackers(config.report_to) or None, project_dir=str(run_dir))


def _trackers(report_to: str) -> list[str]:
    if report_to == "none":
        return []
    if report_to == "auto":  # TensorBoard when installed; found without importing it
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    return [report_to]


@torch.no_grad()
def shuffled_keys(key_encoder: Encoder, images: Tensor, accelerator: Accelerator, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Key embeddings with shuffle-BN. Returns (this process's keys [L, D], every process's keys [G, D]
    in global batch order, for the queue).

    Several processes: gather all images, run each process on a slice of one shared permutation (the
    same seeded generator on every rank), gather the keys back and unshuffle. So BatchNorm statistics of
    a key never come from the sub-batch that holds its query. One process: the same idea emulated by
    running the key encoder on two shuffled halves of the batch (split BN).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    all_images = accelerator.gather(images) if world > 1 else images  # [G, C, H, W]
    perm = torch.randperm(all_images.shape[0], generator=generator).to(images.device)  # [G]
    splits = world if world > 1 else (2 if images.shape[0] >= 4 else 1)
    if world > 1:
        keys_shuffled = accelerator.gather(key_encoder(all_images[perm].chunk(world)[rank]))  # [G, D]
    else:
        keys_shuffled = torch.cat([key_encoder(part) for part in all_images[perm].chunk(splits)])  # [G, D]
    keys = keys_shuffled[perm.argsort()]  # [G, D] global order
    return keys.chunk(world)[rank], keys


@dataclass
class StepOutput:
    loss: Tensor  # [] float32
    logits: Tensor | None  # [L, 1 + K + s + s'] / temperature; None when an input was non-finite
    q: Tensor  # [L, D] this process's queries
    k: Tensor  # [L, D] this process's keys
    finite: bool  # False: nothing was updated


def training_step(query: torch.nn.Module, key: Encoder, queue: NegativeQueue, optimizer: torch.optim.Optimizer,
                  accelerator: Accelerator, images_q: Tensor, images_k: Tensor, labels: Tensor, *,
                  config: TrainConfig, step: int, mixing: bool) -> StepOutput:
    """One MoCo-v2 + MoCHi step: forward, loss, SGD step, momentum update, enqueue of every process's keys.

    A non-finite loss on any process updates nothing anywhere; the caller decides to stop or go on.
    """
    n_hard, s, s_prime = config.mochi
    world = accelerator.num_processes
    with accelerator.autocast():
        q = query(images_q)  # [L, D]
        k, keys_all = shuffled_keys(key, images_k, accelerator, seeded(config.seed, step, -2, device=q.device))
    plan = sample_plan(q.shape[0], n_hard, s, s_prime, beta_max=config.beta_max,
                       generator=seeded(config.seed, step, accelerator.process_index)) if mixing else None
    try:
        logits, targets = contrastive_logits(q, k, queue.keys, temperature=config.temperature, n_hard=n_hard,
                                             plan=plan)  # [L, 1 + K + s + s']
        loss = info_nce(logits, targets)
        finite = bool(torch.isfinite(loss))
    except NonFiniteError:
        logits, loss, finite = None, torch.tensor(float("nan")), False
    if world > 1:  # every process must take the same branch, or the gradient all-reduce waits forever
        finite = bool(accelerator.gather(torch.tensor([finite], device=q.device)).all())
    optimizer.zero_grad(set_to_none=True)
    if finite:
        accelerator.backward(loss)
        optimizer.step()
        momentum_update(key, accelerator.unwrap_model(query), config.key_momentum)
        labels_all = accelerator.gather(labels) if world > 1 else labels  # [G]
        queue.enqueue(keys_all.float(), labels_all)
    return StepOutput(loss, logits, q, k, finite)


@dataclass
class RunSummary:
    """What the run did, saved in every checkpoint and in run.json at the end."""

    images_seen: int = 0
    resumes: int = 0
    nonfinite_steps: int = 0
    wall_time_s: float = 0.0
    bad_files: list[str] = field(default_factory=list)  # "path: reason", each unusable file once

    def to_dict(self) -> dict[str, Any]:
        throughput = self.images_seen / self.wall_time_s if self.wall_time_s else 0.0
        return {"images_seen": self.images_seen, "images_skipped": len(self.bad_files), "resumes": self.resumes,
                "nonfinite_steps": self.nonfinite_steps, "wall_time_s": round(self.wall_time_s, 2),
                "images_per_sec": round(throughput, 2), "bad_files": self.bad_files}


def _check_output_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--output {run_dir}: not writable ({error.strerror})") from None


def _resume_point(config: TrainConfig, run_dir: Path) -> Path | None:
    if config.resume is None:
        return None
    path = latest_checkpoint(run_dir) if config.resume == "auto" else Path(config.resume)
    if path is None:
        return None  # auto with nothing saved yet: a fresh start
    if not (path / "state.json").is_file():
        raise ValueError(f"--resume {config.resume}: no complete checkpoint at {path}")
    saved = train_config_from_dict(read_state(path)["config"])
    different = [f"{name}: checkpoint {getattr(saved, name)!r}, now {getattr(config, name)!r}"
                 for name in RESUME_MUST_MATCH if getattr(saved, name) != getattr(config, name)]
    if different:
        raise ValueError(f"--resume {path}: incompatible config ({'; '.join(different)})")
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop lines a crashed attempt logged past the checkpoint: they will be logged again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def train(config: TrainConfig, *, on_step=None) -> Path:
    """Pretrain, checkpoint, export. Returns the run directory. `on_step(step, info)` is for tests."""
    run_dir = Path(config.output)
    _check_output_writable(run_dir)
    accelerator = make_accelerator(config, run_dir)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    resume_from = _resume_point(config, run_dir)
    if resume_from is None and config.resume is None and latest_checkpoint(run_dir) is not None:
        raise ValueError(f"--output {run_dir} already holds checkpoints: pass --resume auto to continue that run, "
                         "or choose another --output (nothing was overwritten)")
    started = time.perf_counter()

    # Data: every image decoded lazily; undecodable ones replaced and reported (DecodedImages).
    source = resolve_dataset(config.dataset, "train")
    views = pretraining_views(source, config)
    count = len(views)
    if count < config.batch_size:
        raise ValueError(f"--dataset {config.dataset}: {count} images, fewer than one global batch "
                         f"(--batch-size {config.batch_size})")
    if is_main and (note := missing_classes_note(source, count)):
        print(f"warning: {note}", flush=True)
    steps_per_epoch = count // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    last_step = total_steps if config.max_steps is None else min(total_steps, config.max_steps)

    # Model: the same seed on every rank gives the same initial weights (DDP would broadcast them anyway).
    torch.manual_seed(config.seed)
    query = Encoder(create_backbone(config.model), config.proj_dim)
    key = make_key_encoder(query)
    queue = NegativeQueue(config.queue_size, config.proj_dim, generator=seeded(config.seed, -1))
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    query.to(memory_format=memory_format)
    key.to(device, memory_format=memory_format)
    queue.to(device)
    optimizer = torch.optim.SGD(query.parameters(), lr=config.base_lr, momentum=config.sgd_momentum,
                                weight_decay=config.weight_decay)
    query, optimizer = accelerator.prepare(query, optimizer)
    modules = {"query": accelerator.unwrap_model(query), "key": key, "queue": queue}

    summary, step = RunSummary(), 0
    metrics_file = run_dir / "metrics.jsonl"
    if resume_from is not None:
        state = load_checkpoint(resume_from, modules=modules, optimizer=optimizer, rank=rank)
        step = state["step"]
        summary = RunSummary(**{k: v for k, v in state["summary"].items() if k in RunSummary.__dataclass_fields__})
        summary.resumes += 1
        if is_main:
            _truncate_metrics(metrics_file, step)
            accelerator.print(f"resumed from {resume_from} at step {step}")
    elif is_main and metrics_file.exists():
        metrics_file.unlink()  # a fresh run in a used folder starts a fresh log

    run_info = {"config": config.to_dict(), "num_processes": world, "global_batch_size": config.batch_size,
                "per_process_batch_size": config.batch_size // world, "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "mochi_hub_version": __version__,
                "shuffle_bn": "across processes" if world > 1 else "emulated: key encoder on 2 shuffled splits"}
    if is_main:
        _write_json(run_dir / "run.json", run_info)
        print(json.dumps(run_info["config"], indent=2))
        accelerator.print(f"{world} process(es), global batch {config.batch_size}, shuffle-BN {run_info['shuffle_bn']}")
    if accelerator.log_with:
        accelerator.init_trackers("mochi", config={k: str(v) for k, v in config.to_dict().items()})

    analysis_n = config.mochi[0] or min(1024, config.queue_size)  # hard-set size for the false-negative analysis

    progress = tqdm(total=last_step, initial=step, disable=not is_main, desc="mochi train", unit="step")
    window_images, window_start = 0, time.perf_counter()

    def checkpoint(epoch: int) -> None:
        if world > 1:  # BN statistics follow each rank's shard: publish rank 0's, as DDP does at each forward
            for buffer in [*modules["query"].buffers(), *key.buffers()]:
                torch.distributed.broadcast(buffer, src=0)
        state = {"step": step, "epoch": epoch, "config": config.to_dict(), "summary": summary.to_dict(),
                 "num_processes": world}
        final = save_checkpoint(run_dir, step, modules=modules, optimizer=optimizer, state=state,
                                is_main=is_main, rank=rank)
        accelerator.wait_for_everyone()  # every rank's RNG file is in before the folder is published
        if is_main:
            finish_checkpoint(final, config.keep_checkpoints)
        accelerator.wait_for_everyone()

    while step < last_step:
        epoch, start_batch = divmod(step, steps_per_epoch)
        loader = epoch_loader(views, config, epoch, rank=rank, world=world, start=start_batch,
                              pin_memory=device.type == "cuda")
        mixing = config.uses_mixing and epoch >= config.warmup_epochs
        query.train()
        key.train()
        for batch in loader:
            lr = cosine_lr(step, total_steps, config.base_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images_q, images_k = (v.to(device, non_blocking=True, memory_format=memory_format) for v in batch["images"])
            labels = batch["labels"].to(device)
            for reason in batch["skipped"]:
                if reason not in summary.bad_files:  # an unusable file is met every epoch: report it once
                    summary.bad_files.append(reason)
                    print(f"skipped unusable image: {reason}", flush=True)

            logging = (step + 1) % config.log_every_steps == 0 or step + 1 == last_step
            queue_labels = queue.labels.clone() if logging else None  # the hard set indexes the queue before the enqueue
            out = training_step(query, key, queue, optimizer, accelerator, images_q, images_k, labels,
                                config=config, step=step, mixing=mixing)
            if not out.finite:
                summary.nonfinite_steps += 1
                if config.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step} (epoch {epoch}); the last good checkpoint is kept in "
                        f"{run_dir / 'checkpoints'}. Lower --lr, or pass --on-nonfinite skip to skip such steps")
                accelerator.print(f"step {step}: non-finite loss, step skipped ({summary.nonfinite_steps} so far)")

            step += 1
            summary.images_seen += config.batch_size
            window_images += config.batch_size
            progress.update(1)
            if out.finite and logging:
                with torch.no_grad():
                    fnr = false_negative_rate(hardest_negatives(out.logits[:, 1:1 + config.queue_size], analysis_n),
                                              queue_labels, labels)
                    elapsed = time.perf_counter() - window_start
                    record = {"kind": "step", "step": step, "epoch": epoch, "loss": out.loss.item(), "lr": lr,
                              "mixing": mixing, "proxy_top1": proxy_top1(out.logits),
                              "alignment": alignment(out.q, out.k), "uniformity": uniformity(out.q),
                              "false_negative_rate": fnr, "images_per_sec": window_images / elapsed}
                window_images, window_start = 0, time.perf_counter()
                progress.set_postfix(loss=f"{record['loss']:.3f}", top1=f"{record['proxy_top1']:.2f}")
                if is_main:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    if accelerator.log_with:
                        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
            if on_step is not None:
                on_step(step, {"query": modules["query"], "key": key, "queue": queue, "keys": out.k, "finite": out.finite})
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch or step == last_step or (config.save_every_steps and step % config.save_every_steps == 0):
                summary.wall_time_s += time.perf_counter() - started
                started = time.perf_counter()
                if end_of_epoch and is_main:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps({"kind": "epoch", "step": step, "epoch": epoch, **summary.to_dict()}) + "\n")
                checkpoint(epoch if not end_of_epoch else epoch + 1)
            if step >= last_step:
                break
    progress.close()

    summary.wall_time_s += time.perf_counter() - started
    if world > 1:  # each process met its own unusable files
        summary.bad_files = sorted(set(gather_object(summary.bad_files)))
    if is_main:
        run_info["summary"] = summary.to_dict()
        _write_json(run_dir / "run.json", run_info)
        _export(run_dir)
        accelerator.print(f"done: {json.dumps(summary.to_dict())}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _export(run_dir: Path) -> None:
    from .export import export_run

    out = export_run(run_dir)
    print(f"exported the backbone to {out} (timm.create_model('local-dir:{out}', pretrained=True))")
