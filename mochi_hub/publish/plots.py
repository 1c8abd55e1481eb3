"""Line charts with matplotlib, an optional extra (`pip install mochi-hub[plots]`): the export's training
curves and the study's comparison charts. Without matplotlib nothing is drawn and callers say so."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

CURVE_KEYS = (
    ("loss", "InfoNCE loss"),
    ("proxy_top1", "proxy top-1 (positive ranked first)"),
    ("lr", "learning rate"),
    ("alignment", "alignment"),
    ("uniformity", "uniformity"),
    ("false_negative_rate", "false-negative rate"),
)


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def training_curves(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """One panel per metric of metrics.jsonl against the step (per-step values where logged, else the epoch
    records). None when there is nothing finite to draw."""
    steps = [r for r in rows if r.get("kind", "step") == "step"]
    series = []
    for key, title in CURVE_KEYS:
        chosen = [r for r in steps if _finite(r.get(key))] or [r for r in rows if _finite(r.get(key))]
        if chosen:
            series.append((title, [r["step"] for r in chosen], [r[key] for r in chosen], None))
    monitor = [r for r in rows if r.get("kind") == "monitor" and _finite(r.get("knn_top1"))]
    trained = [r for r in monitor if r.get("of") == "trained"]
    untrained = next((r["knn_top1"] for r in monitor if r.get("of") == "untrained"), None)
    if trained:  # the untrained backbone's value as the reference line
        xs, ys = [r["step"] for r in trained], [r["knn_top1"] for r in trained]
        series.append(("kNN top-1 % (monitor; dashed: untrained)", xs, ys, untrained))
    if not series:
        return None
    plt = _pyplot()
    columns = min(3, len(series))
    rows_count = math.ceil(len(series) / columns)
    fig, axes = plt.subplots(rows_count, columns, figsize=(4.2 * columns, 2.8 * rows_count), squeeze=False)
    for ax, (title, xs, ys, reference) in zip(axes.flat, series):
        ax.plot(xs, ys, marker="." if len(xs) <= 8 else None)
        if reference is not None:
            ax.axhline(reference, linestyle="--", color="grey", linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def comparison(
    series: dict[str, list[list[float]]], title: str, path: str | Path, *, ylabel: str = "", vline: float | None = None
) -> Path:
    """One line per named series of [x, y] points (the study: a setting's mean over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in series.items():
        points = [p for p in points if _finite(p[1])]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    if vline is not None:
        ax.axvline(vline, linestyle="--", color="grey", linewidth=1)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
