"""The tests' side of the local Hub endpoint (mochi_hub.publish.local_hub): its users' tokens, what an export uploads,
and a check that nothing private was uploaded."""

from __future__ import annotations

from mochi_hub.publish.local_hub import LocalHub

__all__ = ["ALICE", "BOB", "EXPORT_FILES", "TOKENS", "LocalHub", "assert_clean_upload"]

# The tokens the tests' server knows, and what an export uploads.
ALICE = "hf_alice_0123456789abcdef"  # may write alice/* and mochi-org/*
BOB = "hf_bob_fedcba9876543210"  # may write bob/* only
TOKENS = {ALICE: {"user": "alice", "write": ["alice", "mochi-org"]}, BOB: {"user": "bob", "write": ["bob"]}}
EXPORT_FILES = {"README.md", "config.json", "model.safetensors", "training_curves.png"}


def assert_clean_upload(files: dict[str, bytes], run_dir) -> None:
    """No token and no absolute local path in any uploaded file."""
    for name, content in files.items():
        for token in TOKENS:
            assert token.encode() not in content, name
        assert str(run_dir).encode() not in content and b"/tmp/" not in content, name
