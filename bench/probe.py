"""Benchmark of `mochi probe` (issue 4's targets): the cached-feature ``fast`` protocol against the paper's
``linear`` protocol, on the same data with the same backbone and the same classifier settings, plus kNN.

What runs (each through ``mochi_hub.probe.run_probe``, the function behind ``mochi probe``):

- data: real Fashion-MNIST from Debian's idx files, the first ``--train-images`` of the training split
  and the first ``--eval-images`` of the test split (the class balance of these prefixes is close to
  uniform), at ``--image-size`` px (the fashion-mnist preset: 32 px; evaluation resizes to 37 and
  centre-crops 32);
- backbone: ``--source`` (a run directory, a timm folder or hf-hub:...), else a fresh ``resnet18``
  (seed 0) saved as a timm folder in a temporary directory. The fresh one is built with
  ``zero_init_last=False``: timm zero-initialises the last BatchNorm of every residual block, and at
  32 px a fresh ResNet-18 would then reduce to a chain of strided 1x1 downsampling convs that sees one
  stem pixel (about 25 % top-1); with random residual branches its features carry real information;
- classifier settings: the fashion-mnist preset (epochs, lr, batch, milestones; see ProbeConfig),
  overridable here; SGD momentum 0.9, no weight decay;
- ``linear``: the paper's protocol: features of freshly augmented images (RandomResizedCrop + flip)
  computed by the frozen backbone every epoch, evaluated on centre crops;
- ``fast (cold)``: features extracted once into an empty cache, then the same classifier and schedule;
  ``fast (warm)``: the same command again, features read from the cache;
- ``knn``: k = 200, T = 0.07 on L2-normalised features, in an empty cache (so its time includes the
  extraction); its vote time alone is reported too.

Times are wall-clock seconds of the whole ``run_probe`` call (backbone load, data, features, training,
evaluation), measured in this process one after the other with ``--threads`` torch threads.
Targets: fast (cold) at least 10x faster than linear; |top-1 fast - top-1 linear| <= 2 points.
The ratio grows with the epochs and with train/eval size: on ImageNet-100 (60 epochs, 126k/5k images)
the same arithmetic gives about 55x.

Run (about 4 minutes on 2 cores; the linear protocol is most of it):

    .venv/bin/python bench/probe.py
    .venv/bin/python bench/probe.py --source runs/demo        # a trained run
    .venv/bin/python bench/probe.py --quick                   # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "probe.json"
QUICK = dict(train_images=300, eval_images=100, epochs=3, milestones="2", lr=0.1)
FULL = dict(train_images=2500, eval_images=1000, epochs=None, milestones=None, lr=None)  # None: the preset's


class FirstN:
    """The first n images of an image source (the same ones for every protocol)."""

    def __init__(self, source, n: int):
        self.source, self.n, self.classes = source, min(n, len(source)), source.classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.source[index]

    def describe(self, index: int) -> str:
        return self.source.describe(index)


def fresh_resnet18(folder: Path) -> str:
    import timm
    import torch

    from mochi_hub.model import create_backbone

    torch.manual_seed(0)
    timm.models.save_for_hf(create_backbone("resnet18", zero_init_last=False), str(folder), safe_serialization=True)
    return str(folder)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="backbone to probe (default: a fresh resnet18, see above)")
    p.add_argument("--train-images", type=int, default=None, help=f"training images (default {FULL['train_images']}; "
                                                                  f"quick {QUICK['train_images']})")
    p.add_argument("--eval-images", type=int, default=None, help=f"evaluation images (default {FULL['eval_images']}; "
                                                                 f"quick {QUICK['eval_images']})")
    p.add_argument("--epochs", type=int, default=None, help=f"classifier epochs (default: the fashion-mnist preset's; "
                                                            f"quick {QUICK['epochs']})")
    p.add_argument("--milestones", default=None, help="lr milestones, e.g. 12,16 (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="classifier lr (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--image-size", type=int, default=None, help="crop size (default: the preset's, 32)")
    p.add_argument("--workers", type=int, default=2, help="data-loading workers for the image passes (default 2)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads (default: the CPUs this process may use)")
    p.add_argument("--protocols", default="linear,fast,knn", help="comma-separated subset of linear,fast,knn")
    p.add_argument("--quick", action="store_true", help=f"small sizes {QUICK} for a smoke run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from mochi_hub.config import resolve_probe_config
    from mochi_hub.data import FashionMNIST
    from mochi_hub.probe import run_probe

    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    n_train = args.train_images or sizes["train_images"]
    n_eval = args.eval_images or sizes["eval_images"]
    epochs = args.epochs or sizes["epochs"]
    milestones = args.milestones or sizes["milestones"]
    lr = args.lr or sizes["lr"]
    protocols = args.protocols.split(",")
    sources = (FirstN(FashionMNIST("train"), n_train), FirstN(FashionMNIST("val"), n_eval))

    with tempfile.TemporaryDirectory(prefix="mochi-bench-probe-") as tmp:
        tmp = Path(tmp)
        source = args.source or fresh_resnet18(tmp / "resnet18")

        def probe(protocol: str, cache: str, label: str) -> dict:
            options = dict(dataset="fashion-mnist", protocol=protocol, epochs=epochs, lr_milestones=milestones, lr=lr,
                           batch_size=args.batch_size, image_size=args.image_size, workers=args.workers,
                           cache_dir=str(tmp / cache), output=str(tmp / f"{label}.json"))
            config = resolve_probe_config(**{k: v for k, v in options.items() if v is not None})
            started = time.perf_counter()
            result = run_probe(source, config, sources=sources, show=False)
            seconds = time.perf_counter() - started
            row = dict(protocol=label, seconds=round(seconds, 2), top1=result["top1"], top5=result["top5"],
                       train_images=result["train_images"], eval_images=result["eval_images"],
                       phases={k: v for k, v in result["time"].items() if k.endswith("_s")})
            print(f"  {label:12s} {seconds:8.1f} s  top-1 {result['top1']:6.2f}  top-5 {result['top5']:6.2f}", flush=True)
            return row, result

        rows, results = {}, {}
        print(f"probe bench: {n_train} train / {n_eval} eval Fashion-MNIST images, source "
              f"{args.source or 'fresh resnet18'}, {args.threads} thread(s)", flush=True)
        if "fast" in protocols:
            for label in ("fast (cold)", "fast (warm)"):
                rows[label], results[label] = probe("fast", "cache-fast", label)
        if "linear" in protocols:
            rows["linear"], results["linear"] = probe("linear", "cache-linear", "linear")
        if "knn" in protocols:
            rows["knn"], results["knn"] = probe("knn", "cache-knn", "knn")
        config = next(iter(results.values()))["hyperparameters"] if results else {}

    linear = rows.get("linear")
    for row in rows.values():
        row["speedup_vs_linear"] = round(linear["seconds"] / row["seconds"], 2) if linear else None
    targets = {}
    if linear and "fast (cold)" in rows:
        fast = rows["fast (cold)"]
        targets = {"fast_speedup_at_least_10x": fast["speedup_vs_linear"] >= 10.0,
                   "fast_top1_within_2_points": abs(fast["top1"] - linear["top1"]) <= 2.0,
                   "fast_minus_linear_top1": round(fast["top1"] - linear["top1"], 2)}

    header = f"{'protocol':12s} | {'seconds':>8s} | {'x linear':>8s} | {'top-1 %':>7s} | {'top-5 %':>7s}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows.values():
        speed = f"{row['speedup_vs_linear']:.1f}" if row["speedup_vs_linear"] else "-"
        print(f"{row['protocol']:12s} | {row['seconds']:8.1f} | {speed:>8s} | {row['top1']:7.2f} | {row['top5']:7.2f}")
    if "knn" in rows:
        print(f"knn vote alone: {rows['knn']['phases'].get('knn_s', 0):.2f} s "
              f"(features {rows['knn']['phases'].get('features_s', 0):.1f} s)")
    for name, value in targets.items():
        print(f"{name}: {value}")

    out = dict(bench="probe", command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               quick=args.quick, source=args.source or "fresh resnet18 (seed 0, zero_init_last=False)",
               dataset="fashion-mnist (Debian idx)", train_images=n_train, eval_images=n_eval, config=config,
               torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               cpus=os.cpu_count(), threads=args.threads, rows=list(rows.values()), targets=targets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
