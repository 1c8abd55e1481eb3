"""Other projects' checkpoints, written at test time the way their training code writes them, from real torchvision
and timm networks with random weights; and those networks loaded the way their own evaluation code loads them.

- MoCo / MoCHi: the layout of facebookresearch/moco at 132aea9 (read there, written here in our own words):
  `MoCoLayout` has the state dict of moco/builder.py's module (two torchvision ResNets `encoder_q` / `encoder_k`
  whose fc is the projection, with --mlp Sequential(Linear, ReLU, Linear); the queue as a D x K buffer of unit
  columns; `queue_ptr`); main_moco.py wraps that module in DistributedDataParallel, builds SGD over its parameters
  and saves {"epoch": epoch + 1, "arch", "state_dict", "optimizer"} with torch.save; `main_lincls_backbone` takes
  the backbone as main_lincls.py does (encoder_q minus fc, prefix removed, only fc may be missing).
- Lightning: the dict `_CheckpointConnector.dump_checkpoint` writes ("epoch", "global_step",
  "pytorch-lightning_version", "state_dict", "loops", "callbacks", "optimizer_states", "lr_schedulers",
  "hyper_parameters") around the LightningModule's state dict: lightly's MoCo example (backbone =
  nn.Sequential(*resnet.children()[:-1]), projection_head, *_momentum copies) and solo-learn's MoCo-v2+ (backbone =
  the ResNet with fc = Identity, projector, momentum_backbone, momentum_projector, queue, an online classifier).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch import nn


class MoCoLayout(nn.Module):
    """A module with the state dict of MoCo's (key names, shapes, buffers); its forward plays no part here."""

    def __init__(self, arch: str, dim: int = 128, queue_size: int = 256, mlp: bool = False, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature
        self.encoder_q = torchvision.models.get_model(arch, num_classes=dim)
        if mlp:  # the MLP head: a hidden layer as wide as the pooled features, before the projection
            width = self.encoder_q.fc.in_features
            self.encoder_q.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), self.encoder_q.fc)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)  # starts as a copy, never trained
        self.register_buffer("queue", nn.functional.normalize(torch.randn(dim, queue_size), dim=0))  # [D, K]
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def _one_sgd_step(model: nn.Module, moco: MoCoLayout) -> torch.optim.Optimizer:
    """main_moco.py's optimizer after one step of a contrastive loss (queries against the queue), so that its state
    holds momentum buffers as a trained run's does."""
    optimizer = torch.optim.SGD(model.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    q = nn.functional.normalize(moco.encoder_q(torch.randn(4, 3, 32, 32)), dim=1)  # N x C
    logits = q @ moco.queue.detach() / moco.temperature  # [N, K]
    nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).backward()
    optimizer.step()
    return optimizer


def save_moco_checkpoint(
    path: Path, arch: str = "resnet18", *, ddp: bool = True, mlp: bool = True, epoch: int = 199, legacy: bool = False
) -> Path:
    """main_moco.py's save_checkpoint after `epoch`: under DistributedDataParallel (a real gloo group of one
    process), or the single-process variant. `legacy`: the pre-1.6 serialization of the released 2020 files."""
    torch.manual_seed(0)
    model = MoCoLayout(arch, mlp=mlp)
    if ddp:
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
        try:
            wrapped = nn.parallel.DistributedDataParallel(model)
            optimizer = _one_sgd_step(wrapped, model)
            state = wrapped.state_dict()
        finally:
            dist.destroy_process_group()
    else:
        optimizer = _one_sgd_step(model, model)
        state = model.state_dict()
    checkpoint = {"epoch": epoch + 1, "arch": arch, "state_dict": state, "optimizer": optimizer.state_dict()}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path


def main_lincls_backbone(path: Path, arch: str = "resnet18") -> nn.Module:
    """The backbone as MoCo's linear evaluation takes it from a DDP checkpoint: encoder_q's weights without its fc,
    prefix removed, loaded non-strictly with only the classifier missing; fc then Identity, for pooled features."""
    model = torchvision.models.get_model(arch)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]  # the test's own file
    prefix = "module.encoder_q."
    kept = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    kept = {k: v for k, v in kept.items() if not k.startswith("fc.")}  # the projection head goes
    assert set(model.load_state_dict(kept, strict=False).missing_keys) == {"fc.weight", "fc.bias"}
    model.fc = nn.Identity()
    return model.eval()


def lightning_checkpoint(state_dict: dict, hyper_parameters: dict, epoch: int = 99) -> dict:
    """What Lightning's dump_checkpoint writes around a LightningModule's state dict (one SGD optimizer)."""
    return {
        "epoch": epoch,
        "global_step": 1000 * (epoch + 1),
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"completed": epoch}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.06, "momentum": 0.9, "params": [0, 1]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters,
    }


class LightlyMoCo(nn.Module):
    """lightly's MoCo example module: the ResNet's children but fc as an nn.Sequential, a projection head, and
    momentum copies of both."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)


class SoloLearnMoCo(nn.Module):
    """solo-learn's MoCo-v2+ module: the ResNet with fc = Identity, projector, momentum copies, queue and the online
    linear classifier it trains alongside."""

    def __init__(self, resnet: nn.Module, num_classes: int = 10):
        super().__init__()
        resnet.fc = nn.Identity()
        self.backbone = resnet
        self.projector = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 256))
        self.momentum_backbone = copy.deepcopy(resnet)
        self.momentum_projector = copy.deepcopy(self.projector)
        self.classifier = nn.Linear(512, num_classes)
        self.register_buffer("queue", nn.functional.normalize(torch.randn(2, 256, 64), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
