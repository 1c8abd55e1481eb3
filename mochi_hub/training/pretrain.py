"""`mochi train`: MoCo-v2 + MoCHi pretraining, the only owner of the Accelerate loop for pretraining.

    dataset -> two seeded MoCo-v2 views (views.py) -> training_step (step.py) per batch -> metrics and
    checkpoints at their cadence -> after the last step, the backbone alone as a timm folder (export.py).

Determinism: the data order, each image's augmentation, the shuffle-BN permutation and the MoCHi plan
are all drawn from named seed streams at (epoch or step, index) (seeding.py), never from a running RNG,
so a resumed run sees exactly the batches and plans an uninterrupted one would have.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor

from mochi_hub.config import TrainConfig, fit_to_data, resume_differences, train_config_from_dict
from mochi_hub.core.console import progress_bar
from mochi_hub.core.distributed import all_ranks_true, broadcast_buffers, check_shared_folder, on_main_process
from mochi_hub.core.memory import check_fits
from mochi_hub.core.persist import StateFileError, output_dir
from mochi_hub.data.datasets import missing_classes_note
from mochi_hub.data.views import BatchViews, PretrainingLoader, loader_output, open_dataset, pretraining_views
from mochi_hub.errors import DiskFullError, InputError, OptionError, UserError
from mochi_hub.evaluate.monitor import KnnMonitor
from mochi_hub.method.metrics import alignment, false_negative_rate, proxy_top1, uniformity
from mochi_hub.method.mixing import hardest_negatives
from mochi_hub.method.model import backbone_args, structural_args
from mochi_hub.method.step import StepOutput, cosine_lr
from mochi_hub.training.checkpoint import (
    finish_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from mochi_hub.training.preflight import absolute_folders, training_memory
from mochi_hub.training.runs import MetricsLog, RunSummary, describe_host, write_run_info
from mochi_hub.training.state import TrainingState, build_training_state, launch
from mochi_hub.version import __version__

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """A non-finite loss under --on-nonfinite stop; the message says where and what survived."""


def train(
    config: TrainConfig,
    *,
    accelerator: Accelerator | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """Pretrain, checkpoint, export. Returns the run directory. `accelerator`: an existing one (a library user
    running train and probe in one process); `on_step(step, info)` is for tests. A full disk is one DiskFullError
    naming the file and the last complete checkpoint; nothing half-written is left (persist)."""
    try:
        return _train(config, accelerator, on_step)
    except DiskFullError as error:
        newest = latest_checkpoint(config.output)
        survived = (
            f"the last complete checkpoint is {newest} (--resume auto continues from it once there is room)"
            if newest
            else "no checkpoint was complete yet"
        )
        raise DiskFullError(f"{error}; {survived}") from None


def _train(
    config: TrainConfig, accelerator: Accelerator | None, on_step: Callable[[int, dict[str, Any]], None] | None
) -> Path:
    with output_dir(config.output, "--output") as run_dir:  # a start that fails leaves no empty folder behind
        run = _Run.start(config, run_dir, accelerator)
    try:
        with progress_bar(run.is_main, fields="{task.fields[status]}") as progress:
            task = progress.add_task("mochi train", total=run.last_step, completed=run.step, status="")
            if run.step == 0 and run.monitor is not None:  # the reference a claim of learning must beat
                progress.update(task, status=run.watch(0, "untrained"))
            while run.step < run.last_step:
                epoch, first_batch = divmod(run.step, run.steps_per_epoch)
                mixing = config.uses_mixing and epoch >= config.mixing_warmup_epochs
                run.state.train()
                for batch in run.waited(run.loader.epoch(epoch, start=first_batch)):
                    lr = run.set_lr()
                    images_q, images_k = run.batch_views.of(batch, run.step, run.rank)
                    labels = batch["labels"].to(run.device, non_blocking=True)
                    run.report_bad_files(batch["skipped"])
                    logging_step = run.is_log_step()
                    queue_labels = (
                        run.state.queue.labels.clone() if logging_step else None
                    )  # hard sets index the queue before the enqueue
                    out = run.state.step(images_q, images_k, labels, step=run.step, mixing=mixing)
                    run.note_finite(out, epoch)
                    run.step += 1
                    run.summary.images_seen += config.batch_size
                    if logging_step:
                        status = run.log_step(out, epoch, lr, mixing, queue_labels, labels)
                        progress.update(task, status=status)
                    progress.update(task, completed=run.step, description=run.phase(epoch, mixing))
                    if run.monitor is not None and run.monitor.due(run.step, run.last_step):
                        progress.update(task, status=run.watch(epoch, "trained"))
                    if on_step is not None:
                        on_step(
                            run.step,
                            {
                                "query": run.state.modules["query"],
                                "key": run.state.key,
                                "queue": run.state.queue,
                                "keys": out.k,
                                "finite": bool(out.finite),
                                "applied": out.applied,
                            },
                        )
                    if run.checkpoint_due():
                        run.checkpoint(epoch)
                    if run.step >= run.last_step:
                        break
    except KeyboardInterrupt:
        if run.is_main:
            newest = latest_checkpoint(run.run_dir)
            where = f"the newest checkpoint is {newest}" if newest else "no checkpoint was saved yet"
            log.warning("interrupted at step %d: %s; continue with the same command and --resume auto", run.step, where)
        raise
    return run.finish()


@dataclass
class _Run:
    """Everything one training run holds: small and explicit (the loop above reads it top to bottom)."""

    config: TrainConfig
    run_dir: Path
    accelerator: Accelerator
    loader: PretrainingLoader
    steps_per_epoch: int
    total_steps: int
    last_step: int
    state: TrainingState  # encoders, queue, optimiser: what a step needs
    batch_views: BatchViews
    metrics: MetricsLog
    info: dict[str, Any]
    summary: RunSummary = field(default_factory=RunSummary)
    step: int = 0
    monitor: KnnMonitor | None = None  # the kNN monitor (evaluate/monitor.py), None when off
    first_bad_step: Tensor | None = None  # [] long on the device, -1 until a loss is non-finite (on_nonfinite stop)
    clock: float = field(default_factory=time.perf_counter)
    window: tuple[int, float] = (0, 0.0)  # first step and start time of the throughput window
    data_wait: float = 0.0  # seconds the loop waited for the loader in this window

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --- set-up ------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, config: TrainConfig, run_dir: Path, accelerator: Accelerator | None) -> _Run:
        config = absolute_folders(config)
        trackers = _trackers(config.report_to)
        config, accelerator, device_choices = launch(
            config, accelerator, log_with=trackers or None, project_dir=str(run_dir)
        )
        world = accelerator.num_processes
        build = backbone_args(config.model, init=config.init, image_size=config.image_size)
        check_fits(training_memory(config, world, build), accelerator.device)  # before a byte of it is allocated
        check_shared_folder(run_dir, accelerator, "--output")

        # Data: every image decoded lazily; undecodable ones replaced and reported (DecodedImages).
        source = open_dataset(config, "train")
        views = pretraining_views(source, config, loader_output(config.augment_on, accelerator.device))
        if len(views) < config.batch_size:
            raise InputError(
                f"--dataset {config.dataset}: {len(views)} images, fewer than one global batch "
                f"(--batch-size {config.batch_size})"
            )
        if accelerator.is_main_process and (note := missing_classes_note(source, len(views))):
            log.warning(note)
        config, fitted = fit_to_data(config, len(views))  # a preset measured on another size of data
        # Decided once, on rank 0, from what rank 0 sees: every rank must resume from the same step.
        resume_from = on_main_process(accelerator, lambda: _resume_point(config, run_dir, world))
        steps_per_epoch = len(views) // config.batch_size
        total_steps = config.epochs * steps_per_epoch
        last_step = total_steps if config.max_steps is None else min(total_steps, config.max_steps)
        monitor, monitor_note = KnnMonitor.for_run(config, last_step)

        # Model: the same seeded initial weights on every rank (DDP would broadcast them anyway).
        state = build_training_state(config, accelerator)
        info = {
            "config": config.to_dict(),
            "num_processes": world,
            "global_batch_size": config.batch_size,
            "per_process_batch_size": config.batch_size // world,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "mochi_hub_version": __version__,
            "backbone": {
                "architecture": config.model,
                "init": config.init,
                "model_args": structural_args(state.backbone_args),
                "create_args": state.backbone_args,
            },
            "shuffle_bn": (f"keys shuffled across {world} processes" if world > 1 else "keys shuffled within the batch")
            + f"; BatchNorm in {state.bn_splits} group(s) of {config.batch_size // world // state.bn_splits} "
            "per process, both encoders",
            "dataset_images": len(views),
            "augment_on": config.augment_on,
            "batchnorm_groups": config.batchnorm_groups,
            "device_choices": device_choices,
            "knn_monitor": monitor_note,
            "fitted_to_data": fitted,
        }
        run = cls(
            config=config,
            run_dir=run_dir,
            accelerator=accelerator,
            loader=PretrainingLoader(
                views, config, rank=accelerator.process_index, world=world, pin_memory=accelerator.device.type == "cuda"
            ),
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            last_step=last_step,
            state=state,
            batch_views=BatchViews(config, config.augment_on, accelerator.device, state.memory_format),
            metrics=MetricsLog(run_dir),
            info=info,
            monitor=monitor,
            first_bad_step=torch.full((), -1, dtype=torch.long, device=accelerator.device),
        )
        run.resume_or_reset(resume_from)
        host = describe_host(accelerator.device, world)
        if host not in run.summary.hosts:  # a resumed run may have trained elsewhere before
            run.summary.hosts.append(host)
        if run.is_main:
            write_run_info(run_dir, info)
            run.print_summary()
        if accelerator.log_with:
            accelerator.init_trackers("mochi", config={k: str(v) for k, v in config.to_dict().items()})
        run.window = (run.step, time.perf_counter())
        return run

    def resume_or_reset(self, resume_from: Path | None) -> None:
        if resume_from is None:
            if self.is_main:
                self.metrics.reset()
            return
        try:
            state = load_checkpoint(
                resume_from,
                modules=self.state.modules,
                optimizer=self.state.optimizer,
                rank=self.rank,
                scaler=self.accelerator.scaler,
            )
        except StateFileError as error:
            raise InputError(f"--resume: {error}") from None
        self.step = state["step"]
        self.summary = RunSummary.from_dict(state["summary"])
        self.summary.resumes += 1
        if self.is_main:
            self.metrics.truncate(self.step)
            log.info("resumed from %s at step %d", resume_from, self.step)

    def print_summary(self) -> None:
        c = self.config
        mixing_from = (
            f"mixing MoCHi {tuple(c.mochi)} from epoch {c.mixing_warmup_epochs + 1} "
            f"(step {c.mixing_warmup_epochs * self.steps_per_epoch})"
            if c.uses_mixing
            else "plain MoCo-v2"
        )
        log.info(
            "mochi train: %s (%s init) on %s, %d images at %d px -> %s",
            c.model,
            c.init,
            c.dataset,
            self.info["dataset_images"],
            c.image_size,
            self.run_dir,
        )
        log.info(
            "  %s, %d process(es), global batch %d, %d steps/epoch, %d epochs = %d steps%s",
            self.device,
            self.world,
            c.batch_size,
            self.steps_per_epoch,
            c.epochs,
            self.total_steps,
            f" (stopping at {self.last_step})" if self.last_step < self.total_steps else "",
        )
        log.info(
            "  lr %r (cosine%s), K %d, T %g, m %g; %s; %s; views drawn in the %s",
            c.base_lr,
            f", {c.lr_warmup_epochs} warm-up epochs" if c.lr_warmup_epochs else "",
            c.queue_size,
            c.temperature,
            c.key_momentum,
            mixing_from,
            self.info["shuffle_bn"],
            self.info["augment_on"],
        )
        for note in self.info["fitted_to_data"]:
            log.info("  for these %d images: %s", self.info["dataset_images"], note)
        log.info("  %s", self.info["knn_monitor"])
        if self.info["device_choices"]:
            log.info("  chosen for %s: %s", self.device.type, "; ".join(self.info["device_choices"]))

    # --- per step ----------------------------------------------------------------------------------------

    def waited(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The batches, counting the time the loop waits for each: the share of the window spent waiting says
        whether the loader or the device sets the pace."""
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.data_wait += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    def phase(self, epoch: int, mixing: bool) -> str:
        what = "mixing" if mixing else "warm-up (no mixing)" if self.config.uses_mixing else "MoCo-v2"
        return f"epoch {epoch + 1}/{self.config.epochs} {what}"

    def set_lr(self) -> float:
        lr = cosine_lr(
            self.step, self.total_steps, self.config.base_lr, self.config.lr_warmup_epochs * self.steps_per_epoch
        )
        self.state.set_lr(lr)
        return lr

    def report_bad_files(self, reasons: list[str]) -> None:
        for reason in reasons:
            if reason not in self.summary.bad_files:  # an unusable file is met every epoch: report it once
                self.summary.bad_files.append(reason)
                log.warning("skipped unusable image: %s", reason)

    def is_log_step(self) -> bool:
        return (self.step + 1) % self.config.log_every_steps == 0 or self.step + 1 == self.last_step

    def note_finite(self, out: StepOutput, epoch: int) -> None:
        if not out.applied:  # on_nonfinite skip: the step updated nothing
            self.summary.nonfinite_steps += 1
            if self.is_main:
                log.warning(
                    "step %d: non-finite loss, step skipped (%d so far)", self.step, self.summary.nonfinite_steps
                )
        elif self.config.on_nonfinite == "stop":  # remembered on the device, read when logging or saving
            bad = ~out.finite & (self.first_bad_step < 0)
            self.first_bad_step = torch.where(bad, self.step, self.first_bad_step)

    def require_finite(self) -> None:
        """Stop, keeping the last good checkpoint, if any loss so far was non-finite (one host sync)."""
        if self.config.on_nonfinite != "stop" or bool(all_ranks_true(self.first_bad_step < 0, self.accelerator)):
            return
        bad = int(self.first_bad_step)
        self.summary.nonfinite_steps += 1
        newest = latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {newest}" if newest else "no checkpoint was saved before it"
        raise NonFiniteLossError(
            f"non-finite loss at step {bad} (epoch {bad // self.steps_per_epoch}); {kept}. Lower --lr, or pass "
            "--on-nonfinite skip to skip such steps"
        )

    def log_step(
        self, out: StepOutput, epoch: int, lr: float, mixing: bool, queue_labels: Tensor, labels: Tensor
    ) -> str:
        self.require_finite()
        first, since = self.window
        elapsed = time.perf_counter() - since
        images_per_sec = (self.step - first) * self.config.batch_size / elapsed
        analysis_n = self.config.mochi[0] or min(1024, self.config.queue_size)  # hard-set size of the FN analysis
        with torch.no_grad():
            fnr = false_negative_rate(
                hardest_negatives(out.logits[:, 1 : 1 + self.config.queue_size], analysis_n), queue_labels, labels
            )
            record = {
                "kind": "step",
                "step": self.step,
                "epoch": epoch,
                "loss": out.loss.item(),
                "lr": lr,
                "mixing": mixing,
                "proxy_top1": proxy_top1(out.logits),
                "alignment": alignment(out.q, out.k),
                "uniformity": uniformity(out.q),
                "false_negative_rate": fnr,
                "images_per_sec": images_per_sec,
                "data_wait_share": min(1.0, self.data_wait / elapsed),
            }
        self.window, self.data_wait = (self.step, time.perf_counter()), 0.0
        if self.is_main:
            self.metrics.append(record)
            if self.accelerator.log_with:
                self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=self.step)
        return f"loss {record['loss']:.3f} top-1 {record['proxy_top1']:.2f}" + self.knn_status()

    def watch(self, epoch: int, of: str) -> str:
        """The kNN monitor's point now (every rank takes part: the features are extracted in shards); its time
        is kept out of the training time and the throughput window. Returns the progress line's status."""
        self.require_finite()
        self._add_time()
        point = self.monitor.top1(self.state.modules["query"].backbone, self.accelerator)
        self.summary.monitor_time_s += point["seconds"]
        self.clock = time.perf_counter()  # the monitor's time is not training time
        self.window = (self.window[0], self.window[1] + point["seconds"])
        record = {
            "kind": "monitor",
            "step": self.step,
            "epoch": epoch,
            "of": of,
            "knn_top1": point["knn_top1"],
            "train_s": round(self.summary.wall_time_s, 1),  # training time so far, the monitor's own left out
        }
        self.summary.knn_monitor.append({k: record[k] for k in ("step", "of", "knn_top1")})
        if self.is_main:
            self.metrics.append(record)
            if self.accelerator.log_with:
                self.accelerator.log({f"knn_monitor/{of}": point["knn_top1"]}, step=self.step)
        return self.knn_status()

    def knn_status(self) -> str:
        points = self.summary.knn_monitor
        if not points:
            return ""
        untrained = next((p["knn_top1"] for p in points if p["of"] == "untrained"), None)
        reference = f" (untrained {untrained:.1f})" if untrained is not None and points[-1]["of"] != "untrained" else ""
        return f" kNN {points[-1]['knn_top1']:.1f}{reference}"

    # --- checkpoints and the end -------------------------------------------------------------------------

    def checkpoint_due(self) -> bool:
        every = self.config.save_every_steps
        return (
            self.step % self.steps_per_epoch == 0
            or self.step == self.last_step
            or bool(every and self.step % every == 0)
        )

    def checkpoint(self, epoch: int) -> None:
        self.require_finite()  # a checkpoint is only ever written from finite weights
        end_of_epoch = self.step % self.steps_per_epoch == 0
        self._add_time()
        if end_of_epoch and self.is_main:
            self.metrics.append({"kind": "epoch", "step": self.step, "epoch": epoch, **self.summary.to_dict()})
        if self.world > 1:
            broadcast_buffers(self.state.modules["query"], self.state.key)
        state = {
            "step": self.step,
            "epoch": epoch + 1 if end_of_epoch else epoch,
            "config": self.config.to_dict(),
            "summary": self.summary.to_dict(),
            "num_processes": self.world,
        }
        final = save_checkpoint(
            self.run_dir,
            self.step,
            modules=self.state.modules,
            optimizer=self.state.optimizer,
            state=state,
            is_main=self.is_main,
            rank=self.rank,
            scaler=self.accelerator.scaler,
        )
        self.accelerator.wait_for_everyone()  # every rank's RNG file is in before the folder is published
        if self.is_main:
            finish_checkpoint(final, self.config.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def _add_time(self) -> None:
        now = time.perf_counter()
        self.summary.wall_time_s += now - self.clock
        self.clock = now

    def finish(self) -> Path:
        self.require_finite()
        self._add_time()
        if self.world > 1:  # each process met its own unusable files
            self.summary.bad_files = sorted(set(gather_object(self.summary.bad_files)))
        if self.is_main:
            self.info["summary"] = self.summary.to_dict()
            write_run_info(self.run_dir, self.info)
            from mochi_hub.publish.export import export_run

            out = export_run(self.run_dir)
            log.info("exported the backbone to %s (timm.create_model('local-dir:%s', pretrained=True))", out, out)
            log.info(
                "done: %d images in %.0f s (%.1f images/s), %d skipped, %d non-finite steps, %d resume(s)",
                self.summary.images_seen,
                self.summary.wall_time_s,
                self.summary.to_dict()["images_per_sec"],
                len(self.summary.bad_files),
                self.summary.nonfinite_steps,
                self.summary.resumes,
            )
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return self.run_dir


def _trackers(report_to: str) -> list[str]:
    """Accelerate trackers; one named but not installed is refused (Accelerate would only warn and log nothing)."""
    if report_to == "none":
        return []
    module = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
    if report_to == "auto":  # TensorBoard when installed; found without importing it
        if importlib.util.find_spec("tensorboard") is None:
            log.info("metrics go to metrics.jsonl only (--report-to auto: TensorBoard is not installed)")
            return []
        return ["tensorboard"]
    if importlib.util.find_spec(module[report_to]) is None:
        raise OptionError(
            f"--report-to {report_to}: the {module[report_to]} package is not installed "
            f"(pip install {module[report_to]}, or --report-to none)"
        )
    return [report_to]


def _resume_point(config: TrainConfig, run_dir: Path, world: int) -> Path | None:
    """The checkpoint to continue from, after checking it continues *this* config; refuses to overwrite a run."""
    if config.resume is None:
        if latest_checkpoint(run_dir) is not None:
            raise OptionError(
                f"--output {run_dir} already holds checkpoints: pass --resume auto to continue that run, "
                "or choose another --output (nothing was overwritten)"
            )
        return None
    path = latest_checkpoint(run_dir) if config.resume == "auto" else Path(config.resume)
    if path is None:
        return None  # auto with nothing saved yet: a fresh start
    if not (path / "state.json").is_file():
        raise OptionError(f"--resume {config.resume}: no complete checkpoint at {path}")
    try:
        state = read_state(path)
        saved = train_config_from_dict(state["config"])
        saved = absolute_folders(saved)  # an older run stored a local folder as typed
    except (StateFileError, TypeError, ValueError) as error:
        raise InputError(f"--resume {path}: {error}") from None
    if different := resume_differences(saved, config):
        raise OptionError(f"--resume {path}: incompatible config ({'; '.join(different)})")
    if state.get("num_processes", world) != world:
        log.warning(
            "resuming a run saved by %s process(es) on %d: the data order and the queue continue exactly, "
            "BatchNorm groups and RNG streams follow the new layout",
            state.get("num_processes"),
            world,
        )
    return path
