"""The negative queue and the typed config: exact contents, wrap-around, validation, precedence."""

import json

import pytest
import torch
import torch.nn.functional as F

from mochi_hub.config import TRAIN_PRESETS, TrainConfig, resolve_train_config
from mochi_hub.method.queue import NegativeQueue


def test_enqueue_wraps_around_when_k_is_not_a_multiple_of_the_batch():
    queue = NegativeQueue(size=5, dim=2)
    batches = [torch.full((3, 2), float(i)) for i in range(1, 4)]  # 3 keys a step, K = 5
    for i, keys in enumerate(batches):
        queue.enqueue(keys, torch.full((3,), i))
    # rows 0-2 <- batch 1, rows 3-4 and 0 <- batch 2, rows 1-3 <- batch 3: pointer at 4.
    assert queue.keys[:, 0].tolist() == [2.0, 3.0, 3.0, 3.0, 2.0]
    assert queue.labels.tolist() == [1, 2, 2, 2, 1]
    assert int(queue.ptr) == 4


def test_queue_state_round_trip():
    queue = NegativeQueue(size=7, dim=3, generator=torch.Generator().manual_seed(0))
    queue.enqueue(F.normalize(torch.randn(4, 3), dim=1), torch.arange(4))
    restored = NegativeQueue(size=7, dim=3)
    restored.load_state_dict(queue.state_dict())
    assert set(queue.state_dict()) == {"keys", "labels", "ptr"}
    for name, tensor in queue.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor)


def test_queue_starts_with_unit_rows_and_refuses_more_keys_than_rows():
    queue = NegativeQueue(size=4, dim=8)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="global batch"):
        queue.enqueue(torch.zeros(5, 8))


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(queue_size=128, batch_size=256), "--queue-size"),
        (dict(queue_size=512, batch_size=256, mochi=(1024, 16, 16)), "exceeds the queue size"),
        (dict(mochi="0,16,0"), "N \\(n_hard\\) = 0"),
        (dict(mochi="16,0,8", mixing_warmup_epochs=5, epochs=5), "--mixing-warmup-epochs"),
        (dict(mochi="1,2"), "--mochi"),
        (dict(temperature=0.0), "--temperature"),
        (dict(batch_size=0), "--batch-size"),
        (dict(key_momentum=1.0), "--key-momentum"),
        (dict(mixed_precision="fp8"), "--mixed-precision"),
        (dict(beta_max=0.7 + 0.5), "--beta-max"),
        (dict(preset="imagenet-22k"), "--preset"),
        (dict(color="blue"), "unknown config field"),
    ],
)
def test_bad_settings_name_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        resolve_train_config(**options)


def test_precedence_defaults_preset_file_options(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("epochs: 7\nqueue_size: 2048\nmochi: [64, 32, 16]\n")
    config = resolve_train_config(preset="demo", config_file=config_file, queue_size=4096, lr=None)
    assert config.model == TRAIN_PRESETS["demo"]["model"]  # preset over default
    assert config.epochs == 7 and config.mochi == (64, 32, 16)  # file over preset
    assert config.queue_size == 4096  # option over file
    assert config.lr == TRAIN_PRESETS["demo"]["lr"]  # None means "not given"
    assert config.preset == "demo"
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"seed": 3}))
    assert resolve_train_config(config_file=json_file).seed == 3


def test_paper_presets_hold_the_paper_settings():
    i100 = resolve_train_config(preset="imagenet-100")
    assert (i100.queue_size, i100.mochi, i100.mixing_warmup_epochs, i100.epochs, i100.batch_size) == (
        16384,
        (1024, 1024, 512),
        10,
        200,
        256,
    )
    i1k = resolve_train_config(preset="imagenet-1k")
    assert (i1k.queue_size, i1k.mixing_warmup_epochs) == (65536, 15)
    assert i100.base_lr == pytest.approx(0.03) and TrainConfig(
        batch_size=512, queue_size=4096
    ).base_lr == pytest.approx(0.06)
    assert (i100.temperature, i100.key_momentum, i100.proj_dim) == (0.2, 0.999, 128)


def test_a_preset_is_fitted_to_a_dataset_of_another_size():
    """The queue keeps the share of the data the preset was measured with (MoCHi's N its share of the queue), the run
    the preset's steps as epochs of this dataset, the warm-up its share; explicit values stay; each change is said."""
    from mochi_hub.config import fit_to_data

    preset = resolve_train_config(preset="fashion-mnist")
    same, notes = fit_to_data(preset, 60_000)
    assert same == preset and notes == []
    small, notes = fit_to_data(preset, 4_000)
    assert (small.queue_size, small.mochi, small.epochs, small.mixing_warmup_epochs) == (273, (68, 1024, 512), 60, 15)
    assert len(notes) == 4 and "273" in notes[0] and "60 epoch(s)" in notes[2]
    tiny, _ = fit_to_data(preset, 1_000)
    assert tiny.queue_size == 128 and tiny.mochi[0] == 32  # never below the batch
    large, _ = fit_to_data(preset, 600_000)
    assert (large.queue_size, large.epochs, large.mixing_warmup_epochs) == (4096, 1, 0)  # the queue never grows
    explicit = resolve_train_config(preset="fashion-mnist", queue_size=2048, epochs=8, mochi=(512, 512, 256))
    kept, _ = fit_to_data(explicit, 4_000)
    assert (kept.queue_size, kept.epochs, kept.mochi) == (2048, 8, (512, 512, 256))
    unfitted, notes = fit_to_data(resolve_train_config(preset="fashion-mnist", fit_to_data=False), 4_000)
    assert unfitted.queue_size == 4096 and unfitted.epochs == 4
    assert any("holds at least all 4,000" in n for n in notes) and any("fewer than the 702" in n for n in notes)
    plain, notes = fit_to_data(resolve_train_config(dataset="fashion-mnist", queue_size=8192), 4_000)
    assert plain.queue_size == 8192 and len(notes) == 1 and "holds at least all" in notes[0]  # no preset: only said
