"""`make demo`: the whole path on real images in a few minutes of CPU.

Pretrain with MoCHi on Fashion-MNIST (the `demo` preset), evaluate the frozen backbone (kNN and
cached-feature linear), export it as a timm folder, and load it back with `timm.create_model`.
Usage: python -m mochi_hub.demo [--output runs/demo]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

from .config import resolve_train_config
from .export import export_run
from .pretrain import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo)")
    args = parser.parse_args(argv)

    print("== 1/3 pretrain: MoCo-v2 + MoCHi on Fashion-MNIST (preset 'demo')")
    # resume="auto": a second `make demo` finishes or re-exports the same run instead of refusing its folder.
    run_dir = train(resolve_train_config(preset="demo", output=args.output, resume="auto"))

    print("== 2/3 evaluate the frozen backbone")
    from .config import resolve_probe_config
    from .probe import run_probe

    for protocol in ("knn", "fast"):  # results land in RUN/probes/, so the export's card reports them
        run_probe(
            str(run_dir), resolve_probe_config(dataset="fashion-mnist", protocol=protocol, max_images=4096, workers=2)
        )

    print("== 3/3 export again (the card now reports the probes), then load it with timm")
    export = export_run(Path(run_dir))
    backbone = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    detector_trunk = timm.create_model(f"local-dir:{export}", pretrained=True, features_only=True).eval()
    with torch.no_grad():
        image = torch.randn(1, 3, 64, 64)
        pooled = backbone(image)
        maps = detector_trunk(image)
    print(f"timm.create_model('local-dir:{export}', pretrained=True): features {tuple(pooled.shape)}")
    print(f"  features_only=True: {[tuple(m.shape) for m in maps]} (strides {detector_trunk.feature_info.reduction()})")


if __name__ == "__main__":
    main()
