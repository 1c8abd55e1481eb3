"""The GPU path of `mochi train`, measured on one GPU (issue 12), as one prepared script of at most 8 minutes.

    PYTHONPATH=. python bench/gpu.py                  # on the GPU machine: writes bench/results/gpu.json
    PYTHONPATH=. python bench/gpu.py --smoke          # seconds, on a CPU: every part at toy sizes (CI runs it)
    PYTHONPATH=. python bench/gpu.py --parts data --workers 2 --photos 768 --data-batches 2   # the CPU figure

ResNet-50 at 224 px, bf16 autocast + channels_last, global batch 256, one process. Real photos: scikit-image's
sample photos, cropped at random and resized to ImageNet-like 500x375 JPEGs, written on the spot. Parts:

- step: one training step (mochi_hub.method.step.training_step, as the loop calls it) on pre-made device tensors,
  MoCo-v2 and MoCHi (1024, 1024, 512) at K = 16384 and 65536, alternated; median ms, images/s, peak memory.
- data: images/s of the data path alone for 2..15 workers: PIL views in the workers (the worker path) against
  decode-only workers + the batched device views (`--augment-on device`).
- train: end-to-end `train()` images/s (metrics.jsonl windows after the first), both augmentation paths, with
  and without `--compile`; against the step part's tensors-only rate.
- smoke: 2 CUDA steps of train, then probe (knn) and export of that run; peak memory of each.

Targets: end-to-end with device views >= 80 % of the tensors-only step and >= 3x the worker path; the MoCHi
step <= 1.05x the MoCo-v2 step at K = 16384. Each part is written to the JSON as it finishes, so a run cut short
still reports what it measured. Nothing is downloaded: only torch, timm, accelerate, safetensors, scikit-image
and this checkout are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(
    model="resnet50",
    image_size=224,
    batch_size=256,
    photos=256 * 44,
    pairs=20,
    warmup=5,
    mochi=(1024, 1024, 512),
    queues=(16384, 65536),
    workers=(2, 4, 8, 12, 15),
    data_batches=12,
    train_steps=40,
    window=5,
    photo_size=(500, 375),
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
    train_steps=4,
    window=2,
    photo_size=(50, 38),
)


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_mib(reset: bool = True) -> float | None:
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**20
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def reset_accelerate() -> None:
    """Each part builds its own Accelerator; Accelerate keeps one state per process, reset between parts."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """`count` JPEGs, 500x375 (ImageNet's typical size) random crops of scikit-image's photos, in 4 classes."""
    import numpy as np
    from PIL import Image
    from skimage import data as photos

    sources = [
        Image.fromarray(np.asarray(getattr(photos, name)())).convert("RGB")
        for name in ("astronaut", "chelsea", "coffee", "rocket")
    ]
    rng = np.random.default_rng(0)
    for index in range(count):
        image = sources[index % 4]
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        target = folder / f"photo{index % 4}" / f"{index:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BILINEAR).save(target, quality=90)
    return folder


def config_for(sizes: dict, **overrides: Any):
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
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        channels_last=True,
        report_to="none",
        workers=0,
        log_every_steps=sizes["window"],
    )
    return TrainConfig(**(values | overrides))


# --- part 1: the step on pre-made tensors ---------------------------------------------------------------------


def part_step(sizes: dict) -> dict[str, Any]:
    from accelerate import Accelerator

    from mochi_hub.core.distributed import local_bn_splits
    from mochi_hub.core.seeding import generator
    from mochi_hub.method.model import Encoder, backbone_args, create_backbone, make_key_encoder
    from mochi_hub.method.queue import NegativeQueue
    from mochi_hub.method.step import training_step

    rows = []
    for queue_size in sizes["queues"]:
        reset_accelerate()
        variants = {"MoCo-v2": (0, 0, 0), "MoCHi": config_for(sizes).mochi}
        configs = {name: config_for(sizes, queue_size=queue_size, mochi=mochi) for name, mochi in variants.items()}
        base = configs["MoCo-v2"]
        accelerator = Accelerator(mixed_precision=base.mixed_precision)
        device = accelerator.device
        splits = local_bn_splits(base.batchnorm_groups, 1, base.batch_size)
        images = torch.randn(base.batch_size, 3, base.image_size, base.image_size, device=device).contiguous(
            memory_format=torch.channels_last
        )
        labels = torch.arange(base.batch_size, device=device) % 100
        states = {}
        for name, config in configs.items():
            torch.manual_seed(0)
            query = Encoder(create_backbone(config.model, **backbone_args(config.model)), config.proj_dim)
            key = make_key_encoder(query)
            queue = NegativeQueue(config.queue_size, config.proj_dim, generator=generator(0, "queue_init"))
            query.to(memory_format=torch.channels_last)
            key.to(device, memory_format=torch.channels_last)
            queue.to(device)
            optimizer = torch.optim.SGD(query.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
            query, optimizer = accelerator.prepare(query, optimizer)
            states[name] = (config, query, key, queue, optimizer)
        times: dict[str, list[float]] = {name: [] for name in configs}
        for i in range(sizes["warmup"] + sizes["pairs"]):
            for name in list(configs) if i % 2 == 0 else list(configs)[::-1]:
                config, query, key, queue, optimizer = states[name]
                start = now()
                training_step(
                    query,
                    key,
                    queue,
                    optimizer,
                    accelerator,
                    images,
                    images,
                    labels,
                    config=config,
                    step=i,
                    mixing=config.uses_mixing,
                    bn_splits=splits,
                )
                if i >= sizes["warmup"]:
                    times[name].append((now() - start) * 1e3)
        for name in configs:
            median = statistics.median(times[name])
            rows.append(
                {
                    "variant": name,
                    "K": queue_size,
                    "median_ms": round(median, 2),
                    "images_per_sec": round(base.batch_size / median * 1e3, 1),
                }
            )
        rows[-1]["mochi_over_moco"] = round(rows[-1]["median_ms"] / rows[-2]["median_ms"], 4)
        rows[-1]["peak_mib"] = peak_mib()
        del states
    return {"rows": rows}


# --- part 2: the data path alone ------------------------------------------------------------------------------


def part_data(sizes: dict, photos: Path) -> dict[str, Any]:
    from mochi_hub.data.datasets import resolve_dataset
    from mochi_hub.data.views import BatchViews, epoch_loader, pretraining_views

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_dataset(str(photos), "train")
    rows = []
    for workers in sizes["workers"]:
        for path in ("workers", "device"):
            config = config_for(sizes, dataset=str(photos), workers=workers, augment_on=path)
            views = pretraining_views(source, config, path)
            batch_views = BatchViews(config, path, device, torch.channels_last)
            loader = iter(epoch_loader(views, config, 0, pin_memory=device.type == "cuda"))
            batch_views.of(next(loader), 0, 0)  # workers started, first batch out
            start, images = now(), 0
            for step, batch in zip(range(1, sizes["data_batches"] + 1), loader):
                batch_views.of(batch, step, 0)
                images += len(batch["labels"])
            rows.append({"augment_on": path, "workers": workers, "images_per_sec": round(images / (now() - start), 1)})
    return {"rows": rows}


# --- part 3: end-to-end train() -------------------------------------------------------------------------------


def part_train(sizes: dict, photos: Path, out: Path) -> dict[str, Any]:
    from mochi_hub.training.pretrain import train

    rows = []
    workers = sizes["workers"][-1]
    for path in ("device", "workers"):
        for compiled in (False, True):
            if compiled and (args_smoke(sizes) or path == "workers"):
                continue  # compile changes the GPU side only; the worker path is bound by the CPUs
            reset_accelerate()
            run_dir = out / f"train-{path}-{'compiled' if compiled else 'eager'}"
            config = config_for(
                sizes,
                dataset=str(photos),
                workers=workers,
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
            windows = [r["images_per_sec"] for r in records if r["kind"] == "step"][1:]  # the first holds start-up
            rows.append(
                {
                    "augment_on": path,
                    "compile": compiled,
                    "workers": workers,
                    "images_per_sec": round(statistics.median(windows), 1) if windows else None,
                    "wall_s": round(wall, 1),
                    "peak_mib": peak_mib(),
                }
            )
    return {"rows": rows}


# --- part 4: 2-step smoke of train + probe + export -----------------------------------------------------------


def part_smoke(sizes: dict, photos: Path, out: Path) -> dict[str, Any]:
    from mochi_hub.config import ProbeConfig
    from mochi_hub.evaluate.probe import run_probe
    from mochi_hub.publish.export import export_run
    from mochi_hub.training.pretrain import train

    reset_accelerate()
    run_dir = train(
        config_for(sizes, dataset=str(photos), output=str(out / "smoke"), max_steps=2, workers=2, augment_on="device")
    )
    memory = {"train_peak_mib": peak_mib()}
    reset_accelerate()
    result = run_probe(
        str(run_dir),
        ProbeConfig(
            dataset=str(photos),
            protocol="knn",
            split="train",
            image_size=sizes["image_size"],
            max_images=64,
            workers=2,
            batch_size=32,
            cache_dir=str(out / "cache"),
            mixed_precision="bf16" if torch.cuda.is_available() else "no",
        ),
        show=False,
    )
    memory["probe_peak_mib"] = peak_mib()
    export = export_run(run_dir)
    return {"knn_top1": result["top1"], "export_files": sorted(p.name for p in export.iterdir()), **memory}


def args_smoke(sizes: dict) -> bool:
    return sizes["model"] == SMOKE["model"]


def targets(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    steps = result.get("step", {}).get("rows", [])
    first_k = [r for r in steps if r["variant"] == "MoCHi" and r["K"] == (steps[0]["K"] if steps else None)]
    if first_k:
        out["mochi_step_over_moco"] = {
            "value": first_k[0]["mochi_over_moco"],
            "target": "<= 1.05",
            "met": first_k[0]["mochi_over_moco"] <= 1.05,
        }
    runs = {(r["augment_on"], r["compile"]): r["images_per_sec"] for r in result.get("train", {}).get("rows", [])}
    tensors = next((r["images_per_sec"] for r in steps if r["variant"] == "MoCHi"), None)
    device, workers = runs.get(("device", False)), runs.get(("workers", False))
    if device and tensors:
        out["device_over_tensors_only"] = {
            "value": round(device / tensors, 3),
            "target": ">= 0.8",
            "met": device / tensors >= 0.8,
        }
    if device and workers:
        out["device_over_workers"] = {
            "value": round(device / workers, 2),
            "target": ">= 3",
            "met": device / workers >= 3,
        }
    return out


def machine() -> dict[str, Any]:
    import timm

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpu_count": os.cpu_count(),
        "command": " ".join(sys.argv),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def print_table(result: dict[str, Any]) -> None:
    for part in ("step", "data", "train"):
        rows = result.get(part, {}).get("rows", [])
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            print(f"\n## {part}\n\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
            for r in rows:
                print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if "smoke" in result:
        print(f"\n## smoke\n\n{json.dumps(result['smoke'])}")
    print(f"\n## targets\n\n{json.dumps(result.get('targets', {}), indent=1)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, seconds on a CPU (what CI runs)")
    parser.add_argument("--parts", default="step,data,train,smoke")
    parser.add_argument("--photos", type=int, default=None, help="JPEGs to write (default: 44 batches' worth)")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts of the data part")
    parser.add_argument("--data-batches", type=int, default=None, help="batches timed per data-part setting")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = parser.parse_args(argv)
    sizes = dict(SMOKE if args.smoke else FULL)  # FULL on a CPU is possible (e.g. --parts data), only slow
    if args.photos:
        sizes["photos"] = args.photos
    if args.workers:
        sizes["workers"] = tuple(int(w) for w in args.workers.split(","))
    if args.data_batches:
        sizes["data_batches"] = args.data_batches
    torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {"machine": machine(), "smoke": args.smoke, "sizes": dict(sizes)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mochi-gpu-bench-") as tmp:
        photos = write_photos(Path(tmp) / "photos" / "train", sizes["photos"], sizes["photo_size"]).parent
        result["photos_written_s"] = round(time.perf_counter() - started, 1)
        for part in args.parts.split(","):
            t = time.perf_counter()
            try:
                if part == "step":
                    result["step"] = part_step(sizes)
                elif part == "data":
                    result["data"] = part_data(sizes, photos / "train")
                elif part == "train":
                    result["train"] = part_train(sizes, photos / "train", Path(tmp))
                elif part == "smoke":
                    result["smoke"] = part_smoke(sizes, photos / "train", Path(tmp))
            except Exception as error:
                result[part] = {"error": f"{type(error).__name__}: {error}"}
            result.setdefault("seconds", {})[part] = round(time.perf_counter() - t, 1)
            result["targets"] = targets(result)
            args.out.write_text(json.dumps(result, indent=2))
            print(f"[{time.perf_counter() - started:.0f}s] {part} done", flush=True)
    print_table(result)
    return result


if __name__ == "__main__":
    main()
