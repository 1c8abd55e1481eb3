"""`mochi push` in-process (typer's CliRunner) against a Hub-compatible endpoint on 127.0.0.1
(mochi_hub/publish/local_hub.py), with the REAL huggingface_hub client."""

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard, constants
from typer.testing import CliRunner

from mochi_hub.cli.app import app
from mochi_hub.publish.card import redact_local_paths
from mochi_hub.publish.export import export_run
from mochi_hub.publish.hub import resolve_source

from hub_server import ALICE, BOB, EXPORT_FILES, TOKENS, LocalHub, assert_clean_upload
from runs import (
    PROBES,
    make_run,
    probes_by_key,
    probes_from_card,
    sample_images,  # noqa: F401
)


@pytest.fixture(scope="module")
def hub():
    server = LocalHub(TOKENS).start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub, monkeypatch, tmp_path):
    """huggingface_hub in this process talks to the local endpoint, with ALICE's token and no saved login."""
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", ALICE)
    return hub


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("hub") / "run")
    export_run(run_dir)
    return run_dir


def push(*args: str):
    result = CliRunner().invoke(app, ["push", *args])
    for token in TOKENS:
        assert token not in result.output, "a token was printed"
    assert "Traceback" not in result.output
    return result


def test_push_run_dir_in_one_commit(hub_env, run_dir):
    hub = hub_env
    result = push(str(run_dir), "--repo-id", "mochi-org/demo")
    assert result.exit_code == 0, result.output
    files = hub.files("mochi-org/demo")
    assert set(files) == EXPORT_FILES | {".gitattributes"}
    export = run_dir / "export"
    for name in ("config.json", "model.safetensors", "training_curves.png"):
        assert files[name] == (export / name).read_bytes(), name
    repo = hub.repos["mochi-org/demo"]
    assert len(repo.commits) == 2  # the repo's initial commit + ours, with every file
    assert f"url: {hub.url}/mochi-org/demo" in result.stdout
    assert 'load it with: timm.create_model("hf-hub:mochi-org/demo", pretrained=True)' in result.stdout
    assert "verified" in result.stdout

    card = ModelCard(files["README.md"].decode())  # the card, re-rendered with the repo id
    assert card.data.library_name == "timm" and "mochi" in card.data.tags
    assert probes_from_card(card) == probes_by_key(redact_local_paths(PROBES))
    assert 'name = "hf-hub:mochi-org/demo"' in card.text
    assert json.loads(files["config.json"])["probe_results"] == redact_local_paths(PROBES)
    assert_clean_upload(files, run_dir)

    again = push(str(run_dir), "--repo-id", "mochi-org/demo")  # nothing changed: no new commit
    assert again.exit_code == 0, again.output
    assert len(repo.commits) == 2


def test_pull_request_branch_and_tag(hub_env, run_dir):
    hub = hub_env
    assert push(str(run_dir / "export"), "--repo-id", "alice/reviewed").exit_code == 0
    main_before = hub.repos["alice/reviewed"].branches["main"]
    changed = run_dir.parent / "export-v2"  # the same export after one more probe result
    shutil.copytree(run_dir / "export", changed)
    config = json.loads((changed / "config.json").read_text())
    config["probe_results"].append({**PROBES[0], "split": "test", "top1": 70.5})
    (changed / "config.json").write_text(json.dumps(config, indent=2))

    result = push(str(changed), "--repo-id", "alice/reviewed", "--create-pr")
    assert result.exit_code == 0, result.output
    repo = hub.repos["alice/reviewed"]
    assert repo.branches["main"] == main_before and list(repo.pulls) == [1]
    assert f"{hub.url}/alice/reviewed/discussions/1" in result.stdout
    assert "hf-hub:alice/reviewed@refs/pr/1" in result.stdout

    result = push(
        str(changed),
        "--repo-id",
        "alice/reviewed",
        "--revision",
        "dev",
        "--tag",
        "v1",
        "--commit-message",
        "MoCHi demo weights",
    )
    assert result.exit_code == 0, result.output
    assert repo.tags["v1"] == repo.branches["dev"] != main_before
    assert repo.commits[repo.branches["dev"]].title == "MoCHi demo weights"
    assert set(hub.files("alice/reviewed", "v1")) == EXPORT_FILES | {".gitattributes"}
    assert "/alice/reviewed/tree/dev" in result.stdout and "hf-hub:alice/reviewed@dev" in result.stdout

    result = push(str(changed), "--repo-id", "alice/reviewed", "--create-pr", "--tag", "v2")
    assert result.exit_code == 2 and "--tag cannot be combined with --create-pr" in result.stderr


def test_private_repo_is_not_public(hub_env, run_dir):
    assert push(str(run_dir), "--repo-id", "alice/private-demo", "--private").exit_code == 0
    assert hub_env.repos["alice/private-demo"].private


def test_dry_run_sends_nothing(hub_env, run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # not even needed
    sent = len(hub_env.requests)
    result = push(str(run_dir), "--repo-id", "mochi-org/dry", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: nothing was sent" in result.stdout
    for name in EXPORT_FILES:
        assert name in result.stdout
    assert len(hub_env.requests) == sent and "mochi-org/dry" not in hub_env.repos


def test_no_token(hub_env, run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    sent = len(hub_env.requests)
    result = push(str(run_dir), "--repo-id", "mochi-org/no-token")
    assert result.exit_code == 1
    assert "no Hugging Face token" in result.stderr and "HF_TOKEN" in result.stderr
    assert len(hub_env.requests) == sent and "mochi-org/no-token" not in hub_env.repos


def test_rejected_token(hub_env, run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_known_token")
    result = push(str(run_dir), "--repo-id", "mochi-org/bad-token")
    assert result.exit_code == 1 and "rejected the token (401" in result.stderr
    assert "hf_not_a_known_token" not in result.output
    assert "mochi-org/bad-token" not in hub_env.repos


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "bad name/model", "org/--x", "org/x..y"])
def test_invalid_repo_id(hub_env, run_dir, repo_id):
    sent = len(hub_env.requests)
    result = push(str(run_dir), "--repo-id", repo_id)
    assert result.exit_code == 2 and "invalid --repo-id" in result.stderr
    assert len(hub_env.requests) == sent


def test_token_may_not_write_namespace(hub_env, run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", BOB)
    result = push(str(run_dir), "--repo-id", "mochi-org/not-bobs")
    assert result.exit_code == 1
    assert "may not write to mochi-org/not-bobs" in result.stderr and "403" in result.stderr
    assert "mochi-org/not-bobs" not in hub_env.repos


def test_token_may_not_write_existing_repo(hub_env, run_dir, monkeypatch):
    assert push(str(run_dir), "--repo-id", "mochi-org/guarded").exit_code == 0
    before = hub_env.files("mochi-org/guarded")
    commits = len(hub_env.repos["mochi-org/guarded"].commits)
    monkeypatch.setenv("HF_TOKEN", BOB)
    result = push(str(run_dir), "--repo-id", "mochi-org/guarded", "--allow-extra", "--commit-message", "bob was here")
    assert result.exit_code == 1
    assert "may not write to mochi-org/guarded" in result.stderr and "nothing was committed" in result.stderr
    assert hub_env.files("mochi-org/guarded") == before
    assert len(hub_env.repos["mochi-org/guarded"].commits) == commits


def test_endpoint_dies_mid_push(hub_env, run_dir):
    hub_env.fail_commit = True
    result = push(str(run_dir), "--repo-id", "mochi-org/flaky")
    assert result.exit_code == 1
    assert "lost the connection" in result.stderr and "while uploading" in result.stderr
    assert not hub_env.fail_commit  # the commit request did reach the endpoint
    assert set(hub_env.files("mochi-org/flaky")) == {".gitattributes"}  # created, nothing half-committed
    result = push(str(run_dir), "--repo-id", "mochi-org/flaky")  # the same command again
    assert result.exit_code == 0, result.output
    assert set(hub_env.files("mochi-org/flaky")) == EXPORT_FILES | {".gitattributes"}


def test_source_without_weights(hub_env, tmp_path, run_dir):
    sent = len(hub_env.requests)
    (tmp_path / "empty").mkdir()
    result = push(str(tmp_path / "empty"), "--repo-id", "mochi-org/x")
    assert result.exit_code == 2 and "neither a run directory (run.json, checkpoints/) nor an exported" in result.stderr

    (tmp_path / "bare-run").mkdir()
    (tmp_path / "bare-run" / "run.json").write_text(json.dumps({"config": {}}))
    result = push(str(tmp_path / "bare-run"), "--repo-id", "mochi-org/x")
    assert result.exit_code == 1 and "run without weights" in result.stderr

    (tmp_path / "half-export").mkdir()
    shutil.copy(run_dir / "export" / "config.json", tmp_path / "half-export")
    result = push(str(tmp_path / "half-export"), "--repo-id", "mochi-org/x")
    assert result.exit_code == 1 and "holds no weights" in result.stderr

    result = push(str(tmp_path / "missing"), "--repo-id", "mochi-org/x")
    assert result.exit_code == 2 and "no such folder" in result.stderr
    assert len(hub_env.requests) == sent and "mochi-org/x" not in hub_env.repos


def test_training_state_is_refused_unless_allowed(hub_env, run_dir, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(run_dir / "export", folder)
    torch.save({"state": {}}, folder / "optimizer.pt")
    (folder / "checkpoints" / "step-0000003").mkdir(parents=True)
    (folder / "checkpoints" / "step-0000003" / "state.json").write_text("{}")
    result = push(str(folder), "--repo-id", "mochi-org/extra")
    assert result.exit_code == 1
    assert "not part of an export: checkpoints/step-0000003/state.json, optimizer.pt" in result.stderr
    assert "--allow-extra" in result.stderr and "mochi-org/extra" not in hub_env.repos
    result = push(str(folder), "--repo-id", "mochi-org/extra", "--allow-extra", "--dry-run")
    assert result.exit_code == 0 and "optimizer.pt" in result.stdout


def test_stale_export_is_redone(tmp_path):
    run_dir = make_run(tmp_path / "run", metrics=False, probes=[])
    assert resolve_source(run_dir) == (run_dir / "export", True)  # no export yet
    assert resolve_source(run_dir) == (run_dir / "export", False)
    config = json.loads((run_dir / "export" / "config.json").read_text())
    config["run"]["checkpoint_step"] = 1  # as if exported before the newest checkpoint
    (run_dir / "export" / "config.json").write_text(json.dumps(config))
    assert resolve_source(run_dir) == (run_dir / "export", True)


def test_nothing_changed_says_so_and_opens_no_pull_request(hub_env, run_dir):
    hub = hub_env
    assert push(str(run_dir / "export"), "--repo-id", "alice/unchanged").exit_code == 0
    head = hub.repos["alice/unchanged"].branches["main"]
    result = push(str(run_dir / "export"), "--repo-id", "alice/unchanged", "--create-pr")
    assert result.exit_code == 0, result.output
    assert "nothing to upload: alice/unchanged already holds these 4 files" in result.stdout
    assert "no commit and no pull request was made" in result.stdout and "url: None" not in result.stdout
    assert "uploaded" not in result.stdout and "pull request:" not in result.stdout
    repo = hub.repos["alice/unchanged"]
    assert not repo.pulls and repo.branches["main"] == head
    result = push(str(run_dir / "export"), "--repo-id", "alice/unchanged")
    assert result.exit_code == 0 and "nothing to upload" in result.stdout and repo.branches["main"] == head


def test_a_result_kept_after_the_export_is_exported_before_a_push(hub_env, tmp_path):
    run = make_run(tmp_path / "run")
    export_run(run)
    assert resolve_source(run) == (run / "export", False)  # current: pushed as it is
    newer = {**PROBES[1], "top1": 66.25, "dataset": "fashion-mnist"}
    (run / "probes" / "knn-newer.json").write_text(json.dumps(newer))
    assert resolve_source(run) == (run / "export", True)  # a result the export lacks: exported again
    assert 66.25 in [p["top1"] for p in json.loads((run / "export" / "config.json").read_text())["probe_results"]]
    assert resolve_source(run) == (run / "export", False)
    (run / "probes" / "knn-newer.json").unlink()  # a result dropped from the card
    assert resolve_source(run) == (run / "export", True)


def test_a_token_can_be_given_as_an_option(hub_env, run_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    assert push(str(run_dir), "--repo-id", "alice/by-option").exit_code == 1  # no token anywhere
    result = push(str(run_dir), "--repo-id", "alice/by-option", "--token", ALICE)
    assert result.exit_code == 0, result.output
    assert "alice/by-option" in hub_env.repos
