"""The MoCo-v2 pair around a timm backbone: query encoder, momentum key encoder, projection head."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any, get_args

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mochi_hub.config import Init
from mochi_hub.errors import OptionError

INITS = get_args(Init)
INIT_ONLY_ARGS = ("zero_init_last",)


def check_model_name(name: str) -> None:
    """Unknown timm architectures fail with the closest names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise OptionError(f"--model: unknown timm architecture {name!r}{hint}")


def _accepts(name: str, **kwargs: Any) -> bool:
    """Whether timm's constructor of `name` takes these keyword arguments (built on the meta device: no memory,
    no initialisation cost)."""
    try:
        with torch.device("meta"):
            timm.create_model(name, num_classes=0, **kwargs)
    except TypeError as error:
        if any(key in str(error) for key in kwargs):
            return False
        raise
    return True


def backbone_args(name: str, *, init: str = "moco", image_size: int | None = None) -> dict[str, Any]:
    """The keyword arguments given to timm.create_model for this backbone.

    - A family with a fixed input size (ViT) is built for `image_size` (`img_size`, structural: an export
      records it in config.json's `model_args`, so `timm.create_model("local-dir:...")` rebuilds the same model).
    - init "moco": MoCo-v2's reference code builds torchvision's ResNet, whose residual blocks end in a
      normally initialised BatchNorm; timm zero-inits it (`zero_init_last=True`), which makes every block an
      identity at step 0 and the untrained features degenerate, so "moco" passes `zero_init_last=False`.
      Families without that switch (MobileNet, EfficientNet, ConvNeXt, ViT...) keep timm's init either way.
      init "timm": timm's default.
    """
    if init not in INITS:
        raise OptionError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    check_model_name(name)
    args: dict[str, Any] = {}
    cfg = timm.get_pretrained_cfg(name)
    if image_size is not None and cfg is not None and getattr(cfg, "fixed_input_size", False):
        args["img_size"] = image_size
    if init == "moco" and _accepts(name, zero_init_last=False, **args):
        args["zero_init_last"] = False
    return args


def min_image_size(name: str, **kwargs: Any) -> int:
    """The smallest input the backbone maps to at least one pixel: its total stride (a ViT's patch size)."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=0, **kwargs)
    info = getattr(model, "feature_info", None)
    reductions = [int(f["reduction"]) for f in info] if info else [32]
    return max(reductions)


@dataclass(frozen=True)
class ForwardSizes:
    """What one image through a network holds, in elements, counted on the meta device (no memory, no compute)."""

    parameters: int
    activations: int  # every layer's output: what a training step keeps for backward
    largest: int  # the largest single output: what inference holds at once


def forward_sizes(model: nn.Module | str, image_size: int, **kwargs: Any) -> ForwardSizes:
    """One image of `image_size` pixels through `model` (a module, or a timm name built with `kwargs`), run on meta
    tensors in place of its weights: the sizes of what it would hold, whatever the weights' size or device."""
    if isinstance(model, str):
        with torch.device("meta"):
            model = timm.create_model(model, num_classes=0, **kwargs)
    outputs: list[int] = []

    def count(module: nn.Module, inputs: tuple, output: Any) -> None:
        new = torch.is_tensor(output) and output._base is None  # a view (flatten) or an in-place layer adds nothing
        if new and not any(output is x for x in inputs):
            outputs.append(output.numel())

    hooks = [m.register_forward_hook(count) for m in model.modules() if not next(m.children(), None)]
    tensors = {name: torch.empty_like(t, device="meta") for name, t in model.state_dict(keep_vars=True).items()}
    was_training = model.training
    try:
        with torch.no_grad():  # eval: BatchNorm takes a single image
            torch.func.functional_call(model.eval(), tensors, torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return ForwardSizes(sum(p.numel() for p in model.parameters()), sum(outputs), max(outputs, default=0))


def structural_args(args: dict[str, Any]) -> dict[str, Any]:
    """What a model needs to be rebuilt around saved weights (the init switches only matter before training)."""
    return {k: v for k, v in args.items() if k not in INIT_ONLY_ARGS}


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """timm.create_model(name, num_classes=0, **kwargs): pooled features, no classifier."""
    check_model_name(name)
    return timm.create_model(name, num_classes=0, **kwargs)


def pooled_width(backbone: nn.Module) -> int:
    """Width of what backbone(images) returns with num_classes=0: after a conv head (MobileNetV3, GhostNet)
    that is `head_hidden_size`, not `num_features`."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


class _GroupBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of `groups` contiguous groups of the batch, each with its own statistics.

    It works on [g, n/g, C, H, W], a free view of the batch in NCHW and channels_last alike, with a few whole-batch
    kernels per layer whatever the number of groups, and never copies the activations. (PyTorch's batch-norm
    kernels need the groups' channels side by side, [n/g, g C, H, W], a layout channels_last cannot view, so two
    copies a layer; one kernel call per group costs launches and ran about 10x below memory speed on an H200.)
    The statistics are reduced in float32; the output and the gradient keep the input's dtype.
    Returns the output and each group's mean and 1/std [g, C] for the running statistics.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float):
        n, c = x.shape[:2]
        xv = x.view(groups, n // groups, c, *x.shape[2:])  # [g, m, C, H, W]
        dims = (1, *range(3, xv.dim()))  # all but group and channel
        var, mean = torch.var_mean(xv, dim=dims, correction=0, keepdim=True)  # [g, 1, C, 1, 1] each
        invstd = torch.rsqrt(var.float() + eps)  # [g, 1, C, 1, 1] float32
        scale = invstd if weight is None else invstd * weight.view(1, 1, c, *([1] * (x.dim() - 2)))
        shift = -mean.float() * scale + (0.0 if bias is None else bias.view(1, 1, c, *([1] * (x.dim() - 2))))
        out = torch.empty_like(x)  # [n, C, H, W] in x's layout; written through its grouped view (no copy back)
        torch.addcmul(shift.to(x.dtype), xv, scale.to(x.dtype), out=out.view(xv.shape))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.groups, ctx.affine = groups, (weight is not None, bias is not None)
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean.view(groups, c), invstd.view(groups, c)

    @staticmethod
    def backward(ctx, grad_out: Tensor, _mean: Tensor, _invstd: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        n, c = x.shape[:2]
        shape = (ctx.groups, n // ctx.groups, c, *x.shape[2:])
        xv, dy = x.view(shape), grad_out.reshape(shape)  # [g, m, C, H, W]
        dims = (1, *range(3, xv.dim()))
        count = xv.numel() // (ctx.groups * c)  # values per channel in one group
        sum_dy = dy.sum(dims, keepdim=True, dtype=torch.float32)  # [g, 1, C, 1, 1]
        dot = (dy * xv).sum(dims, keepdim=True, dtype=torch.float32) - mean.float() * sum_dy  # sum dy (x - mean)
        a = invstd if weight is None else invstd * weight.float().view(1, 1, c, *([1] * (x.dim() - 2)))
        # BatchNorm's input gradient per group, a dy + b (x - mean) - a mean(dy), as two fused multiply-adds.
        b = -a * invstd * invstd * dot / count
        constant = -a * sum_dy / count - b * mean.float()
        grad_x = torch.empty_like(x)  # [n, C, H, W] in x's layout
        partial = torch.addcmul(constant.to(x.dtype), dy, a.to(x.dtype))  # [g, m, C, H, W]
        torch.addcmul(partial, xv, b.to(x.dtype), out=grad_x.view(xv.shape))
        grad_weight = (dot * invstd).sum((0, 1)).view(c).to(weight.dtype) if ctx.affine[0] else None
        grad_bias = sum_dy.sum((0, 1)).view(c).to(weight.dtype) if ctx.affine[1] else None
        return grad_x, grad_weight, grad_bias, None, None


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that, in training, normalises `groups` contiguous groups of the batch, each with its own
    statistics, in one layer call: MoCo's SplitBatchNorm (one device emulating several), without copying the
    activations (`_GroupBatchNorm`). Running the backbone once per group gives the same normalisation but costs
    about 1.8x the step on a CPU (16-image convolutions). The running statistics move once per forward, by the mean
    of the groups' statistics, as in MoCo's; evaluation is plain BatchNorm. Parameters, buffers and state-dict keys
    are nn.BatchNorm2d's."""

    groups: int = 1

    def forward(self, x: Tensor) -> Tensor:
        g = self.groups
        if not self.training or g == 1:
            return super().forward(x)
        out, mean, invstd = _GroupBatchNorm.apply(x, self.weight, self.bias, g, self.eps)  # [n, C, H, W], [g, C] x2
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # nn.BatchNorm2d's rule; momentum None is a cumulative average, its factor kept on the device.
                factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                count = x.numel() // (g * x.shape[1])  # values per channel in one group
                unbiased_var = (invstd.pow(-2) - self.eps) * (count / max(count - 1, 1))  # [g, C]
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased_var.mean(0).to(self.running_var.dtype), factor)
        return out


def group_batchnorm(module: nn.Module) -> bool:
    """Turn every nn.BatchNorm2d inside `module` into a GroupedBatchNorm2d, in place (the same objects, so
    parameters, buffers and optimiser references stay). True when no other kind of BatchNorm is left
    (timm's BatchNormAct2d, for example): only then can the groups share one forward."""
    others = False
    for layer in module.modules():
        if type(layer) is nn.BatchNorm2d:
            layer.__class__ = GroupedBatchNorm2d
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and not isinstance(layer, GroupedBatchNorm2d):
            others = True
    return not others


class Encoder(nn.Module):
    """Backbone + MoCo-v2's 2-layer MLP head (hidden = backbone width). Returns unit-norm embeddings."""

    def __init__(self, backbone: nn.Module, proj_dim: int = 128):
        super().__init__()
        width = pooled_width(backbone)
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, proj_dim))
        self.groups_in_one_pass = group_batchnorm(backbone)

    def forward(self, images: Tensor, splits: int = 1) -> Tensor:
        """`splits` BatchNorm groups (MoCo's SplitBatchNorm, as its single-GPU demo emulates several GPUs):
        one backbone pass with grouped BatchNorm where every BatchNorm is a BatchNorm2d and the batch divides
        evenly, else the backbone runs on each group alone. The head has no BatchNorm and runs once."""
        splits = splits if self.training else 1  # evaluation: BatchNorm uses its running statistics
        if splits > 1 and self.groups_in_one_pass and images.shape[0] % splits == 0:
            self._set_groups(splits)
            try:
                features = self.backbone(images)  # [B, width]
            finally:
                self._set_groups(1)
        elif splits > 1 and images.shape[0] >= splits:
            features = torch.cat([self.backbone(group) for group in images.chunk(splits)])  # [B, width]
        else:
            features = self.backbone(images)  # [B, width]
        return F.normalize(self.head(features), dim=1)  # [B, proj_dim]

    def _set_groups(self, groups: int) -> None:
        for layer in self.backbone.modules():
            if isinstance(layer, GroupedBatchNorm2d):
                layer.groups = groups


def make_key_encoder(query: Encoder) -> Encoder:
    """A frozen copy that only follows the query encoder through `momentum_update`."""
    key = copy.deepcopy(query)
    key.requires_grad_(False)
    return key


@torch.no_grad()
def momentum_update(key: nn.Module, query: nn.Module, momentum: float) -> None:
    """key <- m key + (1 - m) query for parameters; BatchNorm statistics are the key encoder's own."""
    key_params = list(key.parameters())
    query_params = [p.detach() for p in query.parameters()]
    torch._foreach_lerp_(key_params, query_params, 1.0 - momentum)
