"""The small pieces everything rests on: seed streams, persistence, the momentum update, shuffle-BN, the
non-finite skip, and what a resume may change. Exact values where the math gives them."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import stat

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from fields import other_values
from safetensors import SafetensorError
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from mochi_hub.config import (
    COMPUTES,
    PROBE_PRESETS,
    TRAIN_PRESETS,
    ProbeConfig,
    TrainConfig,
    resume_differences,
    train_config_from_dict,
)
from mochi_hub.core import persist
from mochi_hub.core.distributed import local_bn_splits, shuffled_keys
from mochi_hub.core.memory import Need, check_fits, free_memory
from mochi_hub.core.seeding import STREAMS, generator, stream_seed
from mochi_hub.errors import DiskFullError, OptionError
from mochi_hub.method.model import (
    Encoder,
    GroupedBatchNorm2d,
    create_backbone,
    forward_sizes,
    make_key_encoder,
    momentum_update,
)
from mochi_hub.method.queue import NegativeQueue
from mochi_hub.method.step import StepSettings, training_step

# --- seed streams ------------------------------------------------------------------------------------------


def test_streams_are_reproducible_and_independent():
    assert stream_seed(0, "augment", 1, 2) == stream_seed(0, "augment", 1, 2)
    seeds = {stream_seed(0, s, 1) for s in STREAMS}
    assert len(seeds) == len(STREAMS)  # one stream per use, none shared
    assert stream_seed(0, "augment", 1, 2) != stream_seed(0, "augment", 2, 1)
    assert stream_seed(0, "augment", 1) != stream_seed(1, "augment", 1)
    assert hash((0, -1)) == hash((0, -2))  # why tuple hashes were replaced: CPython maps -1 and -2 alike
    a = torch.rand(4, generator=generator(3, "mochi_plan", 5))
    assert torch.equal(a, torch.rand(4, generator=generator(3, "mochi_plan", 5)))
    with pytest.raises(ValueError, match="unknown seed stream"):
        stream_seed(0, "no-such-stream")
    with pytest.raises(ValueError, match=">= 0"):
        stream_seed(0, "augment", -1)


# --- persistence ----------------------------------------------------------------------------------------------


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    tensors, meta = persist.split_state(optimizer.state_dict())
    persist.save_tensors(tmp_path / "opt.safetensors", tensors)
    persist.write_json(tmp_path / "opt.json", meta)
    fresh = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(
        persist.join_state(persist.load_tensors(tmp_path / "opt.safetensors"), persist.read_json(tmp_path / "opt.json"))
    )
    before, after = optimizer.state_dict(), fresh.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, state in before["state"].items():
        assert torch.equal(after["state"][index]["momentum_buffer"], state["momentum_buffer"])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary behind


def test_rng_states_round_trip_exactly(tmp_path):
    np.random.randn()  # leaves a cached gaussian in NumPy's state: it must come back too
    tensors, values = persist.rng_state()
    values = persist.read_json(persist.write_json(tmp_path / "rng.json", values))  # through JSON, as saved
    expected = (torch.rand(3), random.random(), np.random.rand(3), np.random.randn())  # randn uses the cached gauss
    persist.set_rng_state(tensors, values)
    got = (torch.rand(3), random.random(), np.random.rand(3), np.random.randn())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]


def test_unreadable_state_files_name_the_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(persist.StateFileError, match="bad.safetensors: not a readable safetensors file"):
        persist.load_tensors(tmp_path / "bad.safetensors")
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(persist.StateFileError, match="state.json: not readable JSON"):
        persist.read_json(tmp_path / "state.json")
    with pytest.raises(persist.StateFileError, match="missing"):
        persist.read_json(tmp_path / "nothing.json")


def test_state_folders_publish_whole_and_prune(tmp_path):
    for step in (1, 2, 3):
        final = tmp_path / f"step-{step:07d}"
        with persist.staging(final) as tmp:
            persist.write_json(tmp / persist.STATE, {"step": step})
        persist.publish(final)
    (tmp_path / "step-0000004.tmp").mkdir()  # a save cut short by kill -9
    assert [p.name for p in persist.complete_folders(tmp_path, "step")] == [f"step-{s:07d}" for s in (1, 2, 3)]
    persist.prune(tmp_path, "step", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002", "step-0000003"]


def _disk_full(path):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_named_and_leaves_nothing_half_written(tmp_path):
    """An injected ENOSPC at the write layer (tests/integration/test_disk_full.py fills a real tmpfs)."""
    with pytest.raises(DiskFullError, match=f"^disk full while writing {tmp_path / 'a.json'}$"):
        persist.atomic_write(tmp_path / "a.json", _disk_full)
    with pytest.raises(DiskFullError, match="disk full while writing .*b.safetensors"):
        persist.atomic_write(tmp_path / "b.safetensors", lambda p: (_ for _ in ()).throw(
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")))  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no temporary file
    with pytest.raises(DiskFullError), persist.staging(tmp_path / "runs" / "checkpoints" / "step-0000002") as tmp:
        persist.write_json(tmp / "state.json", {"step": 2})
        persist.atomic_write(tmp / "model.safetensors", _disk_full)
    assert list(tmp_path.iterdir()) == []  # neither step-N.tmp/ nor the folders made for it
    with pytest.raises(OSError):  # any other failure is not a full disk, and still leaves nothing
        persist.atomic_write(tmp_path / "c.json", lambda p: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    assert list(tmp_path.iterdir()) == []


def test_staged_files_leave_an_earlier_set_as_it_was(tmp_path):
    folder = tmp_path / "export"
    with persist.staged_files(folder, "--output") as staged:
        persist.write_json(staged / "config.json", {"v": 1})
        persist.write_json(staged / "card.json", {"v": 1})
    (folder / "notes.txt").write_text("the user's")
    full = pytest.raises(DiskFullError, match=f"disk full while writing {folder}; its files are as they were")
    with full, persist.staged_files(folder, "--output") as staged:
        persist.write_json(staged / "config.json", {"v": 2})
        persist.atomic_write(staged / "card.json", _disk_full)
    assert persist.read_json(folder / "config.json") == {"v": 1} and persist.read_json(folder / "card.json") == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left
    full = pytest.raises(DiskFullError, match="nothing was left behind")
    with full, persist.staged_files(tmp_path / "new" / "export", "--output") as staged:
        persist.atomic_write(staged / "model.safetensors", _disk_full)
    assert not (tmp_path / "new").exists()


def test_written_files_get_the_users_mode_not_0600(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    persist.save_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})  # safetensors alone writes 0600
    persist.write_json(tmp_path / "c.json", {})
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# --- the momentum update --------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [0.0, 0.5, 1.0])
def test_momentum_update_closed_forms_and_buffers_untouched(m):
    torch.manual_seed(0)
    query, key = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    key[1].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in key.state_dict().items()}
    momentum_update(key, query, m)
    for (name, k), q in zip(key.named_parameters(), query.parameters()):
        torch.testing.assert_close(k, m * before[name] + (1 - m) * q, rtol=0, atol=1e-7)
        if m == 1.0:
            assert torch.equal(k, before[name])
        if m == 0.0:
            assert torch.equal(k, q)
    for name, buffer in key.named_buffers():
        assert torch.equal(buffer, before[name]), name  # BatchNorm statistics stay the key encoder's own


# --- shuffle-BN -------------------------------------------------------------------------------------------------


def test_shuffled_keys_unshuffle_row_for_row_on_one_process():
    """In eval mode a key does not depend on its BatchNorm group, so shuffling, embedding in groups and
    unshuffling must give exactly the unshuffled keys, row for row; in train mode the groups differ."""
    torch.manual_seed(0)
    key = make_key_encoder(Encoder(create_backbone("test_resnet"), 16))
    images = torch.randn(12, 3, 32, 32)
    accelerator = Accelerator(cpu=True)
    key.eval()
    mine, everyone = shuffled_keys(key, images, accelerator, generator(0, "shuffle_bn", 0), splits=3)
    torch.testing.assert_close(mine, key(images), rtol=0, atol=1e-6)
    assert torch.equal(mine, everyone)
    key.train()
    grouped, _ = shuffled_keys(key, images, accelerator, generator(0, "shuffle_bn", 0), splits=3)
    assert not torch.allclose(grouped, key(images, splits=3), atol=1e-4)  # other groups, other statistics


def test_grouped_batchnorm_is_batchnorm_on_each_group():
    """One grouped call must normalise each contiguous group with its own statistics, exactly as BatchNorm2d
    on that group alone (output and gradients), and move the running statistics once, by the groups' mean
    (MoCo's SplitBatchNorm); in eval mode it is plain BatchNorm."""
    torch.manual_seed(0)
    grouped = GroupedBatchNorm2d(5, momentum=0.25)
    nn.init.normal_(grouped.weight), nn.init.normal_(grouped.bias)
    grouped.running_mean.normal_(), grouped.running_var.uniform_(0.5, 2.0)
    plain = nn.BatchNorm2d(5, momentum=0.25)
    plain.load_state_dict(grouped.state_dict())  # the same keys: exports stay timm's
    before_mean, before_var = grouped.running_mean.clone(), grouped.running_var.clone()
    x = (torch.randn(12, 5, 3, 4) * 3 + 1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grouped.groups = 3
    out = grouped(x)  # [12, 5, 3, 4]
    reference = torch.cat(
        [
            nn.functional.batch_norm(part, None, None, plain.weight, plain.bias, training=True, eps=plain.eps)
            for part in x_ref.chunk(3)
        ]
    )  # each group of 4 images alone
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    upstream = torch.randn_like(out)
    out.backward(upstream), reference.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped.weight.grad, plain.weight.grad, rtol=0, atol=1e-4)
    torch.testing.assert_close(grouped.bias.grad, plain.bias.grad, rtol=0, atol=1e-4)
    parts = x.detach().chunk(3)
    means = torch.stack([p.mean((0, 2, 3)) for p in parts]).mean(0)  # [5]
    variances = torch.stack([p.var((0, 2, 3), unbiased=True) for p in parts]).mean(0)  # [5]
    torch.testing.assert_close(grouped.running_mean, 0.75 * before_mean + 0.25 * means, rtol=0, atol=1e-5)
    torch.testing.assert_close(grouped.running_var, 0.75 * before_var + 0.25 * variances, rtol=0, atol=1e-5)
    assert int(grouped.num_batches_tracked) == 1
    as_channels_last = grouped(x.detach().contiguous(memory_format=torch.channels_last))
    assert as_channels_last.is_contiguous(memory_format=torch.channels_last)  # the layout goes on as it came
    torch.testing.assert_close(as_channels_last, out.detach(), rtol=0, atol=1e-6)
    grouped.eval(), plain.eval()
    plain.load_state_dict(grouped.state_dict())
    torch.testing.assert_close(grouped(x.detach()), plain(x.detach()), rtol=0, atol=0)


class FullSizeOps(TorchDispatchMode):
    """Records every aten op that writes a tensor as large as `numel` by copying (clone, copy_, cat, _to_copy,
    contiguous's clone...), and every read of a tensor value to the host (`_local_scalar_dense`: a sync on CUDA)."""

    COPIES = ("clone", "copy_", "cat", "_to_copy", "index_select", "gather", "permute_copy", "transpose_copy")

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.copies, self.host_reads = numel, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.host_reads += name == "_local_scalar_dense"
        results = out if isinstance(out, (tuple, list)) else (out,)
        if name in self.COPIES and any(isinstance(r, Tensor) and r.numel() >= self.numel for r in results):
            self.copies.append(name)
        return out


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_batchnorm_copies_no_activation_and_reads_nothing(memory_format, dtype):
    """Forward and backward of a grouped layer (momentum None too: its factor stays on the device) make no
    full-size copy and no host read, in either layout, under bf16 autocast too; the layout goes on as it came."""
    layer = GroupedBatchNorm2d(8, momentum=None)
    layer.groups = 4
    x = torch.randn(16, 8, 6, 6).to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    with FullSizeOps(x.numel()) as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        out = layer(x)
        out.sum().backward()
    assert seen.copies == [] and seen.host_reads == 0, seen.copies
    assert out.is_contiguous(memory_format=memory_format) and out.dtype == dtype
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert int(layer.num_batches_tracked) == 1


def test_grouped_batchnorm_cumulative_running_statistics():
    """momentum None: the running statistics are the mean over forwards of the groups' mean statistics."""
    torch.manual_seed(0)
    layer = GroupedBatchNorm2d(3, momentum=None)
    layer.groups = 2
    batches = [torch.randn(8, 3, 4, 4) * (i + 1) + i for i in range(3)]
    for x in batches:
        layer(x)
    means = torch.stack([torch.stack([p.mean((0, 2, 3)) for p in x.chunk(2)]).mean(0) for x in batches]).mean(0)
    variances = torch.stack([torch.stack([p.var((0, 2, 3)) for p in x.chunk(2)]).mean(0) for x in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, means, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.running_var, variances, rtol=1e-5, atol=1e-5)


def test_encoder_runs_batchnorm_groups_in_one_pass_like_one_pass_per_group():
    """The encoder's single grouped pass must give the embeddings of running the backbone on each group alone
    (the fallback for other norm layers, here forced), and leave the backbone's state-dict keys timm's."""
    torch.manual_seed(0)
    one_pass = Encoder(create_backbone("test_resnet"), 16)
    assert one_pass.groups_in_one_pass
    assert set(one_pass.backbone.state_dict()) == set(create_backbone("test_resnet").state_dict())
    per_group = Encoder(create_backbone("test_resnet"), 16)
    per_group.load_state_dict(one_pass.state_dict())
    per_group.groups_in_one_pass = False  # the per-group loop
    images = torch.randn(12, 3, 32, 32)
    torch.testing.assert_close(one_pass(images, splits=3), per_group(images, splits=3), rtol=0, atol=1e-5)
    assert not torch.allclose(one_pass(images, splits=3), one_pass(images), atol=1e-4)  # the groups matter
    assert all(m.groups == 1 for m in one_pass.modules() if isinstance(m, GroupedBatchNorm2d))  # reset after
    assert not Encoder(create_backbone("test_efficientnet"), 16).groups_in_one_pass  # BatchNormAct2d: per group


def test_batchnorm_groups_per_process():
    assert TrainConfig(batch_size=256).batchnorm_groups == 8  # the paper: 8 GPUs x 32
    assert TrainConfig(batch_size=64, queue_size=256, mochi=(0, 0, 0)).batchnorm_groups == 2
    assert TrainConfig(batch_size=16, queue_size=64, mochi=(0, 0, 0)).batchnorm_groups == 1
    assert local_bn_splits(8, 1, 256) == 8 and local_bn_splits(8, 2, 256) == 4 and local_bn_splits(8, 8, 256) == 1
    assert local_bn_splits(8, 16, 256) == 1  # more processes than groups: each process is one group
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        local_bn_splits(6, 4, 48)
    with pytest.raises(ValueError, match="groups of at least 2"):
        TrainConfig(batch_size=16, queue_size=64, mochi=(0, 0, 0), bn_splits=16)


# --- a skipped non-finite step ------------------------------------------------------------------------------


def test_a_skipped_non_finite_step_updates_nothing():
    config = TrainConfig(
        model="test_resnet",
        image_size=32,
        batch_size=8,
        queue_size=16,
        mochi=(4, 4, 2),
        mixing_warmup_epochs=0,
        epochs=1,
        on_nonfinite="skip",
        bn_splits=2,
    )
    torch.manual_seed(0)
    query = Encoder(create_backbone("test_resnet"), config.proj_dim)
    key = make_key_encoder(query)
    queue = NegativeQueue(16, config.proj_dim, generator=generator(0, "queue_init"))
    optimizer = torch.optim.SGD(query.parameters(), lr=0.1, momentum=0.9)
    accelerator = Accelerator(cpu=True)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8)
    out = training_step(
        query,
        key,
        queue,
        optimizer,
        accelerator,
        images,
        images.clone(),
        labels,
        settings=StepSettings.of(config),
        step=0,
        mixing=True,
        bn_splits=2,
    )  # a good step first: the optimizer has state
    assert out.applied and bool(out.finite)
    state = {
        name: {k: v.clone() for k, v in m.state_dict().items()}
        for name, m in (("query", query), ("key", key), ("queue", queue))
    }
    momentum_before = [s["momentum_buffer"].clone() for s in optimizer.state.values()]
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    out = training_step(
        query,
        key,
        queue,
        optimizer,
        accelerator,
        bad,
        images,
        labels,
        settings=StepSettings.of(config),
        step=1,
        mixing=True,
        bn_splits=2,
    )
    assert not out.applied and not bool(out.finite)
    for name, module in (("query", query), ("key", key), ("queue", queue)):
        for k, v in module.state_dict().items():
            assert torch.equal(v, state[name][k]), f"{name}.{k} changed"
    for before, now in zip(momentum_before, (s["momentum_buffer"] for s in optimizer.state.values())):
        assert torch.equal(before, now)


# --- what a resume may change -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, presets", [(TrainConfig, TRAIN_PRESETS), (ProbeConfig, PROBE_PRESETS)])
def test_resume_compares_every_field_that_computes(cls, presets):
    """One field changed at a time: a field declared to affect only how the job runs (or what it reports) passes,
    every other one is named."""
    saved = cls()
    free = {f.name for f in dataclasses.fields(cls) if f.metadata["affects"] != COMPUTES}
    assert {"output", "workers", "resume"} <= free  # where and how it runs
    assert not free & {"dataset", "lr", "epochs", "seed", "mixed_precision", "mochi", "init", "protocol", "augment"}
    for name, value in other_values(cls, presets).items():
        if cls is TrainConfig and name in ("mochi", "bn_splits"):
            value = {"mochi": (16, 16, 8), "bn_splits": 4}[name]  # values that agree with the others
        now = dataclasses.replace(saved, **{name: value})
        difference = resume_differences(saved, now)
        if name in free:
            assert difference == [], name
        else:
            assert difference == [f"{name}: saved {saved.to_dict()[name]!r}, now {now.to_dict()[name]!r}"], name


def test_saved_configs_of_older_versions_keep_their_meaning():
    old = {"model": "resnet18", "warmup_epochs": 3, "epochs": 5, "unknown_future_field": 1}
    config = train_config_from_dict(old)
    assert config.mixing_warmup_epochs == 3  # the old name of the field
    assert config.init == "timm"  # runs saved before --init existed used timm's init


def test_forward_sizes_count_what_a_step_holds_without_allocating_it():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    net.append(nn.AdaptiveAvgPool2d(1)).append(nn.Flatten())
    sizes = forward_sizes(net, 8)
    # conv 4x8x8 + BatchNorm 4x8x8 + pool 4; the in-place ReLU and the flattening view hold nothing new
    assert (sizes.parameters, sizes.activations, sizes.largest) == (3 * 4 * 9 + 4 + 4 + 4, 256 + 256 + 4, 256)
    assert net.training and next(net.parameters()).device.type == "cpu"  # the module itself is untouched
    huge = forward_sizes("test_resnet", 100_000)  # on the meta device: nothing of it is allocated
    assert huge.activations > 10**11


def test_check_fits_names_the_option_behind_the_largest_need():
    free, _ = free_memory(torch.device("cpu"))
    check_fits([Need("--batch-size 8", "a batch", 1000)], torch.device("cpu"))
    needs = [Need("--batch-size 8", "a batch", 1000), Need("--queue-size 9", "the queue", 2 * free)]
    with pytest.raises(
        OptionError, match=r"^--queue-size 9: needs at least .* \(the queue .*; a batch 1.0 kB\), more than the "
    ):
        check_fits(needs, torch.device("cpu"))
