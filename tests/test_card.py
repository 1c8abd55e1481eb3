"""The model card: metadata that parses back, a model-index equal to the probe JSON, the paper's numbers only
for the same setting, no local path, and a usage snippet that is the tested code."""

from importlib import resources

import pytest
import torch
from conftest_hub import PROBES, make_run, probes_by_key, probes_from_card, single_thread  # noqa: F401
from huggingface_hub import ModelCard

from mochi_hub.card import TAGS, generate_model_card, redact_local_paths, usage_snippet
from mochi_hub.config import TrainConfig, resolve_train_config
from mochi_hub.export import export_run


def test_template_ships_inside_the_package():
    assert resources.files("mochi_hub.model_cards").joinpath("mochi_timm.md").is_file()


def test_card_metadata_parses_back(tmp_path):
    config = TrainConfig(model="test_resnet", image_size=32, epochs=2, batch_size=8, queue_size=64,
                         mochi=(16, 16, 8), warmup_epochs=1)
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
    config = TrainConfig(model="test_resnet", image_size=32, epochs=2, batch_size=8, queue_size=64,
                         mochi=(16, 16, 8), warmup_epochs=1)
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
    config = TrainConfig(model="test_resnet", image_size=32, epochs=2, batch_size=8, queue_size=64,
                         mochi=(16, 16, 8), warmup_epochs=1)
    card = generate_model_card({**config.to_dict(), "dataset": "/data/private/in100", "output": "/home/me/runs/x"})
    assert "/data/private" not in str(card) and "/home/me" not in str(card)
    assert card.data.datasets is None  # a local folder is no Hub dataset
    assert redact_local_paths({"a": ["/x/y/z", "https://h.co/a/b", "runs/r"]}) == \
        {"a": ["<local>/z", "https://h.co/a/b", "runs/r"]}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_run(make_run(tmp_path_factory.mktemp("card") / "run"))


def test_usage_snippet_is_tested_code(export_dir):
    """The snippet as rendered, with only its model name pointed at the exported folder."""
    snippet = usage_snippet((export_dir / "README.md").read_text())
    assert 'name = "hf-hub:ORG/NAME"' in snippet
    namespace: dict = {}
    exec(snippet.replace('"hf-hub:ORG/NAME"', repr(f"local-dir:{export_dir}")), namespace)
    assert tuple(namespace["features"].shape) == (2, 96)
    assert namespace["classifier"].num_classes == 10
    assert namespace["backbone"].feature_info.channels() == [32, 32, 48, 192, 96]
    assert [m.shape[1] for m in namespace["maps"]] == [32, 32, 48, 192, 96]
    assert isinstance(namespace["features"], torch.Tensor)
