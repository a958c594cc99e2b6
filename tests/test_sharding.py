"""Meshes on 8 CPU devices give the single-device logits, captures and metrics."""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("torch")

import jresid  # noqa: E402
from jresid.analyze import analyze  # noqa: E402
from jresid import sharding  # noqa: E402
from tests.hf_checkpoints import build_checkpoint, random_ids  # noqa: E402

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]
ATOL = 1e-5

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
)


@pytest.fixture(scope="module", params=[(8, 2), (8, 8), (16, 4)], ids=lambda p: f"heads{p[0]}-kv{p[1]}")
def heads_checkpoint(request, tmp_path_factory):
    heads, kv = request.param
    return build_checkpoint(tmp_path_factory.mktemp(f"h{heads}k{kv}"), tie=heads == 8, seed=heads + kv,
                            hidden_size=heads * 8, num_attention_heads=heads, num_key_value_heads=kv,
                            intermediate_size=64, num_hidden_layers=2)


def test_meshes_match_single_device(heads_checkpoint):
    single = jresid.from_pretrained(heads_checkpoint.path)
    ids = random_ids(3, 40, single.config.vocab_size, seed=1)  # 3 rows: not divisible by the data axis
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    mask[2, 30:] = 0
    expected_logits, expected = single.run_with_cache(ids, mask)

    for data, model_axis in MESHES:
        mesh = sharding.make_mesh(data, model_axis)
        sharded = jresid.from_pretrained(heads_checkpoint.path, mesh=mesh)
        where = f"mesh data={data} model={model_axis}"
        if model_axis > 1:
            spec = sharded.module.blocks.attn.q_kernel[...].sharding.spec
            assert spec[2] == "model", f"{where}: q_kernel is not split by head: {spec}"
        logits, cache = sharded.run_with_cache(ids, mask)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(expected_logits), atol=1e-4,
                                   err_msg=f"{where}: logits")
        for name in expected:
            np.testing.assert_allclose(np.asarray(cache[name]), np.asarray(expected[name]), atol=ATOL,
                                       err_msg=f"{where}: {name}")


def test_meshes_give_the_single_device_metrics(heads_checkpoint):
    single = jresid.from_pretrained(heads_checkpoint.path)
    ids = random_ids(3, 40, single.config.vocab_size, seed=2)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[2, 33:] = 0
    expected = analyze(single, ids, mask)

    for data, model_axis in MESHES:
        sharded = jresid.from_pretrained(heads_checkpoint.path, mesh=sharding.make_mesh(data, model_axis))
        result = analyze(sharded, ids, mask, calibration=expected.calibration)
        where = f"mesh data={data} model={model_axis}"
        for name in ("energy", "innovation", "expansion", "complexity", "sequence_complexity"):
            want = getattr(expected, name)
            scale = max(1.0, float(np.nanmax(np.abs(want))))
            np.testing.assert_allclose(getattr(result, name), want, rtol=0, atol=ATOL * scale, equal_nan=True,
                                       err_msg=f"{where}: {name}")
        np.testing.assert_array_equal(result.mode, expected.mode, err_msg=f"{where}: mode")


def test_each_device_holds_only_its_slice(heads_checkpoint):
    mesh = sharding.make_mesh(2, 4)
    model = jresid.from_pretrained(heads_checkpoint.path, mesh=mesh)
    kernel = model.module.blocks.mlp.gate_kernel[...]
    shard_shapes = {shard.data.shape for shard in kernel.addressable_shards}
    L, D, F = kernel.shape
    assert shard_shapes == {(L, D, F // 4)}


def test_model_axis_must_divide_query_heads(tiny_untied):
    mesh = sharding.make_mesh(1, 8)  # 4 query heads
    with pytest.raises(sharding.MeshError, match="does not divide num_attention_heads=4"):
        jresid.from_pretrained(tiny_untied.path, mesh=mesh)


@pytest.mark.parametrize("spec, message", [("data=3,model=2", "needs 6 devices"), ("model=x", "invalid mesh"),
                                           ("", "empty mesh")])
def test_bad_mesh_spec(spec, message):
    with pytest.raises(sharding.MeshError, match=message):
        sharding.mesh_from_spec(spec)


def test_parse_mesh_spec_defaults():
    assert sharding.parse_mesh_spec("model=4") == {"data": 1, "model": 4}
    assert sharding.parse_mesh_spec("data=2, model=4") == {"data": 2, "model": 4}
