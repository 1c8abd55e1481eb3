"""Benchmark of `mochi train` on this CPU (issue 3's targets): the MoCHi step against the MoCo-v2 step,
and training images/s against lightly's MoCo building blocks.

1. ``step``: one training step of MoCHi (1024, 1024, 512) against the same step of MoCo-v2 (MoCHi
   (0, 0, 0)), resnet18 (timm), 64 px, batch 64, K = 16384, fp32. Both models live in one process,
   start from the same weights and see the same pre-augmented real Fashion-MNIST batches (decoded and
   augmented once, exactly as the loop does: ``SeededAugment`` over ``DecodedImages`` in ``GlobalBatches``
   order), so data loading is out of the measurement. Steps alternate, ABBA ABBA ... (the order flips
   every pair, so neither variant always runs right after the other); after ``--step-warmup`` untimed
   pairs, ``--step-pairs`` pairs are timed. Reported: each variant's median step time, the ratio of the
   medians, and the median of the per-pair ratios (robust to slow drift on a shared machine).
   Target: MoCHi / MoCo-v2 <= 1.02.

   The step is ``mochi_hub.train.training_step``, the very function the loop calls (``bench_step``
   only adds the loop's lr schedule), so the bench cannot drift from the loop.

2. ``throughput``: training images/s of ``mochi train`` against the same backbone, batch, queue,
   projection head, optimiser, schedule and augmentation written with lightly's MoCo building blocks
   (``MoCoProjectionHead``, ``NTXentLoss(memory_bank_size=(K, 128))``, ``deactivate_requires_grad``,
   ``update_momentum``, ``MoCoV2Transform``, ``cosine_schedule``), following lightly's documented MoCo
   example, on the same Fashion-MNIST images through a DataLoader with the same workers and batch.
   Ours is ``mochi_hub.train.train(TrainConfig(...))``, the function behind ``mochi train``, read
   back from the run's metrics.jsonl (``images_per_sec`` of the step lines: one window every
   ``--window`` steps). Lightly's loop is timed with the same windows. The first window (worker start,
   allocator warm-up) is dropped for both. Two settings: fp32, and bf16 + channels_last (ours:
   ``mixed_precision="bf16", channels_last=True``; lightly: ``torch.autocast("cpu", torch.bfloat16)`` +
   channels_last). Ours runs MoCo-v2 (mochi 0,0,0), like for like with lightly's MoCo; MoCHi
   (1024, 1024, 512) with no warm-up epochs is run too, for information. Runs alternate
   (ours, lightly, MoCHi; the order reversed every round) for ``--rounds`` rounds; per setting the
   median of all steady windows is reported, and ours / lightly. Target: ours / lightly >= 1.0.

   Differences that remain, by design of each library: ours emulates shuffle-BN on one device (the key
   encoder runs on two shuffled halves of the batch), computes logits and loss in fp32 under bf16,
   keeps labels in the queue, and draws each image's augmentation from a seeded generator; lightly's
   example has no shuffle-BN, and its loss runs under autocast. ``mochi train`` also writes a checkpoint
   and the export at the end of each run (after the last window, so outside the measurement).

``data`` (diagnostic, between the two): the CPU cost per image of each side's data pipeline (decode, two
augmented views, collate), one thread as in a DataLoader worker, alternated blocks of one batch. With
2 cores, the workers share the CPUs with the training step, so this cost shows up in part 2.

Part 1 also records each step's process CPU time (all threads). On a machine shared with other jobs,
wall time with 2 OpenMP threads is bimodal (a barrier waits whenever the other thread is descheduled);
``--threads 1`` removes the barriers, and its CPU time is then a load-independent measure of each step's
work, the fair way to compare MoCHi and MoCo-v2 there. ``--check-loop N`` (on in ``--quick``) then
checks that ``bench_step`` gives exactly the losses ``mochi_hub.train.train`` logs over N steps for the
same seed (the same weights, batches, shuffle-BN permutations and MoCHi plans), and fails the run if not.

Every measurement runs in its own process, forked from this one after the imports (Accelerate's
state is a per-process singleton whose mixed precision cannot change, and each run should start
from a clean allocator); this process imports but never computes, so the forks are safe. Each run's
console output goes to a log next to the JSON (``<out>.logs/``).

Run (the issue's sizes; about 15 minutes on 2 quiet cores):

    .venv/bin/pip install -e '.[bench]'     # lightly, bench-only extra
    .venv/bin/python bench/train.py
    .venv/bin/python bench/train.py --parts step --step-pairs 20        # the step target only
    .venv/bin/python bench/train.py --parts step --threads 1            # the step on a busy machine
    .venv/bin/python bench/train.py --parts data,throughput --rounds 1  # the lightly comparison only
    .venv/bin/python bench/train.py --check-loop 3                      # also prove bench_step == the loop's step
    .venv/bin/python bench/train.py --quick                             # tiny smoke run (~20 s quiet, ~1 min busy)

Prints a table and writes JSON (``--out``, default bench/results/train.json) with every raw number,
versions, CPU and the command.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from itertools import islice
from pathlib import Path
from typing import Any, Callable

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train.json"

# Issue 3's targets.
TARGET_STEP_RATIO = 1.02  # MoCHi step / MoCo-v2 step, at most
TARGET_THROUGHPUT_RATIO = 1.0  # ours images/s / lightly images/s, at least

# The issue's sizes, and tiny ones for --quick. `mochi` is MoCHi (N, s, s'); MoCo-v2 is (0, 0, 0).
FULL = dict(model="resnet18", image_size=64, batch_size=64, queue_size=16384, mochi=(1024, 1024, 512),
            proj_dim=128, dataset="fashion-mnist")
QUICK = dict(model="test_resnet", image_size=16, batch_size=8, queue_size=64, mochi=(16, 16, 8),
             proj_dim=128, dataset="fashion-mnist")
MOCO = (0, 0, 0)
PRECISIONS = {"fp32": dict(mixed_precision="no", channels_last=False),
              "bf16+cl": dict(mixed_precision="bf16", channels_last=True)}


# ----------------------------------------------------------------------------------------------------
# Shared settings


def train_config(sizes: dict, *, mochi: tuple[int, int, int], precision: str, workers: int, seed: int,
                 **extra: Any):
    """The TrainConfig both parts are built from: the single source of every hyperparameter
    (lr, momentum, weight decay, temperature, key momentum, beta_max) for ours and for lightly's loop."""
    from mochi_hub.config import TrainConfig

    return TrainConfig(dataset=sizes["dataset"], model=sizes["model"], image_size=sizes["image_size"],
                       batch_size=sizes["batch_size"], queue_size=sizes["queue_size"], proj_dim=sizes["proj_dim"],
                       mochi=mochi, warmup_epochs=0, epochs=1, workers=workers, seed=seed, report_to="none",
                       **PRECISIONS[precision], **extra)


# ----------------------------------------------------------------------------------------------------
# Part 1: the training step, MoCHi against MoCo-v2, alternated in one process


def bench_step(state: dict, batch: dict, step: int) -> float:
    """One step of the training loop (mochi_hub.train.training_step, the same function the loop calls,
    with the loop's lr schedule); returns its loss."""
    from mochi_hub.train import cosine_lr, training_step

    config, accelerator, optimizer = state["config"], state["accelerator"], state["optimizer"]
    device, memory_format = accelerator.device, state["memory_format"]
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(step, state["total_steps"], config.base_lr)
    images_q, images_k = (v.to(device, non_blocking=True, memory_format=memory_format) for v in batch["images"])
    out = training_step(state["query"], state["key"], state["queue"], optimizer, accelerator, images_q, images_k,
                        batch["labels"].to(device), config=config, step=step, mixing=state["mixing"])
    if not out.finite:
        raise RuntimeError(f"non-finite loss at step {step} ({config.mochi})")
    return float(out.loss.detach())


def step_child(settings: dict) -> dict:
    """Both variants in this process, same initial weights, same batches, steps alternated."""
    import torch
    from accelerate import Accelerator

    from mochi_hub.data import collate_samples, resolve_dataset
    from mochi_hub.model import Encoder, create_backbone, make_key_encoder
    from mochi_hub.queue import NegativeQueue
    from mochi_hub.train import GlobalBatches, pretraining_views, seeded

    sizes, seed, precision = settings["sizes"], settings["seed"], settings["precision"]
    configs = {"moco": train_config(sizes, mochi=MOCO, precision=precision, workers=0, seed=seed),
               "mochi": train_config(sizes, mochi=tuple(sizes["mochi"]), precision=precision, workers=0, seed=seed)}
    base = configs["moco"]
    accelerator = Accelerator(cpu=True, mixed_precision=base.mixed_precision)

    # Real batches, decoded and augmented once, exactly as the loop would produce them.
    started = time.perf_counter()
    source = resolve_dataset(base.dataset, "train")
    views = pretraining_views(source, base)
    order = GlobalBatches(len(source), base.batch_size, seed=seed, epoch=0, rank=0, world=1)
    batches = [collate_samples([views[i] for i in indices]) for indices in islice(order, settings["batches"])]
    data_s = time.perf_counter() - started

    torch.manual_seed(seed)
    first = Encoder(create_backbone(base.model), base.proj_dim)
    memory_format = torch.channels_last if base.channels_last else torch.contiguous_format
    states = {}
    for name, config in configs.items():
        query = copy.deepcopy(first)  # the same initial weights for both variants
        key = make_key_encoder(query)
        queue = NegativeQueue(config.queue_size, config.proj_dim, generator=seeded(seed, -1))
        query.to(memory_format=memory_format)
        key.to(accelerator.device, memory_format=memory_format)
        queue.to(accelerator.device)
        optimizer = torch.optim.SGD(query.parameters(), lr=config.base_lr, momentum=config.sgd_momentum,
                                    weight_decay=config.weight_decay)
        query, optimizer = accelerator.prepare(query, optimizer)
        query.train()
        key.train()
        states[name] = dict(config=config, accelerator=accelerator, query=query, key=key, queue=queue,
                            optimizer=optimizer,
                            memory_format=memory_format, mixing=config.uses_mixing,
                            total_steps=len(source) // config.batch_size)

    times: dict[str, list[float]] = {"moco": [], "mochi": []}
    cpu_times: dict[str, list[float]] = {"moco": [], "mochi": []}  # process CPU time, all threads
    losses: dict[str, list[float]] = {"moco": [], "mochi": []}
    for i in range(settings["warmup"] + settings["pairs"]):
        batch = batches[i % len(batches)]
        for name in (("moco", "mochi") if i % 2 == 0 else ("mochi", "moco")):
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = bench_step(states[name], batch, i)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            losses[name].append(loss)  # every step, warm-up included: the loop check compares the first ones
            if i >= settings["warmup"]:
                times[name].append(elapsed * 1e3)
                cpu_times[name].append(elapsed_cpu * 1e3)
    return dict(times_ms=times, cpu_times_ms=cpu_times, losses=losses, threads=torch.get_num_threads(),
                data_prep_s=data_s,
                settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in base.to_dict().items()
                          if k in ("model", "image_size", "batch_size", "queue_size", "proj_dim", "temperature",
                                   "mixed_precision", "channels_last", "seed")},
                mochi=list(configs["mochi"].mochi))


def check_against_loop(raw: dict, settings: dict, logs: Path) -> dict:
    """The first steps of bench_step must give the losses `mochi_hub.train.train` logs for the same seed
    (same weights, batches, shuffle-BN permutations and MoCHi plans): proof that part 1 times the loop's step."""
    steps = min(settings["check_steps"], settings["warmup"] + settings["pairs"], settings["batches"])
    out: dict[str, Any] = dict(steps=steps, variants={})
    for name, mochi in (("moco", MOCO), ("mochi", tuple(settings["sizes"]["mochi"]))):
        loop = run_forked(ours_child, dict(sizes=settings["sizes"], seed=settings["seed"], threads=settings["threads"],
                                           precision=settings["precision"], mochi=mochi, workers=0, window=1,
                                           windows=steps - 1), logs / f"loop-check-{name}.log")["losses"]
        bench = raw["losses"][name][:steps]
        match = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(bench, loop))
        out["variants"][name] = dict(bench_step=bench, loop=loop, match=match)
    out["match"] = all(v["match"] for v in out["variants"].values())
    return out


def summarise_steps(raw: dict) -> dict:
    moco, mochi = raw["times_ms"]["moco"], raw["times_ms"]["mochi"]
    paired = [b / a for a, b in zip(moco, mochi)]
    ratio = statistics.median(mochi) / statistics.median(moco)
    cpu_moco, cpu_mochi = raw["cpu_times_ms"]["moco"], raw["cpu_times_ms"]["mochi"]
    return dict(moco_median_ms=statistics.median(moco), mochi_median_ms=statistics.median(mochi),
                ratio_of_medians=ratio, median_paired_ratio=statistics.median(paired),
                # Diagnostic, less sensitive to other processes on the machine than wall time.
                cpu_moco_median_ms=statistics.median(cpu_moco), cpu_mochi_median_ms=statistics.median(cpu_mochi),
                cpu_ratio_of_medians=statistics.median(cpu_mochi) / statistics.median(cpu_moco),
                pairs=len(paired), target=f"MoCHi / MoCo-v2 <= {TARGET_STEP_RATIO}",
                met=ratio <= TARGET_STEP_RATIO)


# ----------------------------------------------------------------------------------------------------
# Part 2: images/s of `mochi train` and of lightly's MoCo building blocks


def ours_child(settings: dict) -> dict:
    """mochi_hub.train.train, the function behind `mochi train`; images/s from its metrics.jsonl."""
    from mochi_hub.train import train

    window, windows = settings["window"], settings["windows"]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        config = train_config(settings["sizes"], mochi=tuple(settings["mochi"]), precision=settings["precision"],
                              workers=settings["workers"], seed=settings["seed"], output=tmp,
                              max_steps=window * (windows + 1), log_every_steps=window)
        started = time.perf_counter()
        train(config)
        wall = time.perf_counter() - started
        lines = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if line]
    steps = [line for line in lines if line["kind"] == "step"]
    if len(steps) != windows + 1:
        raise RuntimeError(f"expected {windows + 1} step lines in metrics.jsonl, got {len(steps)}")
    return dict(window_images_per_sec=[line["images_per_sec"] for line in steps],
                losses=[line["loss"] for line in steps], wall_s=wall)


class LightlyViews:
    """The same source images as ours (as RGB, like ours), through lightly's MoCoV2Transform with our
    sizes and probabilities (lightly's defaults for MoCo-v2, stated explicitly; our normalisation)."""

    def __init__(self, source, image_size: int):
        from lightly.transforms.moco_transform import MoCoV2Transform

        from mochi_hub.augment import MEAN, STD

        self.source = source
        self.transform = MoCoV2Transform(input_size=image_size, cj_prob=0.8, cj_strength=1.0, cj_bright=0.4,
                                         cj_contrast=0.4, cj_sat=0.4, cj_hue=0.1, min_scale=0.2,
                                         random_gray_scale=0.2, gaussian_blur=0.5, sigmas=(0.1, 2.0), hf_prob=0.5,
                                         normalize={"mean": list(MEAN), "std": list(STD)})

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source[index]
        return self.transform(image.convert("RGB")), label


def lightly_child(settings: dict) -> dict:
    """MoCo-v2 written with lightly's building blocks, after lightly's documented MoCo example, with
    our hyperparameters (from the same TrainConfig) and the same timm backbone and images."""
    import timm
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from torch.utils.data import DataLoader

    from mochi_hub.data import resolve_dataset

    config = train_config(settings["sizes"], mochi=MOCO, precision=settings["precision"],
                          workers=settings["workers"], seed=settings["seed"])
    window, windows = settings["window"], settings["windows"]
    last_step = window * (windows + 1)

    source = resolve_dataset(config.dataset, "train")
    loader = DataLoader(LightlyViews(source, config.image_size), batch_size=config.batch_size, shuffle=True,
                        drop_last=True, num_workers=config.workers,
                        generator=torch.Generator().manual_seed(config.seed))
    total_steps = config.epochs * (len(source) // config.batch_size)  # the cosine schedule ours uses

    torch.manual_seed(config.seed)
    backbone = timm.create_model(config.model, num_classes=0)
    width = backbone.num_features
    head = MoCoProjectionHead(width, width, config.proj_dim)
    backbone_momentum, head_momentum = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_momentum)
    deactivate_requires_grad(head_momentum)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    for module in (backbone, head, backbone_momentum, head_momentum):
        module.to(memory_format=memory_format)
        module.train()
    criterion = NTXentLoss(temperature=config.temperature, memory_bank_size=(config.queue_size, config.proj_dim))
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=config.base_lr,
                                momentum=config.sgd_momentum, weight_decay=config.weight_decay)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if config.mixed_precision == "bf16" \
        else contextlib.nullcontext

    rates, losses = [], []
    started = window_start = time.perf_counter()
    for step, (views, _labels) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = cosine_schedule(step, total_steps, config.base_lr, 0.0)
        x_query, x_key = (v.to(memory_format=memory_format) for v in views)
        update_momentum(backbone, backbone_momentum, m=config.key_momentum)
        update_momentum(head, head_momentum, m=config.key_momentum)
        with autocast():
            query = head(backbone(x_query))
            key = head_momentum(backbone_momentum(x_key)).detach()
            loss = criterion(query, key)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % window == 0:
            rates.append(window * config.batch_size / (time.perf_counter() - window_start))
            losses.append(float(loss.detach()))
            window_start = time.perf_counter()
        if step + 1 == last_step:
            break
    if len(rates) != windows + 1:
        raise RuntimeError(f"lightly loop: expected {windows + 1} windows, got {len(rates)}")
    return dict(window_images_per_sec=rates, losses=losses, wall_s=time.perf_counter() - started)


def data_child(settings: dict) -> dict:
    """Diagnostic: CPU cost of producing one batch of two views, ours against lightly's, alternated blocks,
    one thread (as in a DataLoader worker). On 2 cores the workers share the CPUs with the training step,
    so this cost is part of the images/s of part 2."""
    import torch
    from torch.utils.data import default_collate

    from mochi_hub.data import collate_samples, resolve_dataset
    from mochi_hub.train import pretraining_views

    torch.set_num_threads(1)
    sizes, block = settings["sizes"], settings["batch"]
    source = resolve_dataset(sizes["dataset"], "train")
    ours = train_config(sizes, mochi=MOCO, precision="fp32", workers=0, seed=settings["seed"])
    pipelines = {"ours": (pretraining_views(source, ours), collate_samples)}
    if settings["lightly"]:
        pipelines["lightly"] = (LightlyViews(source, sizes["image_size"]), default_collate)
    per_image_ms: dict[str, list[float]] = {name: [] for name in pipelines}
    names = list(pipelines)
    for b in range(settings["blocks"] + 1):  # the first block warms up
        for name in (names if b % 2 == 0 else names[::-1]):
            dataset, collate = pipelines[name]
            start = time.perf_counter()
            collate([dataset[i] for i in range(b * block, (b + 1) * block)])
            if b:
                per_image_ms[name].append((time.perf_counter() - start) * 1e3 / block)
    return dict(per_image_ms=per_image_ms, block=block, threads=torch.get_num_threads())


def summarise_data(raw: dict) -> dict:
    out = {f"{name}_median_ms_per_image": statistics.median(v) for name, v in raw["per_image_ms"].items()}
    if "lightly" in raw["per_image_ms"]:
        out["ours_over_lightly_cost"] = out["ours_median_ms_per_image"] / out["lightly_median_ms_per_image"]
    return out


def summarise_throughput(runs: list[dict]) -> dict:
    """Per precision: median of all steady windows (first window of each run dropped), ours / lightly."""
    out = {}
    for precision in PRECISIONS:
        rows = {}
        for impl in ("ours_moco", "lightly_moco", "ours_mochi"):
            steady = [r for run in runs if run["impl"] == impl and run["precision"] == precision
                      for r in run["window_images_per_sec"][1:]]
            if steady:
                rows[impl] = dict(median_images_per_sec=statistics.median(steady), windows=len(steady))
        if "ours_moco" in rows and "lightly_moco" in rows:
            ratio = rows["ours_moco"]["median_images_per_sec"] / rows["lightly_moco"]["median_images_per_sec"]
            per_round = []
            for r in sorted({run["round"] for run in runs}):
                medians = {run["impl"]: statistics.median(run["window_images_per_sec"][1:]) for run in runs
                           if run["round"] == r and run["precision"] == precision}
                if "ours_moco" in medians and "lightly_moco" in medians:
                    per_round.append(medians["ours_moco"] / medians["lightly_moco"])
            rows["ours_over_lightly"] = ratio
            rows["ours_over_lightly_per_round"] = per_round
            rows["target"] = f"ours / lightly >= {TARGET_THROUGHPUT_RATIO}"
            rows["met"] = ratio >= TARGET_THROUGHPUT_RATIO
        if "ours_moco" in rows and "ours_mochi" in rows:
            rows["mochi_over_moco"] = (rows["ours_mochi"]["median_images_per_sec"]
                                       / rows["ours_moco"]["median_images_per_sec"])
        if rows:
            out[precision] = rows
    return out


# ----------------------------------------------------------------------------------------------------
# Running children: forked after the imports, output to a log, result through a pipe


def _child_main(target: Callable[[dict], dict], settings: dict, log_path: str, conn) -> None:
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        try:
            if settings.get("threads"):
                import torch

                torch.set_num_threads(settings["threads"])
            conn.send(dict(ok=True, result=target(settings)))
        except BaseException:  # noqa: BLE001 - everything goes back to the parent, with its traceback
            traceback.print_exc()
            conn.send(dict(ok=False, error=traceback.format_exc()))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def run_forked(target: Callable[[dict], dict], settings: dict, log_path: Path) -> dict:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(target, settings, str(log_path), send))
    process.start()
    send.close()
    try:
        message = receive.recv()
    except EOFError:
        message = None
    process.join()
    if message is None or not message["ok"]:
        tail = log_path.read_text()[-3000:] if log_path.is_file() else ""
        raise RuntimeError(f"{target.__name__} failed (exit code {process.exitcode}); log {log_path}:\n"
                           f"{message['error'] if message else tail}")
    return message["result"]


# ----------------------------------------------------------------------------------------------------
# Environment


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def lightly_available() -> bool:
    try:
        import lightly.loss  # noqa: F401
        import lightly.models.modules  # noqa: F401
        import lightly.transforms.moco_transform  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_info() -> dict:
    import torch

    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return dict(model=model or platform.processor(), machine=platform.machine(), logical_cpus=os.cpu_count(),
                usable_cpus=len(os.sched_getaffinity(0)), torch_threads=torch.get_num_threads(),
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                avx512_bf16=" avx512_bf16" in flags, amx_bf16=" amx_bf16" in flags)


def versions() -> dict:
    found = {name: _version(name) for name in ("torch", "torchvision", "timm", "accelerate", "lightly", "mochi-hub")}
    return {"python": platform.python_version(), **found}


# ----------------------------------------------------------------------------------------------------
# Table


def print_table(result: dict) -> None:
    step = result.get("step")
    if step:
        s = step["summary"]
        mochi = tuple(step["raw"]["mochi"])
        print(f"\nTraining step, alternated in one process ({step['raw']['settings']['model']}, "
              f"{step['raw']['settings']['image_size']} px, batch {step['raw']['settings']['batch_size']}, "
              f"K={step['raw']['settings']['queue_size']}, {step['precision']}, {s['pairs']} pairs, "
              f"{step['raw']['threads']} thread(s))")
        print(f"  {'variant':<26} {'median ms':>10}")
        print(f"  {'MoCo-v2 (0, 0, 0)':<26} {s['moco_median_ms']:>10.1f}")
        print(f"  {f'MoCHi {mochi}':<26} {s['mochi_median_ms']:>10.1f}")
        print(f"  ratio of medians {s['ratio_of_medians']:.3f}, median paired ratio {s['median_paired_ratio']:.3f}"
              f"  -> target {s['target']}: {'met' if s['met'] else 'MISSED'}")
        print(f"  (process CPU time, all threads: MoCo-v2 {s['cpu_moco_median_ms']:.1f} ms, MoCHi "
              f"{s['cpu_mochi_median_ms']:.1f} ms, ratio {s['cpu_ratio_of_medians']:.3f})")
        if "loop_check" in step:
            print(f"  bench_step reproduces mochi_hub.train.train's losses over {step['loop_check']['steps']} steps: "
                  f"{'yes' if step['loop_check']['match'] else 'NO'}")
    data = result.get("data")
    if data:
        d = data["summary"]
        line = (f"\nData pipeline, one thread (decode + 2 augmented views + collate): "
                f"ours {d['ours_median_ms_per_image']:.2f} ms/image")
        if "lightly_median_ms_per_image" in d:
            line += (f", lightly {d['lightly_median_ms_per_image']:.2f} ms/image "
                     f"(ours/lightly cost {d['ours_over_lightly_cost']:.2f})")
        print(line)
    throughput = result.get("throughput")
    if throughput:
        t = throughput["summary"]
        print(f"\nTraining images/s, alternated runs ({throughput['rounds']} round(s), "
              f"workers {throughput['workers']}, "
              f"windows of {throughput['window']} steps, first window dropped)")
        print(f"  {'setting':<9} {'ours MoCo-v2':>13} {'lightly MoCo':>13} {'ours/lightly':>13} {'ours MoCHi':>11} "
              f"{'MoCHi/MoCo':>11}  target")
        for precision, rows in t.items():
            def cell(impl, width):
                return f"{rows[impl]['median_images_per_sec']:>{width}.1f}" if impl in rows else f"{'-':>{width}}"

            ratio = f"{rows['ours_over_lightly']:>13.3f}" if "ours_over_lightly" in rows else f"{'-':>13}"
            mm = f"{rows['mochi_over_moco']:>11.3f}" if "mochi_over_moco" in rows else f"{'-':>11}"
            met = ("met" if rows["met"] else "MISSED") if "met" in rows else "n/a (lightly skipped)"
            print(f"  {precision:<9} {cell('ours_moco', 13)} {cell('lightly_moco', 13)} {ratio} "
                  f"{cell('ours_mochi', 11)} {mm}  {met}")


# ----------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="step,data,throughput",
                   help="comma-separated: step, data, throughput (default all three)")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes {QUICK}, few steps: a smoke run in seconds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every measured process (default: torch's default, as `mochi train`). "
                        "On a shared machine, 1 makes process CPU time a load-independent measure of work "
                        "(no OpenMP barrier waits)")
    g = p.add_argument_group("step (part 1)")
    g.add_argument("--step-pairs", type=int, default=None, help="timed pairs, each one MoCo-v2 + one MoCHi step "
                   "(default 40; quick 2)")
    g.add_argument("--step-warmup", type=int, default=None, help="untimed pairs first (default 3; quick 1)")
    g.add_argument("--step-batches", type=int, default=None, help="distinct pre-augmented batches, cycled "
                   "(default 8; quick 3)")
    g.add_argument("--step-precision", choices=list(PRECISIONS), default="fp32")
    g.add_argument("--check-loop", type=int, default=None, metavar="N",
                   help="first check that bench_step reproduces the losses mochi_hub.train.train logs over N steps "
                        "(default 0, off; quick 3)")
    g = p.add_argument_group("data (diagnostic)")
    g.add_argument("--data-blocks", type=int, default=None, help="timed blocks of one batch per pipeline "
                   "(default 8; quick 1)")
    g = p.add_argument_group("throughput (part 2)")
    g.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated among {', '.join(PRECISIONS)}")
    g.add_argument("--rounds", type=int, default=None, help="rounds of alternated runs (default 2; quick 1)")
    g.add_argument("--window", type=int, default=None, help="steps per images/s window (default 5; quick 1)")
    g.add_argument("--windows", type=int, default=None, help="measured windows per run, after the dropped first "
                   "(default 4; quick 1)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers, both sides (default 2; quick 0)")
    g.add_argument("--skip-lightly", action="store_true", help="measure ours only (no lightly comparison)")
    g.add_argument("--no-mochi-info", action="store_true", help="skip the informational MoCHi runs")
    args = p.parse_args(argv)
    defaults = dict(step_pairs=(2, 40), step_warmup=(1, 3), step_batches=(3, 8), check_loop=(3, 0),
                    data_blocks=(1, 8), rounds=(1, 2), window=(1, 5), windows=(1, 4), workers=(0, 2))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    unknown = ([x for x in args.parts if x not in ("step", "data", "throughput")]
               + [x for x in args.precisions if x not in PRECISIONS])
    if unknown:
        p.error(f"unknown part or precision: {', '.join(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = " ".join(shlex.quote(x) for x in [sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    # Import everything the children use once, here, so each fork starts at once; nothing computes here.
    import accelerate  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    import mochi_hub.train  # noqa: F401

    sizes = QUICK if args.quick else FULL
    use_lightly = "throughput" in args.parts and not args.skip_lightly
    lightly_note = None
    if use_lightly and not lightly_available():
        if not args.quick:
            print("lightly is not installed: pip install -e '.[bench]' (or pass --skip-lightly)", file=sys.stderr)
            return 2
        use_lightly = False
        lightly_note = "lightly not installed: the lightly runs were skipped (pip install -e '.[bench]')"
        print(lightly_note)
    elif args.skip_lightly:
        lightly_note = "--skip-lightly: the lightly runs were skipped"

    logs = args.out.with_suffix(".logs")
    failed_check = None
    load_before = os.getloadavg()
    started = time.perf_counter()
    result: dict[str, Any] = dict(
        benchmark="mochi train on this CPU: MoCHi step vs MoCo-v2 step; images/s vs lightly's MoCo",
        command=command, quick=args.quick,
        sizes={k: (list(v) if isinstance(v, tuple) else v) for k, v in sizes.items()},
        seed=args.seed, threads=args.threads, versions=versions(), cpu=cpu_info(), loadavg_before=list(load_before))

    if "step" in args.parts:
        settings = dict(sizes=sizes, seed=args.seed, threads=args.threads, precision=args.step_precision,
                        pairs=args.step_pairs,
                        warmup=args.step_warmup, batches=args.step_batches)
        print(f"step: {args.step_warmup} + {args.step_pairs} alternated pairs ...", flush=True)
        raw = run_forked(step_child, settings, logs / "step.log")
        result["step"] = dict(precision=args.step_precision, warmup_pairs=args.step_warmup,
                              order="ABBA: the order flips every pair", raw=raw, summary=summarise_steps(raw))
        if args.check_loop:
            print(f"step: checking bench_step against mochi_hub.train.train ({args.check_loop} steps) ...", flush=True)
            check = check_against_loop(raw, dict(settings, check_steps=args.check_loop), logs)
            result["step"]["loop_check"] = check
            if not check["match"]:
                failed_check = check

    if "data" in args.parts:
        settings = dict(sizes=sizes, seed=args.seed, batch=sizes["batch_size"], blocks=args.data_blocks,
                        lightly=lightly_available() and not args.skip_lightly)
        print(f"data: {args.data_blocks} alternated blocks of {sizes['batch_size']} images ...", flush=True)
        raw = run_forked(data_child, settings, logs / "data.log")
        result["data"] = dict(raw=raw, summary=summarise_data(raw))

    if "throughput" in args.parts:
        impls = [("ours_moco", ours_child, MOCO)]
        if use_lightly:
            impls.append(("lightly_moco", lightly_child, MOCO))
        if not args.no_mochi_info:
            impls.append(("ours_mochi", ours_child, tuple(sizes["mochi"])))
        runs = []
        for r in range(args.rounds):
            for precision in (args.precisions if r % 2 == 0 else args.precisions[::-1]):
                for impl, target, mochi in (impls if r % 2 == 0 else impls[::-1]):
                    settings = dict(sizes=sizes, seed=args.seed, threads=args.threads, precision=precision, mochi=mochi,
                                    workers=args.workers, window=args.window, windows=args.windows)
                    print(f"throughput: round {r + 1}/{args.rounds}, {precision}, {impl} ...", flush=True)
                    out = run_forked(target, settings, logs / f"r{r}-{precision}-{impl}.log")
                    steady = out["window_images_per_sec"][1:]
                    print(f"  {statistics.median(steady):8.1f} images/s (windows: "
                          f"{', '.join(f'{x:.1f}' for x in out['window_images_per_sec'])})", flush=True)
                    runs.append(dict(round=r, precision=precision, impl=impl, mochi=list(mochi), **out))
        result["throughput"] = dict(rounds=args.rounds, window=args.window, windows=args.windows,
                                    workers=args.workers, precisions={p: PRECISIONS[p] for p in args.precisions},
                                    lightly=use_lightly, lightly_note=lightly_note, runs=runs,
                                    summary=summarise_throughput(runs))

    result["wall_s"] = time.perf_counter() - started
    result["loadavg_after"] = list(os.getloadavg())
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} (logs in {logs}/); load average before {load_before[0]:.2f}, "
          f"after {result['loadavg_after'][0]:.2f}; {result['wall_s']:.0f} s")
    if failed_check is not None:
        print("bench_step does NOT reproduce the losses of mochi_hub.train.train: part 1 no longer times the "
              f"loop's step; update bench_step. {json.dumps(failed_check['variants'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
