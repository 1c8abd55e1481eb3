"""Benchmark of `mochi probe` (issue 4's targets): the cached-feature ``fast`` protocol against the paper's
``linear`` protocol, on the same data with the same backbone and classifier settings, plus kNN.

Each run is ``mochi_hub.evaluate.probe.run_probe`` (behind ``mochi probe``) on real Fashion-MNIST from Debian's idx
files: the first ``--train-images`` of the training split and the first ``--eval-images`` of the test split
(close to class-balanced), at the fashion-mnist preset's 32 px (evaluation: resize 37, centre crop 32) and
classifier settings (epochs, lr, batch, milestones; SGD momentum 0.9, no weight decay), overridable here.
The backbone is ``--source`` (a run directory, a timm folder or hf-hub:...), else a fresh ``resnet18``
(seed 0) with MoCo's init (``backbone_args(..., init="moco")``: ``zero_init_last=False``) saved as a timm
folder: with timm's zero-initialised last BatchNorm per block, a fresh ResNet-18 at 32 px reduces to strided
1x1 convs that see one stem pixel (about 25 % top-1).

- ``linear``: the paper's protocol: features of freshly augmented images (RandomResizedCrop + flip) from the
  frozen backbone every epoch, evaluated on centre crops;
- ``fast (cold)``: features extracted once into an empty cache, then the same classifier and schedule;
  ``fast (warm)``: the same command again, features read from the cache;
- ``knn``: k = 200, T = 0.07 on L2-normalised features, in an empty cache (its time includes the
  extraction); its vote time alone is reported too.

Times are wall-clock seconds of the whole ``run_probe`` call (backbone load, data, features, training,
evaluation), one after the other in this process with ``--threads`` torch threads. Targets: fast (cold) at
least 10x faster than linear; |top-1 fast - top-1 linear| <= 2 points. The ratio grows with the epochs and
the data: on ImageNet-100 (60 epochs, 126k/5k images) the same arithmetic gives about 55x.

Run (about 4 minutes on 2 cores; the linear protocol is most of it):

    .venv/bin/python bench/probe.py
    .venv/bin/python bench/probe.py --source runs/demo        # a trained run
    .venv/bin/python bench/probe.py --quick                   # smoke run, under a minute

Prints a Markdown table and writes JSON (``--out``, default bench/results/probe.json).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py
import common

SIZED = dict(
    train_images=(int, 300, 2500, "training images"),
    eval_images=(int, 100, 1000, "evaluation images"),
    epochs=(int, 3, None, "classifier epochs; none: the fashion-mnist preset's"),
    milestones=(str, "2", None, "lr milestones, e.g. 12,16; none: the preset's"),
    lr=(float, 0.1, None, "classifier lr; none: the preset's"),
)
FRESH = "fresh resnet18 (seed 0, MoCo init: zero_init_last=False)"
REPORT = """
{table}

knn vote alone: {knn_s} s (features {features_s} s)
{targets}"""


def first_images(split: str, count: int):
    """The first `count` images of a Fashion-MNIST split (the same ones for every protocol)."""
    from mochi_hub.data.datasets import FashionMNIST

    source = FashionMNIST(split)
    source.images, source.labels = source.images[:count], source.labels[:count]
    return source


def fresh_resnet18(folder: Path) -> str:
    import timm
    import torch

    from mochi_hub.method.model import backbone_args, create_backbone

    build = backbone_args("resnet18", init="moco")
    torch.manual_seed(0)
    timm.models.save_for_hf(create_backbone("resnet18", **build), str(folder), safe_serialization=True)
    return str(folder)


def parse_args(argv=None):
    p = common.parser(
        __doc__,
        "probe",
        quick="small sizes, few epochs: a smoke run",
        threads=common.usable_cpus(),
        threads_help="torch threads (default: the CPUs this process may use)",
        sized=SIZED,
    )
    p.add_argument("--source", help="backbone to probe (default: a fresh resnet18, see above)")
    p.add_argument("--batch-size", type=int, help="global batch (default: the preset's)")
    p.add_argument("--image-size", type=int, help="crop size (default: the preset's, 32)")
    p.add_argument("--workers", type=int, default=2, help="data-loading workers for the image passes (default 2)")
    p.add_argument("--protocols", default="linear,fast,knn", help="comma-separated subset of linear,fast,knn")
    return common.parse(p, argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from mochi_hub.config import resolve_probe_config
    from mochi_hub.evaluate.probe import run_probe

    torch.set_num_threads(args.threads)
    result = dict(
        bench="probe",
        quick=args.quick,
        source=args.source or FRESH,
        dataset="fashion-mnist (Debian idx)",
        train_images=args.train_images,
        eval_images=args.eval_images,
        threads=args.threads,
        **common.environment(__file__, argv),
    )
    sources = (first_images("train", args.train_images), first_images("val", args.eval_images))
    protocols = args.protocols.split(",")
    rows, config = {}, {}
    print(
        f"probe bench: {args.train_images} train / {args.eval_images} eval Fashion-MNIST images, source "
        f"{result['source']}, {args.threads} thread(s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="mochi-bench-probe-") as tmp:
        source = args.source or fresh_resnet18(Path(tmp) / "resnet18")
        runs = [("fast", "cache-fast", label) for label in ("fast (cold)", "fast (warm)") if "fast" in protocols]
        runs += [(name, f"cache-{name}", name) for name in ("linear", "knn") if name in protocols]
        for protocol, cache, label in runs:
            options = dict(
                dataset="fashion-mnist",
                protocol=protocol,
                epochs=args.epochs,
                lr=args.lr,
                lr_milestones=args.milestones,
                batch_size=args.batch_size,
                image_size=args.image_size,
                workers=args.workers,
                cache_dir=str(Path(tmp) / cache),
                output=str(Path(tmp) / f"{label}.json"),
            )
            started = time.perf_counter()
            out = run_probe(
                source,
                resolve_probe_config(**{k: v for k, v in options.items() if v is not None}),
                sources=sources,
                show=False,
            )
            seconds = time.perf_counter() - started
            rows[label] = dict(
                protocol=label,
                seconds=round(seconds, 2),
                top1=out["top1"],
                top5=out["top5"],
                train_images=out["train_images"],
                eval_images=out["eval_images"],
                phases={k: v for k, v in out["time"].items() if k.endswith("_s")},
            )
            config = config or out["hyperparameters"]
            print(f"  {label:12s} {seconds:8.1f} s  top-1 {out['top1']:6.2f}  top-5 {out['top5']:6.2f}", flush=True)

    linear, fast = rows.get("linear"), rows.get("fast (cold)")
    for row in rows.values():
        row["speedup_vs_linear"] = round(linear["seconds"] / row["seconds"], 2) if linear else None
    targets = (
        {
            "fast_speedup_at_least_10x": fast["speedup_vs_linear"] >= 10.0,
            "fast_top1_within_2_points": abs(fast["top1"] - linear["top1"]) <= 2.0,
            "fast_minus_linear_top1": round(fast["top1"] - linear["top1"], 2),
        }
        if linear and fast
        else {}
    )
    table = common.markdown_table(
        ["protocol", "seconds", "x linear", "top-1 %", "top-5 %"],
        [
            [
                r["protocol"],
                common.fmt(r["seconds"]),
                common.fmt(r["speedup_vs_linear"]),
                common.fmt(r["top1"], ".2f"),
                common.fmt(r["top5"], ".2f"),
            ]
            for r in rows.values()
        ],
    )
    knn = rows.get("knn", {}).get("phases", {})
    print(
        REPORT.format(
            table=table,
            knn_s=common.fmt(knn.get("knn_s"), ".2f"),
            features_s=common.fmt(knn.get("features_s")),
            targets="\n".join(f"{name}: {value}" for name, value in targets.items()),
        )
    )
    common.write_result(args.out, dict(result, config=config, rows=list(rows.values()), targets=targets))


if __name__ == "__main__":
    main()
