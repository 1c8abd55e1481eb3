"""The card's usage snippet runs against a real export."""

import pytest
import torch

from mochi_hub.publish.card import usage_snippet
from mochi_hub.publish.export import export_run

from runs import make_run


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
