"""A CPU-scale study of MoCHi against MoCo-v2 on real images (Fashion-MNIST), issue 7.

The exact command that produced docs/study/ (36 minutes on a quiet 2-core CPU):

    .venv/bin/python bench/study.py --out docs/study --runs-dir runs/study

A smoke run (a few steps, one seed, small subsets; under a minute):

    .venv/bin/python bench/study.py --quick --out /tmp/study --runs-dir /tmp/study-runs

What it does: for each seed, and for each setting -- MoCo-v2 (MoCHi (0, 0, 0)) and two MoCHi (N, s, s')
settings -- one pretraining run with the same compute budget (same backbone, image size, subset, epochs,
steps, batch, queue K, lr schedule, augmentation and seed; MoCHi mixes after the same warm-up epoch), run one
at a time. Each run is then probed on the Fashion-MNIST test split (kNN and the cached-feature "fast"
linear probe), and its metrics.jsonl gives the curves of proxy_top1, alignment, uniformity and
false_negative_rate over training. A random-initialisation reference (the exact initial weights of the
runs of the first seed, probed the same way) says how much pretraining moved the probes at all.

Resumable: a run whose run.json has a "summary" and whose two probe JSONs exist is not redone; a run cut
off mid-training continues from its newest checkpoint (train's --resume auto). `--report-only` rewrites
docs/study/ from whatever finished (the table then says which runs are missing).

Why these settings: with K = 4096 and 10 classes, about 410 queue entries share a query's class. The
paper (ImageNet-100: K = 16384, 100 classes, about 164 per class) takes N = 1024 hardest, about six
classes' worth of entries; N = 1024 here is about 2.5 classes' worth, N = 256 would be less than one
class's worth (the hard set would be mostly false negatives). N = 1024 is also the hard-set size that
mochi_hub.train uses for the false-negative analysis of a MoCo-v2 run (min(1024, K)), so the
false-negative rate is measured over the same top-1024 for every run. The two MoCHi settings keep N and
vary what is mixed: (1024, 1024, 512) is the paper's headline triple (s + s' = 1536 synthetic points, 37%
of K here against 9% in the paper), and (1024, 0, 512) keeps only the query mixes (s'), the paper's
"harder" negatives.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The settings compared: name -> (N, s, s').
SETTINGS: dict[str, tuple[int, int, int]] = {
    "MoCo-v2": (0, 0, 0),
    "MoCHi (1024, 1024, 512)": (1024, 1024, 512),
    "MoCHi (1024, 0, 512)": (1024, 0, 512),
}
QUICK_SETTINGS: dict[str, tuple[int, int, int]] = {
    "MoCo-v2": (0, 0, 0),
    "MoCHi (128, 64, 32)": (128, 64, 32),
}
CURVES = (
    ("proxy_top1", "proxy top-1 (positive ranked first; MoCHi: synthetic negatives included)"),
    ("uniformity", "uniformity (Wang & Isola, t=2; lower = more uniform)"),
    ("alignment", "alignment (E||q-k||^2; lower = better aligned)"),
    ("false_negative_rate", "false-negative rate (same-class share) among the hardest queue entries"),
    ("loss", "InfoNCE loss"),
)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd")
FINAL_WINDOW = 5  # "final" = mean of the last 5 logged steps (each is one batch of 128: noisy alone)


def slug(name: str, mochi: tuple[int, int, int]) -> str:
    return ("moco-v2" if mochi[1] + mochi[2] == 0 else "mochi") + "-" + "-".join(map(str, mochi))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/study", help="where README.md, study.json and the PNGs go")
    p.add_argument("--runs-dir", default="runs/study", help="run directories (git-ignored; weights live here)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps, one seed, small subsets")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--train-images", type=int, default=None, help="pretraining subset (default 16384)")
    p.add_argument("--epochs", type=int, default=None, help="default 3")
    p.add_argument("--mixing-warmup-epochs", type=int, default=1, help="epochs without mixing, for every MoCHi run")
    p.add_argument("--batch-size", type=int, default=None, help="default 128")
    p.add_argument("--queue-size", type=int, default=None, help="K (default 4096)")
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--key-momentum", type=float, default=0.99)
    p.add_argument(
        "--probe-images",
        type=int,
        default=None,
        help="seeded subset of the train split used as the kNN memory / linear training set "
        "(default 20000); the test split (10,000) is always used whole",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--reference-seeds",
        default=None,
        help="seeds whose initial weights are probed as the random-init reference (default: the first "
        "seed; 'none' for no reference)",
    )
    p.add_argument("--report-only", action="store_true", help="only rewrite --out from finished runs")
    p.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        help="an earlier study.json: the report then says whether this study reproduces its table "
        "within the seed spread, and which runs of the same setting and seed came out identical",
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each finished run's checkpoints/ (default: removed; export/ is kept)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(
        seeds="0" if quick else "0,1,2",
        train_images=256 if quick else 16384,
        epochs=2 if quick else 3,
        batch_size=32 if quick else 128,
        queue_size=128 if quick else 4096,
        probe_images=256 if quick else 20000,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    ref = args.reference_seeds if args.reference_seeds is not None else str(args.seeds[0])
    args.reference_seeds = [] if ref.strip().lower() == "none" else [int(s) for s in ref.split(",") if s.strip()]
    args.settings = QUICK_SETTINGS if quick else SETTINGS
    return args


# ----------------------------------------------------------------------------------------------- running


def train_config(args: argparse.Namespace, mochi: tuple[int, int, int], seed: int, output: Path):
    from mochi_hub.config import resolve_train_config

    steps_per_epoch = args.train_images // args.batch_size
    return resolve_train_config(
        dataset="fashion-mnist",
        model=args.model,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        queue_size=args.queue_size,
        mochi=mochi,
        mixing_warmup_epochs=args.mixing_warmup_epochs if mochi[1] + mochi[2] else 0,
        lr=args.lr,
        temperature=args.temperature,
        key_momentum=args.key_momentum,
        seed=seed,
        workers=args.workers,
        output=str(output),
        max_train_images=args.train_images,
        log_every_steps=max(1, min(10, steps_per_epoch // 4)),
        keep_checkpoints=1,
        report_to="none",
        resume="auto",
    )


def probe_config(args: argparse.Namespace, protocol: str, runs_dir: Path, output: str | None = None):
    from mochi_hub.config import resolve_probe_config

    return resolve_probe_config(
        dataset="fashion-mnist",
        protocol=protocol,
        split="val",
        image_size=args.image_size,
        max_images=args.probe_images,
        workers=args.workers,
        cache_dir=str(runs_dir / "feature-cache"),
        output=output,
    )


def probe_path(run_dir: Path, args: argparse.Namespace, protocol: str, runs_dir: Path) -> Path:
    from mochi_hub.probe import result_name

    return run_dir / "probes" / f"{result_name(probe_config(args, protocol, runs_dir))}.json"


def finished(run_dir: Path, args: argparse.Namespace, runs_dir: Path) -> bool:
    run_json = run_dir / "run.json"
    if not run_json.is_file() or "summary" not in json.loads(run_json.read_text()):
        return False
    return all(probe_path(run_dir, args, p, runs_dir).is_file() for p in ("knn", "fast"))


def do_run(
    args: argparse.Namespace, mochi: tuple[int, int, int], seed: int, run_dir: Path, runs_dir: Path, log
) -> None:
    from mochi_hub.probe import run_probe
    from mochi_hub.train import train

    run_json = run_dir / "run.json"
    if not (run_json.is_file() and "summary" in json.loads(run_json.read_text())):
        t = time.perf_counter()
        train(train_config(args, mochi, seed, run_dir))
        log(f"  trained in {time.perf_counter() - t:.0f} s")
    for protocol in ("knn", "fast"):
        if not probe_path(run_dir, args, protocol, runs_dir).is_file():
            t = time.perf_counter()
            result = run_probe(str(run_dir), probe_config(args, protocol, runs_dir), show=False)
            log(f"  {protocol}: top-1 {result['top1']:.2f} % ({time.perf_counter() - t:.0f} s)")
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # export/ keeps the backbone


def reference_probe(args: argparse.Namespace, seed: int, runs_dir: Path, log) -> dict[str, Any]:
    """kNN and fast probes of the exact initial backbone of the runs of `seed` (train seeds torch, then
    builds the backbone first), i.e. step 0 of every setting."""
    import torch

    from mochi_hub.model import create_backbone
    from mochi_hub.probe import run_probe
    from mochi_hub.sources import weights_sha256

    folder = runs_dir / f"random-init-s{seed}"
    results = {}
    module = None
    for protocol in ("knn", "fast"):
        path = folder / f"{protocol}.json"
        if not path.is_file():
            if module is None:
                torch.manual_seed(seed)
                module = create_backbone(args.model).eval()
                info = {
                    "kind": "random-init",
                    "seed": seed,
                    "architecture": args.model,
                    "num_features": int(module.num_features),
                    "weights_sha256": weights_sha256(module),
                }
            folder.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            run_probe(
                f"random-init:{args.model}:seed{seed}",
                probe_config(args, protocol, runs_dir, str(path)),
                backbone=(module, info),
                show=False,
            )
            log(f"  random init seed {seed} {protocol}: {time.perf_counter() - t:.0f} s")
        results[protocol] = json.loads(path.read_text())["top1"]
    return results


# ----------------------------------------------------------------------------------------------- reading


def read_steps(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("kind") == "step":
            rows.append(row)
    return rows


def run_record(run_dir: Path, args: argparse.Namespace, runs_dir: Path, name: str, mochi, seed: int) -> dict[str, Any]:
    info = json.loads((run_dir / "run.json").read_text())
    steps = read_steps(run_dir)
    steps_per_epoch = info["steps_per_epoch"]
    warm = args.mixing_warmup_epochs * steps_per_epoch  # MoCHi mixes from this step on (the same steps for MoCo-v2)
    after = [r for r in steps if r["step"] > warm]

    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return sum(values) / len(values) if values else None

    last = steps[-FINAL_WINDOW:]
    record = {
        "setting": name,
        "mochi": list(mochi),
        "seed": seed,
        "run_dir": str(run_dir),
        "knn_top1": json.loads(probe_path(run_dir, args, "knn", runs_dir).read_text())["top1"],
        "fast_top1": json.loads(probe_path(run_dir, args, "fast", runs_dir).read_text())["top1"],
        "final_proxy_top1": mean("proxy_top1", last),
        "final_uniformity": mean("uniformity", last),
        "final_alignment": mean("alignment", last),
        "final_loss": mean("loss", last),
        "mean_false_negative_rate": mean("false_negative_rate", after),
        "mean_proxy_top1_after_warmup": mean("proxy_top1", after),
        "mean_uniformity_after_warmup": mean("uniformity", after),
        "mean_false_negative_rate_warmup": mean("false_negative_rate", [r for r in steps if r["step"] <= warm]),
        "last_step_values": {k: steps[-1].get(k) for k, _ in CURVES} if steps else {},
        "wall_time_s": info["summary"]["wall_time_s"],
        "train_images_per_sec": info["summary"]["images_per_sec"],
        "steps_per_epoch": steps_per_epoch,
        "total_steps": info["total_steps"],
        "warmup_steps": warm,
        "curves": {k: [[r["step"], r.get(k)] for r in steps] for k, _ in CURVES},
        "probe_train_images": json.loads(probe_path(run_dir, args, "knn", runs_dir).read_text())["train_images"],
        "probe_eval_images": json.loads(probe_path(run_dir, args, "knn", runs_dir).read_text())["eval_images"],
        "probe_seconds": {
            p: json.loads(probe_path(run_dir, args, p, runs_dir).read_text())["time"]["seconds"]
            for p in ("knn", "fast")
        },
    }
    return record


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


TABLE_COLUMNS = (
    ("knn_top1", "kNN top-1 %", 2),
    ("fast_top1", "fast-linear top-1 %", 2),
    ("final_proxy_top1", "final proxy top-1", 3),
    ("final_uniformity", "final uniformity", 3),
    ("final_alignment", "final alignment", 3),
    ("mean_false_negative_rate", "mean FN rate", 3),
)


EXTRA_COLUMNS = (
    ("wall_time_s", "", 0),
    ("mean_proxy_top1_after_warmup", "", 3),
    ("mean_uniformity_after_warmup", "", 3),
)


def aggregate(records: list[dict[str, Any]], settings: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
    out = {}
    for name in settings:
        mine = [r for r in records if r["setting"] == name]
        if not mine:
            continue
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in mine], "n": len(mine)}
        for key, _, _ in TABLE_COLUMNS + EXTRA_COLUMNS:
            m, s = mean_std([r[key] for r in mine])
            entry[key] = {"mean": m, "std": s, "values": [r[key] for r in mine]}
        curves = {}
        for key, _ in CURVES:  # mean over seeds at each logged step (every run logs the same steps)
            by_step: dict[int, list[float]] = {}
            for r in mine:
                for step, value in r["curves"][key]:
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        by_step.setdefault(step, []).append(value)
            curves[key] = [[s, statistics.fmean(v)] for s, v in sorted(by_step.items())]
        entry["mean_curves"] = curves
        out[name] = entry
    return out


def compare(agg: dict[str, Any], key: str, a: str, b: str) -> dict[str, Any] | None:
    """b - a, with the standard error of the difference of two means over seeds (Welch)."""
    if a not in agg or b not in agg:
        return None
    va = [v for v in agg[a][key]["values"] if v is not None]
    vb = [v for v in agg[b][key]["values"] if v is not None]
    if not va or not vb:
        return None
    diff = statistics.fmean(vb) - statistics.fmean(va)
    var = (statistics.variance(va) / len(va) if len(va) > 1 else 0.0) + (
        statistics.variance(vb) / len(vb) if len(vb) > 1 else 0.0
    )
    se = math.sqrt(var)
    return {"diff": diff, "se": se, "z": diff / se if se > 0 else None, "n": [len(va), len(vb)]}


def verdict(c: dict[str, Any] | None, sign: int) -> str:
    """sign: +1 if the paper's claim is that the difference is positive, -1 if negative."""
    if c is None:
        return "not measured"
    if c["z"] is None:
        return "one seed only: no spread to judge"
    if sign * c["z"] >= 2:
        return "holds"
    if sign * c["z"] <= -2:
        return "opposite"
    return "not resolved (within 2 standard errors)"


# ----------------------------------------------------------------------------------------------- plotting


def plot_curves(
    series: dict[str, list[list[float]]],
    title: str,
    path: Path,
    *,
    vline: float | None = None,
    hline: tuple[float, str] | None = None,
) -> None:
    """One PNG line chart, one line per setting (mean over seeds), with a legend; Pillow only, as
    mochi_hub.export.plot_training_curves."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = 760, 420
    left, right, top, bottom = 78, 20, 34, 48 + 18 * len(series)
    image = Image.new("RGB", (width, height + 18 * len(series)), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    points = [p for pts in series.values() for p in pts if p[1] is not None]
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if hline is not None:
        ys.append(hline[0])
    xmin, xmax, ymin, ymax = min(xs), max(xs), min(ys), max(ys)
    if xmax == xmin:
        xmax = xmin + 1
    pad = (ymax - ymin) * 0.05 or 0.5 * (abs(ymin) or 1)
    ymin, ymax = ymin - pad, ymax + pad
    x0, y0, x1, y1 = left, top, width - right, height + 18 * len(series) - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)

    draw.text((left, 8), title, fill="black", font=font)
    draw.rectangle((x0, y0, x1, y1), outline="#444444")
    for i in range(6):
        fy = ymin + (ymax - ymin) * i / 5
        py = px(xmin, fy)[1]
        draw.line((x0 + 1, py, x1 - 1, py), fill="#eeeeee")
        draw.line((x0 - 4, py, x0, py), fill="#444444")
        draw.text((6, py - 7), f"{fy:.3g}", fill="black", font=font)
    for fx in sorted({round(xmin + (xmax - xmin) * i / 5) for i in range(6)}):
        pxx = px(fx, ymin)[0]
        draw.line((pxx, y1, pxx, y1 + 4), fill="#444444")
        draw.text((pxx - 12, y1 + 6), f"{fx:d}", fill="black", font=font)
    draw.text((x1 - 32, y1 + 22), "step", fill="#444444", font=font)
    if vline is not None and xmin < vline < xmax:
        vx = px(vline, ymin)[0]
        for yy in range(int(y0), int(y1), 8):
            draw.line((vx, yy, vx, min(yy + 4, y1)), fill="#888888")
        draw.text((vx + 4, y0 + 4), "MoCHi starts mixing", fill="#666666", font=font)
    if hline is not None:
        hy = px(xmin, hline[0])[1]
        for xx in range(int(x0), int(x1), 8):
            draw.line((xx, hy, min(xx + 4, x1), hy), fill="#999999")
        draw.text((x0 + 6, hy - 16), hline[1], fill="#666666", font=font)
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pix = [px(x, y) for x, y in pts if y is not None]
        if len(pix) > 1:
            draw.line(pix, fill=colour, width=2)
        elif pix:
            draw.ellipse((pix[0][0] - 2, pix[0][1] - 2, pix[0][0] + 2, pix[0][1] + 2), fill=colour)
        ly = y1 + 40 + 18 * i
        draw.line((x0, ly + 7, x0 + 30, ly + 7), fill=colour, width=3)
        draw.text((x0 + 38, ly), name, fill="black", font=font)
    image.save(path, format="PNG")


# ----------------------------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    import timm
    import torch

    import mochi_hub

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "mochi-hub": mochi_hub.__version__,
            "torchvision": __import__("torchvision").__version__,
            "accelerate": __import__("accelerate").__version__,
        },
    }


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def fmt(entry: dict[str, Any] | None, digits: int) -> str:
    if entry is None or entry["mean"] is None:
        return "n/a"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def fmt_cmp(c: dict[str, Any] | None, digits: int) -> str:
    if c is None:
        return "n/a"
    return f"{c['diff']:+.{digits}f} ± {c['se']:.{digits}f}"


def write_report(
    args: argparse.Namespace,
    out: Path,
    records: list[dict[str, Any]],
    expected: list[tuple[str, int]],
    references: dict[int, dict[str, float]],
    meta: dict[str, Any],
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    settings = args.settings
    agg = aggregate(records, settings)
    done = {(r["setting"], r["seed"]) for r in records}
    missing = [f"{name} seed {seed}" for name, seed in expected if (name, seed) not in done]
    partial = bool(missing)
    moco = next(iter(settings))
    warm = records[0]["warmup_steps"] if records else None

    plots = []
    for key, title in CURVES:
        series = {name: agg[name]["mean_curves"][key] for name in agg}
        if not any(series.values()):
            continue
        name = f"{key}.png"
        plot_curves(
            series,
            title + " - mean over seeds",
            out / name,
            vline=warm,
            hline=(0.1, "10 classes: chance share 0.10") if key == "false_negative_rate" else None,
        )
        plots.append((key, name))

    comparisons = {}
    for name in list(settings)[1:]:
        comparisons[name] = {key: compare(agg, key, moco, name) for key, _, _ in TABLE_COLUMNS + EXTRA_COLUMNS}
    claims = []
    for name in list(settings)[1:]:
        c = comparisons[name]
        claims.append(
            {
                "setting": name,
                "proxy_harder": verdict(c["final_proxy_top1"], -1),
                "proxy_harder_after_warmup": verdict(c["mean_proxy_top1_after_warmup"], -1),
                "uniformity_better_after_warmup": verdict(c["mean_uniformity_after_warmup"], -1),
                "uniformity_better": verdict(c["final_uniformity"], -1),
                "knn_gain": verdict(c["knn_top1"], +1),
                "fast_gain": verdict(c["fast_top1"], +1),
            }
        )

    study = {
        "command": meta["command"],
        "partial": partial,
        "missing": missing,
        "args": {k: v for k, v in vars(args).items() if k not in ("settings", "compare_with")},
        "settings": {k: list(v) for k, v in settings.items()},
        "machine": meta["machine"],
        "git_commit": meta["git_commit"],
        "trained_at_commits": meta["trained_at_commits"],
        "started": meta["started"],
        "finished": meta["finished"],
        "study_wall_time_s": meta["wall_time_s"],
        "invocations": meta["invocations"],
        "sum_of_run_wall_times_s": sum(r["wall_time_s"] for r in records),
        "random_init_reference": references,
        "aggregate": agg,
        "comparisons_vs_moco": comparisons,
        "claims": claims,
        "runs": records,
    }
    if previous is not None:
        study["reproducibility"] = reproducibility(agg, records, previous)
    (out / "study.json").write_text(json.dumps(study, indent=1))

    m = meta["machine"]
    lines = [f"# CPU-scale study: MoCHi vs MoCo-v2 on Fashion-MNIST{' (PARTIAL)' if partial else ''}", ""]
    if partial:
        lines += [
            f"**Partial**: {len(records)} of {len(expected)} runs finished; missing: {', '.join(missing)}. "
            "Re-running the command below continues the study (finished runs are not redone).",
            "",
        ]
    lines += [
        "Generated by `bench/study.py` (issue 7). Every number below is in [study.json](study.json).",
        "",
        "## Command",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"- machine: {m['cpu_model']}, {m['usable_cpus']} usable CPU cores ({m['logical_cpus']} logical), "
        f"torch threads {m['torch_threads']}, no GPU; Python {m['python']}",
        f"- versions: torch {m['versions']['torch']}, torchvision {m['versions']['torchvision']}, "
        f"timm {m['versions']['timm']}, accelerate {m['versions']['accelerate']}, "
        f"mochi-hub {m['versions']['mochi-hub']} (runs trained at commit "
        f"{', '.join(meta['trained_at_commits']) or 'not recorded'}; report written at commit "
        f"{meta['git_commit'] or 'unknown'})",
        f"- wall time: {meta['wall_time_s'] / 60:.1f} min over {max(1, len(meta['invocations']))} invocation(s) "
        f"(first started {meta['started']}; an interrupted study continues where it stopped); "
        f"sum of the runs' own training wall times: {sum(r['wall_time_s'] for r in records) / 60:.1f} min "
        "(the machine was shared with other work at times, so times are upper bounds)",
        "",
    ]
    steps = records[0] if records else None
    fn_n = min(1024, args.queue_size)  # train.py's hard-set size for a MoCo-v2 run's false-negative analysis
    probe_train = records[0]["probe_train_images"] if records else args.probe_images
    probe_eval = records[0]["probe_eval_images"] if records else None
    mixing_n = sorted({v[0] for v in settings.values() if v[1] + v[2]})
    lines += [
        "## Setup (the same for every run)",
        "",
        f"- data: Fashion-MNIST (Debian's real images), pretraining on the first {args.train_images:,} "
        f"training images; probes fit on a seeded {probe_train:,}-image subset of the training split and "
        f"report {'the whole test split' if probe_eval == 10000 else 'a seeded subset of the test split'} "
        f"({probe_eval if probe_eval is not None else '?'} images)",
        f"- backbone: timm `{args.model}` (random init, `num_classes=0`) + MoCo-v2 MLP head (128-d), "
        f"{args.image_size} px crops; MoCo-v2 augmentation unchanged (random resized crop 0.2-1, colour "
        "jitter p=0.8, random grayscale p=0.2, blur p=0.5, flip). On these grayscale images (converted to "
        "RGB with R=G=B) the jitter's saturation and hue and the random grayscale do nothing; brightness "
        "and contrast still act",
        f"- {args.epochs} epochs x {steps['steps_per_epoch'] if steps else '?'} steps of batch "
        f"{args.batch_size} = {steps['total_steps'] if steps else '?'} steps; queue K = {args.queue_size}; "
        f"SGD lr {args.lr} (cosine), momentum 0.9, wd 1e-4; temperature {args.temperature}; key momentum "
        f"{args.key_momentum}; shuffle-BN emulated on one process (split BN)",
        f"- MoCHi runs: no mixing during the first {args.mixing_warmup_epochs} epoch(s) (until step {warm}), the "
        "same rule for every MoCHi setting; MoCo-v2 never mixes. Seeds: " + ", ".join(map(str, args.seeds)),
        f"- why N = {', '.join(map(str, mixing_n))}: with K = {args.queue_size} and 10 classes, about "
        f"{args.queue_size // 10} queue entries share a query's class; see the docstring of `bench/study.py` "
        f"(the paper's N = 1024 of K = 16384 with 100 classes is about 6 classes' worth of entries). "
        f"{fn_n} is also the hard-set size over which mochi_hub.train measures a MoCo-v2 run's false-negative "
        f"rate (min(1024, K)); a MoCHi run's is measured over its own N"
        + (
            ", so every run is measured over the same hard set size"
            if mixing_n == [fn_n]
            else " (NOT the same here: compare the FN rates with care)"
        ),
        "- probes: `knn` (k = 200, T = 0.07, cosine) and `fast` (linear classifier, 20 epochs, on cached "
        "features of un-augmented centre crops; not the paper's augmented linear protocol)",
        f"- final proxy top-1 / uniformity / alignment: mean of the last {FINAL_WINDOW} logged steps (one "
        "batch each); mean FN rate: mean over the logged steps after warm-up (the steps where MoCHi mixes; "
        "the same steps for MoCo-v2) of the share of same-class entries among each query's hardest queue "
        "entries (chance: about 0.10)",
        "",
    ]
    lines += [
        "## Results (mean ± std over seeds)",
        "",
        "| setting | runs | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " | train wall time (s) |",
        "|---" * (len(TABLE_COLUMNS) + 3) + "|",
    ]
    for name in settings:
        if name not in agg:
            lines.append(f"| {name} | 0 | " + " | ".join("n/a" for _ in TABLE_COLUMNS) + " | n/a |")
            continue
        e = agg[name]
        lines.append(
            f"| {name} | {e['n']} | "
            + " | ".join(fmt(e[k], d) for k, _, d in TABLE_COLUMNS)
            + f" | {fmt(e['wall_time_s'], 0)} |"
        )
    if references:
        knn = mean_std([r["knn"] for r in references.values()])
        fast = mean_std([r["fast"] for r in references.values()])
        lines.append(
            f"| random init (reference, no training) | {len(references)} | "
            f"{fmt({'mean': knn[0], 'std': knn[1]}, 2)} | {fmt({'mean': fast[0], 'std': fast[1]}, 2)} | "
            "- | - | - | - | - |"
        )
    lines += [
        "",
        "Differences against MoCo-v2 (MoCHi minus MoCo-v2, ± standard error of the difference of the seed means):",
        "",
        "| setting | " + " | ".join(c[1] for c in TABLE_COLUMNS) + " |",
        "|---" * (len(TABLE_COLUMNS) + 1) + "|",
    ]
    for name, c in comparisons.items():
        lines.append(f"| {name} | " + " | ".join(fmt_cmp(c[k], d) for k, _, d in TABLE_COLUMNS) + " |")
    lines += [
        "",
        "Per run:",
        "",
        "| setting | seed | kNN top-1 | fast top-1 | final proxy top-1 | final uniformity | "
        "final alignment | mean FN rate | wall time (s) |",
        "|---" * 9 + "|",
    ]
    for r in records:
        lines.append(
            f"| {r['setting']} | {r['seed']} | {r['knn_top1']:.2f} | {r['fast_top1']:.2f} | "
            f"{r['final_proxy_top1']:.3f} | {r['final_uniformity']:.3f} | {r['final_alignment']:.3f} | "
            f"{r['mean_false_negative_rate']:.3f} | {r['wall_time_s']:.0f} |"
        )
    lines += ["", "## Curves (mean over seeds; the dashed line is the end of the warm-up)", ""]
    for key, name in plots:
        lines += [f"![{key}]({name})", ""]
    lines += ["## The paper's claims at this scale", "", CLAIMS_PLACEHOLDER, ""]
    if previous is not None:
        lines += reproducibility_section(study["reproducibility"], str(args.compare_with))
    text = "\n".join(lines)
    text = text.replace(CLAIMS_PLACEHOLDER, claims_section(agg, comparisons, claims, settings))
    (out / "README.md").write_text(text)
    return study


def reproducibility(agg: dict[str, Any], records: list[dict[str, Any]], previous: dict[str, Any]) -> dict[str, Any]:
    """This study against an earlier one. Per setting and table column: the difference of the seed means and
    whether it lies within the seed spread (the larger of the two standard deviations over seeds). Per run of
    the same setting and seed in both: the absolute difference of each column (0 = identical)."""
    columns = [key for key, _, _ in TABLE_COLUMNS]
    settings = {}
    for name, entry in agg.items():
        before = previous.get("aggregate", {}).get(name)
        if before is None:
            continue
        settings[name] = {}
        for key in columns:
            now, then = entry[key], before.get(key)
            if then is None or now["mean"] is None or then["mean"] is None:
                continue
            spread = max(now["std"] or 0.0, then["std"] or 0.0)
            diff = now["mean"] - then["mean"]
            settings[name][key] = {
                "now": now["mean"],
                "before": then["mean"],
                "diff": diff,
                "spread": spread,
                "n": [entry["n"], before["n"]],
                "within_spread": abs(diff) <= spread,
            }
    earlier = {(r["setting"], r["seed"]): r for r in previous.get("runs", [])}
    runs = []
    for r in records:
        old = earlier.get((r["setting"], r["seed"]))
        if old is not None:
            runs.append(
                {
                    "setting": r["setting"],
                    "seed": r["seed"],
                    "max_abs_diff": {
                        k: abs(r[k] - old[k]) for k in columns if r.get(k) is not None and old.get(k) is not None
                    },
                }
            )
    return {
        "previous_commit": previous.get("git_commit"),
        "previous_started": previous.get("started"),
        "settings": settings,
        "same_runs": runs,
    }


def reproducibility_section(rep: dict[str, Any], path: str) -> list[str]:
    names = {key: label for key, label, _ in TABLE_COLUMNS}
    digits = {key: d for key, _, d in TABLE_COLUMNS}
    lines = [
        "## Re-running the study",
        "",
        f"Compared with an earlier study ({path}: commit {rep['previous_commit'] or 'unknown'}, started "
        f"{rep['previous_started']}). *within spread*: the difference of the seed means is at most the larger of "
        "the two standard deviations over seeds.",
        "",
        "| setting | runs (now, before) | " + " | ".join(names.values()) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for name, cols in rep["settings"].items():
        n = next(iter(cols.values()))["n"] if cols else ["?", "?"]
        cells = []
        for key in names:
            c = cols.get(key)
            cells.append(
                "n/a"
                if c is None
                else f"{c['diff']:+.{digits[key]}f} (spread {c['spread']:.{digits[key]}f}): "
                f"{'within spread' if c['within_spread'] else '**outside spread**'}"
            )
        lines.append(f"| {name} | {n[0]}, {n[1]} | " + " | ".join(cells) + " |")
    if rep["same_runs"]:
        lines += [
            "",
            "Runs of the same setting and seed in both studies, absolute difference per column (0 = the same value):",
            "",
            "| setting | seed | " + " | ".join(names.values()) + " |",
            "|---" * (len(names) + 2) + "|",
        ]
        for r in rep["same_runs"]:
            lines.append(
                f"| {r['setting']} | {r['seed']} | "
                + " | ".join(
                    f"{r['max_abs_diff'][k]:.{digits[k] + 1}f}" if k in r["max_abs_diff"] else "n/a" for k in names
                )
                + " |"
            )
    return lines + [""]


CLAIMS_PLACEHOLDER = "<!-- claims -->"


def claims_section(
    agg: dict[str, Any],
    comparisons: dict[str, Any],
    claims: list[dict[str, Any]],
    settings: dict[str, tuple[int, int, int]],
) -> str:
    """The side-by-side table, generated from the numbers: a claim 'holds' when the difference of seed
    means lies in the paper's direction by at least 2 standard errors."""
    moco = next(iter(settings))
    rows = [
        "Verdict rule: *holds* when MoCHi minus MoCo-v2 lies in the paper's direction by at least two "
        "standard errors of the difference of seed means; *opposite* when it lies the other way by as much; "
        "otherwise *not resolved*.",
        "",
        "| paper's claim | what was measured here | " + " | ".join(f"{n}" for n in list(settings)[1:]) + " |",
        "|---|---|" + "---|" * (len(settings) - 1),
    ]

    def cell(name: str, key: str, claim: str, digits: int) -> str:
        c = comparisons[name][key]
        v = next(x for x in claims if x["setting"] == name)[claim]
        return f"{fmt_cmp(c, digits)}: **{v}**"

    others = list(settings)[1:]
    rows.append(
        "| (1) MoCHi makes the proxy task harder (lower proxy accuracy) | final proxy top-1, MoCHi - MoCo-v2 "
        "(MoCHi's counts its synthetic negatives, as its loss does) | "
        + " | ".join(
            cell(n, "final_proxy_top1", "proxy_harder", 3)
            + "; mean after warm-up: "
            + cell(n, "mean_proxy_top1_after_warmup", "proxy_harder_after_warmup", 3)
            for n in others
        )
        + " |"
    )
    rows.append(
        "| (2) MoCHi improves uniformity | final uniformity, MoCHi - MoCo-v2 (negative = more uniform) | "
        + " | ".join(
            cell(n, "final_uniformity", "uniformity_better", 3)
            + "; mean after warm-up: "
            + cell(n, "mean_uniformity_after_warmup", "uniformity_better_after_warmup", 3)
            for n in others
        )
        + " |"
    )

    def above_chance(name: str) -> str:
        e = agg.get(name, {}).get("mean_false_negative_rate")
        if not e or e["mean"] is None:
            return "n/a"
        n = len([v for v in e["values"] if v is not None])
        se = e["std"] / math.sqrt(n) if n > 1 else 0.0
        z = (e["mean"] - CHANCE_FN) / se if se > 0 else None
        word = (
            "one seed only"
            if z is None
            else "above chance"
            if z >= 2
            else "below chance"
            if z <= -2
            else "at chance (within 2 SE)"
        )
        return f"{fmt(e, 3)}: **{word}**"

    rows.append(
        f"| (3) false negatives appear among the hardest negatives | share of same-class entries among each "
        f"query's hardest queue entries, mean after warm-up; chance = {CHANCE_FN:.2f} (10 balanced classes); "
        f"MoCo-v2: {above_chance(moco)} | " + " | ".join(above_chance(n) for n in others) + " |"
    )
    rows.append(
        "| (4) linear-accuracy gain over MoCo-v2 | fast-linear top-1 (kNN top-1), MoCHi - MoCo-v2, points | "
        + " | ".join(f"{cell(n, 'fast_top1', 'fast_gain', 2)} ({cell(n, 'knn_top1', 'knn_gain', 2)})" for n in others)
        + " |"
    )
    rows += ["", NOTES]
    return "\n".join(rows)


CHANCE_FN = 0.10
NOTES = """Notes on reading these numbers:

- **Proxy top-1 is not the same task for MoCo-v2 and MoCHi.** mochi_hub.train logs `proxy_top1` on the logits the
  loss sees, so a MoCHi query must also outrank its s + s' synthetic negatives. A query mix
  h' = normalize(beta q + (1 - beta) n) with beta up to 0.5 lies between q and one of its hardest negatives and
  is often closer to q than the positive key, so claim (1) partly holds by construction here. A comparison
  over the real queue alone would need `proxy_top1(logits[:, :1 + K])`, which train.py does not log.
- **The false-negative rate** compares each query's hard set with the labels the queue held when that hard set was
  chosen, before the step enqueued its own keys (train.py since commit 4f59a22; a study run before that read
  the labels after the enqueue, so the B = 128 rows just overwritten, 3% of the queue, carried the wrong labels).
- **MoCo-v2 itself does not train well in this recipe, so the comparison is made where the baseline is failing.**
  After about 90 steps the MoCo-v2 loss climbs back towards ln(K + 1) = 8.32 and its proxy top-1 falls from
  about 0.46 to about 0.02 by the end, while the queries stay bunched together (uniformity between -0.02 and
  -0.6 throughout; a well-spread 128-d embedding scores about -4). It is the recipe, not mochi_hub: MoCo-v2
  written with lightly's building blocks, on the same batches with the same hyperparameters, follows the same
  curve (`bench/dynamics.py`, in BENCHMARKS.md: loss 7.11 -> 8.07 ours, 7.13 -> 8.16 lightly, steps 96 ->
  384). Not isolated: every variant tried turned the same way. Temperature 0.1 (384 steps: loss 6.58 at step
  60, 8.44 at step 380); batch 64 with lr 0.03 (768 steps: 6.55 at step 120, 8.05 at step 760); lr 0.015, the
  paper's 0.03 x 128/256 (up by step 160, stopped there); crop scale 0.5 without blur (384 steps: 7.08 at step
  80, 7.62 at step 360); 64 px inputs (200 steps: 6.69 at step 80, 6.84 at step 200; proxy top-1 0.56 at
  step 40, 0.13 at step 200). With an almost constant lr (a 30-epoch cosine stopped at step 384) proxy top-1
  fell too (0.51 at step 80, 0.02 at step 320) while the queries began to spread (uniformity -0.02 -> -0.75),
  then recovered at the end (0.16 and loss 6.99 at step 380): the runs may end half-way out of the bunched
  state they start in. A longer schedule does get them out: over 10 epochs (1280 steps, 11 minutes a run) the
  loss fell back to 6.63-6.70 over the last 200 steps, uniformity reached -1.93 and alignment 0.21, although
  the single-batch proxy top-1 stayed low (0.03); a study at that length would take about 2 hours, and is the
  next thing to try. Each variant is one command,
  `bench/dynamics.py --ours-only --steps 384 --every 20 --temperature 0.1`, and likewise `--batch-size 64
  --lr 0.03 --steps 768`, `--lr 0.015 --steps 160`, `--image-size 64 --steps 200`, `--epochs 30 --steps 384`, `--epochs 10 --steps 1280 --every 64`;
  the crop run without blur patched the transform by hand. The pretrained features still beat random initialisation by
  about 34 points of kNN top-1, but the verdicts above say little about the paper's regime, where MoCo-v2
  trains well.
- **This is an early-training regime.** A few hundred steps on 16k images at 32 px is far from the paper's 200
  epochs on ImageNet; the random-initialisation row says how far pretraining moved the probes at all. The
  fast probe is a linear classifier on frozen, un-augmented features, not the paper's linear protocol.
- Times are wall-clock on a shared 2-core machine; MoCHi's extra cost per step is small next to the backbone's."""


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    previous = (
        json.loads(args.compare_with.read_text()) if args.compare_with else None
    )  # read before --out is rewritten
    out, runs_dir = Path(args.out), Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(UTC)
    clock = time.perf_counter()
    commit = git_commit()  # the code the runs of this invocation train with
    exe = sys.executable
    exe = os.path.relpath(exe) if exe.startswith(os.getcwd() + os.sep) else exe
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]  # the study's command
    if "--compare-with" in given:  # a reporting option, not part of the study's command
        at = given.index("--compare-with")
        del given[at : at + 2]
    given = [a for a in given if not a.startswith("--compare-with=")]
    command = " ".join(shlex.quote(a) for a in [exe, "bench/study.py", *given])

    def log(message: str) -> None:
        print(f"[study {datetime.now(UTC):%H:%M:%S}] {message}", flush=True)

    # Seed-major order: an interrupted study has whole seeds of every setting, not all seeds of one.
    expected = [(name, seed) for seed in args.seeds for name in args.settings]
    references: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        for name in args.settings:
            mochi = args.settings[name]
            run_dir = runs_dir / f"{slug(name, mochi)}-s{seed}"
            if finished(run_dir, args, runs_dir):
                log(f"{name} seed {seed}: finished earlier, kept ({run_dir})")
                continue
            if args.report_only:
                continue
            log(f"{name} seed {seed}: running in {run_dir}")
            do_run(args, mochi, seed, run_dir, runs_dir, log)
        if seed in args.reference_seeds and not args.report_only:
            references[seed] = reference_probe(args, seed, runs_dir, log)
    for seed in args.seeds:  # references probed earlier (or by an earlier invocation) are reported too
        folder = runs_dir / f"random-init-s{seed}"
        if seed not in references and all((folder / f"{p}.json").is_file() for p in ("knn", "fast")):
            references[seed] = {p: json.loads((folder / f"{p}.json").read_text())["top1"] for p in ("knn", "fast")}

    records = []
    for name, seed in expected:
        run_dir = runs_dir / f"{slug(name, args.settings[name])}-s{seed}"
        if finished(run_dir, args, runs_dir):
            records.append(run_record(run_dir, args, runs_dir, name, args.settings[name], seed))
    # An interrupted study is finished by later invocations: its wall time is the sum of theirs (report-only
    # invocations excluded), kept in RUNS/invocations.json.
    log_path = runs_dir / "invocations.json"
    invocations = json.loads(log_path.read_text()) if log_path.is_file() else []
    if not args.report_only:
        invocations.append(
            {
                "started": started_at.isoformat(timespec="seconds"),
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "wall_time_s": round(time.perf_counter() - clock, 1),
                "runs_finished": len(records),
                "git_commit": commit,
            }
        )
        log_path.write_text(json.dumps(invocations, indent=1))
    wall = sum(i["wall_time_s"] for i in invocations) if invocations else time.perf_counter() - clock
    trained_at = list(dict.fromkeys(i["git_commit"] for i in invocations if i.get("git_commit")))
    meta = {
        "command": command,
        "machine": machine_info(),
        "git_commit": commit,
        "trained_at_commits": trained_at,
        "started": invocations[0]["started"] if invocations else started_at.isoformat(timespec="seconds"),
        "finished": invocations[-1]["finished"] if invocations else datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_time_s": wall,
        "invocations": invocations,
    }  # report-only runs train nothing
    study = write_report(args, out, records, expected, references, meta, previous)
    log(f"wrote {out / 'README.md'} ({len(records)} of {len(expected)} runs; {wall / 60:.1f} min)")
    return study


if __name__ == "__main__":
    main()
