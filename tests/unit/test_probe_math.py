"""The probe's math and settings: presets, the frozen check, kNN votes (no data loading)."""

from __future__ import annotations

import math

import pytest
import torch
from images import tiny_backbone

from mochi_hub.config import resolve_probe_config
from mochi_hub.data.augment import eval_transform
from mochi_hub.evaluate import probe as probe_module
from mochi_hub.evaluate.classify import knn_scores, lr_at, topk_hits
from mochi_hub.evaluate.frozen import FrozenBackboneError, check_frozen, snapshot


def test_the_evaluation_crop_follows_crop_pct():
    resize = lambda transform: transform.transforms[0].size  # noqa: E731
    assert resize(eval_transform(224)) == 256 and resize(eval_transform(32)) == 37  # 256/224, ImageNet's
    assert resize(eval_transform(32, resolve_probe_config(crop_pct=1.0).crop_pct)) == 32  # the whole image
    with pytest.raises(ValueError, match=r"--crop-pct must be a number in \(0, 1\], got 1.5"):
        resolve_probe_config(crop_pct=1.5)


def test_presets_follow_the_paper_and_dataset_selects_its_preset():
    in100 = resolve_probe_config(dataset="imagenet-100")
    assert (in100.epochs, in100.lr, in100.batch_size, in100.lr_milestones) == (60, 10.0, 128, (30, 40, 50))
    assert (in100.sgd_momentum, in100.weight_decay, in100.lr_gamma, in100.image_size) == (0.9, 0.0, 0.1, 224)
    in1k = resolve_probe_config(dataset="imagenet-1k")
    assert (in1k.epochs, in1k.lr, in1k.batch_size, in1k.lr_milestones) == (100, 30.0, 512, (60, 80))
    assert resolve_probe_config(preset="imagenet-100", dataset="/data/in100", lr=3.0).lr == 3.0  # options win
    assert resolve_probe_config(dataset="/data/in100").preset is None
    assert resolve_probe_config(lr_milestones="5, 8").lr_milestones == (5, 8)
    assert [lr_at(e, in100) for e in (0, 29, 30, 39, 40, 50, 59)] == pytest.approx([10, 10, 1, 1, 0.1, 0.01, 0.01])
    for bad in (dict(protocol="svm"), dict(lr_milestones="40,30"), dict(split="test"), dict(knn_k=0)):
        with pytest.raises(ValueError):
            resolve_probe_config(**bad)


def test_check_frozen_catches_an_optimizer_step_a_bn_statistic_and_train_mode():
    backbone = probe_module.freeze(tiny_backbone())
    before = snapshot(backbone)
    check_frozen(before, backbone)  # untouched: passes

    backbone.requires_grad_(True)  # broken: an optimizer over the backbone
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
    backbone(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    with pytest.raises(FrozenBackboneError, match=r"tensor\(s\) changed.*conv"):
        check_frozen(before, backbone)

    backbone = probe_module.freeze(tiny_backbone())
    before = snapshot(backbone)
    backbone.train()  # broken: BatchNorm updating its running statistics
    with torch.no_grad():
        backbone(torch.randn(4, 3, 32, 32))
    with pytest.raises(FrozenBackboneError, match=r"running_mean.*train mode"):
        check_frozen(before, backbone)


def unit_at(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_knn_votes_are_similarity_weighted_and_limited_to_k():
    # Bank: class 0 at 0 deg; class 1 twice at +-30 deg; class 2 at 90 deg. Query at 0 deg.
    bank = torch.tensor([unit_at(0), unit_at(30), unit_at(-30), unit_at(90)]) * 3.0  # norms do not matter
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([unit_at(0)])
    c30 = math.cos(math.radians(30))
    # k=3, T=0.5: class 0 gets e^(1/0.5) = 7.389, class 1 gets 2 e^(0.866/0.5) = 11.31: two near votes beat one exact.
    votes = knn_scores(bank, labels, query, 3, k=3, temperature=0.5)
    assert votes[0].tolist() == pytest.approx([math.exp(2.0), 2 * math.exp(c30 / 0.5), 0.0], rel=1e-5)
    assert votes.argmax(1).item() == 1
    # T=0.1: e^10 = 22026 against 2 e^8.66 = 11534: the sharper temperature lets the exact match win.
    assert knn_scores(bank, labels, query, 3, k=3, temperature=0.1).argmax(1).item() == 0
    # k=1: only the nearest votes. k=4: class 2 (cos 90 = 0) adds e^0 = 1.
    assert knn_scores(bank, labels, query, 3, k=1, temperature=0.5)[0].tolist() == pytest.approx([math.exp(2), 0, 0])
    assert knn_scores(bank, labels, query, 3, k=4, temperature=0.5)[0, 2].item() == pytest.approx(1.0)
    assert knn_scores(bank, labels, query, 3, k=200, temperature=0.5).shape == (1, 3)  # k capped at the bank size
    # top-k hits: scores [0.1, 0.7, 0.2] -> ranking 1, 2, 0.
    hits = topk_hits(torch.tensor([[0.1, 0.7, 0.2]] * 3), torch.tensor([1, 2, 0]), ks=(1, 2))
    assert hits.tolist() == [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]


def test_only_the_papers_own_linear_protocol_is_called_so():
    from mochi_hub.evaluate.probe import is_paper_protocol

    assert is_paper_protocol(resolve_probe_config(dataset="imagenet-100"))
    assert is_paper_protocol(resolve_probe_config(dataset="imagenet-1k"))
    assert not is_paper_protocol(resolve_probe_config(dataset="imagenet-100", epochs=2))
    assert not is_paper_protocol(resolve_probe_config(dataset="imagenet-100", max_images=256))
    assert not is_paper_protocol(resolve_probe_config(dataset="imagenet-100", protocol="fast"))
    assert not is_paper_protocol(resolve_probe_config(dataset="fashion-mnist"))
