"""Shared fixtures: tiny Qwen2 checkpoints built with transformers, and real published files."""

from __future__ import annotations

import os

# Eight CPU devices for the sharding tests; must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib

import pytest

from tests.hf_checkpoints import build_checkpoint


@pytest.fixture(scope="session")
def real_data() -> pathlib.Path:
    """Folder of real published Qwen2 configs and the Qwen2.5 tokenizer (JRESID_REAL_DATA)."""
    value = os.environ.get("JRESID_REAL_DATA")
    if not value:
        pytest.skip("JRESID_REAL_DATA is not set; it points at a folder with qwen2-configs/ "
                    "and qwen2.5-math-1.5b-tokenizer/ of real published files")
    path = pathlib.Path(value)
    if not (path / "qwen2-configs").is_dir():
        pytest.skip(f"JRESID_REAL_DATA={value} has no qwen2-configs/ folder")
    return path


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    """Float32 checkpoint with a separate output layer, rope_theta 1e6, 3 blocks."""
    return build_checkpoint(tmp_path_factory.mktemp("untied"), tie=False, seed=1)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    """Float32 checkpoint with tied embeddings, saved in the transformers 4 config layout."""
    return build_checkpoint(tmp_path_factory.mktemp("tied"), tie=True, seed=2, v4_config=True)


@pytest.fixture(scope="session")
def tiny_sharded(tmp_path_factory):
    """Float32 checkpoint split into several safetensors files with an index."""
    return build_checkpoint(tmp_path_factory.mktemp("sharded"), tie=False, seed=3, max_shard_size="40KB")


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory):
    """bfloat16 checkpoint."""
    return build_checkpoint(tmp_path_factory.mktemp("bf16"), tie=True, seed=4, torch_dtype="bfloat16")
