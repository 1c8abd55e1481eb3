"""Pieces of the training loop that need no model: schedule, batch order, image conversion, settings."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mochi_hub.config import resolve_train_config
from mochi_hub.data.datasets import to_rgb
from mochi_hub.data.sampling import GlobalBatches
from mochi_hub.method.step import cosine_lr


def test_cosine_schedule_and_global_batches():
    assert cosine_lr(0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_lr(50, 100, 0.3) == pytest.approx(0.15)
    assert cosine_lr(100, 100, 0.3) == pytest.approx(0.0)
    ranks = [list(GlobalBatches(50, 8, seed=1, epoch=2, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == 6  # 50 // 8 global batches, the last partial one dropped
    merged = [ranks[0][b] + ranks[1][b] for b in range(6)]  # rank 0 holds the first half of each batch
    assert sorted(i for batch in merged for i in batch) == sorted(set(i for batch in merged for i in batch))
    assert list(GlobalBatches(50, 8, seed=1, epoch=2, rank=1, world=2, start=4)) == ranks[1][4:]
    assert list(GlobalBatches(50, 8, seed=1, epoch=3, rank=0, world=2)) != ranks[0]


REPO = Path(__file__).resolve().parents[2]


def test_to_rgb_rescales_16_bit_grayscale():
    gray16 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(gray16))[0, :, 0].tolist() == [0, 127, 255]
    assert to_rgb(Image.new("CMYK", (2, 2))).mode == to_rgb(Image.new("RGBA", (2, 2))).mode == "RGB"


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(model="resnet5O"), "unknown timm architecture 'resnet5O'; did you mean resnet50"),
        (dict(dataset="imagenet-22k"), "--dataset 'imagenet-22k': not a folder"),
        (dict(mixing_warmup_epochs=20, epochs=10), "--mixing-warmup-epochs"),
    ],
)
def test_bad_settings_fail_when_the_config_is_built(options, match):
    with pytest.raises(ValueError, match=re.escape(match) if "'" in match else match):
        resolve_train_config(**options)


def test_no_saved_state_is_ever_unpickled():
    """Checkpoints and probe states are safetensors + JSON: nothing the library reads can run code."""
    sources = {path: path.read_text() for path in (REPO / "mochi_hub").rglob("*.py")}
    assert "persist.load_tensors" in sources[REPO / "mochi_hub" / "training" / "checkpoint.py"]
    for path, text in sources.items():
        for line in text.splitlines():
            assert "torch.load(" not in line and "pickle.load" not in line, f"{path}: {line.strip()}"
