"""The model card: a pure function of a config and probe results."""

from importlib import resources

from huggingface_hub import ModelCard

from mochi_hub.config import TrainConfig, resolve_train_config
from mochi_hub.publish.card import PAPER_RESULTS, TAGS, generate_model_card, redact_local_paths

from runs import PROBES, probes_by_key, probes_from_card


def test_template_ships_inside_the_package():
    assert resources.files("mochi_hub.model_cards").joinpath("mochi_timm.md").is_file()


def test_card_metadata_parses_back(tmp_path):
    config = TrainConfig(
        model="test_resnet",
        image_size=32,
        epochs=2,
        batch_size=8,
        queue_size=64,
        mochi=(16, 16, 8),
        mixing_warmup_epochs=1,
    )
    card = generate_model_card(config.to_dict(), probe_results=PROBES, repo_id="mochi-org/demo")
    (tmp_path / "README.md").write_text(str(card))
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.library_name == "timm" and data.license == "apache-2.0"
    assert data.pipeline_tag == "image-feature-extraction"
    assert set(TAGS) <= set(data.tags) and {"self-supervised", "moco", "mochi"} <= set(data.tags)
    assert data.datasets == ["zalando-datasets/fashion_mnist"]
    assert data.model_name == "demo"
    assert probes_from_card(loaded) == probes_by_key(PROBES)
    text = loaded.text
    assert "hf-hub:mochi-org/demo" in text and "features_only=True" in text and "local-dir:" in text
    assert "@inproceedings{kalantidis2020hard" in text
    assert "| Queue size (K) | 64 |" in text and "| MoCHi (N, s, s') | (16, 16, 8) |" in text
    assert "/tmp/" not in str(card)  # the probes' "source" paths are redacted


def test_card_without_probes_has_no_model_index():
    config = TrainConfig(
        model="test_resnet",
        image_size=32,
        epochs=2,
        batch_size=8,
        queue_size=64,
        mochi=(16, 16, 8),
        mixing_warmup_epochs=1,
    )
    card = generate_model_card(config.to_dict())
    assert "model-index" not in str(card) and "No evaluation was run" in card.text


def test_published_numbers_only_checked_ones_and_only_for_the_same_setting():
    """Every quoted number names its source; the MoCHi paper's tables could not be checked, so none is quoted."""
    assert [(r["dataset"], r["method"], r["top1"]) for r in PAPER_RESULTS] == [("imagenet-1k", "MoCo-v2", 67.5)]
    assert all("facebookresearch/moco README" in r["source"] for r in PAPER_RESULTS)
    imagenet_1k = resolve_train_config(preset="imagenet-1k").to_dict()
    text = generate_model_card({**imagenet_1k, "mochi": [1024, 0, 0]}).text
    assert "| MoCo-v2 (this configuration) | 67.50 | facebookresearch/moco README" in text and "without mixing" in text
    assert "| MoCo-v2 | 67.50 |" in generate_model_card(imagenet_1k).text  # a MoCHi run beside the baseline
    for config in (resolve_train_config(preset="imagenet-100").to_dict(), {**imagenet_1k, "epochs": 100}):
        text = generate_model_card(config).text
        assert "Top-1 (%) | Source" not in text and "was checked against its source for this card" in text


def test_local_dataset_path_is_redacted():
    config = TrainConfig(
        model="test_resnet",
        image_size=32,
        epochs=2,
        batch_size=8,
        queue_size=64,
        mochi=(16, 16, 8),
        mixing_warmup_epochs=1,
    )
    card = generate_model_card({**config.to_dict(), "dataset": "/data/private/in100", "output": "/home/me/runs/x"})
    assert "/data/private" not in str(card) and "/home/me" not in str(card)
    assert card.data.datasets is None  # a local folder is no Hub dataset
    assert redact_local_paths({"a": ["/x/y/z", "https://h.co/a/b", "runs/r"]}) == {
        "a": ["<local>/z", "https://h.co/a/b", "runs/r"]
    }


def test_short_probes_say_what_they_were_and_splits_keep_their_names():
    config = TrainConfig(
        model="test_resnet",
        image_size=32,
        epochs=2,
        batch_size=8,
        queue_size=64,
        mochi=(16, 16, 8),
        mixing_warmup_epochs=1,
    ).to_dict()
    short = {
        "top1": 12.11,
        "top5": 50.0,
        "protocol": "linear",
        "dataset": "fashion-mnist",
        "split": "val",
        "split_name": "test",
        "epochs": 2,
        "train_images": 256,
        "eval_images": 256,
        "paper_protocol": False,
    }
    card = generate_model_card(config, probe_results=[short])
    assert "paper protocol" not in card.text.split("## Results")[1].split("\n\n")[1]
    assert "| linear probe | fashion-mnist | test | 2 | 256 / 256 | 12.11 |" in card.text
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}  # the dataset's own split name
    paper = {**short, "dataset": "imagenet-100", "split_name": "validation", "epochs": 60, "paper_protocol": True}
    assert (
        "| linear probe (paper protocol) | imagenet-100 | validation | 60 |"
        in generate_model_card(config, probe_results=[paper]).text
    )


def test_a_smoke_run_of_a_paper_preset_is_not_this_configuration():
    config = resolve_train_config(preset="imagenet-1k", max_steps=20, mochi=(1024, 0, 0)).to_dict()
    text = generate_model_card(config).text
    assert "(this configuration)" not in text and "| MoCo-v2 | 67.50 |" in text


def test_the_header_declares_only_what_is_known():
    """A Hub dataset is declared; a local folder is described in the text, never declared (datasets, model-index);
    detection data is always a local folder; results of one dataset and split share a task name that fits them all,
    and each metric names its protocol."""
    config = {
        **TrainConfig(model="resnet18", image_size=32, epochs=2, batch_size=8, queue_size=64, mochi=(0, 0, 0)).to_dict()
    }
    local = {**config, "dataset": "/data/private/color"}
    probes = [PROBES[0], PROBES[1], {**PROBES[0], "dataset": "/data/private/color", "top1": 55.5}]
    detection = {"AP": 31.5, "AP50": 60.0, "dataset": "/data/coco", "dataset_name": "coco", "split": "val",
                 "train_images": 24, "val_images": 12, "hyperparameters": {"image_size": 128, "epochs": 3}}  # fmt: skip
    card = generate_model_card(local, probe_results=probes, detection_results=[detection])
    assert card.data.datasets is None and "a local image folder (`color`)" in card.text
    assert {r.dataset_type for r in card.data.eval_results} == {"zalando-datasets/fashion_mnist"}
    assert 55.5 not in [r.metric_value for r in card.data.eval_results] and "| `color` (local folder) |" in card.text
    assert all(r.task_type != "object-detection" for r in card.data.eval_results)
    assert "| `coco` (local folder) | val | Faster R-CNN + FPN (torchvision), 128 px, 3 epochs | 24 / 12 | 31.50 |" in (
        card.text
    )
    assert {r.task_name for r in card.data.eval_results} == {"Image classification on frozen features"}
    assert {r.metric_name for r in card.data.eval_results} == {
        "linear probe top-1 accuracy (%)",
        "linear probe top-5 accuracy (%)",
        "kNN top-1 accuracy (%)",
        "kNN top-5 accuracy (%)",
    }


def test_a_vit_card_gives_no_resnet_advice():
    config = TrainConfig(
        model="vit_tiny_patch16_224", image_size=32, epochs=2, batch_size=8, queue_size=64, mochi=(0, 0, 0)
    )
    info = {"architecture": "vit_tiny_patch16_224", "feature_info": {"channels": [192] * 3, "reduction": [16] * 3}}
    text = generate_model_card(config.to_dict(), model_info=info).text
    assert "out_indices=(1, 2, 3, 4)" not in text and "--format" not in text and "strides (16, 16, 16)" in text
    resnet = {
        "architecture": "resnet18",
        "feature_info": {"channels": [64, 64, 128, 256, 512], "reduction": [2, 4, 8, 16, 32]},
    }
    text = generate_model_card(config.to_dict(), model_info=resnet).text
    assert "out_indices=(1, 2, 3, 4)" in text and "--format detectron2" in text
