"""Benchmark of `mochi train` on this CPU (issue 3's targets): the MoCHi step against the MoCo-v2 step, and
training images/s against MoCo-v2 written with lightly. Each measurement runs in a process forked after the
imports, its output in ``<out>.logs/`` (bench/common.py).

1. ``step``: MoCHi (1024, 1024, 512) against MoCo-v2 (0, 0, 0), resnet18 (timm, MoCo's init), 64 px, batch 64
   in 2 BatchNorm groups, K = 16384, fp32, in one process: both built as ``mochi_hub.training.pretrain`` builds them
   (the same initial weights), on the loop's first Fashion-MNIST batches (``PretrainingLoader``) collated
   beforehand, each step ``mochi_hub.method.step.training_step`` called as the loop calls it (its ``cosine_lr``,
   ``bn_splits`` from ``local_bn_splits``). Steps alternate ABBA ABBA ...: ``--step-warmup`` untimed pairs,
   ``--step-pairs`` timed. Reported: median wall and process CPU time per variant, the ratio of the medians
   and the median per-pair ratio (robust to drift). Target: MoCHi / MoCo-v2 <= 1.02. (On a shared machine 2
   OpenMP threads make wall time bimodal; with ``--threads 1`` CPU time measures the work whatever the load.)
   ``--check-loop N`` (on in ``--quick``) proves the bench times the loop's step: its first N losses must
   equal those ``mochi_hub.training.pretrain.train`` logs to metrics.jsonl for the same seed, or the run fails.

2. ``throughput``: images/s of ``mochi_hub.training.pretrain.train`` (MoCo-v2; metrics.jsonl's ``images_per_sec``, a
   window every ``--window`` steps) against lightly's MoCo example (``MoCoProjectionHead``,
   ``NTXentLoss(memory_bank_size=(K, 128))``, ``update_momentum``, ``cosine_schedule``) on its own data:
   ``torchvision.datasets.FashionMNIST`` over Debian's files, lightly's ``MoCoV2Transform`` (whose defaults
   are MoCo-v2's augmentation), a shuffled DataLoader. One TrainConfig gives both the backbone and initial
   weights, batch, queue, head width, optimiser, hyperparameters, schedule and workers; both are timed in the
   same windows, each run's first dropped. fp32, and bf16 + channels_last (lightly: ``torch.autocast``); MoCHi
   without warm-up runs too, for information. Runs alternate (ours, lightly, MoCHi; reversed every round) for
   ``--rounds``; per setting, the median of the steady windows. Target: ours / lightly >= 1.0. Differences
   left by design: ours runs BatchNorm in groups in both encoders with shuffled keys (lightly's example: no
   shuffle-BN), computes logits and loss in fp32 under bf16 (lightly: under autocast), keeps labels in the
   queue and seeds each image's augmentation; it also saves a checkpoint and the export after the last window.

3. ``groups``: the step with BatchNorm groups in one backbone pass (``GroupedBatchNorm2d``, what the loop runs)
   against one backbone pass per group (the fallback for other norm layers), at the ``fashion-mnist`` preset's
   sizes (resnet18, 32 px, batch 128 in 8 groups, K = 4096, MoCHi): the same initial weights and batches in one
   process, steps alternated ABBA as in part 1. Reported: median ms per step and per-group / one-pass.

``data`` (diagnostic): each side's CPU cost per image (decode, two views, collate), one thread as in a loader
worker, alternated blocks of one batch; on 2 cores the workers share the CPUs with the step (part 2).

Run (the issue's sizes; about 15 minutes on 2 quiet cores):

    .venv/bin/pip install -e '.[bench]'     # lightly, bench-only extra
    .venv/bin/python bench/train.py
    .venv/bin/python bench/train.py --parts step --step-pairs 20        # the step target only
    .venv/bin/python bench/train.py --parts step --threads 1            # the step on a busy machine
    .venv/bin/python bench/train.py --parts groups                      # BatchNorm groups: one pass or one per group
    .venv/bin/python bench/train.py --parts data,throughput --rounds 1  # the lightly comparison only
    .venv/bin/python bench/train.py --check-loop 3                      # also prove the step is the loop's
    .venv/bin/python bench/train.py --quick                             # tiny smoke run (about a minute)

Prints Markdown tables; writes JSON (``--out``, default bench/results/train.json) with every raw number.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import importlib.util
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also when run through runpy
import common

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # lightly's side reads it through torchvision
TARGET_STEP_RATIO = 1.02  # MoCHi step / MoCo-v2 step, at most
TARGET_THROUGHPUT_RATIO = 1.0  # ours images/s / lightly images/s, at least
# TrainConfig fields: the sizes, and tiny ones for --quick. bn_splits None: the default (batch / 32).
FULL = dict(
    model="resnet18",
    image_size=64,
    batch_size=64,
    queue_size=16384,
    mochi=(1024, 1024, 512),
    proj_dim=128,
    dataset="fashion-mnist",
    bn_splits=None,
)
QUICK = dict(FULL, model="test_resnet", image_size=16, batch_size=8, queue_size=64, mochi=(16, 16, 8), bn_splits=2)
PRESET = dict(FULL, image_size=32, batch_size=128, queue_size=4096, bn_splits=8)  # the fashion-mnist preset's
MOCO = (0, 0, 0)
PRECISIONS = {
    "fp32": dict(mixed_precision="no", channels_last=False),
    "bf16+cl": dict(mixed_precision="bf16", channels_last=True),
}
SIZED = dict(
    step_pairs=(int, 2, 40, "timed pairs, one MoCo-v2 + one MoCHi step each"),
    step_warmup=(int, 1, 3, "untimed pairs first"),
    step_batches=(int, 3, 8, "distinct batches, cycled"),
    check_loop=(int, 3, 0, "check that the step reproduces train()'s losses over this many steps"),
    data_blocks=(int, 1, 8, "data: timed blocks of one batch per pipeline"),
    rounds=(int, 1, 2, "throughput: rounds of alternated runs"),
    window=(int, 1, 5, "throughput: steps per images/s window"),
    windows=(int, 1, 4, "throughput: measured windows per run, after the dropped first"),
    workers=(int, 0, 2, "throughput: DataLoader workers, both sides"),
)

STEP_REPORT = """
Training step, alternated in one process ({model}, {image_size} px, batch {batch_size} in {groups} BatchNorm \
group(s), K={queue_size}, {precision}, {pairs} pairs, {threads} thread(s))

| variant | median ms | CPU ms |
|---|---:|---:|
| MoCo-v2 (0, 0, 0) | {moco_median_ms:.1f} | {cpu_moco_median_ms:.1f} |
| MoCHi {mochi} | {mochi_median_ms:.1f} | {cpu_mochi_median_ms:.1f} |

ratio of medians {ratio_of_medians:.3f}, median paired ratio {median_paired_ratio:.3f} -> target {target}: {verdict}
process CPU time ratio {cpu_ratio_of_medians:.3f}; {loop}"""
GROUPS_REPORT = """
BatchNorm groups, alternated steps in one process ({model}, {image_size} px, batch {batch_size} in {groups} groups, \
K={queue_size}, fp32, {pairs} pairs)

| variant | median ms |
|---|---:|
| one backbone pass, grouped BatchNorm | {one_pass_median_ms:.1f} |
| one backbone pass per group | {per_group_median_ms:.1f} |

per group / one pass: ratio of medians {ratio_of_medians:.2f}, median paired ratio {median_paired_ratio:.2f}"""
DATA_REPORT = """
Data pipeline, one thread (decode + 2 augmented views + collate): ours {ours} ms/image, lightly {lightly} \
ms/image (ours / lightly cost {ratio})"""
THROUGHPUT_REPORT = """
Training images/s, alternated runs ({rounds} round(s), workers {workers}, windows of {window} steps, first dropped)

{table}"""


def train_config(sizes: dict, *, mochi: tuple[int, int, int], precision: str, workers: int, seed: int, **extra: Any):
    """The one TrainConfig of every part, ours and lightly's: the source of every hyperparameter."""
    from mochi_hub.config import TrainConfig

    return TrainConfig(
        **{**sizes, "mochi": mochi},
        mixing_warmup_epochs=0,
        epochs=1,
        workers=workers,
        seed=seed,
        report_to="none",
        **PRECISIONS[precision],
        **extra,
    )


# --- Part 1: the training step, MoCHi against MoCo-v2, alternated in one process ------------------------


def build_state(config, accelerator) -> tuple:
    """(config, the training state train() builds from it (mochi_hub.training.state), in training mode)."""
    from mochi_hub.training.state import build_training_state

    state = build_training_state(config, accelerator)
    state.train()
    return config, state


def bench_step(variant: tuple, batch: dict, step: int, steps_per_epoch: int) -> float:
    """One step as the loop runs it (its lr schedule, then the state's step); returns the loss."""
    from mochi_hub.method.step import cosine_lr

    config, state = variant
    state.set_lr(
        cosine_lr(step, config.epochs * steps_per_epoch, config.base_lr, config.lr_warmup_epochs * steps_per_epoch)
    )
    images_q, images_k = (
        v.to(state.accelerator.device, non_blocking=True, memory_format=state.memory_format) for v in batch["images"]
    )
    out = state.step(
        images_q, images_k, batch["labels"].to(state.accelerator.device), step=step, mixing=config.uses_mixing
    )
    if not bool(out.finite):
        raise RuntimeError(f"non-finite loss at step {step} ({config.mochi})")
    return float(out.loss)


def first_batches(config, count: int) -> tuple[list[dict], int]:
    """The loop's first `count` batches of epoch 0 (drawn once, so every variant steps on the same images), and the
    number of steps in an epoch (for the lr schedule)."""
    from mochi_hub.data.datasets import resolve_dataset
    from mochi_hub.data.views import PretrainingLoader, pretraining_views

    views = pretraining_views(resolve_dataset(config.dataset, "train"), config)
    return list(islice(PretrainingLoader(views, config).epoch(0), count)), len(views) // config.batch_size


def alternate(states: dict[str, dict], batches: list[dict], settings: dict, steps_per_epoch: int) -> dict:
    """Step every variant once a round, in A B then B A order, so that a drift in the machine's speed falls on
    each alike; after settings["warmup"] rounds keep each step's wall and CPU ms. Every step's loss is kept (the
    loop check compares the first ones with train()'s log)."""
    names = list(states)
    raw: dict[str, Any] = {kind: {name: [] for name in names} for kind in ("times_ms", "cpu_times_ms", "losses")}
    for i in range(settings["warmup"] + settings["pairs"]):
        for name in names if i % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            raw["losses"][name].append(bench_step(states[name], batches[i % len(batches)], i, steps_per_epoch))
            if i >= settings["warmup"]:
                raw["times_ms"][name].append((time.perf_counter() - start) * 1e3)
                raw["cpu_times_ms"][name].append((time.process_time() - start_cpu) * 1e3)
    return raw


def paired_ratios(times: dict[str, list[float]], base: str, other: str) -> dict[str, Any]:
    """other / base as the ratio of the medians, and as the median of each round's ratio (`alternate` ran the two
    steps of a round back to back, so each round is a pair)."""
    return dict(
        ratio_of_medians=statistics.median(times[other]) / statistics.median(times[base]),
        median_paired_ratio=statistics.median(b / a for a, b in zip(times[base], times[other])),
        pairs=len(times[base]),
    )


def step_child(settings: dict) -> dict:
    """Both variants in this process, the same initial weights and batches, steps alternated."""
    import torch
    from accelerate import Accelerator

    configs = {
        name: train_config(
            settings["sizes"], mochi=mochi, precision=settings["precision"], workers=0, seed=settings["seed"]
        )
        for name, mochi in (("moco", MOCO), ("mochi", settings["sizes"]["mochi"]))
    }
    base = configs["moco"]
    accelerator = Accelerator(cpu=True, mixed_precision=base.mixed_precision)
    batches, steps_per_epoch = first_batches(base, settings["batches"])
    states = {name: build_state(config, accelerator) for name, config in configs.items()}
    return dict(
        alternate(states, batches, settings, steps_per_epoch),
        threads=torch.get_num_threads(),
        settings=base.to_dict(),
        mochi=list(configs["mochi"].mochi),
        batchnorm_groups=states["moco"][1].bn_splits,
    )


def groups_child(settings: dict) -> dict:
    """The same config, weights and batches twice: BatchNorm groups in one pass, and one pass per group."""
    from accelerate import Accelerator

    config = train_config(
        settings["sizes"], mochi=tuple(settings["sizes"]["mochi"]), precision="fp32", workers=0, seed=settings["seed"]
    )
    accelerator = Accelerator(cpu=True)
    batches, steps_per_epoch = first_batches(config, settings["batches"])
    states = {name: build_state(config, accelerator) for name in ("one_pass", "per_group")}
    for encoder in (states["per_group"][1].query, states["per_group"][1].key):
        accelerator.unwrap_model(encoder).groups_in_one_pass = False
    times = alternate(states, batches, settings, steps_per_epoch)["times_ms"]
    medians = {f"{name}_median_ms": statistics.median(values) for name, values in times.items()}
    return dict(
        times_ms=times,
        settings=config.to_dict(),
        groups=states["one_pass"][1].bn_splits,
        one_pass=accelerator.unwrap_model(states["one_pass"][1].query).groups_in_one_pass,
        summary=dict(medians, **paired_ratios(times, "one_pass", "per_group")),
    )


def check_against_loop(raw: dict, settings: dict, logs: Path) -> dict:
    """The bench's first steps must give the losses train() logs for the same seed (same weights, batches,
    BatchNorm groups, shuffle-BN permutations and MoCHi plans)."""
    steps = min(settings["check_steps"], settings["warmup"] + settings["pairs"], settings["batches"])
    out: dict[str, Any] = dict(steps=steps, variants={})
    for name, mochi in (("moco", MOCO), ("mochi", settings["sizes"]["mochi"])):
        loop = common.run_forked(
            ours_child,
            dict(settings, mochi=mochi, workers=0, window=1, windows=steps - 1),
            logs / f"loop-check-{name}.log",
        )["losses"]
        bench = raw["losses"][name][:steps]
        out["variants"][name] = dict(
            bench_step=bench,
            loop=loop,
            match=len(bench) == len(loop)
            and all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(bench, loop)),
        )
    out["match"] = all(v["match"] for v in out["variants"].values())
    return out


def summarise_steps(raw: dict) -> dict:
    median = {
        f"{cpu}{name}_median_ms": statistics.median(raw[kind][name])
        for cpu, kind in (("", "times_ms"), ("cpu_", "cpu_times_ms"))
        for name in ("moco", "mochi")
    }
    ratios = paired_ratios(raw["times_ms"], "moco", "mochi")
    return dict(
        median,
        **ratios,
        cpu_ratio_of_medians=median["cpu_mochi_median_ms"] / median["cpu_moco_median_ms"],
        target=f"MoCHi / MoCo-v2 <= {TARGET_STEP_RATIO}",
        met=ratios["ratio_of_medians"] <= TARGET_STEP_RATIO,
    )


# --- Part 2: images/s of `mochi train` and of lightly's MoCo ----------------------------------------------


def ours_child(settings: dict) -> dict:
    """mochi_hub.training.pretrain.train, the function behind `mochi train`; images/s and losses from its metrics.jsonl."""
    from mochi_hub.training.pretrain import train
    from mochi_hub.training.runs import read_metrics

    window, windows = settings["window"], settings["windows"]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        started = time.perf_counter()
        train(
            train_config(
                settings["sizes"],
                mochi=tuple(settings["mochi"]),
                precision=settings["precision"],
                workers=settings["workers"],
                seed=settings["seed"],
                output=tmp,
                max_steps=window * (windows + 1),
                log_every_steps=window,
            )
        )
        wall = time.perf_counter() - started
        steps = [line for line in read_metrics(Path(tmp) / "metrics.jsonl") if line["kind"] == "step"]
    if len(steps) != windows + 1:
        raise RuntimeError(f"expected {windows + 1} step lines in metrics.jsonl, got {len(steps)}")
    return dict(
        window_images_per_sec=[s["images_per_sec"] for s in steps], losses=[s["loss"] for s in steps], wall_s=wall
    )


def torchvision_root(folder: Path) -> Path:
    """Debian's Fashion-MNIST gunzipped in torchvision's raw layout, <folder>/FashionMNIST/raw/*-ubyte."""
    (folder / "FashionMNIST" / "raw").mkdir(parents=True, exist_ok=True)
    for packed in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
        with gzip.open(packed) as source, open(folder / "FashionMNIST" / "raw" / packed.stem, "wb") as target:
            shutil.copyfileobj(source, target)
    return folder


def lightly_views(root: str, image_size: int):
    """Lightly's own pipeline: torchvision's FashionMNIST (as RGB, like ours) through MoCoV2Transform."""
    from lightly.transforms.moco_transform import MoCoV2Transform
    from torchvision.datasets import FashionMNIST

    views = MoCoV2Transform(input_size=image_size)
    return FashionMNIST(root, train=True, download=False, transform=lambda image: views(image.convert("RGB")))


def lightly_child(settings: dict) -> dict:
    """MoCo-v2 with lightly's building blocks (its MoCo example), our hyperparameters, backbone and weights."""
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from torch.utils.data import DataLoader

    from mochi_hub.method.model import backbone_args, create_backbone

    config = train_config(
        settings["sizes"],
        mochi=MOCO,
        precision=settings["precision"],
        workers=settings["workers"],
        seed=settings["seed"],
    )
    dataset = lightly_views(settings["torchvision_root"], config.image_size)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    build = backbone_args(config.model, init=config.init, image_size=config.image_size)
    torch.manual_seed(config.seed)  # as ours: the same initial backbone
    backbone = create_backbone(config.model, **build)
    head = MoCoProjectionHead(backbone.num_features, backbone.num_features, config.proj_dim)
    backbone_key, head_key = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_key)
    deactivate_requires_grad(head_key)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    for module in (backbone, head, backbone_key, head_key):
        module.to(memory_format=memory_format).train()
    criterion = NTXentLoss(temperature=config.temperature, memory_bank_size=(config.queue_size, config.proj_dim))
    optimizer = torch.optim.SGD(
        [*backbone.parameters(), *head.parameters()],
        lr=config.base_lr,
        momentum=config.sgd_momentum,
        weight_decay=config.weight_decay,
    )
    bf16 = config.mixed_precision == "bf16"
    window, last_step = settings["window"], settings["window"] * (settings["windows"] + 1)
    rates, losses = [], []
    started = window_start = time.perf_counter()
    for step, (views, _labels) in enumerate(islice(loader, last_step)):
        for group in optimizer.param_groups:  # the cosine schedule ours uses, over one epoch
            group["lr"] = cosine_schedule(step, len(dataset) // config.batch_size, config.base_lr, 0.0)
        x_query, x_key = (v.to(memory_format=memory_format) for v in views)
        update_momentum(backbone, backbone_key, m=config.key_momentum)
        update_momentum(head, head_key, m=config.key_momentum)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = criterion(head(backbone(x_query)), head_key(backbone_key(x_key)).detach())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % window == 0:
            rates.append(window * config.batch_size / (time.perf_counter() - window_start))
            losses.append(float(loss.detach()))
            window_start = time.perf_counter()
    if len(rates) != settings["windows"] + 1:
        raise RuntimeError(f"lightly loop: expected {settings['windows'] + 1} windows, got {len(rates)}")
    return dict(window_images_per_sec=rates, losses=losses, wall_s=time.perf_counter() - started)


def data_child(settings: dict) -> dict:
    """Diagnostic: CPU cost of one batch of two views, ours against lightly's, alternated blocks, one thread."""
    import torch
    from torch.utils.data import default_collate

    from mochi_hub.data.datasets import collate_samples, resolve_dataset
    from mochi_hub.data.views import pretraining_views

    torch.set_num_threads(1)
    sizes, block = settings["sizes"], settings["sizes"]["batch_size"]
    ours = train_config(sizes, mochi=MOCO, precision="fp32", workers=0, seed=settings["seed"])
    pipelines = {"ours": (pretraining_views(resolve_dataset(sizes["dataset"], "train"), ours), collate_samples)}
    if settings["torchvision_root"]:
        pipelines["lightly"] = (lightly_views(settings["torchvision_root"], sizes["image_size"]), default_collate)
    per_image_ms: dict[str, list[float]] = {name: [] for name in pipelines}
    for b in range(settings["blocks"] + 1):  # the first block warms up
        for name in list(pipelines) if b % 2 == 0 else list(pipelines)[::-1]:
            dataset, collate = pipelines[name]
            start = time.perf_counter()
            collate([dataset[i] for i in range(b * block, (b + 1) * block)])
            if b:
                per_image_ms[name].append((time.perf_counter() - start) * 1e3 / block)
    summary = {f"{name}_median_ms_per_image": statistics.median(v) for name, v in per_image_ms.items()}
    if "lightly_median_ms_per_image" in summary:
        summary["ours_over_lightly_cost"] = summary["ours_median_ms_per_image"] / summary["lightly_median_ms_per_image"]
    return dict(raw=dict(per_image_ms=per_image_ms, block=block, threads=torch.get_num_threads()), summary=summary)


def summarise_throughput(runs: list[dict]) -> dict:
    """Per precision: the median of all steady windows (each run's first dropped), ours / lightly."""
    out = {}
    for precision in PRECISIONS:
        mine = [run for run in runs if run["precision"] == precision]
        rows: dict[str, Any] = {
            impl: dict(median_images_per_sec=statistics.median(steady), windows=len(steady))
            for impl in ("ours_moco", "lightly_moco", "ours_mochi")
            if (steady := [r for run in mine if run["impl"] == impl for r in run["window_images_per_sec"][1:]])
        }
        rate = {impl: row["median_images_per_sec"] for impl, row in rows.items()}
        if "ours_moco" in rate and "lightly_moco" in rate:
            ratio = rate["ours_moco"] / rate["lightly_moco"]
            by_round = {
                (run["round"], run["impl"]): statistics.median(run["window_images_per_sec"][1:]) for run in mine
            }
            rows.update(
                ours_over_lightly=ratio,
                target=f"ours / lightly >= {TARGET_THROUGHPUT_RATIO}",
                met=ratio >= TARGET_THROUGHPUT_RATIO,
                ours_over_lightly_per_round=[
                    by_round[r, "ours_moco"] / by_round[r, "lightly_moco"] for r in sorted({r for r, _ in by_round})
                ],
            )
        if "ours_moco" in rate and "ours_mochi" in rate:
            rows["mochi_over_moco"] = rate["ours_mochi"] / rate["ours_moco"]
        if rows:
            out[precision] = rows
    return out


# --- Report and main ----------------------------------------------------------------------------------------


def report(result: dict) -> str:
    parts, fmt = [], common.fmt
    if step := result.get("step"):
        raw, check = step["raw"], step.get("loop_check")
        loop = (
            "loop check off"
            if check is None
            else f"reproduces mochi_hub.training.pretrain.train's losses over "
            f"{check['steps']} steps: {'yes' if check['match'] else 'NO'}"
        )
        parts.append(
            STEP_REPORT.format(
                **{**raw["settings"], **step["summary"], "mochi": tuple(raw["mochi"])},
                groups=raw["batchnorm_groups"],
                precision=step["precision"],
                loop=loop,
                threads=raw["threads"],
                verdict="met" if step["summary"]["met"] else "MISSED",
            )
        )
    if groups := result.get("groups"):
        parts.append(GROUPS_REPORT.format(**{**groups["settings"], **groups["summary"]}, groups=groups["groups"]))
    if data := result.get("data"):
        d = data["summary"]
        parts.append(
            DATA_REPORT.format(
                ours=fmt(d["ours_median_ms_per_image"], ".2f"),
                ratio=fmt(d.get("ours_over_lightly_cost"), ".2f"),
                lightly=fmt(d.get("lightly_median_ms_per_image"), ".2f"),
            )
        )
    if throughput := result.get("throughput"):

        def rate(rows, impl):
            return fmt(rows[impl]["median_images_per_sec"] if impl in rows else None)

        table = common.markdown_table(
            ["setting", "ours MoCo-v2", "lightly MoCo", "ours / lightly", "ours MoCHi", "MoCHi / MoCo", "target"],
            [
                [
                    precision,
                    rate(rows, "ours_moco"),
                    rate(rows, "lightly_moco"),
                    fmt(rows.get("ours_over_lightly"), ".3f"),
                    rate(rows, "ours_mochi"),
                    fmt(rows.get("mochi_over_moco"), ".3f"),
                    ("met" if rows["met"] else "MISSED") if "met" in rows else "n/a (lightly skipped)",
                ]
                for precision, rows in throughput["summary"].items()
            ],
        )
        parts.append(THROUGHPUT_REPORT.format(**throughput, table=table))
    return "\n".join(parts)


def parse_args(argv=None):
    p = common.parser(
        __doc__,
        "train",
        quick=f"tiny sizes {QUICK}, few steps: a smoke run",
        threads=None,
        sized=SIZED,
        threads_help="torch threads in every measured process (default: torch's, as `mochi train`); "
        "1 makes CPU time a load-independent measure of work on a shared machine",
    )
    p.add_argument("--parts", default="step,data,throughput", help="comma-separated: step, data, throughput, groups")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-precision", choices=list(PRECISIONS), default="fp32")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"throughput: among {', '.join(PRECISIONS)}")
    p.add_argument("--skip-lightly", action="store_true", help="measure ours only (no lightly comparison)")
    p.add_argument("--no-mochi-info", action="store_true", help="skip the informational MoCHi throughput runs")
    args = common.parse(p, argv)
    args.parts, args.precisions = (
        [x.strip() for x in value.split(",") if x.strip()] for value in (args.parts, args.precisions)
    )
    if unknown := set(args.parts) - {"step", "data", "throughput", "groups"} | set(args.precisions) - set(PRECISIONS):
        p.error(f"unknown part or precision: {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import accelerate  # noqa: F401  (what the children use, imported once, here; nothing computes here)
    import timm  # noqa: F401
    import torch  # noqa: F401

    import mochi_hub.training.pretrain  # noqa: F401

    sizes = QUICK if args.quick else FULL
    use_lightly = importlib.util.find_spec("lightly") is not None and not args.skip_lightly
    note = "--skip-lightly: the lightly runs were skipped" if args.skip_lightly else None
    if "throughput" in args.parts and not args.skip_lightly and not use_lightly:
        if not args.quick:
            print("lightly is not installed: pip install -e '.[bench]' (or pass --skip-lightly)", file=sys.stderr)
            return 2
        print(note := "lightly not installed: the lightly runs were skipped (pip install -e '.[bench]')")
    logs, started = args.out.with_suffix(".logs"), time.perf_counter()
    result: dict[str, Any] = dict(
        benchmark="mochi train on this CPU: MoCHi step vs MoCo-v2 step; images/s vs lightly's MoCo",
        quick=args.quick,
        seed=args.seed,
        threads=args.threads,
        sizes={k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        **common.environment(__file__, argv),
    )
    base = dict(sizes=sizes, seed=args.seed, threads=args.threads)
    if "step" in args.parts:
        settings = dict(
            base,
            precision=args.step_precision,
            pairs=args.step_pairs,
            warmup=args.step_warmup,
            batches=args.step_batches,
            check_steps=args.check_loop,
        )
        print(f"step: {args.step_warmup} + {args.step_pairs} alternated pairs ...", flush=True)
        raw = common.run_forked(step_child, settings, logs / "step.log")
        step = result["step"] = dict(
            precision=args.step_precision,
            warmup_pairs=args.step_warmup,
            raw=raw,
            order="ABBA: the order flips every pair",
            summary=summarise_steps(raw),
        )
        if args.check_loop:
            print(
                f"step: checking it against mochi_hub.training.pretrain.train ({args.check_loop} steps) ...", flush=True
            )
            step["loop_check"] = check_against_loop(raw, settings, logs)

    if "groups" in args.parts:
        settings = dict(
            base,
            sizes=QUICK if args.quick else PRESET,
            pairs=args.step_pairs,
            warmup=args.step_warmup,
            batches=args.step_batches,
        )
        print(f"groups: {args.step_warmup} + {args.step_pairs} alternated pairs ...", flush=True)
        result["groups"] = common.run_forked(groups_child, settings, logs / "groups.log")

    with tempfile.TemporaryDirectory(prefix="bench-train-fmnist-") as tmp:
        root = str(torchvision_root(Path(tmp))) if use_lightly and {"data", "throughput"} & set(args.parts) else None
        if "data" in args.parts:
            print(f"data: {args.data_blocks} alternated blocks of {sizes['batch_size']} images ...", flush=True)
            result["data"] = common.run_forked(
                data_child, dict(base, threads=None, blocks=args.data_blocks, torchvision_root=root), logs / "data.log"
            )
        if "throughput" in args.parts:
            impls = (
                [("ours_moco", ours_child, MOCO)]
                + [("lightly_moco", lightly_child, MOCO)] * use_lightly
                + [("ours_mochi", ours_child, tuple(sizes["mochi"]))] * (not args.no_mochi_info)
            )
            runs = []
            for r in range(args.rounds):
                for precision in args.precisions if r % 2 == 0 else args.precisions[::-1]:
                    for impl, target, mochi in impls if r % 2 == 0 else impls[::-1]:
                        print(f"throughput: round {r + 1}/{args.rounds}, {precision}, {impl} ...", flush=True)
                        settings = dict(
                            base,
                            precision=precision,
                            mochi=mochi,
                            workers=args.workers,
                            window=args.window,
                            windows=args.windows,
                            torchvision_root=root,
                        )
                        out = common.run_forked(target, settings, logs / f"r{r}-{precision}-{impl}.log")
                        print(
                            f"  {statistics.median(out['window_images_per_sec'][1:]):8.1f} images/s (windows: "
                            f"{', '.join(f'{x:.1f}' for x in out['window_images_per_sec'])})",
                            flush=True,
                        )
                        runs.append(dict(round=r, precision=precision, impl=impl, mochi=list(mochi), **out))
            result["throughput"] = dict(
                rounds=args.rounds,
                window=args.window,
                windows=args.windows,
                workers=args.workers,
                precisions={p: PRECISIONS[p] for p in args.precisions},
                lightly=use_lightly,
                lightly_note=note,
                runs=runs,
                summary=summarise_throughput(runs),
            )
    result["wall_s"] = time.perf_counter() - started
    print(report(result))
    common.write_result(args.out, result)
    print(f"logs in {logs}/; {result['wall_s']:.0f} s")
    if (check := result.get("step", {}).get("loop_check")) and not check["match"]:
        print(
            "the bench's step does NOT reproduce the losses of mochi_hub.training.pretrain.train: part 1 no longer times "
            f"the loop's step; update bench_step. {json.dumps(check['variants'])}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
