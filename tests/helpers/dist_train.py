"""Run under torchrun by tests/test_train.py: a real training run that records, on every rank, the
keys each step produced and the final queue and weights, so that the test can compare the ranks."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from mochi_hub.config import TrainConfig, parse_mochi
from mochi_hub.training.pretrain import train


def value(text: str):
    return int(text) if text.isdigit() else text


options = dict(arg.split("=", 1) for arg in sys.argv[1:])
config = TrainConfig(**{k: value(v) for k, v in options.items()} | {"mochi": parse_mochi(options["mochi"])})
recorded: dict = {"keys": []}


def record(step, info):
    recorded["keys"].append(info["keys"].detach().cpu().clone())  # this rank's keys [L, D]
    recorded["modules"] = info


train(config, on_step=record)
rank = int(os.environ["RANK"])  # end_training() has already closed the process group
modules = recorded["modules"]
tensors = {f"keys.{i}": k for i, k in enumerate(recorded["keys"])}
tensors["queue.keys"] = modules["queue"].keys.cpu()
tensors["queue.ptr"] = modules["queue"].ptr.cpu().reshape(1)
tensors.update({f"query.{n}": t.detach().cpu().contiguous() for n, t in modules["query"].state_dict().items()})
tensors.update({f"key.{n}": t.detach().cpu().contiguous() for n, t in modules["key"].state_dict().items()})
save_file(tensors, Path(config.output) / f"rank{rank}.safetensors")
