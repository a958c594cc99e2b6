"""Logits and every capture point against Hugging Face transformers (eager, float32)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jresid.pretrained as pretrained  # noqa: E402
from tests.hf_checkpoints import build_checkpoint, load_hf_reference, random_ids  # noqa: E402

LENGTH = 300  # long enough that a rotary bug shows
LOGITS_ATOL = 1e-4
RESID_ATOL = 1e-5


def hf_captures(hf_model, ids, mask=None):
    """Run transformers and collect the same points jresid captures, as NumPy float32."""
    layers = hf_model.model.layers
    records = {}
    handles = []

    def keep(name, index=None):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            records[name] = value.detach().float().numpy()
        return hook

    def keep_input(name):
        def hook(module, args):
            records[name] = args[0].detach().float().numpy()
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.register_forward_hook(keep(f"attn_out.{i}")))
        handles.append(layer.mlp.register_forward_hook(keep(f"mlp_out.{i}")))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(keep_input(f"z.{i}")))
    handles.append(hf_model.model.norm.register_forward_pre_hook(keep_input("final_in")))
    try:
        with torch.no_grad():
            kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
            out = hf_model(torch.tensor(ids), output_hidden_states=True, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    config = hf_model.config
    H, E = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    captures = {"logits": out.logits.float().numpy(), "hook_embed": out.hidden_states[0].float().numpy()}
    for i in range(config.num_hidden_layers):
        resid_pre = out.hidden_states[i].float().numpy()
        captures[f"blocks.{i}.hook_resid_pre"] = resid_pre
        captures[f"blocks.{i}.hook_attn_out"] = records[f"attn_out.{i}"]
        captures[f"blocks.{i}.hook_resid_mid"] = resid_pre + records[f"attn_out.{i}"]
        captures[f"blocks.{i}.hook_mlp_out"] = records[f"mlp_out.{i}"]
        captures[f"blocks.{i}.hook_resid_post"] = (
            out.hidden_states[i + 1].float().numpy() if i + 1 < config.num_hidden_layers else records["final_in"]
        )
        w_o = layers[i].self_attn.o_proj.weight.detach().float().numpy()  # [D, H*E]
        z = records[f"z.{i}"].reshape(*ids.shape, H, E)
        captures[f"blocks.{i}.attn.hook_result"] = np.einsum("bthe,dhe->bthd", z, w_o.reshape(-1, H, E))
    final = records["final_in"].astype(np.float64)
    normalized = final / np.sqrt(np.mean(final**2, axis=-1, keepdims=True) + config.rms_norm_eps)
    captures["ln_final.hook_normalized"] = normalized.astype(np.float32)
    captures["hf_last_hidden"] = out.hidden_states[-1].float().numpy()
    return captures


def assert_close(ours, theirs, atol, name, mask=None):
    ours = np.asarray(ours, dtype=np.float32)
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} != {theirs.shape}"
    diff = np.abs(ours - theirs)
    if mask is not None:
        diff = diff[mask.astype(bool)]
    worst = float(diff.max())
    assert worst <= atol, f"{name}: max |jresid - transformers| = {worst:.3g} > {atol:g}"


@pytest.fixture(scope="module", params=["tiny_untied", "tiny_tied", "tiny_sharded"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


def test_every_point_matches_transformers(checkpoint):
    model = pretrained.from_pretrained(checkpoint.path)
    hf_model = load_hf_reference(checkpoint.path)
    ids = random_ids(2, LENGTH, model.config.vocab_size, seed=11)

    logits, cache = model.run_with_cache(ids)
    expected = hf_captures(hf_model, ids)

    assert_close(logits, expected["logits"], LOGITS_ATOL, "logits")
    for name in cache:
        assert_close(cache[name], expected[name], RESID_ATOL, name)
    assert len(cache) == 2 + 6 * model.config.num_hidden_layers


def test_residual_identities(tiny_untied):
    model = pretrained.from_pretrained(tiny_untied.path)
    ids = random_ids(1, LENGTH, model.config.vocab_size, seed=12)
    _, cache = model.run_with_cache(ids)
    L = model.config.num_hidden_layers
    for layer in range(L - 1):
        np.testing.assert_array_equal(
            cache[f"blocks.{layer + 1}.hook_resid_pre"], cache[f"blocks.{layer}.hook_resid_post"],
            err_msg=f"resid_pre[{layer + 1}] != resid_post[{layer}]",
        )
    for layer in range(L):
        update = np.asarray(cache["resid_post", layer]) - np.asarray(cache["resid_pre", layer])
        parts = np.asarray(cache["attn_out", layer]) + np.asarray(cache["mlp_out", layer])
        np.testing.assert_allclose(update, parts, atol=1e-6, err_msg=f"layer {layer}: update != attn_out + mlp_out")
        heads = np.asarray(cache["result", layer]).sum(axis=2)
        np.testing.assert_allclose(heads, cache["attn_out", layer], atol=1e-6,
                                   err_msg=f"layer {layer}: sum of hook_result != attn_out")

    hf_model = load_hf_reference(tiny_untied.path)
    expected = hf_captures(hf_model, ids)
    gain = hf_model.model.norm.weight.detach().numpy()
    final = np.asarray(cache["ln_final.hook_normalized"]) * gain
    assert_close(final, expected["hf_last_hidden"], RESID_ATOL, "final norm of last resid_post")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_prompts_alone(tiny_untied, side):
    model = pretrained.from_pretrained(tiny_untied.path)
    vocab = model.config.vocab_size
    prompts = [list(random_ids(1, n, vocab, seed=20 + n)[0]) for n in (260, 97, 1)]
    ids, mask = pretrained.pad_token_ids(prompts, padding_side=side, length=280, pad_id=vocab - 1)

    logits, cache = model.run_with_cache(ids, mask)
    for name, value in [("logits", logits), *cache.items()]:
        assert np.isfinite(np.asarray(value)).all(), f"{name} has NaN or inf with {side} padding"

    for row, prompt in enumerate(prompts):
        alone_logits, alone = model.run_with_cache(np.array([prompt]))
        real = mask[row].astype(bool)
        np.testing.assert_allclose(np.asarray(logits)[row][real], np.asarray(alone_logits)[0], atol=LOGITS_ATOL,
                                   err_msg=f"row {row} ({len(prompt)} tokens, {side} padding): logits")
        for name in cache:
            np.testing.assert_allclose(np.asarray(cache[name])[row][real], np.asarray(alone[name])[0],
                                       atol=RESID_ATOL, err_msg=f"row {row}, {side} padding: {name}")


def test_names_filter_returns_only_requested(tiny_untied):
    model = pretrained.from_pretrained(tiny_untied.path)
    ids = random_ids(1, 16, model.config.vocab_size, seed=3)
    _, cache = model.run_with_cache(ids, names_filter=["blocks.1.hook_resid_post", "hook_embed"])
    assert sorted(cache) == ["blocks.1.hook_resid_post", "hook_embed"]
    _, cache = model.run_with_cache(ids, names_filter=lambda name: name.endswith("resid_pre"))
    assert sorted(cache) == [f"blocks.{i}.hook_resid_pre" for i in range(3)]
    with pytest.raises(ValueError, match="unknown capture point"):
        model.run_with_cache(ids, names_filter=["blocks.7.hook_resid_pre"])


def test_bfloat16_tracks_float32_with_outlier_channel(tmp_path):
    built = build_checkpoint(tmp_path, tie=False, seed=5, num_hidden_layers=8,
                             outlier_channel=7, outlier_size=1000.0)
    f32 = pretrained.from_pretrained(built.path, dtype="float32")
    bf16 = pretrained.from_pretrained(built.path, dtype="bfloat16")
    ids = random_ids(2, 256, f32.config.vocab_size, seed=9)
    names = [f"blocks.{i}.hook_resid_post" for i in range(8)]
    _, ref = f32.run_with_cache(ids, names_filter=names)
    _, low = bf16.run_with_cache(ids, names_filter=names)
    assert abs(float(np.asarray(ref[names[0]])[..., 7].mean())) > 500, "the outlier channel is missing"
    for i, name in enumerate(names):
        a = np.asarray(ref[name], dtype=np.float64).reshape(-1, f32.config.hidden_size)
        b = np.asarray(low[name], dtype=np.float64).reshape(-1, f32.config.hidden_size)
        assert np.asarray(low[name]).dtype == np.dtype("bfloat16")
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert cosine.min() >= 0.99, f"layer {i}: min cosine bf16 vs f32 = {cosine.min():.4f}"

        # The outlier dominates the cosine above; the other channels must hold up too.
        a, b = np.delete(a, 7, axis=1), np.delete(b, 7, axis=1)
        cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        assert cosine.min() >= 0.99, f"layer {i}: min cosine without the outlier channel = {cosine.min():.4f}"
