"""The loader's ceiling on this CPU (issue 30): images/s per core for what a loader worker does on each path, on
ImageNet-like JPEGs, and from it the cores one GPU needs at 3,000 images/s.

    .venv/bin/python bench/loader.py            # bench/results/loader.json; about 2 minutes on 2 cores
    .venv/bin/python bench/loader.py --quick    # seconds, toy photos (CI runs it)

Each path is timed as one worker does its job, in this process with one thread (so: images/s of one core), through
the library's own `pretraining_views` and collate functions, on images in the loader's seeded order:
- pil_views (--augment-on workers): read the file, decode it (a JPEG at reduced scale when its shorter side exceeds
  image-size / sqrt(0.2)), MoCo-v2's two PIL views, collate;
- device_cpu_decode (--augment-on device on a CPU): read, decode as above to HWC uint8, pack the batch (no padding);
- bytes_only (--augment-on device on a GPU): read the file, parse the JPEG header, pack the bytes (the GPU decodes).
The device's side of the two device paths (decode with nvJPEG, views) is bench/gpu.py's part `decode`. The photos
are bench/gpu.py's (`write_photos`: colour photos at 500 x 375 / 375 x 500, sensor-like noise, quality 88-96,
about 100 KB, as ImageNet's). The machine is shared: the paths alternate within each round (the order reversed
every other round), the table gives medians over the rounds and the ratios to pil_views per round.

Targets (issue 30): bytes_only >= 5x the images/s per core of pil_views; device_cpu_decode >= 2x.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from gpu import write_photos

PATHS = {"pil_views": "views", "device_cpu_decode": "pixels", "bytes_only": "bytes"}  # name: loader output
GPU_RATE = 3000  # images/s one GPU trains (issue 30's figure for one H200, ResNet-50)
TARGETS = {"bytes_only": 5.0, "device_cpu_decode": 2.0}  # x pil_views, images/s per core


def rate(views, collate, order: list[int], batch: int, seconds: float) -> float:
    """Images/s of `collate([views[i] ...])` over whole batches, for at least `seconds`."""
    start, images, k = time.perf_counter(), 0, 0
    while images == 0 or time.perf_counter() - start < seconds:
        indices = [order[(k * batch + j) % len(order)] for j in range(batch)]
        collate([views[i] for i in indices])
        images, k = images + batch, k + 1
    return images / (time.perf_counter() - start)


def measure(args) -> dict[str, Any]:
    import torch

    from mochi_hub.config import TrainConfig
    from mochi_hub.data.datasets import collate_samples, resolve_dataset
    from mochi_hub.data.decode import collate_packed
    from mochi_hub.data.views import pretraining_views

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mochi-loader-bench-") as tmp:
        photos = write_photos(Path(tmp) / "train", args.photos, small=args.quick)
        source = resolve_dataset(str(Path(tmp)), "train")
        config = TrainConfig(dataset=tmp, image_size=args.image_size, seed=0)
        views = {name: pretraining_views(source, config, output) for name, output in PATHS.items()}
        collate = {name: collate_samples if output == "views" else collate_packed for name, output in PATHS.items()}
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(0)).tolist()
        for name in PATHS:  # warm: the page cache holds the files, each path has run once
            rate(views[name], collate[name], order, args.batch, 0.0)
        rounds = []
        for r in range(args.rounds):
            names = list(PATHS) if r % 2 == 0 else list(PATHS)[::-1]
            rounds.append({name: rate(views[name], collate[name], order, args.batch, args.seconds) for name in names})
            print(f"round {r + 1}: " + ", ".join(f"{n} {v:.1f}" for n, v in rounds[-1].items()), flush=True)
    rows = {}
    for name in PATHS:
        per_core = statistics.median(r[name] for r in rounds)
        ratios = [r[name] / r["pil_views"] for r in rounds]
        rows[name] = {
            "images_per_sec_per_core": round(per_core, 1),
            "over_pil_views_median": round(statistics.median(ratios), 2),
            "over_pil_views_range": [round(min(ratios), 2), round(max(ratios), 2)],
            "cores_for_3000_per_sec": math.ceil(GPU_RATE / per_core),
        }
    return {"photos": photos, "rounds": rounds, "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(
        __doc__,
        "loader",
        quick="toy photos (50 x 37), short rounds: seconds",
        threads=1,
        threads_help="torch threads (one core per worker: 1)",
        sized={
            "photos": (int, 32, 512, "ImageNet-like JPEGs written"),
            "rounds": (int, 2, 5, "rounds, each timing every path"),
            "seconds": (float, 0.2, 4.0, "seconds each path is timed per round"),
            "batch": (int, 8, 64, "images per collated batch"),
            "image_size": (int, 32, 224, "view size in pixels"),
        },
    )
    args = common.parse(p, argv)
    result = {**common.environment(__file__, argv), "settings": vars(args) | {"out": str(args.out)}}
    result |= measure(args)
    rows = result["rows"]
    result["targets"] = {
        name: {
            "value": rows[name]["over_pil_views_median"],
            "target": f">= {goal:g}x pil_views",
            "met": rows[name]["over_pil_views_median"] >= goal,
        }
        for name, goal in TARGETS.items()
    }
    print(
        "\n"
        + common.markdown_table(
            [
                "path (what a worker does)",
                "images/s per core",
                "x pil_views (median, range)",
                f"cores for {GPU_RATE:,} images/s",
            ],
            [
                [
                    name,
                    f"{row['images_per_sec_per_core']:,.1f}",
                    f"{row['over_pil_views_median']:.2f} ({row['over_pil_views_range'][0]:.2f}-"
                    f"{row['over_pil_views_range'][1]:.2f})",
                    row["cores_for_3000_per_sec"],
                ]
                for name, row in rows.items()
            ],
        )
    )
    print(f"photos: {result['photos']}; targets: {result['targets']}")
    common.write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
