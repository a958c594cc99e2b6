"""Real published Qwen2-family configs and the Qwen2.5 tokenizer (found through JRESID_REAL_DATA)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from jresid.config import Qwen2Config

# Values in effect for each published config, written out by hand from the files.
EXPECTED = {
    "Qwen2-0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       head_dim=64, rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936),
    "Qwen2.5-0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         head_dim=64, rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936),
    "Qwen2.5-0.5B-Instruct": dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                                  tie_word_embeddings=True, vocab_size=151936),
    "Qwen2.5-1.5B-Instruct": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                  num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
    "Qwen2.5-7B-Instruct": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                num_key_value_heads=4, head_dim=128, tie_word_embeddings=False,
                                vocab_size=152064, rms_norm_eps=1e-6),
    "Qwen2.5-32B": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                        head_dim=128, rms_norm_eps=1e-5, tie_word_embeddings=False, vocab_size=152064),
    "QwQ-32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                    vocab_size=152064, rope_theta=1e6),
}


def config_files(real_data):
    files = sorted((real_data / "qwen2-configs").glob("*.json"))
    assert files, "qwen2-configs/ is empty"
    return files


def test_every_real_config_parses(real_data):
    for path in config_files(real_data):
        raw = json.loads(path.read_text())
        config = Qwen2Config.from_json(path)
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                      "tie_word_embeddings", "sliding_window", "max_window_layers", "use_sliding_window"):
            assert getattr(config, field) == raw[field], f"{path.name}: {field}"
        assert config.torch_dtype == raw["torch_dtype"], path.name
        assert config.layer_types == ("full_attention",) * raw["num_hidden_layers"], path.name
        for field, value in EXPECTED.get(path.stem, {}).items():
            assert getattr(config, field) == value, f"{path.name}: {field}={getattr(config, field)}, expected {value}"


def test_expected_files_present(real_data):
    names = {path.stem for path in config_files(real_data)}
    assert set(EXPECTED) <= names, f"missing configs: {set(EXPECTED) - names}"


def shrunk(raw: dict) -> dict:
    """Keep every field of a real config but make the model small: head_dim 8, 2 layers, vocab 512."""
    raw = dict(raw)
    raw["hidden_size"] = raw["num_attention_heads"] * 8
    raw["intermediate_size"] = 48
    raw["num_hidden_layers"] = 2
    raw["vocab_size"] = 512
    raw["torch_dtype"] = "float32"
    return raw


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shrunk_real_config_matches_transformers(real_data, tmp_path, name):
    torch = pytest.importorskip("torch")
    import transformers

    import jresid.pretrained as pretrained
    from tests.hf_checkpoints import load_hf_reference, randomise

    raw = shrunk(json.loads((real_data / "qwen2-configs" / f"{name}.json").read_text()))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    torch.manual_seed(0)
    hf_model = transformers.Qwen2ForCausalLM(hf_config)
    randomise(hf_model, seed=3)
    hf_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(raw))  # keep the real layout verbatim

    model = pretrained.from_pretrained(tmp_path / "ckpt")
    assert model.config.rope_theta == raw["rope_theta"]
    ids = np.random.default_rng(0).integers(0, 512, size=(1, 256))
    hf = load_hf_reference(tmp_path / "ckpt")
    with torch.no_grad():
        out = hf(torch.tensor(ids), output_hidden_states=True)
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("resid_pre"))
    worst = np.abs(np.asarray(logits) - out.logits.numpy()).max()
    assert worst <= 1e-4, f"{name}: logits differ by {worst:.3g}"
    for layer in range(2):
        diff = np.abs(np.asarray(cache["resid_pre", layer]) - out.hidden_states[layer].numpy()).max()
        assert diff <= 1e-5, f"{name}: resid_pre of layer {layer} differs by {diff:.3g}"


def test_real_tokenizer_no_bos(real_data, tmp_path):
    pytest.importorskip("torch")
    import jresid.pretrained as pretrained
    from tests.hf_checkpoints import build_checkpoint

    folder = tmp_path / "model"
    build_checkpoint(folder, tie=True, seed=1, vocab_size=151936, hidden_size=32, intermediate_size=32,
                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    for source in (real_data / "qwen2.5-math-1.5b-tokenizer").iterdir():
        shutil.copy(source, folder / source.name)

    model = pretrained.from_pretrained(folder)
    assert model.tokenizer is not None
    ids, mask = model.tokenize("Hello world")
    assert ids.tolist() == [[9707, 1879]]
    text = "The residual stream of layer 12 carries 3.5 times more energy than layer 2."
    ids, mask = model.tokenize([text, "Hello world"], padding_side="left")
    assert ids.shape[0] == 2 and mask[1].sum() == 2
    assert model.tokenizer.decode(ids[0][mask[0].astype(bool)]) == text
    plain = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0][mask[0].astype(bool)].tolist() == plain, "the tokenizer added a special token"
    logits = model.forward(ids, mask)
    assert np.isfinite(np.asarray(logits)).all()
