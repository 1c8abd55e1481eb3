"""Training checkpoints on disk: atomic, safetensors for tensors, JSON for the rest.

RUN/checkpoints/step-0000123/
    model.safetensors   query encoder, key encoder and queue ("query.", "key.", "queue." prefixes)
    optimizer.pt        the optimizer's state_dict (read back with weights_only=True)
    rng-rank{r}.pt      each process's RNG states (read back with weights_only=True)
    state.json          epoch, step, counters and the resolved config

A checkpoint is written into `step-N.tmp/` and renamed when complete, so a crash during a save leaves
the previous checkpoint intact and `latest_checkpoint` never sees a half-written one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "state.json"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is an interrupted save and is ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": np.random.get_state()[1].tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """One flat, contiguous CPU tensor dict: {prefix.name: tensor}."""
    return {f"{prefix}.{name}": tensor.detach().cpu().contiguous()
            for prefix, module in modules.items() for name, tensor in module.state_dict().items()}


def save_checkpoint(run_dir: str | Path, step: int, *, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], is_main: bool, rank: int) -> Path:
    """Every process writes its RNG file; the main process writes the rest. Call on all processes;
    the caller synchronises (wait_for_everyone) before the main process renames the folder."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    if is_main:
        save_file(model_tensors(modules), tmp / WEIGHTS)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / STATE).write_text(json.dumps(state, indent=2))
    return final


def finish_checkpoint(final: Path, keep: int) -> None:
    """Main process only, after every rank wrote into final.tmp: publish it, then rotate old ones."""
    tmp = final.with_name(final.name + ".tmp")
    if final.exists():  # the same step saved twice (end of epoch == save_every_steps): keep the newer
        shutil.rmtree(final)
    tmp.rename(final)
    for stale in final.parent.glob("step-*.tmp"):  # saves interrupted by a crash: never complete now
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, *, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None,
                    rank: int) -> dict[str, Any]:
    """Restore modules, optimizer and this rank's RNG; return state.json."""
    path = Path(path)
    tensors = load_file(path / WEIGHTS)
    for prefix, module in modules.items():
        own = {name[len(prefix) + 1:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}
        module.load_state_dict(own)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / STATE).read_text())


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE).read_text())


def load_query_backbone_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The query encoder's backbone weights alone, as timm names them (what an export holds)."""
    prefix = "query.backbone."
    return {k[len(prefix):]: v for k, v in load_file(Path(checkpoint) / WEIGHTS).items() if k.startswith(prefix)}
