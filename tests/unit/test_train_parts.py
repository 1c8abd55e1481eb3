"""Pieces of the training loop that need no model: schedule, batch order, image conversion, settings."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mochi_hub.config import resolve_train_config
from mochi_hub.data.datasets import to_rgb
from mochi_hub.data.sampling import GlobalBatches
from mochi_hub.method.step import cosine_lr
from mochi_hub.training.preflight import preflight


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
def test_bad_settings_fail_before_any_work(options, match):
    """Values are checked when the config is built, what they name (model, dataset) by the preflight."""
    with pytest.raises(ValueError, match=re.escape(match) if "'" in match else match):
        preflight(resolve_train_config(**options))


LOADERS = {"torch.load", "pickle.load", "pickle.loads"}


def _load_calls(tree: ast.AST) -> list[tuple[ast.Call, str | None]]:
    """(call, the function it sits in) for every torch.load / pickle.load(s) call of a module."""
    calls = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Call) and ast.unparse(child.func) in LOADERS:
                calls.append((child, function))
            visit(child, child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function)

    visit(tree, None)
    return calls


def test_no_saved_state_is_ever_unpickled():
    """Checkpoints and probe states are safetensors + JSON: nothing the library reads can run code. The one reader
    of other projects' pickles, publish/importer.py, calls torch.load(weights_only=True), and weights_only=False
    only in _unsafe_load, which --allow-unsafe-pickle reaches (tests/integration/test_import.py runs both)."""
    sources = {path: path.read_text() for path in (REPO / "mochi_hub").rglob("*.py")}
    assert "persist.load_tensors" in sources[REPO / "mochi_hub" / "training" / "checkpoint.py"]
    importer = REPO / "mochi_hub" / "publish" / "importer.py"
    calls = []
    for path, text in sources.items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle"):
                assert "load" not in {a.name for a in node.names}, f"{path}: from {node.module} import load"
        for call, function in _load_calls(tree):
            assert path == importer, f"{path}:{call.lineno}: {ast.unparse(call)}"
            assert ast.unparse(call.func) == "torch.load", f"{path}:{call.lineno}: pickle"
            safe = {k.arg: ast.unparse(k.value) for k in call.keywords}.get("weights_only")
            calls.append((safe, function))
    assert sorted(calls, key=str) == [("False", "_unsafe_load"), ("True", "read_checkpoint")]


# --- device choices ---------------------------------------------------------------------------------------------


def test_device_defaults_on_a_gpu_and_what_wins_over_them():
    """auto/None fields are chosen for the device with a reason each; explicit values and accelerate launch's
    mixed precision win; "no" from the launcher (its default) leaves the choice to the device."""
    from mochi_hub.config import TrainConfig
    from mochi_hub.training.state import resolve_device_defaults

    gpu, reasons = resolve_device_defaults(TrainConfig(), "cuda", cpus=16, local_processes=1)
    assert (gpu.mixed_precision, gpu.channels_last, gpu.workers, gpu.augment_on) == ("bf16", True, 15, "device")
    assert len(reasons) == 4 and all("auto" in r for r in reasons)
    eight, _ = resolve_device_defaults(TrainConfig(), "cuda", cpus=96, local_processes=8)
    assert eight.workers == 11  # 96 CPUs / 8 local processes, one left for the process itself
    many, _ = resolve_device_defaults(TrainConfig(), "cuda", cpus=256, local_processes=1)
    assert many.workers == 16
    old_gpu, _ = resolve_device_defaults(TrainConfig(), "cuda", cpus=4, local_processes=1, bf16_supported=False)
    assert old_gpu.mixed_precision == "no"
    launched, reasons = resolve_device_defaults(
        TrainConfig(), "cuda", cpus=16, local_processes=1, launcher_precision="fp16"
    )
    assert launched.mixed_precision == "fp16" and "from accelerate launch" in reasons[0]
    launcher_default, _ = resolve_device_defaults(
        TrainConfig(), "cuda", cpus=16, local_processes=1, launcher_precision="no"
    )
    assert launcher_default.mixed_precision == "bf16"
    explicit = TrainConfig(mixed_precision="no", channels_last=False, workers=2, augment_on="workers")
    kept, reasons = resolve_device_defaults(explicit, "cuda", cpus=16, local_processes=1, launcher_precision="bf16")
    assert kept == explicit and reasons == []
    cpu, _ = resolve_device_defaults(TrainConfig(), "cpu", cpus=2, local_processes=1)
    assert (cpu.mixed_precision, cpu.channels_last, cpu.workers, cpu.augment_on) == ("no", False, 2, "workers")
