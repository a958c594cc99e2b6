"""Orbax conversion: restore into any mesh, same numbers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

import jresid  # noqa: E402
from jresid import orbax_store, sharding  # noqa: E402
from jresid.cli import main  # noqa: E402
from tests.hf_checkpoints import build_checkpoint, random_ids  # noqa: E402


@pytest.fixture(scope="module")
def eight_heads(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("orbax"), tie=False, seed=6, hidden_size=64,
                            num_attention_heads=8, num_key_value_heads=2)


def test_convert_command_and_restore(eight_heads, tmp_path):
    out = tmp_path / "ckpt"
    assert main(["convert", "--model", str(eight_heads.path), "--out", str(out)]) == 0
    assert orbax_store.is_orbax_checkpoint(str(out))

    original = jresid.from_pretrained(eight_heads.path)
    restored = jresid.from_pretrained(out)
    for name, value in original.params().items():
        np.testing.assert_array_equal(np.asarray(restored.params()[name]), np.asarray(value), err_msg=name)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_restore_into_other_mesh(eight_heads, tmp_path):
    saved_from = jresid.from_pretrained(eight_heads.path, mesh=sharding.make_mesh(2, 4))
    orbax_store.save(saved_from, str(tmp_path / "ckpt"))
    restored = jresid.from_pretrained(tmp_path / "ckpt", mesh=sharding.make_mesh(4, 2))
    kernel = restored.module.blocks.mlp.gate_kernel[...]
    assert kernel.sharding.mesh.shape == {"data": 4, "model": 2}
    ids = random_ids(4, 24, 256, seed=2)
    expected = jresid.from_pretrained(eight_heads.path).forward(ids)
    np.testing.assert_allclose(np.asarray(restored.forward(ids)), np.asarray(expected), atol=1e-4)


def test_restore_with_other_dtype(eight_heads, tmp_path):
    orbax_store.save(jresid.from_pretrained(eight_heads.path), str(tmp_path / "ckpt"))
    restored = jresid.from_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    assert restored.dtype == np.dtype("bfloat16")


def test_convert_refuses_non_empty_folder(eight_heads, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["convert", "--model", str(eight_heads.path), "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
