"""The GPU path of `mochi train` on one GPU (issue 29): one prepared command that always brings figures back.

    PYTHONPATH=. python3 bench/gpu.py                 # on the GPU machine: $OUT/gpu.json (else bench/results/)
    PYTHONPATH=. python3 bench/gpu.py --smoke         # seconds on a CPU: every part at toy sizes (CI runs it)
    PYTHONPATH=. python3 bench/gpu.py --parts data --workers 2 --photos 512   # the loader alone, e.g. on a CPU

ResNet-50 at 224 px, global batch 256, one process, with the settings `mochi train` chooses on a GPU (bf16
autocast, channels_last, cuDNN autotuner: mochi_hub.training.state). Everything is built by the library's own
functions (launch, build_training_state, PretrainingLoader, BatchViews, train), so the figures are what
`mochi train` runs. Images: ImageNet-like JPEGs written on the spot (scikit-image's colour photos, downscaled
crops at 500x375 / 375x500 with sensor-like noise, quality 88-96: about 100 KB each, as ImageNet's ~110 KB).

Parts, cheapest first; each row is written to the JSON as soon as it is measured, a failing row is recorded with
its error and the rest go on, and a part that no longer fits the time budget (--budget-s, default 420 s after the
photos) is recorded as skipped:

- smoke: 2 steps of train() with its defaults, then probe (knn) and export of that run; peak memory of each.
- syncs: host synchronisations per steady-state step (device views + step): CUDA's sync debug mode on a GPU, a
  count of host reads of tensor values on a CPU.
- step: one training step on pre-made device tensors, MoCo-v2 and MoCHi (1024, 1024, 512) at K = 16384 and 65536,
  alternated; median ms, images/s, peak memory.
- profile: torch.profiler over MoCHi steps: the GPU's busy share of the wall time and the top kernels.
- decode: the device's side of the bytes path (issue 30): batches of JPEG files packed as the workers pack them,
  decoded on the GPU (nvJPEG) and turned into both views by BatchViews.of, images/s; and the decode alone.
- data: images/s of the loader + views alone for several worker counts: PIL views in the workers against
  bytes-only workers (on a GPU; decode-only workers on a CPU) + decode and views on the device; timed after the
  workers have filled their queues.
- train: end-to-end train() images/s (metrics.jsonl windows after the first) and its data-wait share, views on
  the device (eager and --compile, compile time apart) and in the workers.

Targets (issue 29): MoCo-v2 step >= 3,000 images/s; MoCHi step <= 1.05x MoCo-v2 at K = 65,536; end-to-end
with device views >= 80 % of the tensors-only step (MoCHi, K = 16384) and >= 3x the worker path; 0 syncs a step.
Issue 30: batched decode + both views on the device >= 5,000 images/s (224 px).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(
    model="resnet50",
    image_size=224,
    batch_size=256,
    photos=256 * 40,
    pairs=15,
    warmup=5,
    mochi=(1024, 1024, 512),
    queues=(16384, 65536),
    workers=(4, 8, 15),
    data_batches=10,
    decode_batches=20,
    train_steps=100,  # past the loader's prefetch (2 batches a worker), so the rate is the steady one
    window=5,
    sync_steps=5,
    profile_steps=3,
)
SMOKE = dict(
    model="test_resnet",
    image_size=32,
    batch_size=8,
    photos=48,
    pairs=2,
    warmup=1,
    mochi=(8, 8, 4),
    queues=(64,),
    workers=(0, 2),
    data_batches=2,
    decode_batches=2,
    train_steps=4,
    window=2,
    sync_steps=2,
    profile_steps=1,
)
PHOTO_SOURCES = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


# --- the record ------------------------------------------------------------------------------------------------


class Record:
    """The result as it grows: every row is written to `path` at once (atomically), so a run cut short keeps
    what it measured."""

    def __init__(self, path: Path, result: dict[str, Any], deadline: float):
        self.path, self.result, self.deadline = path, result, deadline
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, part: str, row: dict[str, Any]) -> None:
        self.result.setdefault(part, {}).setdefault("rows", []).append(row)
        self.write()

    def set(self, part: str, **values: Any) -> None:
        self.result.setdefault(part, {}).update(values)
        self.write()

    def attempt(self, part: str, what: dict[str, Any], measure: Callable[[], dict[str, Any]], need_s: float) -> None:
        """One row: measured, or its error, or skipped when less than `need_s` of the budget is left."""
        if self.left() < need_s:
            self.row(part, {**what, "skipped": f"{self.left():.0f} s of the budget left, about {need_s:.0f} needed"})
            return
        try:
            self.row(part, {**what, **measure()})
        except Exception as error:  # one row failing must not lose the others
            self.row(part, {**what, "error": f"{type(error).__name__}: {error}", "where": _where(error)})
        finally:
            reset_accelerate()

    def write(self) -> None:
        self.result["targets"] = targets(self.result)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.path)


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_mib() -> float | None:
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def reset_accelerate() -> None:
    """Each row builds its own Accelerator; Accelerate keeps one state per process, reset between rows."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- inputs ----------------------------------------------------------------------------------------------------


def _write_photo(job: tuple[int, str, int]) -> int:
    """One ImageNet-like JPEG: a downscaled crop of a colour photo, with sensor-like noise; returns its bytes."""
    import numpy as np
    from PIL import Image
    from skimage import data as photos

    index, folder, small = job
    rng = np.random.default_rng(index)
    source = np.asarray(getattr(photos, PHOTO_SOURCES[index % len(PHOTO_SOURCES)])())[..., :3]
    h, w = source.shape[:2]
    tw, th = (500, 375) if rng.random() < 0.75 else (375, 500)
    if small:
        tw, th = tw // 10, th // 10
    scale = min(w / tw, h / th)
    scale = rng.uniform(1.0, scale) if scale > 1 else scale  # never upscaled: the detail of a real photo
    cw, ch = int(tw * scale), int(th * scale)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = Image.fromarray(source[y : y + ch, x : x + cw]).resize((tw, th), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 11.0, (th, tw, 3))
    target = Path(folder) / f"photo{index % len(PHOTO_SOURCES)}" / f"{index:06d}.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target, quality=int(rng.integers(88, 97)))
    return target.stat().st_size


def write_photos(folder: Path, count: int, small: bool) -> dict[str, Any]:
    jobs = [(i, str(folder), int(small)) for i in range(count)]
    with ProcessPoolExecutor(max_workers=max(1, min(16, (os.cpu_count() or 2) - 1))) as pool:
        sizes = list(pool.map(_write_photo, jobs, chunksize=64))
    return {"photos": count, "mean_kb": round(statistics.mean(sizes) / 1e3, 1)}


def config_for(sizes: dict, **overrides: Any):
    """The bench's TrainConfig: device settings left to `mochi train`'s own choices unless overridden."""
    from mochi_hub.config import TrainConfig

    values = dict(
        dataset="fashion-mnist",
        model=sizes["model"],
        image_size=sizes["image_size"],
        batch_size=sizes["batch_size"],
        queue_size=sizes["queues"][0],
        mochi=sizes["mochi"],
        mixing_warmup_epochs=0,
        epochs=1,
        report_to="none",
        log_every_steps=sizes["window"],
    )
    return TrainConfig(**(values | overrides))


def library_state(config):
    """(resolved config, Accelerator, training state) exactly as train() builds them."""
    from mochi_hub.training.state import build_training_state, launch

    config, accelerator, _ = launch(config)
    state = build_training_state(config, accelerator)
    state.train()
    return config, accelerator, state


# --- parts -----------------------------------------------------------------------------------------------------


def part_smoke(sizes: dict, photos: Path, out: Path, record: Record) -> None:
    from mochi_hub.config import ProbeConfig
    from mochi_hub.evaluate.probe import run_probe
    from mochi_hub.publish.export import export_run
    from mochi_hub.training.pretrain import train

    run_dir = out / "smoke"

    def trained() -> dict[str, Any]:
        train(config_for(sizes, dataset=str(photos), output=str(run_dir), max_steps=2, workers=2))
        run = json.loads((run_dir / "run.json").read_text())
        return {"device_choices": run["device_choices"], "peak_mib": peak_mib()}

    def probed() -> dict[str, Any]:
        config = ProbeConfig(
            dataset=str(photos),
            protocol="knn",
            split="train",
            image_size=sizes["image_size"],
            max_images=64,
            workers=2,
            batch_size=32,
            cache_dir=str(out / "cache"),
            mixed_precision="bf16" if torch.cuda.is_available() else "no",
        )
        return {"knn_top1": run_probe(str(run_dir), config, show=False)["top1"], "peak_mib": peak_mib()}

    def exported() -> dict[str, Any]:
        return {"files": sorted(p.name for p in export_run(run_dir).iterdir())}

    for what, measure in (("train", trained), ("probe", probed), ("export", exported)):
        record.attempt("smoke", {"what": what}, measure, need_s=30)


def part_syncs(sizes: dict, photos: Path, record: Record) -> None:
    """Host synchronisations per steady-state step with views on the device, as the loop runs them."""
    from mochi_hub.data.datasets import resolve_dataset
    from mochi_hub.data.views import BatchViews, PretrainingLoader, loader_output, pretraining_views

    def count() -> dict[str, Any]:
        config, accelerator, state = library_state(config_for(sizes, dataset=str(photos), augment_on="device"))
        views = pretraining_views(
            resolve_dataset(config.dataset, "train"), config, loader_output("device", accelerator.device)
        )
        batch_views = BatchViews(config, "device", accelerator.device, state.memory_format)
        batches = PretrainingLoader(views, config, pin_memory=accelerator.device.type == "cuda").epoch(0)
        counts = []
        for step in range(2 + sizes["sync_steps"]):
            batch = next(batches)
            with SyncCounter(enabled=step >= 2) as syncs:
                images_q, images_k = batch_views.of(batch, step, 0)
                labels = batch["labels"].to(accelerator.device, non_blocking=True)
                state.step(images_q, images_k, labels, step=step, mixing=True)
            now()  # the step's work done before the next is counted (our own synchronize, not counted)
            if step >= 2:
                counts.append(syncs.count)
        return {"syncs_per_step": counts, "how": SyncCounter.how()}

    record.attempt("syncs", {"what": "device views + step"}, count, need_s=40)


class SyncCounter:
    """On CUDA: the warnings of torch.cuda.set_sync_debug_mode("warn"), one per synchronising call. On a CPU:
    reads of tensor values by the host (aten._local_scalar_dense), what would synchronise on a GPU."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.count = enabled, 0

    @staticmethod
    def how() -> str:
        return "cuda sync debug mode" if torch.cuda.is_available() else "host reads (_local_scalar_dense)"

    def __enter__(self) -> SyncCounter:
        if not self.enabled:
            return self
        if torch.cuda.is_available():
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            from torch.utils._python_dispatch import TorchDispatchMode

            counter = self

            class Reads(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    counter.count += func.overloadpacket.__name__ == "_local_scalar_dense"
                    return func(*args, **(kwargs or {}))

            self._mode = Reads()
            self._mode.__enter__()
        return self

    def stop(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
            self.count = sum("synchroniz" in str(w.message) for w in self._caught)
            self._warnings.__exit__(None, None, None)
        else:
            self._mode.__exit__(None, None, None)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.stop()


def _pre_made(config, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(config.batch_size, 3, config.image_size, config.image_size, device=accelerator.device)
    return images.contiguous(memory_format=torch.channels_last), torch.arange(config.batch_size) % 100


def part_step(sizes: dict, record: Record) -> None:
    for queue_size in sizes["queues"]:

        def measure(queue_size: int = queue_size) -> dict[str, Any]:
            variants = {"MoCo-v2": (0, 0, 0), "MoCHi": tuple(sizes["mochi"])}
            states = {}
            for name, mochi in variants.items():
                config, accelerator, state = library_state(config_for(sizes, queue_size=queue_size, mochi=mochi))
                states[name] = state
            images, labels = _pre_made(config, accelerator)
            labels = labels.to(accelerator.device)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for i in range(sizes["warmup"] + sizes["pairs"]):
                for name in list(variants) if i % 2 == 0 else list(variants)[::-1]:
                    start = now()
                    states[name].step(images, images, labels, step=i, mixing=name == "MoCHi")
                    if i >= sizes["warmup"]:
                        times[name].append((now() - start) * 1e3)
            ms = {name: statistics.median(t) for name, t in times.items()}
            return {
                "moco_ms": round(ms["MoCo-v2"], 2),
                "mochi_ms": round(ms["MoCHi"], 2),
                "moco_images_per_sec": round(config.batch_size / ms["MoCo-v2"] * 1e3, 1),
                "mochi_images_per_sec": round(config.batch_size / ms["MoCHi"] * 1e3, 1),
                "mochi_over_moco": round(ms["MoCHi"] / ms["MoCo-v2"], 4),
                "mixed_precision": config.mixed_precision,
                "peak_mib": peak_mib(),
            }

        record.attempt("step", {"K": queue_size}, measure, need_s=45)

    def one_group() -> dict[str, Any]:
        """MoCo-v2 with one BatchNorm group (bn_splits 1): what the groups cost, for reference."""
        config, accelerator, state = library_state(config_for(sizes, mochi=(0, 0, 0), bn_splits=1))
        images, labels = _pre_made(config, accelerator)
        labels = labels.to(accelerator.device)
        times = []
        for i in range(sizes["warmup"] + sizes["pairs"]):
            start = now()
            state.step(images, images, labels, step=i, mixing=False)
            times.append((now() - start) * 1e3)
        ms = statistics.median(times[sizes["warmup"] :])
        return {"moco_ms": round(ms, 2), "moco_images_per_sec": round(config.batch_size / ms * 1e3, 1)}

    record.attempt("step", {"K": sizes["queues"][0], "bn_groups": 1}, one_group, need_s=30)


def part_profile(sizes: dict, record: Record) -> None:
    """Where a MoCHi step's time goes: the GPU's busy share of the wall time and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    def measure() -> dict[str, Any]:
        config, accelerator, state = library_state(config_for(sizes))
        images, labels = _pre_made(config, accelerator)
        labels = labels.to(accelerator.device)
        for i in range(3):
            state.step(images, images, labels, step=i, mixing=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        start = now()
        with profile(activities=activities) as prof:
            for i in range(sizes["profile_steps"]):
                state.step(images, images, labels, step=3 + i, mixing=True)
            now()
        wall_ms = (now() - start) * 1e3 / sizes["profile_steps"]
        gpu = torch.cuda.is_available()
        events = prof.key_averages()
        key = "self_device_time_total" if gpu else "self_cpu_time_total"
        top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:25]
        busy_ms = sum(getattr(e, key, 0) for e in events) / 1e3 / sizes["profile_steps"]
        return {
            "wall_ms_per_step": round(wall_ms, 2),
            "busy_ms_per_step": round(busy_ms, 2),
            "top": [
                {
                    "op": e.key[:80],
                    "ms_per_step": round(getattr(e, key, 0) / 1e3 / sizes["profile_steps"], 3),
                    "calls": e.count,
                }
                for e in top
            ],
        }

    record.attempt("profile", {"what": "MoCHi step"}, measure, need_s=40)


def part_decode(sizes: dict, photos: Path, record: Record) -> None:
    """The device's side of the bytes path: batches of JPEG files packed as the workers pack them (made beforehand,
    in memory), decoded on the device (nvJPEG on CUDA) and turned into both views by BatchViews.of as the loop calls
    it; and the decode alone. Images/s at the loop's batch size."""
    from mochi_hub.data.datasets import resolve_dataset
    from mochi_hub.data.decode import collate_packed
    from mochi_hub.data.views import BatchViews, pretraining_views

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def measure() -> dict[str, Any]:
        config = config_for(sizes, dataset=str(photos), augment_on="device")
        views = pretraining_views(resolve_dataset(config.dataset, "train"), config, "bytes")
        size = config.batch_size
        batches = [collate_packed([views[b * size + i] for i in range(size)]) for b in range(sizes["decode_batches"])]
        on_device = sum(sum(batch["images"].on_device) for batch in batches) / (size * len(batches))
        batch_views = BatchViews(config, "device", device, torch.channels_last)
        rates = {}
        for what, run in (
            ("decode", lambda step, batch: batch["images"].on(device)),
            ("decode_and_views", lambda step, batch: batch_views.of({**batch, "skipped": []}, step, 0)),
        ):
            run(0, batches[0])  # warm: nvJPEG's handle, kernels, the allocator
            start = now()
            for step, batch in enumerate(batches):
                run(step, batch)
            rates[what] = size * len(batches) / (now() - start)
        return {
            "device": device.type,
            "decode_images_per_sec": round(rates["decode"], 1),
            "decode_and_views_images_per_sec": round(rates["decode_and_views"], 1),
            "ms_per_batch": round(size / rates["decode_and_views"] * 1e3, 2),
            "share_decoded_on_device": round(on_device, 3),
            "batches": len(batches),
            "peak_mib": peak_mib(),
        }

    record.attempt(
        "decode", {"what": "nvJPEG batch decode + two views" if device.type == "cuda" else "CPU"}, measure, 40
    )


def part_data(sizes: dict, photos: Path, record: Record) -> None:
    from mochi_hub.data.datasets import resolve_dataset
    from mochi_hub.data.views import BatchViews, PretrainingLoader, loader_output, pretraining_views

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_dataset(str(photos), "train")
    for workers in sizes["workers"]:
        for path in ("device", "workers"):

            def measure(workers: int = workers, path: str = path) -> dict[str, Any]:
                config = config_for(sizes, dataset=str(photos), workers=workers, augment_on=path)
                views = pretraining_views(source, config, loader_output(path, device))
                batch_views = BatchViews(config, path, device, torch.channels_last)
                loader = PretrainingLoader(views, config, pin_memory=device.type == "cuda")
                batches = (batch for epoch in range(1000) for batch in loader.epoch(epoch))  # workers persist
                # DataLoader keeps 2 batches a worker in flight: start the clock once they are queued, and time
                # at least twice that many more, so the rate is the workers' own, not the queue's.
                fill, timed = max(1, 2 * workers), max(sizes["data_batches"], 4 * workers)
                for step in range(fill):
                    batch_views.of(next(batches), step, 0)
                start, images = now(), 0
                for step in range(fill, fill + timed):
                    batch = next(batches)
                    batch_views.of(batch, step, 0)
                    images += len(batch["labels"])
                rate = images / (now() - start)
                del batches, loader
                return {
                    "output": loader_output(path, device),
                    "images_per_sec": round(rate, 1),
                    "per_worker": round(rate / max(1, workers), 1),
                    "batches_timed": timed,
                }

            record.attempt("data", {"augment_on": path, "workers": workers}, measure, need_s=25)


def part_train(sizes: dict, photos: Path, out: Path, record: Record) -> None:
    from mochi_hub.training.pretrain import train

    for path, compiled in (("device", False), ("workers", False), ("device", True)):
        if compiled and sizes["model"] == SMOKE["model"]:
            continue  # compile on a CPU smoke costs minutes for nothing

        def measure(path: str = path, compiled: bool = compiled) -> dict[str, Any]:
            run_dir = out / f"train-{path}-{'compiled' if compiled else 'eager'}"
            config = config_for(
                sizes,
                dataset=str(photos),
                augment_on=path,
                compile=compiled,
                output=str(run_dir),
                max_steps=sizes["train_steps"],
                keep_checkpoints=1,
            )
            start = now()
            train(config)
            wall = now() - start
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in records if r["kind"] == "step"]
            steady = steps[1:]  # the first window holds start-up (and compilation)
            run = json.loads((run_dir / "run.json").read_text())
            first_window_s = sizes["window"] * sizes["batch_size"] / steps[0]["images_per_sec"] if steps else None
            steady_window_s = (
                sizes["window"] * sizes["batch_size"] / statistics.median(r["images_per_sec"] for r in steady)
                if steady
                else None
            )
            return {
                "workers": run["config"]["workers"],
                "images_per_sec": round(statistics.median(r["images_per_sec"] for r in steady), 1) if steady else None,
                "data_wait_share": round(statistics.median(r["data_wait_share"] for r in steady), 3)
                if steady
                else None,
                "start_up_s": round(first_window_s - steady_window_s, 1) if steady else None,
                "wall_s": round(wall, 1),
                "peak_mib": peak_mib(),
            }

        record.attempt("train", {"augment_on": path, "compile": compiled}, measure, need_s=90 if compiled else 45)


# --- targets and the table -------------------------------------------------------------------------------------


def targets(result: dict[str, Any]) -> dict[str, Any]:
    def rows(part: str) -> list[dict]:
        return [r for r in result.get(part, {}).get("rows", []) if "error" not in r and "skipped" not in r]

    out: dict[str, Any] = {}
    steps = {r["K"]: r for r in rows("step") if "bn_groups" not in r}

    def target(name: str, value: float | None, goal: str, met: bool) -> None:
        if value is not None:
            out[name] = {"value": value, "target": goal, "met": met}

    first = steps.get(min(steps)) if steps else None
    largest = steps.get(max(steps)) if steps else None
    if first:
        target(
            "moco_step_images_per_sec", first["moco_images_per_sec"], ">= 3000", first["moco_images_per_sec"] >= 3000
        )
    if largest:
        ratio = largest["mochi_over_moco"]
        target(f"mochi_over_moco_at_K{largest['K']}", ratio, "<= 1.05", ratio <= 1.05)
    runs = {(r["augment_on"], r["compile"]): r["images_per_sec"] for r in rows("train")}
    device, workers = runs.get(("device", False)), runs.get(("workers", False))
    if device and first:
        share = device / first["mochi_images_per_sec"]
        target("train_device_over_tensors_only", round(share, 3), ">= 0.8", share >= 0.8)
    if device and workers:
        target("train_device_over_workers", round(device / workers, 2), ">= 3", device / workers >= 3)
    decode = rows("decode")
    if decode and decode[0]["device"] == "cuda":
        value = decode[0]["decode_and_views_images_per_sec"]
        target("decode_and_views_images_per_sec", value, ">= 5000", value >= 5000)
    syncs = rows("syncs")
    if syncs:
        worst = max(syncs[0]["syncs_per_step"])
        target("syncs_per_step", worst, "== 0", worst == 0)
    return out


def machine() -> dict[str, Any]:
    import accelerate
    import timm

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "cpu_count": os.cpu_count(),
        "command": " ".join(sys.argv),
    }
    if Path("/dev/shm").exists():
        info["dev_shm_gib"] = round(shutil.disk_usage("/dev/shm").total / 2**30, 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def print_table(result: dict[str, Any]) -> None:
    for part in ("smoke", "syncs", "step", "decode", "data", "train"):
        rows = result.get(part, {}).get("rows", [])
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            print(f"\n## {part}\n\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
            for r in rows:
                print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    for r in result.get("profile", {}).get("rows", []):
        print(f"\n## profile\n\n{json.dumps({k: v for k, v in r.items() if k != 'top'})}")
        for e in r.get("top", [])[:12]:
            print(f"  {e['ms_per_step']:9.3f} ms  x{e['calls']:<5} {e['op']}")
    print(f"\n## targets\n\n{json.dumps(result.get('targets', {}), indent=1)}")


PARTS = ("smoke", "syncs", "step", "profile", "decode", "data", "train")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, seconds on a CPU (what CI runs)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    parser.add_argument("--photos", type=int, default=None, help="JPEGs to write (default: 40 batches' worth)")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts of the data part")
    parser.add_argument("--queues", default=None, help="comma-separated queue sizes K of the step part")
    parser.add_argument("--train-steps", type=int, default=None, help="steps of each train() run")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for the parts, after the photos")
    default_out = Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else ROOT / "bench/results/gpu.json"
    parser.add_argument("--out", type=Path, default=default_out, help=f"the JSON (default: {default_out})")
    args = parser.parse_args(argv)
    sizes = dict(SMOKE if args.smoke else FULL)
    if args.photos:
        sizes["photos"] = args.photos
    if args.workers:
        sizes["workers"] = tuple(int(w) for w in args.workers.split(","))
    if args.queues:
        sizes["queues"] = tuple(int(k) for k in args.queues.split(","))
    if args.train_steps:
        sizes["train_steps"] = args.train_steps
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    result: dict[str, Any] = {"machine": machine(), "toy_sizes": args.smoke, "sizes": dict(sizes)}
    with tempfile.TemporaryDirectory(prefix="mochi-gpu-bench-") as tmp:
        started = time.monotonic()
        photos = Path(tmp) / "photos" / "train"
        result["photos"] = {**write_photos(photos, sizes["photos"], small=args.smoke), "written_s": 0.0}
        result["photos"]["written_s"] = round(time.monotonic() - started, 1)
        record = Record(args.out, result, deadline=time.monotonic() + args.budget_s)
        for part in (p for p in PARTS if p in args.parts.split(",")):
            t = time.monotonic()
            try:
                if part == "smoke":
                    part_smoke(sizes, photos, Path(tmp), record)
                elif part == "syncs":
                    part_syncs(sizes, photos, record)
                elif part == "step":
                    part_step(sizes, record)
                elif part == "profile":
                    part_profile(sizes, record)
                elif part == "decode":
                    part_decode(sizes, photos, record)
                elif part == "data":
                    part_data(sizes, photos, record)
                elif part == "train":
                    part_train(sizes, photos, Path(tmp), record)
            except Exception as error:  # a part's own set-up failed: say so, go on
                record.set(part, error=f"{type(error).__name__}: {error}", where=_where(error))
            result.setdefault("seconds", {})[part] = round(time.monotonic() - t, 1)
            record.write()
            print(f"[{time.monotonic() - started:.0f}s] {part} done", flush=True)
    print_table(result)
    print(f"\nwritten: {args.out}")
    return result


if __name__ == "__main__":
    main()
