"""`mochi detect SOURCE --data DIR`: options -> DetectConfig -> mochi_hub.evaluate.detect.run_detect."""

from __future__ import annotations

from typing import Any

from mochi_hub.config import DETECT_PRESETS, DetectConfig, resolve_detect_config

from .options import SOURCE, config_options, print_table, user_errors, with_signature
from .options import print_config as show_config


def run(source: str, *, print_config: bool = False, **options: Any) -> None:
    with user_errors():  # bad options, bad data, a bad SOURCE, a diverging loss: one line each
        config = resolve_detect_config(**options)
        if print_config:
            return show_config(config)
        from mochi_hub.evaluate.detect import METRIC_KEYS, run_detect

        result = run_detect(source, config)
    row = {"dataset": result["dataset_name"]}
    row |= {k: "-" if result[k] is None else f"{result[k]:.2f}" for k in METRIC_KEYS}
    row |= {"epochs": str(result["hyperparameters"]["epochs"]), "seconds": f"{result['time']['seconds']:.1f}"}
    print_table(f"mochi detect: {result['source']}", row)


detect = with_signature(
    run,
    [SOURCE, *config_options(DetectConfig, DETECT_PRESETS)],
    "Fine-tune torchvision's Faster R-CNN + FPN on a backbone and report COCO box AP.",
)
