"""`mochi presets [NAME]`: every preset of `mochi train` and `mochi probe`, resolved (defaults + preset)."""

from __future__ import annotations

from typing import Annotated

import typer

from mochi_hub.config import PROBE_PRESETS, TRAIN_PRESETS, ProbeConfig, TrainConfig, resolve_config

from .options import USAGE, fail


def presets(
    name: Annotated[str | None, typer.Argument(help="One preset; all when omitted.", show_default=False)] = None,
) -> None:
    import yaml

    known = sorted(set(TRAIN_PRESETS) | set(PROBE_PRESETS))
    if name is not None and name not in known:
        fail(f"no preset {name!r}; presets: {', '.join(known)}", USAGE)
    for preset in [name] if name else known:
        for command, cls, table in (("train", TrainConfig, TRAIN_PRESETS), ("probe", ProbeConfig, PROBE_PRESETS)):
            if preset in table:
                config = resolve_config(cls, table, preset=preset)
                typer.echo(f"# mochi {command} --preset {preset}  (set by the preset: {', '.join(table[preset])})")
                typer.echo(yaml.safe_dump(config.to_dict(), sort_keys=False))
