"""`mochi presets [NAME]`: every preset of `mochi train`, `mochi probe` and `mochi detect`, resolved."""

from __future__ import annotations

from typing import Annotated

import typer

from mochi_hub.config import (
    DETECT_PRESETS,
    PROBE_PRESETS,
    TRAIN_PRESETS,
    DetectConfig,
    ProbeConfig,
    TrainConfig,
    resolve_config,
)
from mochi_hub.errors import USAGE

from .options import fail


def presets(
    name: Annotated[
        str | None, typer.Argument(help="One preset; all when omitted.", metavar="NAME", show_default=False)
    ] = None,
) -> None:
    """List the presets of train, probe and detect with their resolved values (what `--preset NAME` runs)."""
    import yaml

    tables = (
        ("train", TrainConfig, TRAIN_PRESETS),
        ("probe", ProbeConfig, PROBE_PRESETS),
        ("detect", DetectConfig, DETECT_PRESETS),
    )
    known = sorted({name for _, _, table in tables for name in table})
    if name is not None and name not in known:
        fail(f"no preset {name!r}; presets: {', '.join(known)}", USAGE)
    for preset in [name] if name else known:
        for command, cls, table in tables:
            if preset in table:
                values = {"data": "DIR"} if cls is DetectConfig else {}  # detect's --data has no default
                config = resolve_config(cls, table, preset=preset, **values)
                typer.echo(f"# mochi {command} --preset {preset}  (set by the preset: {', '.join(table[preset])})")
                typer.echo(yaml.safe_dump(config.to_dict(), sort_keys=False))
