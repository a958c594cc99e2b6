"""The safetensors reader: layouts, tying, dtypes and every kind of bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
import safetensors.numpy  # noqa: E402

import jresid.pretrained as pretrained  # noqa: E402
from jresid.checkpoint import Checkpoint, CheckpointError  # noqa: E402
from jresid.config import ConfigError, Qwen2Config, UnsupportedConfigError  # noqa: E402
from tests.hf_checkpoints import build_checkpoint, load_hf_reference, random_ids  # noqa: E402


def copy_checkpoint(built, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(built.path, target)
    return target


def load_tensors(path):
    """Read a single-file checkpoint with the bfloat16-aware reader of safetensors."""
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="flax") as f:
        for name in f.keys():
            out[name] = np.asarray(f.get_tensor(name))
    return out


def flat_params(model):
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(model.state)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def test_sharded_equals_single_file(tiny_sharded, tmp_path):
    files = sorted(p.name for p in tiny_sharded.path.glob("*.safetensors"))
    assert len(files) > 1, f"the fixture should be sharded, found {files}"
    # Re-save the same weights as one file and compare the loaded parameters.
    single = tmp_path / "single"
    single.mkdir()
    tensors = {}
    for name in files:
        tensors.update(load_tensors(tiny_sharded.path / name))
    safetensors.numpy.save_file(tensors, single / "model.safetensors")
    shutil.copy(tiny_sharded.path / "config.json", single / "config.json")

    a = flat_params(pretrained.from_pretrained(tiny_sharded.path))
    b = flat_params(pretrained.from_pretrained(single))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_index_limits_files_read(tiny_sharded, tmp_path):
    folder = copy_checkpoint(tiny_sharded, tmp_path)
    (folder / "model-stray.safetensors").write_bytes(b"not a safetensors file")
    (folder / "model.safetensors").write_bytes(b"stale single file")
    model = pretrained.from_pretrained(folder)
    assert model.config.num_hidden_layers == 3


def test_missing_shard_named(tiny_sharded, tmp_path):
    folder = copy_checkpoint(tiny_sharded, tmp_path)
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        pretrained.from_pretrained(folder)


def test_missing_tensor_named(tiny_untied, tmp_path):
    folder = copy_checkpoint(tiny_untied, tmp_path)
    tensors = load_tensors(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        pretrained.from_pretrained(folder)


def test_wrong_shape_named(tiny_untied, tmp_path):
    folder = copy_checkpoint(tiny_untied, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[96, 64\]"):
        pretrained.from_pretrained(folder)


def test_unsupported_config_fails_before_weights(tiny_untied, tmp_path):
    folder = copy_checkpoint(tiny_untied, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["use_sliding_window"] = True
    config["sliding_window"] = 64
    config["max_window_layers"] = 1
    config.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"garbage")  # must not be read
    with pytest.raises(UnsupportedConfigError, match="use_sliding_window"):
        pretrained.from_pretrained(folder)


def test_non_qwen2_config(tiny_untied, tmp_path):
    folder = copy_checkpoint(tiny_untied, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfigError, match="model_type is 'llama'"):
        pretrained.from_pretrained(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="model folder not found"):
        pretrained.from_pretrained(tmp_path / "nowhere")


def test_no_weights_file(tiny_untied, tmp_path):
    folder = copy_checkpoint(tiny_untied, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        pretrained.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["truncated", "corrupt_header", "garbage"])
def test_damaged_file(tiny_untied, tmp_path, damage):
    folder = copy_checkpoint(tiny_untied, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) - 1000]
    elif damage == "corrupt_header":
        data = data[:8] + b"{" + data[9:]
        data = data[:20] + b"\xff\xfe" + data[22:]
    else:
        data = os.urandom(4096)
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        pretrained.from_pretrained(folder)


def test_tied_flag_wins_over_stored_output_layer(tiny_untied, tmp_path, caplog):
    folder = copy_checkpoint(tiny_untied, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="jresid.checkpoint"):
        model = pretrained.from_pretrained(folder)
    assert "differs from the embedding" in caplog.text
    assert "lm_head.weight" in caplog.text
    assert model.module.lm_head is None

    embedding = np.asarray(model.module.embed.embedding[...])
    ids = random_ids(1, 32, model.config.vocab_size, seed=1)
    _, cache = model.run_with_cache(ids, names_filter=["ln_final.hook_normalized"])
    gain = np.asarray(model.module.final_norm.weight[...])
    expected = (np.asarray(cache["ln_final.hook_normalized"]) * gain) @ embedding.T
    np.testing.assert_allclose(model.forward(ids), expected, atol=1e-4)


def test_untied_flag_without_output_layer_is_an_error(tiny_tied, tmp_path):
    folder = copy_checkpoint(tiny_tied, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lm_head.weight.*tie_word_embeddings"):
        pretrained.from_pretrained(folder)


def test_unused_tensor_reported(tiny_untied, tmp_path, caplog):
    folder = copy_checkpoint(tiny_untied, tmp_path)
    tensors = load_tensors(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, dtype=np.float32)
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="jresid.checkpoint"):
        checkpoint = Checkpoint.open(folder, Qwen2Config.from_json(folder))
    assert checkpoint.unused == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "rotary_emb.inv_freq" in caplog.text


def test_bfloat16_stays_bfloat16(tiny_bf16):
    model = pretrained.from_pretrained(tiny_bf16.path)
    dtypes = {leaf.dtype for leaf in flat_params(model).values()}
    assert dtypes == {np.dtype(ml_dtypes.bfloat16)}
    stored = load_tensors(tiny_bf16.path / "model.safetensors")["model.layers.2.mlp.down_proj.weight"]
    np.testing.assert_array_equal(np.asarray(model.module.blocks.mlp.down_kernel[...][2]), stored.T)


def test_bfloat16_upcast_on_request(tiny_bf16):
    model = pretrained.from_pretrained(tiny_bf16.path, dtype="float32")
    assert model.dtype == jnp.float32
    stored = load_tensors(tiny_bf16.path / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(model.module.embed.embedding[...]), stored.astype(np.float32))


def test_bfloat16_logits_match_transformers(tiny_bf16):
    import torch

    model = pretrained.from_pretrained(tiny_bf16.path)
    hf = load_hf_reference(tiny_bf16.path, dtype="bfloat16")
    ids = random_ids(1, 64, model.config.vocab_size, seed=4)
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.float().numpy()
    ours = np.asarray(model.forward(ids))
    # bfloat16 keeps about 3 significant digits; both sides round differently.
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() <= 0.05 * scale


def test_float16_storage(tmp_path):
    built = build_checkpoint(tmp_path, tie=False, seed=8, torch_dtype="float16")
    model = pretrained.from_pretrained(built.path)
    assert model.dtype == jnp.float16
    stored = load_tensors(built.path / "model.safetensors")["lm_head.weight"]
    np.testing.assert_array_equal(np.asarray(model.module.lm_head.kernel[...]), stored.T)


def test_invalid_dtype_option(tiny_untied):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        pretrained.from_pretrained(tiny_untied.path, dtype="int8")


def test_tokenizer_absent_gives_none(tiny_untied):
    model = pretrained.from_pretrained(tiny_untied.path)
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer files"):
        model.tokenize("hello")


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        ([[0, 1, 999]], None, "token id 999"),
        ([[0, 1, 2]], [[1, 1]], "attention_mask has shape"),
        ([[0, 1, 2]], [[0, 0, 0]], "no real token"),
        ([[0.5, 1.0]], None, "must be integers"),
        ([[0, 1, 2]], [[1, 2, 1]], "only 0"),
    ],
)
def test_bad_inputs_rejected(tiny_untied, ids, mask, message):
    model = pretrained.from_pretrained(tiny_untied.path)
    with pytest.raises(ValueError, match=message):
        model.run_with_cache(np.array(ids), None if mask is None else np.array(mask))


@pytest.mark.parametrize("fixture", ["tiny_untied", "tiny_tied"])
def test_save_pretrained_round_trip(fixture, request, tmp_path):
    built = request.getfixturevalue(fixture)
    model = pretrained.from_pretrained(built.path)
    model.save_pretrained(tmp_path / "saved")
    original = load_tensors(built.path / "model.safetensors")
    saved = load_tensors(tmp_path / "saved" / "model.safetensors")
    if built.tie:
        original.pop("lm_head.weight", None)
    assert saved.keys() == original.keys()
    for name in saved:
        np.testing.assert_array_equal(saved[name], original[name], err_msg=name)
    assert Qwen2Config.from_json(tmp_path / "saved") == model.config


def test_chunked_copy_gives_the_same_parameters(tiny_untied, monkeypatch):
    import jresid.checkpoint as checkpoint

    whole = flat_params(pretrained.from_pretrained(tiny_untied.path))
    # Chunks of 256 bytes split every tensor, transposed ones included, into many slices.
    monkeypatch.setattr(checkpoint, "COPY_CHUNK_BYTES", 256)
    model = pretrained.from_pretrained(tiny_untied.path)
    chunked = flat_params(model)
    assert whole.keys() == chunked.keys()
    for name in whole:
        np.testing.assert_array_equal(chunked[name], whole[name], err_msg=name)
    stored = load_tensors(tiny_untied.path / "model.safetensors")
    np.testing.assert_array_equal(np.asarray(model.module.blocks.mlp.down_kernel[...][1]),
                                  stored["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.module.lm_head.kernel[...]), stored["lm_head.weight"].T)


def test_chunked_copy_of_transposed_view():
    from jresid.checkpoint import COPY_CHUNK_BYTES, _copy_releasing

    rng = np.random.default_rng(0)
    source = rng.normal(size=(300, 7)).astype(np.float32)
    out = np.empty((7, 300), dtype=np.float32)
    releases = []
    _copy_releasing(source.T, out, lambda: releases.append(1))
    np.testing.assert_array_equal(out, source.T)
    assert source.nbytes <= COPY_CHUNK_BYTES
    assert not releases


def test_aligned_buffers_are_taken_over_by_jax():
    import jax

    from jresid.checkpoint import BUFFER_ALIGNMENT, aligned_empty

    for shape in [(3,), (5, 7), (1000, 129)]:
        buffer = aligned_empty(shape, np.float32)
        assert buffer.shape == shape
        assert buffer.flags.c_contiguous
        assert buffer.ctypes.data % BUFFER_ALIGNMENT == 0
    buffer = aligned_empty((1000, 129), np.float32)
    buffer[...] = 1.0
    array = jax.device_put(buffer)
    if jax.default_backend() == "cpu":
        # The loader relies on this to hold each parameter once.
        assert array.unsafe_buffer_pointer() == buffer.ctypes.data
