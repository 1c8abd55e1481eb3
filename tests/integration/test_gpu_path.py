"""The GPU path, checked on the CPU: a steady-state step never makes the host wait for the device, and the loader's
workers live for the whole run.

On CUDA the host waits on a read of a device value (`.item()`, `bool()`, `float()`: aten `_local_scalar_dense`), on
a blocking host-to-device copy, and on `torch.tensor(..., device=cuda)` (a copy from pageable memory). The step
is run here on the CPU under modes that see every such call, whichever device it would have gone to.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mochi_hub.data.datasets import resolve_dataset
from mochi_hub.data.views import BatchViews, PretrainingLoader, pretraining_views
from mochi_hub.training.state import build_training_state, launch

from runs import tiny_config

TRANSFERS = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_}
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy}
NEW_ON_DEVICE = {torch.tensor, torch.as_tensor}


class HostWaits(TorchDispatchMode):
    """Counts reads of tensor values by the host (what .item(), bool(), int() and float() become)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense":
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


class BlockingCalls(TorchFunctionMode):
    """Records host->device transfers that block (a device given, non_blocking not set), per-step constants made on
    a device (`torch.tensor(..., device=)`), and value reads that bypass the dispatcher (`tolist`, `numpy`)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in TRANSFERS and self._blocking_transfer(func, args, kwargs):
            self.calls.append(f"blocking {func.__name__}")
        elif func in NEW_ON_DEVICE and kwargs.get("device") is not None:
            self.calls.append(f"{func.__name__}(..., device=)")
        elif func in HOST_READS:
            self.calls.append(f"read {func.__name__}")
        return func(*args, **kwargs)

    @staticmethod
    def _blocking_transfer(func, args, kwargs) -> bool:
        source = args[1] if func is torch.Tensor.copy_ else args[0]
        if not isinstance(source, torch.Tensor) or source.device.type != "cpu":
            return False
        rest = args[2:] if func is torch.Tensor.copy_ else args[1:]
        device_given = func is torch.Tensor.cuda or "device" in kwargs
        device_given |= bool(rest) and isinstance(rest[0], (torch.device, str, torch.Tensor))
        non_blocking = kwargs.get("non_blocking", False) or (func is torch.Tensor.copy_ and bool(rest) and rest[0])
        return device_given and not non_blocking


@pytest.mark.parametrize("output", ["bytes", "pixels", "views"])
def test_a_steady_state_step_never_waits_for_the_device(tmp_path, output, photo_jpegs):
    """The views and the step of steps 3-5 (steps 1-2 may build constants once), every loader output (JPEG bytes
    decoded in the main process as on a GPU, pixels decoded in the workers, PIL views), MoCHi mixing: no host read,
    no blocking copy, no per-step constant on a device."""
    augment_on = "workers" if output == "views" else "device"
    config = tiny_config(
        tmp_path, dataset=str(photo_jpegs), augment_on=augment_on, mixed_precision="no", channels_last=True
    )
    config, accelerator, _ = launch(config)
    state = build_training_state(config, accelerator)
    state.train()
    views = pretraining_views(resolve_dataset(config.dataset, "train"), config, output)
    batch_views = BatchViews(config, config.augment_on, accelerator.device, state.memory_format)
    batches = list(PretrainingLoader(views, config).epoch(0))
    if output == "bytes":
        assert all(batch["images"].on_device == [True] * len(batch["labels"]) for batch in batches)
    for step, batch in enumerate(batches[:5]):
        steady = step >= 2
        with HostWaits() as reads, BlockingCalls() as calls:
            images_q, images_k = batch_views.of(batch, step, 0)
            labels = batch["labels"].to(accelerator.device, non_blocking=True)
            out = state.step(images_q, images_k, labels, step=step, mixing=True)
        if steady:
            assert reads.reads == [] and calls.calls == [], (step, reads.reads, calls.calls)
    assert bool(out.finite)  # the counting saw real, finite steps
    assert images_q.is_contiguous(memory_format=torch.channels_last)


def test_the_counters_catch_what_they_must():
    """The modes above are only worth their silence if they do see each kind of wait."""
    with HostWaits() as reads, BlockingCalls() as calls:
        x = torch.ones(3)
        bool(x.sum() > 0), x.tolist()
        x.to("cpu"), x.to("cpu", non_blocking=True), torch.zeros(3).copy_(x)
        torch.tensor([1.0], device="cpu"), torch.tensor([1.0])
    assert len(reads.reads) == 1
    assert calls.calls == ["read tolist", "blocking to", "tensor(..., device=)"]


def test_skip_nonfinite_reads_the_loss_every_step_by_design(tmp_path):
    """--on-nonfinite skip must decide on the host whether to update: one read a step, and only then."""
    config, accelerator, _ = launch(tiny_config(tmp_path, on_nonfinite="skip", augment_on="workers"))
    state = build_training_state(config, accelerator)
    state.train()
    batch = next(
        PretrainingLoader(pretraining_views(resolve_dataset(config.dataset, "train"), config, "views"), config).epoch(0)
    )
    images_q, images_k = batch["images"]
    for step in range(3):
        with HostWaits() as reads:
            state.step(images_q, images_k, batch["labels"], step=step, mixing=True)
    assert len(reads.reads) == 1


def test_loader_workers_live_for_the_whole_run_and_views_follow_the_epoch(tmp_path):
    """Persistent workers (no re-fork each epoch): the epoch reaches them with each index, so epoch 1's views differ
    from epoch 0's, equal what a fresh worker draws for (epoch, index), and a start mid-epoch gives the same
    batches as the straight run from there."""
    config = tiny_config(tmp_path, workers=2, augment_on="workers")
    views = pretraining_views(resolve_dataset(config.dataset, "train"), config, "views")
    loader = PretrainingLoader(views, config)
    epoch0 = list(loader.epoch(0))
    workers = [w.pid for w in loader.loader._iterator._workers]
    epoch1 = list(loader.epoch(1))
    assert [w.pid for w in loader.loader._iterator._workers] == workers and all(workers)
    resumed = list(loader.epoch(1, start=2))
    assert len(epoch0) == len(epoch1) == 4 and len(resumed) == 2
    order = loader.batches
    order.epoch, order.start = 1, 0
    first_index = next(iter(order))[0]  # (epoch, index) of epoch 1's first image
    assert first_index[0] == 1
    fresh = views[first_index].image  # (query, key) views of that image, drawn here in the main process
    torch.testing.assert_close(epoch1[0]["images"][0][0], fresh[0], rtol=0, atol=0)
    assert not torch.equal(epoch0[0]["images"][0], epoch1[0]["images"][0])
    for straight, again in zip(epoch1[2:], resumed):
        assert torch.equal(straight["images"][0], again["images"][0]) and torch.equal(
            straight["labels"], again["labels"]
        )


def test_device_choices_on_the_cpu_keep_the_cpu_settings(tmp_path):
    """launch() on this CPU: fp32, NCHW, views in the workers, up to 4 workers, and says so."""
    config, accelerator, reasons = launch(tiny_config(tmp_path, workers=None))
    assert accelerator.device.type == "cpu"
    assert (config.mixed_precision, config.channels_last, config.augment_on) == ("no", False, "workers")
    assert config.workers == min(4, len(os.sched_getaffinity(0)))
    assert any("loader workers" in r for r in reasons) and not any("cuDNN" in r for r in reasons)


def test_cudnn_autotuner_is_set_for_a_gpu_accelerator(tmp_path, monkeypatch):
    """A caller's Accelerator on CUDA (mocked: only its device is read) turns cuDNN's autotuner on."""
    from mochi_hub.training import state as state_module

    fake = SimpleNamespace(device=torch.device("cuda"), num_processes=1, mixed_precision="bf16")
    monkeypatch.setattr(state_module, "launched_accelerator", lambda batch, accelerator=None, **kw: accelerator)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    config, accelerator, reasons = launch(tiny_config(tmp_path), fake)
    assert torch.backends.cudnn.benchmark and accelerator is fake
    assert (config.mixed_precision, config.channels_last, config.augment_on) == ("bf16", True, "device")
    assert "cuDNN autotuner on" in reasons
