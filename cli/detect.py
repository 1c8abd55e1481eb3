"""`mochi detect SOURCE --data DIR`: options -> DetectConfig -> mochi_hub.evaluate.detect.run_detect."""

from __future__ import annotations

from typing import Any

from mochi_hub.config import DETECT_PRESETS, DetectConfig, resolve_detect_config

from .options import FAILURE, SOURCE, USAGE, config_options, exit_on, print_table, with_signature
from .options import print_config as show_config


def run(source: str, *, print_config: bool = False, **options: Any) -> None:
    with exit_on(ValueError, code=USAGE):
        config = resolve_detect_config(**options)
    if print_config:
        return show_config(config)
    from mochi_hub.evaluate.detect import METRIC_KEYS, NonFiniteLossError, run_detect

    # Bad data, a bad SOURCE, an unwritable --output, a diverging loss: one line each.
    with exit_on(ValueError, NonFiniteLossError, code=FAILURE):
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
