"""The model card: a pure function of a config and probe results."""

from importlib import resources

from huggingface_hub import ModelCard

from mochi_hub.config import TrainConfig, resolve_train_config
from mochi_hub.publish.card import TAGS, generate_model_card, redact_local_paths

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


def test_paper_numbers_only_for_the_same_setting():
    config = resolve_train_config(preset="imagenet-100").to_dict()
    text = generate_model_card(config, probe_results=[{**PROBES[0], "dataset": "imagenet-100"}]).text
    assert "| MoCHi (1024, 1024, 512) (this configuration) | 79.00 |" in text
    assert "| MoCo-v2 | 78.00 |" in text and "arXiv:2010.01028" in text

    moco = {**config, "mochi": [1024, 0, 0]}
    text = generate_model_card(moco).text
    assert "| MoCo-v2 (this configuration) | 78.00 |" in text and "without mixing" in text

    text = generate_model_card({**config, "epochs": 100}).text
    assert "reports no linear-probe number for this setting" in text
    imagenet_1k = resolve_train_config(preset="imagenet-1k").to_dict()
    assert "| MoCHi (1024, 1024, 512) (this configuration) | 68.00 |" in generate_model_card(imagenet_1k).text


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
    config = resolve_train_config(preset="imagenet-100", max_steps=20).to_dict()
    text = generate_model_card(config).text
    assert "(this configuration)" not in text and "| MoCHi (1024, 1024, 512) | 79.00 |" in text
