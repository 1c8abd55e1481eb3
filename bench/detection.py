"""Detection transfer benchmark: box AP of backbones fine-tuned at equal budget on Fashion-MNIST canvases.

The data is real: Fashion-MNIST items from Debian's idx files pasted onto canvases in the COCO layout
(``bench/canvases.py``: train canvases from the training split, val canvases from the test
split, each box the tight outline of the item's own pixels, no overlaps; ``--backgrounds`` puts them on crops of
scikit-image's bundled photos). Every SOURCE given (a run directory, a timm folder, hf-hub:...) and an untrained
backbone of the same architecture with the same init as pretraining (``backbone_args(arch, init="moco")``,
torch seed 0, saved as a timm folder) is fine-tuned with ``mochi_hub.evaluate.detect.run_detect`` under the same
DetectConfig (the ``canvas`` preset, overridable here) for each of ``--seeds``; the table gives AP and AP50
(COCO box AP, %) as mean +- std over the seeds. A backbone worth publishing should beat the untrained one.

Run (the full setting is for a GPU machine: 1000 canvases, 12 epochs, 3 seeds per backbone):

    .venv/bin/python bench/detection.py runs/demo                  # a trained run against its untrained twin
    .venv/bin/python bench/detection.py --quick SOURCE             # smoke run, under a minute on 2 cores

Prints a Markdown table and writes JSON (``--out``, default bench/results/detection.json).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, bench/canvases.py
import common

SIZED = dict(
    train_canvases=(int, 8, 1000, "training canvases"),
    val_canvases=(int, 4, 200, "validation canvases"),
    epochs=(int, 2, None, "fine-tuning epochs; none: the canvas preset's (12)"),
    batch_size=(int, 2, None, "global batch; none: the canvas preset's (8)"),
    fpn_channels=(int, 32, 256, "FPN channels"),
    seeds=(str, "0", "0,1,2", "fine-tuning seeds, comma-separated"),
    arch=(str, "test_resnet", None, "architecture of the untrained baseline; none: the first SOURCE's"),
)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")  # inside the scikit-image wheel


def parse_args(argv=None):
    p = common.parser(
        __doc__,
        "detection",
        quick="a few canvases, 2 epochs, a tiny untrained baseline: a smoke run",
        threads=common.usable_cpus(),
        threads_help="torch threads (default: the CPUs this process may use)",
        sized=SIZED,
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="backbones to compare (run dir, timm folder, hf-hub:)")
    p.add_argument("--data", type=Path, help="use this COCO-layout folder instead of building canvases")
    p.add_argument("--size", type=int, default=128, help="canvas side and --image-size in pixels (default 128)")
    p.add_argument("--backgrounds", action="store_true", help="paste onto crops of real photos (scikit-image)")
    p.add_argument("--workers", type=int, default=2, help="data-loading workers (default 2)")
    p.add_argument("--mixed-precision", default="no", help="no | bf16 | fp16 (default no)")
    return common.parse(p, argv)


def untrained(arch: str, folder: Path) -> str:
    """A fresh backbone with pretraining's init (MoCo's: zero_init_last=False), seed 0, as a timm folder."""
    import timm
    import torch

    from mochi_hub.method.model import backbone_args, create_backbone

    torch.manual_seed(0)
    timm.models.save_for_hf(
        create_backbone(arch, **backbone_args(arch, init="moco")), str(folder), safe_serialization=True
    )
    return str(folder)


def spread(values: list[float | None]) -> str:
    found = [v for v in values if v is not None]
    if not found:
        return "-"
    std = statistics.stdev(found) if len(found) > 1 else 0.0
    return f"{statistics.mean(found):.2f} ± {std:.2f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from canvases import write_canvas_dataset

    from mochi_hub.config import resolve_detect_config
    from mochi_hub.evaluate.detect import run_detect
    from mochi_hub.publish.sources import load_backbone

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    arch = args.arch or (load_backbone(args.sources[0])[1]["architecture"] if args.sources else "resnet50")
    result = dict(bench="detection", quick=args.quick, seeds=seeds, arch=arch, **common.environment(__file__, argv))
    rows = []
    with tempfile.TemporaryDirectory(prefix="mochi-bench-detection-") as tmp:
        data = args.data
        if data is None:
            import skimage.data

            photos = [getattr(skimage.data, name)() for name in PHOTOS] if args.backgrounds else None
            data = write_canvas_dataset(
                Path(tmp) / "canvases",
                train=args.train_canvases,
                val=args.val_canvases,
                size=args.size,
                seed=0,
                backgrounds=photos,
            )
        result["data"] = str(args.data) if args.data else f"canvases {args.train_canvases}/{args.val_canvases}"
        named = [(s, s) for s in args.sources] + [(f"untrained {arch} (MoCo init)", untrained(arch, Path(tmp) / "u"))]
        print(f"detection bench: {len(named)} backbone(s) x seeds {seeds} on {result['data']}", flush=True)
        for label, source in named:
            runs = []
            for seed in seeds:
                options = dict(
                    preset="canvas",
                    data=str(data),
                    image_size=args.size,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    fpn_channels=args.fpn_channels,
                    seed=seed,
                    workers=args.workers,
                    mixed_precision=args.mixed_precision,
                    output=str(Path(tmp) / f"out-{len(rows)}-{seed}"),
                )
                config = resolve_detect_config(**{k: v for k, v in options.items() if v is not None})
                started = time.perf_counter()
                out = run_detect(source, config, show=False)
                seconds = time.perf_counter() - started
                runs.append(dict(seed=seed, seconds=round(seconds, 2), **{k: out[k] for k in ("AP", "AP50", "AP75")}))
                print(f"  {label}  seed {seed}: AP {out['AP']}  AP50 {out['AP50']}  ({seconds:.1f} s)", flush=True)
            result.setdefault("config", out["hyperparameters"])
            result.setdefault("evaluator", out["evaluator"])
            rows.append(dict(backbone=label, weights_sha256=out["weights_sha256"], runs=runs))
    table = common.markdown_table(
        ["backbone", "AP %", "AP50 %", "seconds / run"],
        [
            [
                r["backbone"],
                spread([x["AP"] for x in r["runs"]]),
                spread([x["AP50"] for x in r["runs"]]),
                common.fmt(statistics.mean(x["seconds"] for x in r["runs"])),
            ]
            for r in rows
        ],
    )
    print(f"\n{table}\n\nCOCO box AP, mean ± std over seeds {seeds}; evaluator {result['evaluator']}")
    common.write_result(args.out, dict(result, rows=rows))


if __name__ == "__main__":
    main()
