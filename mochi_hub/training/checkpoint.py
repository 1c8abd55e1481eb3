"""Training checkpoints, through mochi_hub.core.persist (atomic, safetensors + JSON, nothing pickled).

RUN/checkpoints/step-0000123/
    model.safetensors        query encoder, key encoder and queue ("query.", "key.", "queue." prefixes)
    optimizer.safetensors    the optimizer's tensors (momentum buffers); its param groups are in state.json
    rng-rank{r}.safetensors  each process's RNG states (the JSON part is in rng-rank{r}.json)
    state.json               step, epoch, counters, the resolved config, optimizer groups, GradScaler state

A checkpoint is written into `step-N.tmp/` and renamed when complete, so a crash during a save leaves
the previous checkpoint intact and `latest_checkpoint` never sees a half-written one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mochi_hub.core import persist

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = persist.STATE
PREFIX = "step"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}-{step:07d}"


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is an interrupted save and is ignored)."""
    return persist.complete_folders(Path(run_dir) / CHECKPOINTS, PREFIX)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def model_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """One flat tensor dict: {prefix.name: tensor}."""
    return {
        f"{prefix}.{name}": tensor for prefix, module in modules.items() for name, tensor in module.state_dict().items()
    }


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    is_main: bool,
    rank: int,
    scaler: Any = None,
) -> Path:
    """Every process writes its RNG files; the main process writes the rest. Call on all processes;
    the caller synchronises (wait_for_everyone) before the main process calls `finish_checkpoint`."""
    final = checkpoint_dir(run_dir, step)
    with persist.staging(final) as tmp:  # a save that fails (a full disk) leaves no step-N.tmp/ behind
        rng_tensors, rng_values = persist.rng_state()
        persist.save_tensors(tmp / f"rng-rank{rank}.safetensors", rng_tensors)
        persist.write_json(tmp / f"rng-rank{rank}.json", rng_values)
        if is_main:
            persist.save_tensors(tmp / WEIGHTS, model_tensors(modules))
            opt_tensors, opt_meta = persist.split_state(optimizer.state_dict())
            persist.save_tensors(tmp / OPTIMIZER, opt_tensors)
            scaler_state = scaler.state_dict() if scaler is not None else None
            persist.write_json(tmp / STATE, {**state, "optimizer": opt_meta, "grad_scaler": scaler_state})
    return final


def finish_checkpoint(final: Path, keep: int) -> None:
    """Main process only, after every rank wrote into final.tmp: publish it, then rotate old ones."""
    persist.publish(final)
    persist.prune(final.parent, PREFIX, keep)


def read_state(path: str | Path) -> dict[str, Any]:
    state = persist.read_json(Path(path) / STATE)
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise persist.StateFileError(f"{Path(path) / STATE}: not a mochi-hub checkpoint state (no step / config)")
    return state


def load_checkpoint(
    path: str | Path,
    *,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer | None,
    rank: int,
    scaler: Any = None,
) -> dict[str, Any]:
    """Restore modules, optimizer, GradScaler and this rank's RNG; return state.json."""
    path = Path(path)
    state = read_state(path)
    tensors = persist.load_tensors(path / WEIGHTS)
    for prefix, module in modules.items():
        own = {name[len(prefix) + 1 :]: t for name, t in tensors.items() if name.startswith(prefix + ".")}
        try:
            module.load_state_dict(own)
        except RuntimeError as error:
            raise persist.StateFileError(
                f"{path / WEIGHTS}: does not fit the {prefix} module ({str(error).splitlines()[0]})"
            ) from None
    if optimizer is not None:
        optimizer.load_state_dict(persist.join_state(persist.load_tensors(path / OPTIMIZER), state["optimizer"]))
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():  # a run resumed on more processes than it saved: the new ranks keep their own RNG
        persist.set_rng_state(persist.load_tensors(rng_file), persist.read_json(path / f"rng-rank{rank}.json"))
    return state


def load_query_backbone_tensors(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The query encoder's backbone weights alone, as timm names them (what an export holds)."""
    prefix = "query.backbone."
    return {
        k[len(prefix) :]: v for k, v in persist.load_tensors(Path(checkpoint) / WEIGHTS).items() if k.startswith(prefix)
    }
