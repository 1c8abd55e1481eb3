"""The fashion-mnist preset on data nobody tuned it for (issue 34): small and class-disjoint sets cut from
Fashion-MNIST at seeds the study never used, trained as a user would (`mochi train --preset fashion-mnist
--dataset DIR`, plus a variant's options), judged by kNN and the fast probe against the same network untrained and
raw pixels, probed the same way.

    .venv/bin/python bench/untuned.py --sets small-4k,disjoint --methods moco,mochi --variants unfitted,fitted
    .venv/bin/python bench/untuned.py --sets small-4k --methods moco --variants epochs-60 \
        --variant queue-273=fit_to_data=false,queue_size=273   # one variable at a time
    .venv/bin/python bench/untuned.py --quick        # a smoke run, a minute

Sets (real Fashion-MNIST images written as PNG folders at test time; classes all 10 unless said):
- small-4k: 400 training images a class (seed 7), queries 200 test images a class: a small set of the same kind.
- small-2k: 200 training images a class (seed 13), queries 200 test images a class.
- disjoint: trained on classes 0-4 only (1,200 training images a class, seed 11); judged on classes 5-9, which it
  never saw (bank 1,000 training images a class, queries 500 test images a class): features that transfer.
Variants are option sets on top of the preset (`--variant NAME=FIELD=VALUE,...` adds one); each run's resolved
config is kept in the JSON. Every run is resumable: a finished run directory is probed again from its files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SETS: dict[str, dict[str, Any]] = {
    "small-4k": dict(train=(range(10), 400, 7), val=(range(10), 200, 7)),
    "small-2k": dict(train=(range(10), 200, 13), val=(range(10), 200, 13)),
    "disjoint": dict(train=(range(5), 1200, 11), val=(range(5), 200, 11), judge=(range(5, 10), 1000, 500, 11)),
}
VARIANTS: dict[str, dict[str, Any]] = {
    "fitted": {},  # the preset as `mochi train` fits it to the set (--fit-to-data, the default)
    "unfitted": {"fit_to_data": False},  # the preset's values as they are (what mochi-hub did before the fit)
    "epochs-60": {"fit_to_data": False, "epochs": 60, "mixing_warmup_epochs": 15},  # the budget alone
}
METHODS = {"moco": (0, 0, 0), "mochi": (1024, 1024, 512)}


def write_split(folder: Path, split: str, classes: range, per_class: int, seed: int) -> int:
    """`per_class` images of each class of Fashion-MNIST's `split`, a seeded choice, as folder/<class>/<n>.png."""
    from mochi_hub.data.datasets import FASHION_MNIST_CLASSES, FashionMNIST

    source = FashionMNIST(split)
    labels = torch.from_numpy(source.labels)  # [n]
    generator = torch.Generator().manual_seed(seed)
    written = 0
    for label in classes:
        where = (labels == label).nonzero()[:, 0]
        for n, index in enumerate(where[torch.randperm(len(where), generator=generator)[:per_class]].tolist()):
            image, _ = source[index]
            target = folder / FASHION_MNIST_CLASSES[label].replace("/", "-") / f"{n:05d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target)
            written += 1
    return written


def build_set(name: str, root: Path) -> dict[str, Path]:
    """The set's folders (train on, and judge on), written once."""
    spec, folder = SETS[name], root / name
    folders = {"train_on": folder / "data", "judge_on": folder / ("judge" if "judge" in spec else "data")}
    if not (folder / "done").is_file():
        classes, per_class, seed = spec["train"]
        write_split(folders["train_on"] / "train", "train", classes, per_class, seed)
        classes, per_class, seed = spec["val"]
        write_split(folders["train_on"] / "val", "val", classes, per_class, seed + 1)
        if "judge" in spec:
            classes, bank, queries, seed = spec["judge"]
            write_split(folders["judge_on"] / "train", "train", classes, bank, seed + 2)
            write_split(folders["judge_on"] / "val", "val", classes, queries, seed + 3)
        (folder / "done").write_text("")
    return folders


def probed(source: str, backbone, judge_on: Path, image_size: int, cache: Path) -> dict[str, float]:
    """kNN and fast top-1 of a run directory (backbone None) or a (module, info) pair, on the judge folder."""
    from mochi_hub.config import resolve_probe_config
    from mochi_hub.evaluate.probe import run_probe

    out = {}
    for protocol in ("knn", "fast"):
        config = resolve_probe_config(
            dataset=str(judge_on), protocol=protocol, image_size=image_size, workers=2, cache_dir=str(cache)
        )
        out[protocol] = run_probe(source, config, backbone=backbone, show=False)["top1"]
    return out


def references(config, judge_on: Path, cache: Path) -> dict[str, dict[str, float]]:
    """The same network untrained (same architecture, init and seed) and raw pixels, probed the same way."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from learning import Pixels

    from mochi_hub.data.augment import eval_transform
    from mochi_hub.data.datasets import resolve_dataset, to_rgb
    from mochi_hub.publish.sources import weights_sha256
    from mochi_hub.training.state import initial_encoder

    untrained = initial_encoder(config)[0].backbone.eval()
    info = {"weights_sha256": weights_sha256(untrained), "num_features": untrained.num_features}
    bank = resolve_dataset(str(judge_on), "train")
    transform = eval_transform(config.image_size)
    mean_image = torch.stack([transform(to_rgb(bank[i][0])) for i in range(len(bank))]).mean(0)
    pixels = Pixels(mean_image).eval()
    pixels_info = {"weights_sha256": weights_sha256(pixels), "num_features": pixels.mean_image.numel()}
    return {
        "untrained": probed("untrained", (untrained, info), judge_on, config.image_size, cache),
        "raw pixels (centred)": probed("pixels", (pixels, pixels_info), judge_on, config.image_size, cache),
    }


def one_run(args, set_name: str, folders: dict[str, Path], method: str, variant: str) -> dict[str, Any]:
    from mochi_hub.config import resolve_train_config
    from mochi_hub.training.preflight import preflight
    from mochi_hub.training.pretrain import train

    run_dir = args.runs_dir / set_name / f"{method}-{variant}"
    options = {
        "mochi": METHODS[method],
        **VARIANTS[variant],
        **(args.quick_options if args.quick else {}),
        "dataset": str(folders["train_on"]),
        "output": str(run_dir),
        "report_to": "none",
        "resume": "auto",
    }
    config = preflight(resolve_train_config(preset="fashion-mnist", **options))
    started = time.perf_counter()
    if not (run_dir / "export" / "config.json").is_file():
        train(config)
    run = json.loads((run_dir / "run.json").read_text())
    return {
        "set": set_name,
        "method": method,
        "variant": variant,
        "config": run["config"],
        "steps": run["total_steps"] if config.max_steps is None else min(run["total_steps"], config.max_steps),
        "train_s": run["summary"]["wall_time_s"],
        "monitor_s": run["summary"].get("monitor_time_s"),
        "knn_monitor": run["summary"].get("knn_monitor"),
        "trained": probed(str(run_dir), None, folders["judge_on"], config.image_size, args.runs_dir / "cache"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(
        __doc__,
        "untuned",
        quick="a smoke run: test_resnet, a few steps, one set and variant",
        threads=2,
        threads_help="torch threads (default 2)",
    )
    p.add_argument("--sets", default="small-4k,disjoint", help=f"from {', '.join(SETS)}")
    p.add_argument("--methods", default="moco,mochi", help=f"from {', '.join(METHODS)}")
    p.add_argument("--variants", default="unfitted,fitted", help=f"from {', '.join(VARIANTS)} and those --variant adds")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FIELD=VALUE,...", help="add a variant")
    p.add_argument("--runs-dir", type=Path, default=common.ROOT / "runs" / "untuned")
    args = common.parse(p, argv)
    torch.set_num_threads(args.threads)
    import yaml

    for spec in args.variant:
        name, _, settings = spec.partition("=")
        VARIANTS[name] = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in settings.split(","))}
    args.quick_options = dict(
        model="test_resnet", max_steps=6, batch_size=32, queue_size=128, mochi=(16, 16, 8), bn_splits=2, epochs=2
    )
    if args.quick:
        args.sets, args.methods, args.variants = "small-2k", "mochi", "fitted"
    started = time.perf_counter()
    result: dict[str, Any] = {**common.environment(__file__, argv), "runs": [], "references": {}}
    for set_name in args.sets.split(","):
        folders = build_set(set_name, args.runs_dir)
        for method in args.methods.split(","):
            for variant in args.variants.split(","):
                result["runs"].append(one_run(args, set_name, folders, method, variant))
                common.write_result(args.out, result)
                r = result["runs"][-1]
                print(f"{set_name} {method} {variant}: {r['trained']} after {r['steps']} steps", flush=True)
        from mochi_hub.config import resolve_train_config

        base = resolve_train_config(preset="fashion-mnist", **(args.quick_options if args.quick else {}))
        result["references"][set_name] = references(base, folders["judge_on"], args.runs_dir / "cache")
        common.write_result(args.out, result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    common.write_result(args.out, result)
    rows = []
    for r in result["runs"]:
        ref = result["references"][r["set"]]
        rows.append(
            [
                r["set"],
                r["method"],
                r["variant"],
                r["config"]["queue_size"],
                r["steps"],
                common.fmt(r["trained"]["knn"], ".2f"),
                common.fmt(r["trained"]["knn"] - ref["untrained"]["knn"], "+.2f"),
                common.fmt(r["trained"]["fast"], ".2f"),
                common.fmt(r["trained"]["fast"] - ref["untrained"]["fast"], "+.2f"),
                common.fmt(r["train_s"], ".0f"),
            ]
        )
    for name, ref in result["references"].items():
        for kind, values in ref.items():
            rows.append(
                [
                    name,
                    kind,
                    "",
                    "",
                    "",
                    common.fmt(values["knn"], ".2f"),
                    "",
                    common.fmt(values["fast"], ".2f"),
                    "",
                    "",
                ]
            )
    headers = ["set", "method", "variant", "K", "steps", "kNN", "vs untrained", "fast", "vs untrained", "train s"]
    print(common.markdown_table(headers, rows))
    return result


if __name__ == "__main__":
    main()
