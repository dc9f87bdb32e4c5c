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


@pytest.fixture(scope="session")
def tiny_ref(tiny_ckpt):
    """The PyTorch reference of the tiny checkpoint: the oracle of every end-to-end test."""
    from owl2_edge.convert.reference import Owl2Reference
    return Owl2Reference.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint converted by `owl2 convert`'s own code: F32 decoder, fp32 vision."""
    from owl2_edge.convert.converter import convert
    out = tmp_path_factory.mktemp("models") / "tiny-F32"
    convert(tiny_checkpoint, out, quant="F32", vision=("fp32",))
    return out
