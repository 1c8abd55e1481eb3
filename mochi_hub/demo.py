"""`make demo`: the whole path on real images in a few minutes of CPU, and the point of it: the trained backbone
beats the same network untrained.

Pretrain with MoCHi on Fashion-MNIST (the `demo` preset), probe the frozen backbone and its exact initial weights
the same way (kNN and cached-feature linear on held-out test images), export it as a timm folder (the card reports
the probes), and load it back with `timm.create_model`.
Usage: python -m mochi_hub.demo [--output runs/demo]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mochi_hub.core.console import setup_logging


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo)")
    args = parser.parse_args(argv)
    setup_logging()

    import timm
    import torch

    from mochi_hub.config import resolve_train_config
    from mochi_hub.evaluate.probe import run_probe
    from mochi_hub.publish.export import export_run
    from mochi_hub.publish.sources import probe_config_for, weights_sha256
    from mochi_hub.training.preflight import preflight
    from mochi_hub.training.pretrain import train
    from mochi_hub.training.state import initial_encoder

    print("== 1/3 pretrain: MoCo-v2 + MoCHi on Fashion-MNIST (preset 'demo')", flush=True)
    # resume="auto": a second `make demo` finishes or re-exports the same run instead of refusing its folder.
    config = preflight(resolve_train_config(preset="demo", output=args.output, resume="auto"))
    run_dir = train(config)

    print("== 2/3 probe the trained backbone and the same network untrained, the same way", flush=True)
    untrained = initial_encoder(config)[0].backbone
    info = {"kind": "untrained", "weights_sha256": weights_sha256(untrained), "num_features": untrained.num_features}
    scores: dict[str, dict[str, float]] = {"untrained": {}, "trained": {}}
    for protocol in ("knn", "fast"):  # a run directory's results land in RUN/probes/: the export's card reports them
        probe = probe_config_for(str(run_dir), protocol=protocol, max_images=4096, workers=2)
        scores["trained"][protocol] = run_probe(str(run_dir), probe, show=False)["top1"]
        scores["untrained"][protocol] = run_probe("untrained", probe, backbone=(untrained, info), show=False)["top1"]
    print(f"\n{'backbone':<28} {'kNN top-1 %':>12} {'fast-linear top-1 %':>20}")
    for name in ("untrained", "trained"):
        print(
            f"{name + (' (same init, seed)' if name == 'untrained' else ''):<28} "
            f"{scores[name]['knn']:>12.2f} {scores[name]['fast']:>20.2f}"
        )
    gain = scores["trained"]["knn"] - scores["untrained"]["knn"]
    print(f"pretraining moved kNN by {gain:+.2f} points ({'learning' if gain > 0 else 'NOT learning'})\n")

    print("== 3/3 export again (the card now reports the probes), then load it with timm", flush=True)
    export = export_run(Path(run_dir))
    backbone = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    detector_trunk = timm.create_model(f"local-dir:{export}", pretrained=True, features_only=True).eval()
    with torch.no_grad():
        image = torch.randn(1, 3, 64, 64)
        pooled = backbone(image)
        maps = detector_trunk(image)
    print(f"timm.create_model('local-dir:{export}', pretrained=True): features {tuple(pooled.shape)}")
    print(f"  features_only=True: {[tuple(m.shape) for m in maps]} (strides {detector_trunk.feature_info.reduction()})")
    if gain <= 0:
        raise SystemExit("the trained backbone does not beat its untrained weights: see docs/study/README.md")
    return scores


if __name__ == "__main__":
    main()
