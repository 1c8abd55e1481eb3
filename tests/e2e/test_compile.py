"""--compile: torch.compile of both encoders (in place) trains the same steps as eager, within float tolerance,
and checkpoints keep the eager names. Slow on a CPU (inductor compiles C++), so outside `make test`."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from mochi_hub.training.checkpoint import latest_checkpoint
from mochi_hub.training.pretrain import train

from runs import tiny_config


def test_compiled_encoders_train_like_eager_ones(tmp_path):
    losses = {}
    for compiled in (False, True):
        run_dir = train(
            tiny_config(
                tmp_path / str(compiled),
                max_steps=3,
                epochs=1,
                mochi=(0, 0, 0),
                mixing_warmup_epochs=0,
                compile=compiled,
            )
        )
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in rows if r["kind"] == "step"]
        names = set(load_file(latest_checkpoint(run_dir) / "model.safetensors"))
        assert not any("_orig_mod" in name for name in names)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
