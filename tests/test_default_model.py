"""The default model shipped in models/jresid-tiny-qwen2: size, loading, parity, and that it is trained."""

from __future__ import annotations

import math
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jresid
from jresid.model import Qwen2
from tests.hf_checkpoints import load_hf_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "jresid-tiny-qwen2"
MAX_BYTES = 10 * 10**6
# The trained model reaches about 1.2 nats on held-out text (training_report.json),
# and a random-init model stays near log(V), about 6.8.
MAX_HELDOUT_LOSS = 2.5

# models/ is not a package, so put it on the path. train_default.py imports corpus.py itself.
sys.path.insert(0, str(ROOT / "models"))
import train_default  # noqa: E402

corpus = train_default.corpus


@pytest.fixture(scope="module")
def model() -> jresid.Model:
    return jresid.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


def model_forward(model: jresid.Model):
    return lambda ids_BT, mask_BT: model.forward(ids_BT, mask_BT)


def heldout_windows(tokenizer, seed: int = 12345, count: int = 32, length: int = 128) -> np.ndarray:
    """Return windows of freshly generated held-out text, from a seed that training never used."""
    documents = corpus.generate_documents(count * 3, seed, "heldout")
    stream = train_default.token_stream(tokenizer.backend_tokenizer, documents)
    windows, _ = train_default.split_windows(stream, length, count)
    return windows


def test_folder_within_size_limit():
    assert MODEL_DIR.is_dir(), f"{MODEL_DIR} is missing; run python models/train_default.py"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (MODEL_DIR / name).is_file(), f"{name} is missing from {MODEL_DIR}"
    total = sum(path.stat().st_size for path in MODEL_DIR.iterdir() if path.is_file())
    assert total <= MAX_BYTES, f"{MODEL_DIR} holds {total} bytes, more than {MAX_BYTES}"


def test_loads_with_jresid(model):
    config = model.config
    assert config.model_type == "qwen2"
    assert config.num_attention_heads == 4
    assert config.num_key_value_heads == 2
    assert config.tie_word_embeddings
    assert config.max_position_embeddings >= 512
    assert model.dtype == jnp.float32
    assert model.tokenizer is not None


def test_tokenizer_adds_no_bos(tokenizer, model):
    text = "Alice has 3 apples. Bob gives her 4 more. Now Alice has 7 apples."
    with_special = tokenizer(text)["input_ids"]
    without_special = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert tokenizer.bos_token is None
    assert with_special == without_special
    assert tokenizer.decode(with_special) == text
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert max(with_special) < model.config.vocab_size


def test_logits_match_transformers(model, tokenizer):
    import torch

    text = "Ana lives in Oslo. Ben lives in Lima. Where does Ben live? Lima."
    ids = np.asarray([tokenizer(text)["input_ids"]], dtype=np.int64)
    reference = load_hf_reference(MODEL_DIR)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).logits.numpy()

    actual = np.asarray(model.forward(ids))

    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_heldout_loss_far_below_uniform(model, tokenizer):
    windows = heldout_windows(tokenizer)
    loss = train_default.windows_loss(model_forward(model), windows)

    assert loss < MAX_HELDOUT_LOSS, f"held-out loss {loss:.3f}, log(V) = {math.log(model.config.vocab_size):.3f}"


def test_random_init_fails_loss_threshold(model, tokenizer):
    random_module = Qwen2(model.config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(random_module, nnx.Param)
    windows = heldout_windows(tokenizer)

    loss = train_default.windows_loss(train_default.make_forward(graphdef, params), windows)

    assert loss > MAX_HELDOUT_LOSS, f"a random-init model reaches held-out loss {loss:.3f}"


def test_copies_word_lists(model, tokenizer):
    examples = corpus.task_examples("refinement_list", 64, seed=12345)

    accuracy = train_default.answer_accuracy(model_forward(model), tokenizer, examples)

    assert accuracy > 0.8, f"list copying accuracy {accuracy:.3f}"


RECALL_TASKS = [task for task in corpus.TASKS if task.startswith("recall_")]


# NOTE: the shipped model answers recall questions below chance. It names one
# fixed city, food, color or surname instead of looking the fact up (see
# models/README.md). strict=True turns a model that learns recall into a
# failure here, so that this mark is removed.
@pytest.mark.xfail(strict=True, reason="the shipped model has not learned to look facts up in the prompt")
@pytest.mark.parametrize("task", RECALL_TASKS)
def test_recall_above_chance(model, tokenizer, task):
    examples = corpus.task_examples(task, 64, seed=12345)
    chance = train_default.chance_level(examples)

    accuracy = train_default.answer_accuracy(model_forward(model), tokenizer, examples)

    assert accuracy > chance, f"{task}: accuracy {accuracy:.3f}, chance {chance:.3f}"
