"""Training-dynamics cross-check: `mochi train` (MoCo-v2) against MoCo-v2 written with lightly's building blocks.

Why: in the CPU study (docs/study) every MoCo-v2 run's loss falls for about 100 steps and then climbs back
towards ln(K + 1) while its proxy top-1 falls, and the queries stay bunched together (uniformity near 0).
Is that our code or the recipe? Both loops here see the same batches of the same augmented images (our
seeded sampler and augmentation), the same hyperparameters and lr schedule as the study (bench/study.py's
defaults), and the same initial backbone weights; lightly's loop uses its own projection head, momentum
update, memory bank and loss, after lightly's documented MoCo example (no shuffle-BN). If lightly's curves
follow ours, the dynamics come from the recipe, not from mochi_hub.

    .venv/bin/python bench/dynamics.py                 # 160 steps each (about 5 minutes on 2 quiet cores)
    .venv/bin/python bench/dynamics.py --steps 384     # the study's whole schedule
    .venv/bin/python bench/dynamics.py --quick         # a smoke run: the study's --quick sizes, 4 steps
    .venv/bin/python bench/dynamics.py --steps 384 --ours-only --temperature 0.1   # a variant of the recipe

Options it does not know go to bench/study.py's parser (--lr, --temperature, --key-momentum, --batch-size,
--epochs, --image-size, --queue-size, --train-images), so a variant of the study's recipe is one command.

Needs the bench extra (`pip install -e '.[bench]'`, for lightly) and Debian's dataset-fashion-mnist.
Prints a table and writes JSON (default bench/results/dynamics.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402  (bench/study.py: the study's settings are the ones checked here)

METRICS = ("loss", "proxy_top1", "alignment", "uniformity")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dynamics.json"


def ours(config, every: int) -> dict[int, dict[str, float]]:
    from mochi_hub.train import train

    train(config)
    rows = study.read_steps(Path(config.output))
    return {r["step"]: {k: r[k] for k in METRICS} for r in rows if r["step"] % every == 0}


def lightly_loop(config, steps: int, every: int) -> dict[int, dict[str, float]]:
    import torch
    import torch.nn.functional as F
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from mochi_hub.data import resolve_dataset
    from mochi_hub.metrics import alignment, proxy_top1, uniformity
    from mochi_hub.model import create_backbone
    from mochi_hub.train import cosine_lr, epoch_loader, pretraining_views

    views = pretraining_views(resolve_dataset(config.dataset, "train"), config)  # the loop's images and views
    steps_per_epoch = len(views) // config.batch_size
    total_steps = config.epochs * steps_per_epoch

    torch.manual_seed(config.seed)  # as train(): the same initial backbone
    backbone = create_backbone(config.model)
    head = MoCoProjectionHead(backbone.num_features, backbone.num_features, config.proj_dim)
    backbone_key, head_key = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_key)
    deactivate_requires_grad(head_key)
    criterion = NTXentLoss(temperature=config.temperature, memory_bank_size=(config.queue_size, config.proj_dim))
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=config.base_lr,
                                momentum=config.sgd_momentum, weight_decay=config.weight_decay)
    for module in (backbone, head, backbone_key, head_key):
        module.train()

    rows, step = {}, 0
    while step < steps:
        for batch in epoch_loader(views, config, step // steps_per_epoch):  # the loop's batches
            images_q, images_k = batch["images"]
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total_steps, config.base_lr)
            update_momentum(backbone, backbone_key, m=config.key_momentum)
            update_momentum(head, head_key, m=config.key_momentum)
            q = head(backbone(images_q))  # [B, D]
            k = head_key(backbone_key(images_k)).detach()  # [B, D]
            bank = criterion.memory_bank.bank.detach().clone()  # [K, D] before this step's enqueue
            loss = criterion(q, k)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % every == 0:
                with torch.no_grad():
                    qn, kn = F.normalize(q.detach(), dim=1), F.normalize(k, dim=1)  # [B, D]
                    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ F.normalize(bank, dim=1).T], 1)
                    rows[step] = {"loss": loss.item(), "proxy_top1": proxy_top1(logits),
                                  "alignment": alignment(qn, kn), "uniformity": uniformity(qn)}
            if step >= steps:
                break
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="steps of each loop (default 160; --quick 4)")
    p.add_argument("--every", type=int, default=None, help="compare the metrics every this many steps "
                                                            "(default 20; --quick 2)")
    p.add_argument("--quick", action="store_true", help="the study's --quick sizes (tiny subset, batch, K), 4 steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--ours-only", action="store_true", help="run mochi train alone (no lightly loop)")
    args, study_options = p.parse_known_args(argv)
    args.steps = args.steps or (4 if args.quick else 160)
    args.every = args.every or (2 if args.quick else 20)
    if not args.ours_only:
        try:
            import lightly.loss  # noqa: F401
        except ImportError:
            p.error("needs lightly, the bench-only extra: .venv/bin/pip install -e '.[bench]' (or --ours-only)")

    # The study's settings (data, model, batch, K, lr, temperature, momentum), with any of its options given here.
    settings = study.parse_args((["--quick"] if args.quick else []) + study_options)
    scratch = Path(tempfile.mkdtemp(prefix="mochi-dynamics-"))
    try:
        config = study.train_config(settings, study.SETTINGS["MoCo-v2"], args.seed, scratch / "ours")
        config.max_steps, config.log_every_steps, config.keep_checkpoints = args.steps, args.every, 1
        started = time.perf_counter()
        mine = ours(config, args.every)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        theirs = {} if args.ours_only else lightly_loop(config, args.steps, args.every)
        lightly_s = time.perf_counter() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    header = f"{'step':>5} | " + " | ".join(f"{m:>10} ours / lightly" for m in METRICS)
    print(f"\nMoCo-v2, {config.model} {config.image_size} px, batch {config.batch_size}, K {config.queue_size}, "
          f"lr {config.base_lr}, T {config.temperature}, m {config.key_momentum}; ln(K + 1) = "
          f"{math.log(config.queue_size + 1):.3f}\n{header}\n" + "-" * len(header))
    for step in sorted(mine):
        print(f"{step:>5} | " + " | ".join(f"{mine[step][m]:>10.3f} / " + (f"{theirs[step][m]:<7.3f}" if theirs else "-      ")
                                           for m in METRICS))
    result = {"command": "python bench/dynamics.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "config": config.to_dict(), "ln_k_plus_1": math.log(config.queue_size + 1),
              "ours": mine, "lightly": theirs, "seconds": {"ours": ours_s, "lightly": lightly_s}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
