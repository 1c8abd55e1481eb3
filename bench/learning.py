"""Is it learning? kNN on held-out real images against training steps, beside the references that a claim of
learning must beat: the exact untrained backbone (same architecture, init and seed) and raw pixels.

    .venv/bin/python bench/learning.py --preset fashion-mnist                  # the preset's recipe, ~30 min
    .venv/bin/python bench/learning.py --preset fashion-mnist --set lr=0.06    # one knob changed
    .venv/bin/python bench/learning.py --quick                                 # a smoke run, seconds

Fashion-MNIST: the kNN bank is a seeded 20,000-image subset of the training split, the queries the whole test
split (10,000; --max-images subsets of both when --bank is smaller), at the run's image size through the probe's
evaluation transform; kNN k = 200, T = 0.07, on the backbone's pooled features: the library's kNN monitor
(mochi_hub.evaluate.monitor, `--knn-monitor-every`), which is `mochi probe --protocol knn --max-images N`. At the
end the trained backbone, the untrained one and raw pixels (centred by the bank's mean image) are also probed with the
real `run_probe` (knn and fast), and the curve's last point must equal the knn probe (it is the same number
computed twice). Writes a JSON (every point, the config, the references) and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

BANK, K, T = 20000, 200, 0.07


class Pixels(nn.Module):
    """Raw pixels as 'features': the flattened image minus the bank's mean image."""

    def __init__(self, mean_image: Tensor):
        super().__init__()
        self.register_buffer("mean_image", mean_image.flatten())  # [C*H*W]
        self.num_features = mean_image.numel()  # the width a probe reads, as on a timm model

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1) - self.mean_image  # [B, C*H*W]


def eval_tensors(image_size: int, bank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(bank images, labels, test images, labels) through the probe's evaluation transform."""
    from mochi_hub.data.augment import eval_transform
    from mochi_hub.data.datasets import resolve_dataset, to_rgb
    from mochi_hub.data.sampling import subset

    transform = eval_transform(image_size)
    out = []
    for stream, split in enumerate(("train", "val")):  # the subsets `mochi probe --max-images` takes
        source = resolve_dataset("fashion-mnist", split)
        indices = subset(len(source), bank, 0, stream)
        images = torch.stack([transform(to_rgb(source[i][0])) for i in indices])  # [N, 3, S, S]
        out += [images, torch.tensor([source[i][1] for i in indices])]
    return tuple(out)


def probes(source: str, backbone: tuple[nn.Module, dict] | None, image_size: int, bank: int, cache: Path) -> dict:
    """The real `mochi probe` knn and fast top-1 of a backbone: a run directory (backbone None, its results kept
    in RUN/probes/), or a (module, info) pair."""
    from mochi_hub.config import resolve_probe_config
    from mochi_hub.evaluate.probe import run_probe

    out = {}
    for protocol in ("knn", "fast"):
        config = resolve_probe_config(
            dataset="fashion-mnist",
            protocol=protocol,
            image_size=image_size,
            max_images=bank,
            workers=2,
            cache_dir=str(cache),
        )
        out[protocol] = run_probe(source, config, backbone=backbone, show=False)["top1"]
    return out


def pixels_reference(bank_images: Tensor) -> tuple[Pixels, dict[str, Any]]:
    """Raw pixels centred by the bank's mean image, with the info `run_probe` wants for a module."""
    from mochi_hub.publish.sources import weights_sha256

    pixels = Pixels(bank_images.mean(0)).eval()
    info = {"kind": "raw-pixels", "weights_sha256": weights_sha256(pixels), "num_features": pixels.mean_image.numel()}
    return pixels, info


def run(args) -> dict[str, Any]:
    import yaml

    from mochi_hub.config import resolve_train_config
    from mochi_hub.publish.sources import weights_sha256
    from mochi_hub.training.pretrain import train
    from mochi_hub.training.state import initial_encoder

    options = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}  # "0.015" -> 0.015
    config = resolve_train_config(
        preset=args.preset,
        output=str(args.runs_dir / args.name),
        report_to="none",
        **options,
        **({"max_steps": args.steps} if args.steps else {}),
    )
    shutil.rmtree(config.output, ignore_errors=True)
    data = eval_tensors(config.image_size, args.bank)
    untrained = initial_encoder(config)[0].backbone.eval()
    pixels = pixels_reference(data[0])
    # The library's kNN monitor draws the curve: the same bank, queries, k and T as `mochi probe --max-images`.
    config = dataclasses.replace(config, knn_monitor_every=args.every, knn_monitor_images=args.bank)
    run_dir = train(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [
        {"step": r["step"], "knn": r["knn_top1"], "train_s": r["train_s"]} for r in records if r["kind"] == "monitor"
    ]
    for point in curve[1:]:
        print(f"step {point['step']}: kNN {point['knn']:.2f} after {point['train_s']:.0f} s of training", flush=True)
    cache = args.runs_dir / "feature-cache"
    untrained_info = {"weights_sha256": weights_sha256(untrained), "num_features": untrained.num_features}
    references = {
        "untrained": probes("untrained", (untrained, untrained_info), config.image_size, args.bank, cache),
        "raw pixels (centred)": probes("pixels", pixels, config.image_size, args.bank, cache),
        "trained": probes(str(run_dir), None, config.image_size, args.bank, cache),
    }
    return {
        "config": config.to_dict(),
        "curve": curve,
        "references": references,
        "bank": args.bank,
        "knn": {"k": K, "temperature": T},
        "crossed_untrained_at": next((p["step"] for p in curve[1:] if p["knn"] > curve[0]["knn"]), None),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(
        __doc__,
        "learning",
        quick="a smoke run: test_resnet, a few steps, small bank",
        threads=2,
        threads_help="torch threads (default 2)",
    )
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a TrainConfig field")
    p.add_argument("--every", type=int, default=None, help="kNN every N steps (default: 4 points an epoch)")
    p.add_argument("--steps", type=int, default=None, help="stop after N steps (the schedule keeps its length)")
    p.add_argument("--bank", type=int, default=BANK)
    p.add_argument("--runs-dir", type=Path, default=common.ROOT / "runs" / "learning")
    p.add_argument("--name", default="run")
    args = common.parse(p, argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.set = [
            "model=test_resnet",
            "max_train_images=256",
            "epochs=2",
            "batch_size=32",
            "queue_size=128",
            "mochi=16,16,8",
            "mixing_warmup_epochs=1",
            "bn_splits=2",
            *args.set,
        ]
        args.bank, args.every = 500, args.every or 4
    from mochi_hub.config import TRAIN_PRESETS

    if args.every is None:
        preset = TRAIN_PRESETS[args.preset]
        per_epoch = (preset.get("max_train_images") or 60000) // preset.get("batch_size", 256)
        args.every = max(1, per_epoch // 4)
    started = time.perf_counter()
    result = {**common.environment(__file__, argv), **run(args), "seconds": round(time.perf_counter() - started, 1)}
    last, probed = result["curve"][-1]["knn"], result["references"]["trained"]["knn"]
    result["curve_matches_probe"] = math.isclose(last, probed, abs_tol=0.02)
    common.write_result(args.out, result)
    rows = [
        [name, common.fmt(r["knn"], ".2f"), common.fmt(r["fast"], ".2f")] for name, r in result["references"].items()
    ]
    print(common.markdown_table(["backbone", "kNN top-1 %", "fast-linear top-1 %"], rows))
    print(
        common.markdown_table(
            ["step", "kNN top-1 %", "training s"],
            [[p["step"], common.fmt(p["knn"], ".2f"), p["train_s"]] for p in result["curve"]],
        )
    )
    if not result["curve_matches_probe"]:
        raise SystemExit(f"the curve's last kNN ({last:.2f}) differs from the knn probe ({probed:.2f})")
    return result


if __name__ == "__main__":
    main()
