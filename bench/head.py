"""Benchmark of the MoCHi head: contrastive logits + InfoNCE loss, forward and backward w.r.t. q, at the paper's
scale (B=256, D=128, K in {16384, 65536}, MoCHi (N, s, s') = (1024, 1024, 512), temperature 0.2, float32, CPU):

- ``mochi``: ``mochi_hub.method.loss.contrastive_logits`` + ``info_nce`` with a plan from
  ``mochi_hub.method.mixing.sample_plan`` (synthetic logits assembled from l_neg, nothing materialised);
- ``reference``: the naive vectorised form written below: the hard negatives gathered to [B, N, D], mixed
  points [B, s, D] and [B, s', D] normalised and dotted with q by ``torch.bmm``, concatenated with l_pos
  and l_neg, cross-entropy. Same plan; before any timing the two are asserted to give the same loss and
  gradient at small sizes (float64 and float32);
- ``moco``: the plain MoCo-v2 head (plan None), for scale.

Each run of a (variant, K) is a process of its own, forked after the imports (bench/common.py), so its peak
memory is its own; every variant gets the same torch threads (the usable CPUs, or ``--threads``). A run
allocates the inputs and the plan (sampled once, outside the timed loop), calls the head on a tiny problem
(thread pool, autograd engine), resets the peak-RSS watermark (writing "5" to /proc/self/clear_refs; where
it cannot, VmHWM after the inputs is the baseline) and records VmRSS, then runs ``--warmup`` untimed and
``--iters`` timed iterations. "Peak extra" is VmHWM after the loop minus that baseline.

Time: the median wall time of the timed iterations (default allocator), best of ``--rounds`` interleaved
runs per variant; "CPU ms" (median process CPU time) measures the work regardless of load with one thread
(with two, OpenMP's spin-waiting counts). Memory: glibc keeps freed blocks up to 32 MiB in its heap, so the
default allocator's peak says more about heap reuse than about the head; the "live" figure of the ratios
comes from one more run per variant with ``mallopt(M_MMAP_THRESHOLD, 65536)`` (as MALLOC_MMAP_THRESHOLD_=65536:
every tensor above 64 KiB its own mapping, unmapped on free, so RSS follows the tensors alive). The
default-allocator figure (largest of the timing runs) is reported too. ``--quick``: the live run gives both.

Targets (the issue's): reference / mochi time >= 4 at K = 16384; mochi / reference live peak extra memory
<= 0.2; mochi / moco time <= 5. Prints Markdown tables; writes JSON (``--out``, default
bench/results/head.json; the runs' logs in ``<out>.logs/``). Run (about three minutes on 2 cores):

    .venv/bin/python bench/head.py                 # K = 16384 and 65536
    .venv/bin/python bench/head.py --ks 16384 --iters 5
    .venv/bin/python bench/head.py --quick         # small sizes, smoke run in seconds
"""

from __future__ import annotations

import ctypes
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py
import common

VARIANTS = ("mochi", "reference", "moco")
TEMPERATURE = 0.2
PAPER = dict(batch=256, dim=128, n_hard=1024, s=1024, s_prime=512)
QUICK = dict(batch=16, dim=32, n_hard=64, s=64, s_prime=32)
# The targets: {name: (ratio, "<=" or ">=", bound, what)}; the speed target is set at K = 16384 only.
TARGETS = {
    "memory_vs_reference": ("mochi_over_reference_memory", "<=", 0.2, "mochi/reference peak extra memory"),
    "time_vs_moco": ("mochi_over_moco_time", "<=", 5.0, "mochi/moco time"),
    "speed_vs_reference": ("reference_over_mochi_time", ">=", 4.0, "reference/mochi time"),
}
SIZED = dict(
    ks=(str, "1024", "16384,65536", "comma-separated queue sizes K"),
    iters=(int, 3, 10, "timed iterations per run"),
    warmup=(int, 1, 2, "untimed iterations first"),
    rounds=(int, 1, 2, "timing runs per variant, interleaved; the best median is kept"),
)
LIVE_MMAP_THRESHOLD = 65536  # live-memory runs: every allocation above this is its own mapping, returned on free
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter

REPORT = """
{rows}

{ratios}
{targets}"""


def reference_head(q, k, queue, *, temperature, n_hard, plan):
    """The materialised MoCHi head, vectorised: every synthetic point is built as a D-vector."""
    import torch
    import torch.nn.functional as F

    from mochi_hub.method.mixing import hardest_negatives

    queue = queue.detach()
    dim = q.shape[1]
    l_pos = (q * k.detach()).sum(1, keepdim=True)  # [B, 1]
    l_neg = q @ queue.T  # [B, K]
    hard = queue[hardest_negatives(l_neg, n_hard)]  # [B, N, D]: the same topk, so the plan picks the same points

    def pick(positions):  # [B, m] positions in the hard set -> [B, m, D]
        return hard.gather(1, positions.unsqueeze(-1).expand(-1, -1, dim))

    alpha = plan.alpha.to(q.dtype).unsqueeze(-1)  # [B, s, 1]
    mixed = F.normalize(alpha * pick(plan.pair_i) + (1 - alpha) * pick(plan.pair_j), dim=-1)  # [B, s, D]
    beta = plan.beta.to(q.dtype).unsqueeze(-1)  # [B, s', 1]
    q_mixed = F.normalize(beta * q.detach().unsqueeze(1) + (1 - beta) * pick(plan.query_j), dim=-1)  # [B, s', D]
    l_syn = torch.bmm(torch.cat([mixed, q_mixed], dim=1), q.unsqueeze(-1)).squeeze(-1)  # [B, s + s']
    logits = torch.cat([l_pos, l_neg, l_syn], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def mochi_head(q, k, queue, *, temperature, n_hard, plan):
    """The library's head; with plan None, MoCo-v2's."""
    from mochi_hub.method.loss import contrastive_logits, info_nce

    return info_nce(*contrastive_logits(q, k, queue, temperature=temperature, n_hard=n_hard, plan=plan))


HEADS = {
    "mochi": mochi_head,
    "reference": reference_head,
    "moco": lambda q, k, queue, **options: mochi_head(q, k, queue, **{**options, "plan": None}),
}


def make_inputs(batch, dim, queue_size, n_hard, s, s_prime, *, dtype, seed=0):
    """Unit-norm q (a leaf with gradient), k and queue, and a MoCHi plan: all from fixed seeds."""
    import torch
    import torch.nn.functional as F

    from mochi_hub.method.mixing import sample_plan

    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=1)
    queue = F.normalize(torch.randn(queue_size, dim, generator=g, dtype=dtype), dim=1)
    return q, k, queue, sample_plan(batch, n_hard, s, s_prime, generator=torch.Generator().manual_seed(seed + 1))


def agreement_child(settings: dict) -> dict:
    """The MoCHi head and the materialised reference: the same loss and gradient w.r.t. q, the same plan."""
    import torch

    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        for batch, dim, queue_size, n_hard, s, s_prime in ((8, 16, 256, 32, 48, 24), (5, 8, 40, 40, 7, 0)):
            results = []
            for head in (mochi_head, reference_head):
                q, k, queue, plan = make_inputs(batch, dim, queue_size, n_hard, s, s_prime, dtype=dtype, seed=7)
                loss = head(q, k, queue, temperature=TEMPERATURE, n_hard=n_hard, plan=plan)
                loss.backward()
                results.append((loss.detach(), q.grad))
            for mine, reference in zip(*results):
                torch.testing.assert_close(mine, reference, rtol=tol, atol=tol)
    return {}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def head_child(settings: dict) -> dict:
    """One variant at one K: time and peak extra memory over the timed loop."""
    import torch

    if settings["live"] and ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, LIVE_MMAP_THRESHOLD) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: no live-memory measurement on this libc")
    sizes, head = settings["sizes"], HEADS[settings["variant"]]
    q, k, queue, plan = make_inputs(4, 8, 64, 8, 8, 4, dtype=torch.float32, seed=1)  # thread pool, autograd engine
    head(q, k, queue, temperature=TEMPERATURE, n_hard=8, plan=plan).backward()
    q, k, queue, plan = make_inputs(
        sizes["batch"], sizes["dim"], settings["K"], sizes["n_hard"], sizes["s"], sizes["s_prime"], dtype=torch.float32
    )
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset, baseline_kib = True, _status_kib("VmRSS")
    except OSError:
        reset, baseline_kib = False, _status_kib("VmHWM")

    def step() -> tuple[float, float]:
        q.grad = None
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = head(q, k, queue, temperature=TEMPERATURE, n_hard=sizes["n_hard"], plan=plan)
        loss.backward()
        elapsed = (time.perf_counter() - start, time.process_time() - start_cpu)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{settings['variant']}: non-finite loss")
        return elapsed

    for _ in range(settings["warmup"]):
        step()
    times, cpu_times = zip(*[step() for _ in range(settings["iters"])])
    return dict(
        threads=torch.get_num_threads(),
        times_ms=[t * 1e3 for t in times],
        median_ms=statistics.median(times) * 1e3,
        cpu_median_ms=statistics.median(cpu_times) * 1e3,
        peak_extra_mib=(_status_kib("VmHWM") - baseline_kib) / 1024,
        baseline_rss_mib=baseline_kib / 1024,
        hwm_reset=reset,
        malloc_mmap_threshold=LIVE_MMAP_THRESHOLD if settings["live"] else None,
    )


def measure(variants: list[str], queue_size: int, args, logs: Path) -> list[dict]:
    """Per variant: the best-of-rounds median time (default allocator) and the live peak extra memory.
    With --quick, a single run per variant under the live-memory setting gives both (a smoke run)."""
    sizes = QUICK if args.quick else PAPER

    def run(variant: str, live: bool, name: str) -> dict:
        short = live and not args.quick  # a live-memory run needs no timing: 1 + 2 iterations reach the steady peak
        settings = dict(
            variant=variant,
            K=queue_size,
            sizes=sizes,
            threads=args.threads,
            live=live,
            iters=2 if short else args.iters,
            warmup=1 if short else args.warmup,
        )
        return common.run_forked(head_child, settings, logs / f"{variant}-K{queue_size}-{name}.log")

    timed: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(0 if args.quick else args.rounds):  # rounds interleaved: every variant once per round
        for variant in variants:
            timed[variant].append(run(variant, False, f"r{r}"))
    rows = []
    for variant in variants:
        live = run(variant, True, "live")
        runs = timed[variant] or [live]
        best = min(runs, key=lambda r: r["median_ms"])
        rows.append(
            dict(
                variant=variant,
                K=queue_size,
                **sizes,
                dtype="float32",
                threads=best["threads"],
                warmup=args.warmup,
                iters=args.iters,
                rounds=len(runs),
                median_ms=best["median_ms"],
                round_medians_ms=[r["median_ms"] for r in runs],
                times_ms=best["times_ms"],
                cpu_median_ms=best["cpu_median_ms"],
                peak_extra_mib=live["peak_extra_mib"],
                peak_extra_mib_default_malloc=None if args.quick else max(r["peak_extra_mib"] for r in runs),
                memory_method=f"VmHWM minus {'VmRSS (VmHWM reset by clear_refs)' if live['hwm_reset'] else 'VmHWM'} after "
                f"the inputs; live: mallopt(M_MMAP_THRESHOLD, {LIVE_MMAP_THRESHOLD})",
            )
        )
        print(
            f"  {variant:<10} K={queue_size:<6} {best['median_ms']:8.1f} ms, {live['peak_extra_mib']:7.1f} MiB live",
            flush=True,
        )
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    by_k: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_k.setdefault(row["K"], {})[row["variant"]] = row
    return [
        dict(
            K=queue_size,
            reference_over_mochi_time=v["reference"]["median_ms"] / v["mochi"]["median_ms"],
            mochi_over_reference_memory=_share(v, "peak_extra_mib"),
            mochi_over_reference_memory_default_malloc=_share(v, "peak_extra_mib_default_malloc"),
            mochi_over_moco_time=v["mochi"]["median_ms"] / v["moco"]["median_ms"],
        )
        for queue_size, v in sorted(by_k.items())
    ]


def _share(v: dict[str, dict], key: str) -> float | None:
    return v["mochi"][key] / v["reference"][key] if v["mochi"][key] is not None and v["reference"][key] else None


def targets_met(summary: list[dict]) -> dict:
    return {
        str(s["K"]): {
            name: dict(
                target=f"{what} {op} {bound}"
                + (" (issue target is at K=16384)" if name == "speed_vs_reference" and s["K"] != 16384 else ""),
                value=s[key],
                met=s[key] <= bound if op == "<=" else s[key] >= bound,
            )
            for name, (key, op, bound, what) in TARGETS.items()
        }
        for s in summary
    }


def report(rows: list[dict], summary: list[dict], targets: dict) -> str:
    fmt = common.fmt
    table = common.markdown_table(
        ["variant", "K", "median ms", "CPU ms", "peak extra MiB (live)", "peak extra MiB (default malloc)"],
        [
            [
                r["variant"],
                r["K"],
                fmt(r["median_ms"]),
                fmt(r["cpu_median_ms"]),
                fmt(r["peak_extra_mib"]),
                fmt(r["peak_extra_mib_default_malloc"]),
            ]
            for r in rows
        ],
    )
    ratio_table = (
        common.markdown_table(
            ["K", "reference / mochi time", "mochi / reference memory (live)", "(default malloc)", "mochi / moco time"],
            [
                [
                    s["K"],
                    fmt(s["reference_over_mochi_time"], ".2f"),
                    fmt(s["mochi_over_reference_memory"], ".3f"),
                    fmt(s["mochi_over_reference_memory_default_malloc"], ".3f"),
                    fmt(s["mochi_over_moco_time"], ".2f"),
                ]
                for s in summary
            ],
        )
        if summary
        else ""
    )
    verdicts = "\n".join(
        f"K={k}: " + "; ".join(f"{v['target']}: {v['value']:.3g} {'met' if v['met'] else 'MISSED'}" for v in t.values())
        for k, t in targets.items()
    )
    return REPORT.format(rows=table, ratios=ratio_table, targets=verdicts)


def parse_args(argv=None):
    p = common.parser(
        __doc__,
        "head",
        quick=f"small sizes {QUICK} for a smoke run",
        threads=common.usable_cpus(),
        threads_help="torch threads, the same for every variant (default: the CPUs this process may use)",
        sized=SIZED,
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    args = common.parse(p, argv)
    if unknown := set(args.variants.split(",")) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch  # noqa: F401  (imported once, before the forks; nothing computes in this process)

    import mochi_hub.method.loss  # noqa: F401

    logs = args.out.with_suffix(".logs")
    result = dict(
        benchmark="MoCHi head: contrastive logits + InfoNCE, forward + backward w.r.t. q",
        quick=args.quick,
        sizes=QUICK if args.quick else PAPER,
        temperature=TEMPERATURE,
        threads=args.threads,
        **common.environment(__file__, argv),
    )
    common.run_forked(agreement_child, dict(threads=args.threads), logs / "agreement.log")
    print("mochi == reference (loss and grad w.r.t. q, float64 and float32, small sizes): ok", flush=True)
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    rows = []
    for queue_size in (int(x) for x in args.ks.split(",") if x):
        rows += measure(variants, queue_size, args, logs)
    summary = ratios(rows) if variants == list(VARIANTS) else []
    targets = {} if args.quick else targets_met(summary)  # the targets are for the paper's sizes
    print(report(rows, summary, targets))
    common.write_result(args.out, dict(result, rows=rows, ratios=summary, targets=targets))


if __name__ == "__main__":
    main()
