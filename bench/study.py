"""A CPU-scale study of MoCHi against MoCo-v2 on real images (Fashion-MNIST), in the recipe that learns.

    .venv/bin/python bench/study.py --out docs/study --runs-dir runs/study          # 3 settings x 3 seeds
    .venv/bin/python bench/study.py --quick --out /tmp/study --runs-dir /tmp/runs   # a smoke run, a minute

Every run is `mochi train --preset fashion-mnist` with one MoCHi setting and one seed (MoCo-v2 is MoCHi (0, 0, 0);
MoCHi mixes after the preset's warm-up epoch), then `mochi probe` knn and fast on the test split (bank: a seeded
20,000-image subset of the training split). Beside every trained backbone stand the references a claim of
learning must beat, probed the same way: the exact untrained backbone of its seed (mochi_hub.training.state.
initial_encoder) and raw pixels (centred by the bank's mean image). The runs' metrics.jsonl give the curves of
proxy top-1, uniformity, alignment and the false-negative rate; the paper's claims get a verdict from seed means
and their standard errors. Resumable: a finished run (run.json with a summary and both probes) is kept, an
interrupted one continues from its newest checkpoint. `--report-only` trains nothing: it rewrites the report from
the runs that finished, probing any reference they lack (an interrupted study computes its references last);
`--compare-with OLD/study.json` adds whether this study reproduces an earlier table within the seed spread.
`--reuse OLD/study.json` continues a study whose run directories are gone (a new machine, a fresh clone): the runs
it holds of the same recipe (the same config but for where it ran) are kept with its references, the rest are run.

The report's text is bench/study_report.md.j2; the hand-written notes (what was tried, what failed and why) are
bench/study_notes.md, included verbatim.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

HERE = Path(__file__).resolve().parent
SETTINGS = {"MoCo-v2": (0, 0, 0), "MoCHi (1024, 1024, 512)": (1024, 1024, 512), "MoCHi (1024, 0, 512)": (1024, 0, 512)}
QUICK_SETTINGS = {"MoCo-v2": (0, 0, 0), "MoCHi (128, 64, 32)": (128, 64, 32)}
QUICK = dict(
    model="test_resnet", max_train_images=256, epochs=2, batch_size=32, queue_size=256, bn_splits=2, log_every_steps=2
)
BANK, QUICK_BANK = 20000, 300
FINAL_WINDOW = 5  # "final" = mean of the last 5 logged steps (each one batch: noisy alone)
CHANCE_FN = 0.10  # 10 balanced classes
# Columns of the tables: key, label, digits.
COLUMNS = (
    ("knn", "kNN top-1 %", 2),
    ("fast", "fast-linear top-1 %", 2),
    ("knn_gain", "kNN minus untrained", 2),
    ("fast_gain", "fast minus untrained", 2),
    ("final_proxy_top1", "final proxy top-1", 3),
    ("final_uniformity", "final uniformity", 3),
    ("final_alignment", "final alignment", 3),
    ("mean_fn_rate", "mean FN rate", 3),
    ("wall_time_s", "train wall time (s)", 0),
)
EXTRA = ("proxy_after_warmup", "uniformity_after_warmup")
CURVES = (
    ("proxy_top1", "proxy top-1 (MoCHi: synthetic negatives included)"),
    ("uniformity", "uniformity (Wang & Isola, t=2; lower = more uniform)"),
    ("alignment", "alignment (E||q-k||^2; lower = better aligned)"),
    ("false_negative_rate", "false-negative rate among the hardest queue entries (chance 0.10)"),
    ("loss", "InfoNCE loss"),
)


def slug(mochi: tuple[int, int, int]) -> str:
    return ("moco-v2" if mochi[1] + mochi[2] == 0 else "mochi") + "-" + "-".join(map(str, mochi))


def train_config(args, mochi: tuple[int, int, int], seed: int, run_dir: Path):
    from mochi_hub.config import resolve_train_config

    extra = QUICK if args.quick else {}
    return resolve_train_config(
        preset="fashion-mnist",
        mochi=mochi,
        seed=seed,
        output=str(run_dir),
        resume="auto",
        report_to="none",
        keep_checkpoints=1,
        **extra,
        **dict(args.set),
    )


def run_path(args, name: str, seed: int) -> Path:
    return args.runs_dir / f"{slug(args.settings[name])}-s{seed}"


def cache(args) -> Path:
    return args.runs_dir / "feature-cache"


def reference(args, seed: int, log) -> dict[str, float]:
    """The untrained backbone of `seed` (every setting of that seed starts from it), probed as the runs are."""
    from learning import probes

    from mochi_hub.publish.sources import weights_sha256
    from mochi_hub.training.state import initial_encoder

    path = args.runs_dir / f"untrained-s{seed}.json"
    if not path.is_file():
        config = train_config(args, (0, 0, 0), seed, args.runs_dir / "unused")
        module = initial_encoder(config)[0].backbone.eval()
        info = {
            "kind": "untrained",
            "seed": seed,
            "weights_sha256": weights_sha256(module),
            "num_features": module.num_features,
        }
        found = probes(
            f"untrained:{config.model}:seed{seed}", (module, info), config.image_size, args.bank, cache(args)
        )
        path.write_text(json.dumps(found))
        log(f"untrained seed {seed}: kNN {json.loads(path.read_text())['knn']:.2f}")
    return json.loads(path.read_text())


def raw_pixels(args, image_size: int) -> dict[str, float]:
    path = args.runs_dir / "raw-pixels.json"
    if not path.is_file():
        from learning import eval_tensors, pixels_reference, probes

        pixels = pixels_reference(eval_tensors(image_size, args.bank)[0])
        path.write_text(json.dumps(probes("raw pixels (centred)", pixels, image_size, args.bank, cache(args))))
    return json.loads(path.read_text())


def restore(args, earlier: dict[str, Any], log) -> dict[tuple[str, int], dict[str, Any]]:
    """The records of an earlier study.json (its run directories gone: a new machine) that trained exactly what
    this study would, by (setting, seed); its references and invocations fill in what --runs-dir lacks."""
    from mochi_hub.config import resume_differences, train_config_from_dict
    from mochi_hub.training.state import resolve_device_defaults

    kept = {}
    for r in earlier["runs"]:
        name, seed = r["setting"], r["seed"]
        if name not in args.settings or seed not in args.seeds:
            continue
        now = train_config(args, args.settings[name], seed, Path(r["run_dir"]))
        now, _ = resolve_device_defaults(now, "cpu", cpus=os.cpu_count() or 1, local_processes=1)  # as saved
        if differences := resume_differences(train_config_from_dict(r["config"]), now):
            raise SystemExit(f"--reuse: {name} seed {seed} trained another recipe ({'; '.join(differences)})")
        kept[name, seed] = r
    if not kept:
        raise SystemExit("--reuse: the earlier study has none of this study's runs")
    files = {"raw-pixels.json": earlier["references"]["raw pixels"], "invocations.json": earlier["invocations"]}
    files |= {f"untrained-s{s}.json": found for s, found in earlier["references"]["untrained"].items()}
    for file, content in files.items():
        if not (args.runs_dir / file).is_file():
            (args.runs_dir / file).write_text(json.dumps(content, indent=1))
    log(f"reused {len(kept)} runs of the earlier study ({', '.join(f'{n} seed {s}' for n, s in kept)})")
    return kept


def finished(run_dir: Path) -> bool:
    info = run_dir / "run.json"
    return info.is_file() and "summary" in json.loads(info.read_text()) and (run_dir / "probes.json").is_file()


def do_run(args, name: str, mochi, seed: int, run_dir: Path, log) -> None:
    import shutil

    from mochi_hub.training.pretrain import train

    config = train_config(args, mochi, seed, run_dir)
    info = run_dir / "run.json"
    if not (info.is_file() and "summary" in json.loads(info.read_text())):
        t = time.perf_counter()
        train(config)
        log(f"{name} seed {seed}: trained in {time.perf_counter() - t:.0f} s")
    from learning import probes

    found = probes(str(run_dir), None, config.image_size, args.bank, cache(args))
    (run_dir / "probes.json").write_text(json.dumps(found))
    log(f"{name} seed {seed}: kNN {found['knn']:.2f}, fast {found['fast']:.2f}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # export/ keeps the backbone


def mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return statistics.fmean(values) if values else None


def record(run_dir: Path, name: str, mochi, seed: int, untrained: dict[str, float]) -> dict[str, Any]:
    from mochi_hub.training.runs import read_metrics

    info = json.loads((run_dir / "run.json").read_text())
    probes = json.loads((run_dir / "probes.json").read_text())
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "step"]
    warm = info["config"]["mixing_warmup_epochs"] * info["steps_per_epoch"]
    after, last = [r for r in steps if r["step"] > warm], steps[-FINAL_WINDOW:]
    return {
        "setting": name,
        "mochi": list(mochi),
        "seed": seed,
        "run_dir": str(run_dir),
        "knn": probes["knn"],
        "fast": probes["fast"],
        "knn_gain": probes["knn"] - untrained["knn"],
        "fast_gain": probes["fast"] - untrained["fast"],
        "final_proxy_top1": mean(last, "proxy_top1"),
        "final_uniformity": mean(last, "uniformity"),
        "final_alignment": mean(last, "alignment"),
        "mean_fn_rate": mean(after, "false_negative_rate"),
        "proxy_after_warmup": mean(after, "proxy_top1"),
        "uniformity_after_warmup": mean(after, "uniformity"),
        "wall_time_s": info["summary"]["wall_time_s"],
        "hosts": info["summary"].get("hosts", []),  # runs before mochi-hub recorded hosts have none
        "warmup_steps": warm,
        "total_steps": info["total_steps"],
        "steps_per_epoch": info["steps_per_epoch"],
        "config": info["config"],
        "curves": {k: [[r["step"], r.get(k)] for r in steps] for k, _ in CURVES},
    }


# --- statistics ---------------------------------------------------------------------------------------------


def mean_std(values: list[float | None]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
        "n": len(values),
    }


def aggregate(records: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name in settings:
        mine = [r for r in records if r["setting"] == name]
        if mine:
            entry = {key: mean_std([r[key] for r in mine]) for key in [c[0] for c in COLUMNS] + list(EXTRA)}
            entry["curves"] = {key: _mean_curve([r["curves"][key] for r in mine]) for key, _ in CURVES}
            entry["n"] = len(mine)
            out[name] = entry
    return out


def _mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    return [[s, statistics.fmean(v)] for s, v in sorted(by_step.items())]


def compare(agg: dict[str, Any], key: str, a: str, b: str) -> dict[str, Any] | None:
    """b - a, with the standard error of the difference of the two seed means (Welch)."""
    if a not in agg or b not in agg or not agg[a][key]["values"] or not agg[b][key]["values"]:
        return None
    va, vb = agg[a][key]["values"], agg[b][key]["values"]
    var = sum(statistics.variance(v) / len(v) for v in (va, vb) if len(v) > 1)
    diff, se = statistics.fmean(vb) - statistics.fmean(va), math.sqrt(var)
    return {"diff": diff, "se": se, "z": diff / se if se > 0 else None}


def verdict(c: dict[str, Any] | None, sign: int) -> str:
    """sign: the direction the paper claims. Holds / opposite at two standard errors."""
    if c is None:
        return "not measured"
    if c["z"] is None:
        return "no spread to judge (one seed, or identical values)"
    return "holds" if sign * c["z"] >= 2 else "opposite" if sign * c["z"] <= -2 else "not resolved (within 2 SE)"


def versus_value(entry: dict[str, Any], value: float) -> str:
    """A seed mean against a fixed value (chance, or a reference): above / below at two standard errors."""
    se = entry["std"] / math.sqrt(entry["n"]) if entry["n"] > 1 else 0.0
    if entry["mean"] is None:
        return "n/a"
    if se == 0:
        return "above" if entry["mean"] > value else "not above"
    z = (entry["mean"] - value) / se
    return "above" if z >= 2 else "below" if z <= -2 else "within 2 SE"


def reproducibility(agg: dict[str, Any], records: list[dict[str, Any]], previous: dict[str, Any]) -> dict[str, Any]:
    """This study against an earlier one: per setting and column, the difference of the seed means and whether it
    lies within the seed spread (the larger of the two standard deviations); per run of the same setting and seed
    in both, the absolute difference of each column (0 = identical)."""
    keys = [c[0] for c in COLUMNS if c[0] != "wall_time_s"]
    settings: dict[str, Any] = {}
    for name, entry in agg.items():
        before = previous.get("aggregate", {}).get(name, {})
        for key in keys:
            now, then = entry[key], before.get(key)
            if then and now["mean"] is not None and then["mean"] is not None:
                spread, diff = max(now["std"], then["std"]), now["mean"] - then["mean"]
                settings.setdefault(name, {})[key] = {
                    "diff": diff,
                    "spread": spread,
                    "within_spread": abs(diff) <= spread,
                }
    earlier = {(r["setting"], r["seed"]): r for r in previous.get("runs", [])}
    same = [
        {
            "setting": r["setting"],
            "seed": r["seed"],
            "abs_diff": {k: abs(r[k] - old[k]) for k in keys if r.get(k) is not None and old.get(k) is not None},
        }
        for r in records
        if (old := earlier.get((r["setting"], r["seed"]))) is not None
    ]
    return {"previous_commit": previous.get("git_commit"), "settings": settings, "same_runs": same}


# --- the report -----------------------------------------------------------------------------------------------


def report(args, records, expected, references, meta, previous) -> dict[str, Any]:
    import jinja2

    from mochi_hub.publish import plots

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(records, args.settings)
    moco, others = next(iter(args.settings)), list(args.settings)[1:]
    comparisons = {n: {k: compare(agg, k, moco, n) for k in [c[0] for c in COLUMNS] + list(EXTRA)} for n in others}
    claims = {
        n: {
            "proxy": verdict(c["final_proxy_top1"], -1),
            "proxy_after": verdict(c["proxy_after_warmup"], -1),
            "uniformity": verdict(c["final_uniformity"], -1),
            "uniformity_after": verdict(c["uniformity_after_warmup"], -1),
            "fast": verdict(c["fast"], +1),
            "knn": verdict(c["knn"], +1),
        }
        for n, c in comparisons.items()
    }
    untrained = {p: mean_std([r[p] for r in references["untrained"].values()]) for p in ("knn", "fast")}
    learning = {n: {p: versus_value(agg[n][p], untrained[p]["mean"] + 5) for p in ("knn", "fast")} for n in agg}
    charts = []
    if plots.available() and records:
        for key, title in CURVES:
            plots.comparison(
                {n: agg[n]["curves"][key] for n in agg},
                f"{title} - mean over seeds",
                out / f"{key}.png",
                vline=records[0]["warmup_steps"],
            )
            charts.append(key)
    study = {
        "command": meta["command"],
        "partial": len(records) < len(expected),
        "missing": [
            f"{n} seed {s}" for n, s in expected if not any(r["setting"] == n and r["seed"] == s for r in records)
        ],
        "settings": {k: list(v) for k, v in args.settings.items()},
        **meta,
        "references": references,
        "aggregate": agg,
        "comparisons_vs_moco": comparisons,
        "claims": claims,
        "learning": learning,
        "runs": records,
    }
    if previous is not None:
        study["reproducibility"] = reproducibility(agg, records, previous)
    common.write_result(out / "study.json", study)

    def cell(entry: dict[str, Any] | None, digits: int) -> str:
        return (
            "n/a"
            if not entry or entry.get("mean") is None
            else f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"
        )

    def diff(c: dict[str, Any] | None, digits: int) -> str:
        return "n/a" if c is None else f"{c['diff']:+.{digits}f} ± {c['se']:.{digits}f}"

    template = jinja2.Template((HERE / "study_report.md.j2").read_text(), trim_blocks=True, lstrip_blocks=True)
    notes = (HERE / "study_notes.md").read_text() if not args.quick else "(quick run: no notes)"
    text = template.render(
        s=study,
        c=COLUMNS,
        agg=agg,
        moco=moco,
        others=others,
        charts=charts,
        cell=cell,
        diff=diff,
        untrained=untrained,
        pixels=references["raw pixels"],
        first=records[0] if records else None,
        chance=CHANCE_FN,
        fn=versus_value,
        notes=notes,
        args=args,
    )
    (out / "README.md").write_text(text)
    return study


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(
        __doc__,
        "study",
        quick="2 settings, 1 seed, test_resnet, a few steps",
        threads=2,
        threads_help="torch threads (default 2)",
    )
    p.add_argument("--runs-dir", type=Path, default=common.ROOT / "runs" / "study")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --quick: 0)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a preset field")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: rewrite --out from the finished runs (probing any reference they lack)",
    )
    p.add_argument("--compare-with", type=Path, default=None, help="an earlier study.json to compare against")
    p.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="an earlier study.json whose run directories are gone: its runs of the same recipe are kept, not re-run",
    )
    args = common.parse(p, argv)
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    args.out = args.out if args.out.suffix != ".json" else common.ROOT / "docs" / "study"
    args.settings = QUICK_SETTINGS if args.quick else SETTINGS
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    args.bank = QUICK_BANK if args.quick else BANK
    args.set = [(k, yaml.safe_load(v)) for k, v in (item.split("=", 1) for item in args.set)]
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.compare_with.read_text()) if args.compare_with else None
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    for option in ("--compare-with", "--reuse"):  # how this invocation reports or resumes: not the study's command
        if option in given:
            del given[given.index(option) : given.index(option) + 2]
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/study.py", *given])
    started, clock = datetime.now(UTC), time.perf_counter()

    def log(message: str) -> None:
        print(f"[study {datetime.now(UTC):%H:%M:%S}] {message}", flush=True)

    expected = [(name, seed) for seed in args.seeds for name in args.settings]  # seed-major: whole seeds first
    image_size = train_config(args, (0, 0, 0), 0, args.runs_dir / "unused").image_size
    reused = restore(args, json.loads(args.reuse.read_text()), log) if args.reuse else {}
    for name, seed in expected:
        run_dir = run_path(args, name, seed)
        if finished(run_dir):
            log(f"{name} seed {seed}: finished earlier, kept ({run_dir})")
        elif (name, seed) in reused:
            reused[name, seed]["reused"] = True
        elif not args.report_only:
            log(f"{name} seed {seed}: running in {run_dir}")
            do_run(args, name, args.settings[name], seed, run_dir, log)
    done = [(n, s) for n, s in expected if finished(run_path(args, n, s)) or (n, s) in reused]
    # Probed here, not per run, so --report-only after an interrupted study also probes what it lacks.
    references = {
        "raw pixels": raw_pixels(args, image_size),
        "untrained": {seed: reference(args, seed, log) for seed in sorted({s for _, s in done})},
    }
    records = [
        record(run_path(args, n, s), n, args.settings[n], s, references["untrained"][s])
        if finished(run_path(args, n, s))
        else reused[n, s]
        for n, s in done
    ]
    invocations_file = args.runs_dir / "invocations.json"
    invocations = json.loads(invocations_file.read_text()) if invocations_file.is_file() else []
    env = common.environment(__file__, argv)
    if not args.report_only:
        invocations.append(
            {
                "started": started.isoformat(timespec="seconds"),
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "wall_time_s": round(time.perf_counter() - clock, 1),
                "git": env.get("git"),
            }
        )
        invocations_file.write_text(json.dumps(invocations, indent=1))
    meta = {
        "command": command,
        "environment": env,
        "loadavg_before": env["loadavg_before"],
        "invocations": invocations,
        "wall_time_s": sum(i["wall_time_s"] for i in invocations),
    }
    study = report(args, records, expected, references, meta, previous)
    log(f"wrote {args.out / 'README.md'} ({len(records)} of {len(expected)} runs)")
    return study


if __name__ == "__main__":
    main()
