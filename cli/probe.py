"""`mochi probe SOURCE`: options -> ProbeConfig -> mochi_hub.evaluate.probe.run_probe."""

from __future__ import annotations

from typing import Any

from mochi_hub.config import PROBE_PRESETS, ProbeConfig

from .options import SOURCE, config_options, print_table, user_errors, with_signature
from .options import print_config as show_config


def run(source: str, *, print_config: bool = False, **options: Any) -> None:
    with user_errors():  # FrozenBackboneError is a bug, not bad input: it keeps its traceback
        from mochi_hub.publish.sources import probe_config_for

        config = probe_config_for(source, **options)
        if print_config:
            return show_config(config)
        from mochi_hub.evaluate.probe import run_probe

        result = run_probe(source, config)
    row = {k: str(result[k]) for k in ("protocol", "dataset", "split")}
    row |= {"top-1 %": f"{result['top1']:.2f}", "top-5 %": f"{result['top5']:.2f}"}
    row |= {"train": str(result["train_images"]), "eval": str(result["eval_images"])}
    row["seconds"] = f"{result['time']['seconds']:.1f}"
    print_table(f"mochi probe: {result['source']}", row, text_columns=3, note=result["note"])


probe = with_signature(
    run,
    [SOURCE, *config_options(ProbeConfig, PROBE_PRESETS)],
    "Evaluate a frozen backbone: the paper's linear protocol, kNN, or cached-feature linear.",
)
