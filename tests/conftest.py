"""Shared fixtures: one tiny checkpoint per test session, written by the project's own generator
in the release's layout (bf16 pickle shards + index, sentencepiece tokenizer)."""

from pathlib import Path

import pytest

from owl2_edge.convert.checkpoint import Checkpoint
from owl2_edge.convert.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Path of a tiny mPLUG-Owl2 checkpoint folder (seed 0, bfloat16 pickle shards). Read-only:
    tests that damage a checkpoint make their own with make_tiny_checkpoint."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-owl2"), seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_checkpoint) -> Checkpoint:
    return Checkpoint.open(tiny_checkpoint)
