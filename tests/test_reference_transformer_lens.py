"""Logits and every capture point against TransformerLens (HookedTransformer and TransformerBridge).

The checkpoints are tiny random Qwen2 models built with transformers (every
parameter randomised, norm gains and q/k/v biases included, rope_theta 1e6),
and prompts are 256 tokens or longer so that a rotary error shows.
"""

from __future__ import annotations

import os

# Nothing in this module may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("transformer_lens")

import jresid.pretrained as pretrained  # noqa: E402
from jresid import reference  # noqa: E402
from jresid.capture import all_names  # noqa: E402
from tests.hf_checkpoints import build_checkpoint, random_ids  # noqa: E402

pytestmark = pytest.mark.reference

LOGITS_ATOL = 1e-4
RESID_ATOL = 1e-5
LENGTH = 300
PADDED_LENGTHS = (300, 257, 281)

# Spelled out in full so that a change to the shared defaults cannot
# silently shrink what this module covers.
SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
)

CHECKPOINTS = {
    "untied": dict(tie=False, seed=11),
    # transformers 4 layout: rope_theta at the top level of config.json.
    "tied_v4_layout": dict(tie=True, seed=12, v4_config=True),
    # head_dim 24 differs from hidden_size / num_attention_heads = 16.
    "wide_heads": dict(tie=False, seed=13, head_dim=24),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folder of each checkpoint in CHECKPOINTS."""
    folders = {}
    for name, options in CHECKPOINTS.items():
        built = build_checkpoint(tmp_path_factory.mktemp(f"reference_{name}"), **SHAPE, **options)
        folders[name] = str(built.path)
    return folders


@pytest.fixture(scope="module")
def models(checkpoints):
    """jresid float32 model of each checkpoint."""
    return {name: pretrained.from_pretrained(path, dtype="float32") for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def references(checkpoints):
    """Load each (checkpoint, backend) reference once, on first use."""
    loaded = {}

    def get(name: str, backend: str):
        key = (name, backend)
        if key not in loaded:
            loaded[key] = reference.load_reference(checkpoints[name], backend)
        return loaded[key]

    return get


def failure_message(report: reference.ComparisonReport) -> str:
    lines = [
        f"{row.name}: max |diff| {row.max_abs_diff:.3e} > {row.tolerance:g} at {row.location}"
        for row in report.failures()
    ]
    return "\n".join(lines) + "\n\n" + report.format()


def padded_batch(side: str):
    sequences = [random_ids(1, n, SHAPE["vocab_size"], seed=100 + i)[0].tolist()
                 for i, n in enumerate(PADDED_LENGTHS)]
    # 255 is a valid id, so a padding token that leaked into a real one would
    # change the numbers rather than crash.
    return pretrained.pad_token_ids(sequences, padding_side=side, pad_id=255)


@pytest.mark.parametrize("backend", reference.BACKENDS)
@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_every_point_matches(models, references, checkpoint, backend):
    model = models[checkpoint]
    ids = random_ids(2, LENGTH, SHAPE["vocab_size"], seed=7)

    report = reference.compare_with_transformer_lens(
        model, ids, reference=references(checkpoint, backend),
        atol_resid=RESID_ATOL, atol_logits=LOGITS_ATOL,
    )

    compared = [row.name for row in report.points]
    assert compared == all_names(SHAPE["num_hidden_layers"]), f"compared {compared}"
    assert report.missing == (), f"{backend} did not provide {report.missing}"
    assert report.logits.max_abs_diff <= LOGITS_ATOL, failure_message(report)
    for row in report.points:
        assert row.passed, f"{row.name}: max |diff| {row.max_abs_diff:.3e} > {RESID_ATOL:g} at {row.location}"
    assert report.passed, failure_message(report)


@pytest.mark.parametrize("backend", reference.BACKENDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_real_tokens(models, references, side, backend):
    model = models["untied"]
    ids, mask = padded_batch(side)

    report = reference.compare_with_transformer_lens(
        model, ids, mask, reference=references("untied", backend),
        atol_resid=RESID_ATOL, atol_logits=LOGITS_ATOL,
    )

    assert report.real_tokens == sum(PADDED_LENGTHS)
    assert report.missing == ()
    for row in report.rows:
        assert row.passed, f"{side} padding, {row.name}: max |diff| {row.max_abs_diff:.3e} at {row.location}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_match_unpadded_reference(models, references, side):
    """Each row of a padded jresid batch equals HookedTransformer on that row alone.

    This does not rely on TransformerLens' own handling of a mask.
    """
    model = models["untied"]
    hooked = references("untied", "hooked")
    ids, mask = padded_batch(side)
    names = all_names(SHAPE["num_hidden_layers"])
    logits, cache = model.run_with_cache(ids, mask)
    arrays = {"logits": np.asarray(logits), **cache.to_numpy()}

    for row in range(ids.shape[0]):
        real = mask[row].astype(bool)
        alone_logits, alone = reference.run_reference(hooked, ids[row][real][None], names=names)
        alone["logits"] = alone_logits
        for name, expected in alone.items():
            actual = arrays[name][row][real][None]
            tolerance = LOGITS_ATOL if name == "logits" else RESID_ATOL
            diff = reference.difference_on_real_tokens(name, actual, expected, None, tolerance)
            assert diff.passed, f"{side} padding, row {row}, {name}: max |diff| {diff.max_abs_diff:.3e}"


def test_hf_reference_is_eager_float32(checkpoints, models):
    import torch

    hf_model = reference.hf_reference(checkpoints["untied"])
    model = models["untied"]
    ids = random_ids(1, 260, SHAPE["vocab_size"], seed=3)
    with torch.inference_mode():
        out = hf_model(torch.from_numpy(ids), output_hidden_states=True)
    logits, cache = model.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_resid_pre"))

    assert hf_model.config._attn_implementation == "eager"
    assert next(hf_model.parameters()).dtype == torch.float32
    logits_diff = np.abs(np.asarray(logits) - out.logits.numpy()).max()
    assert logits_diff <= LOGITS_ATOL, f"logits: max |diff| {logits_diff:.3e}"
    for layer in range(SHAPE["num_hidden_layers"]):
        name = f"blocks.{layer}.hook_resid_pre"
        diff = np.abs(np.asarray(cache[name]) - out.hidden_states[layer].numpy()).max()
        assert diff <= RESID_ATOL, f"{name}: max |diff| {diff:.3e}"


def test_hooked_config_from_checkpoint(references, models):
    hooked = references("tied_v4_layout", "hooked")
    config = models["tied_v4_layout"].config

    assert hooked.cfg.rotary_base == config.rope_theta == 1e6
    assert hooked.cfg.d_head == config.head_dim
    assert hooked.cfg.rotary_dim == config.head_dim
    assert hooked.cfg.n_key_value_heads == config.num_key_value_heads
    assert hooked.cfg.eps == config.rms_norm_eps
    assert hooked.cfg.n_ctx == config.max_position_embeddings
    assert hooked.cfg.default_prepend_bos is False
    assert hooked.tokenizer is None


def test_wide_heads_config(references, models):
    hooked = references("wide_heads", "hooked")

    assert hooked.cfg.d_head == 24
    assert hooked.blocks[0].attn.W_Q.shape == (SHAPE["num_attention_heads"], SHAPE["hidden_size"], 24)


def test_other_checkpoint_fails(models, references):
    """A reference built from different weights must fail, naming the points."""
    ids = random_ids(1, LENGTH, SHAPE["vocab_size"], seed=5)

    report = reference.compare_with_transformer_lens(
        models["untied"], ids, reference=references("tied_v4_layout", "hooked")
    )

    failed = {row.name for row in report.failures()}
    assert not report.passed
    assert "logits" in failed
    assert "blocks.0.hook_attn_out" in failed
    assert "FAIL" in report.format()


def test_names_subset_and_summary(models, references):
    ids = random_ids(1, LENGTH, SHAPE["vocab_size"], seed=6)
    names = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out", "ln_final.hook_normalized"]

    report = reference.compare_with_transformer_lens(
        models["untied"], ids, names=names, reference=references("untied", "bridge")
    )
    worst = report.max_diff_by_point()
    text = report.format(per_layer=False)

    assert [row.name for row in report.points] == names
    assert report.backend == "bridge"
    assert report.transformer_lens_version == reference.transformer_lens_version()
    assert (report.atol_resid, report.atol_logits) == (RESID_ATOL, LOGITS_ATOL)
    assert set(worst) == {"logits", "hook_resid_post", "hook_mlp_out", "ln_final.hook_normalized"}
    assert report["blocks.2.hook_mlp_out"].layer == 2
    assert "TransformerLens" in text
    assert "bridge" in text
    assert report.to_dict()["passed"] is report.passed


def test_from_path_loads_both_sides(checkpoints):
    ids = random_ids(1, 256, SHAPE["vocab_size"], seed=8)

    report = reference.compare_with_transformer_lens(
        checkpoints["untied"], ids, backend="hooked", names=lambda name: "resid" in name
    )

    assert report.model_path == checkpoints["untied"]
    assert report.model_dtype == "float32"
    assert report.reference_dtype == "float32"
    assert all("resid" in row.name for row in report.points)
    assert report.passed, failure_message(report)


def test_result_needs_use_attn_result(checkpoints, models):
    hooked = reference.load_hooked_transformer(checkpoints["untied"], use_attn_result=False)
    ids = random_ids(1, 16, SHAPE["vocab_size"], seed=9)

    with pytest.raises(ValueError, match="use_attn_result"):
        reference.compare_with_transformer_lens(models["untied"], ids, reference=hooked)


def test_invalid_backend_and_name(models):
    ids = random_ids(1, 16, SHAPE["vocab_size"], seed=10)

    with pytest.raises(ValueError, match="backend"):
        reference.compare_with_transformer_lens(models["untied"], ids, backend="lens")
    with pytest.raises(ValueError, match="unknown capture point"):
        reference.compare_with_transformer_lens(models["untied"], ids, names=["blocks.9.hook_resid_pre"])


def test_missing_extra_names_install_command():
    """Without torch, importing works and calls raise an error that names the extra."""
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['transformer_lens'] = None\n"
        "import jresid, jresid.reference as r\n"
        "try:\n"
        "    r.load_hooked_transformer('.')\n"
        "except r.ReferenceUnavailableError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "pip install 'jresid[reference]'" in result.stdout


def test_relative_tolerance_scales_with_the_reference():
    expected = np.full((1, 3, 4), 480.0)
    actual = expected.copy()
    actual[0, 1, 2] += 2e-4
    absolute_only = reference.difference_on_real_tokens("blocks.3.hook_resid_post", actual, expected, None, 1e-5)
    assert not absolute_only.passed
    scaled = reference.difference_on_real_tokens("blocks.3.hook_resid_post", actual, expected, None, 1e-5, 1e-6)
    assert scaled.passed
    assert scaled.tolerance == pytest.approx(1e-5 + 480.0 * 1e-6)
    assert scaled.location == (0, 1, 2)
    too_far = actual.copy()
    too_far[0, 1, 2] += 1e-3
    assert not reference.difference_on_real_tokens("x", too_far, expected, None, 1e-5, 1e-6).passed
