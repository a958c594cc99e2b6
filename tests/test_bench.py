"""`jresid bench`: the PyTorch baseline's metrics, the FLOP count, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jresid import bench, bench_report
from jresid.cli import main
from jresid.config import Qwen2Config
from tests import metrics_reference
from tests.hf_checkpoints import random_ids

torch = pytest.importorskip("torch")

ROW_LABELS = tuple(bench_report.WORKLOAD_LABELS.values())


# ---------------------------------------------------------------------------
# The PyTorch baseline


def test_baseline_matches_analyze(tiny_untied):
    """The TransformerLens workflow's metrics equal jresid.analyze's on real model activations."""
    import jresid
    from jresid import bench_baseline, reference

    model = jresid.from_pretrained(tiny_untied.path)
    ids = random_ids(3, 90, model.config.vocab_size, seed=11)
    mask = np.ones_like(ids)
    mask[1, :25] = 0  # left padding
    mask[2, 60:] = 0  # right padding
    ours = jresid.analyze(model, ids, mask)

    hooked = reference.load_hooked_transformer(tiny_untied.path, use_attn_result=True)
    clean_ids, clean_mask = reference.sanitize_inputs(ids, mask)
    with torch.inference_mode():
        _, cache = hooked.run_with_cache(torch.from_numpy(clean_ids), attention_mask=torch.from_numpy(clean_mask),
                                         names_filter=bench_baseline.cache_names_filter)
        theirs = bench_baseline.metrics_from_cache(cache, model.config.num_hidden_layers,
                                                   torch.from_numpy(clean_mask))

    for name in bench_baseline.METRIC_NAMES:
        expected = getattr(ours, name)
        actual = theirs[name].numpy()
        assert actual.shape == expected.shape, name
        metrics_reference.assert_matches(actual, expected, atol=2e-5, rtol=1e-5, what=f"baseline {name}")


@pytest.mark.parametrize("kind", ["gaussian", "rank_deficient", "dominant", "low_rank_tiny_noise"])
def test_baseline_layer_matches_float64_reference(kind):
    """Degenerate updates, rank-deficient windows and padding follow docs/metrics.md's rules."""
    from jresid import bench_baseline

    positions, width, heads = 40, 24, 3
    updates = metrics_reference.make_updates(kind, positions, width, seed=3)
    updates[5] = 0.0  # a degenerate update inside every kind
    components = metrics_reference.make_components("mixed", positions, heads + 1, width, seed=3)
    valid = metrics_reference.make_valid("holes", positions, seed=3)

    pre = np.zeros((1, positions, width), np.float32)
    post = updates[None].astype(np.float32)
    got = bench_baseline.layer_metrics(
        torch.from_numpy(pre), torch.from_numpy(post),
        torch.from_numpy(components[None, :, :heads].astype(np.float32)),
        torch.from_numpy(components[None, :, heads].astype(np.float32)),
        torch.from_numpy(valid[None]),
    )
    u = updates.astype(np.float32).astype(np.float64)
    expected = {
        "energy": metrics_reference.energy(u, valid),
        "innovation": metrics_reference.innovation(u, valid, window=8),
        "expansion": metrics_reference.expansion(u, valid, window=8),
        "complexity": metrics_reference.complexity_components(components.astype(np.float32), valid),
    }
    for name, values in expected.items():
        scale = np.nanmax(np.abs(values)) if name == "energy" else 1.0
        metrics_reference.assert_matches(got[name][0].numpy(), values, atol=2e-5 * scale, rtol=2e-5,
                                         what=f"{kind} {name}")


# ---------------------------------------------------------------------------
# FLOP count


def test_forward_flops_hand_count():
    config = Qwen2Config.from_dict(dict(
        model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    ))
    flops = bench_report.forward_flops(config, batch=2, length=10)
    # 20 tokens, 3 layers, a multiply-add counted as 2 FLOPs.
    # q and o: 2 * 64 * 64 = 8192 each; k and v: 2 * 64 * 32 = 4096 each.
    assert flops.projections == (8192 + 8192 + 4096 + 4096) * 20 * 3
    # gate, up and down: 2 * 64 * 96 = 12288 each.
    assert flops.mlp == 3 * 12288 * 20 * 3
    # Each token's 4 heads of width 16 meet all 10 keys twice (scores, values): 2 * 2 * 10 * 64.
    assert flops.attention == 2560 * 20 * 3
    # Logits: 2 * 64 * 256 = 32768 per token.
    assert flops.unembedding == 32768 * 20
    assert flops.total == 1_474_560 + 2_211_840 + 153_600 + 655_360
    assert flops.blocks == flops.total - 655_360


# ---------------------------------------------------------------------------
# Inputs


def test_parse_shape_accepts_batch_by_length():
    assert bench.parse_shape("4x256") == (4, 256)
    assert bench.parse_shape(" 1X512 ") == (1, 512)


@pytest.mark.parametrize("text", ["4by256", "0x16", "4x0", "x16", "4x", "-1x16", "4x16x2"])
def test_parse_shape_rejects_bad_text(text):
    with pytest.raises(bench.BenchError, match="BATCHxLENGTH"):
        bench.parse_shape(text)


def test_select_workloads_expands_groups():
    assert bench.select_workloads(None) == bench.WORKLOADS
    assert bench.select_workloads(["tl"]) == ("tl-metrics", "tl-forward", "bridge-resid")
    assert bench.select_workloads(["matmul,jresid-analyze"]) == ("jresid-analyze", "matmul")


def test_build_random_reuses_marked_folder(tmp_path):
    folder = tmp_path / "qwen2-0.5b-random-seed7"
    folder.mkdir()
    marker = {"name": "qwen2-0.5b", "seed": 7, "config": bench.RANDOM_MODELS["qwen2-0.5b"]}
    (folder / "jresid-bench-random.json").write_text(json.dumps(marker))
    assert bench.build_random_checkpoint("qwen2-0.5b", tmp_path, seed=7) == folder


# ---------------------------------------------------------------------------
# The command


def test_bench_command_end_to_end(tiny_untied, tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    status = main(["bench", "--model", str(tiny_untied.path), "--shape", "2x24", "--repeats", "1",
                   "--warmup", "0", "--matmul-size", "128", "--json", str(report_path)])
    out = capsys.readouterr().out
    assert status == 0, out

    for label in ROW_LABELS:
        rows = [line for line in out.splitlines() if line.startswith(label)]
        assert len(rows) == 1, f"{label!r} row missing in:\n{out}"
        assert "failed" not in rows[0], rows[0]
        assert "skipped" not in rows[0], rows[0]
    assert "matmul (cpu" in out
    assert "analyze / tl-metrics time" in out
    assert "forward FLOP/s / matmul rate" in out
    assert "streamed analyze / tl-metrics peak memory" in out

    report = json.loads(report_path.read_text())
    assert not report["failed"]
    assert {row["workload"] for row in report["results"]} == set(bench_report.WORKLOAD_LABELS)
    for row in report["results"]:
        assert row["error"] is None, row
        assert row["skipped"] is None, row
        assert row["data"]["median_s"] > 0, row["workload"]
        assert row["data"]["peak_rss_bytes"] > 0, row["workload"]
    assert report["matmul"]["data"]["square"]["flop_per_s"] > 0
    for name, row in report["agreement"]["2x24"].items():
        assert row["nan_pattern_equal"], name
        assert row["max_difference"] < 1e-4, (name, row)


def test_bench_skips_reference_without_extra(tiny_untied, monkeypatch, capsys):
    monkeypatch.setattr(bench, "reference_unavailable_reason",
                        lambda: "torch not installed; install the reference extra with "
                                f"{bench.INSTALL_HINT}")
    status = main(["bench", "--model", str(tiny_untied.path), "--shape", "1x16", "--repeats", "1",
                   "--warmup", "0", "--only", "jresid-forward,tl-forward"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "TransformerLens workloads skipped: torch not installed" in out
    assert bench.INSTALL_HINT in out
    tl_rows = [line for line in out.splitlines() if line.startswith("TL HookedTransformer forward")]
    assert len(tl_rows) == 1, out
    assert tl_rows[0].endswith("skipped"), tl_rows[0]
    forward_rows = [line for line in out.splitlines() if line.startswith("jresid forward (logits)")]
    assert forward_rows and "failed" not in forward_rows[0]


@pytest.mark.parametrize("arguments, message", [
    (["--shape", "4by256"], "--shape '4by256' is invalid"),
    (["--shape", "1x100000"], "max_position_embeddings"),
    (["--repeats", "0"], "--repeats 0 is invalid"),
    (["--warmup", "-1"], "--warmup -1 is invalid"),
    (["--only", "jax"], "--only 'jax' is invalid"),
    (["--build-random", "gpt2"], "--build-random 'gpt2' is invalid"),
])
def test_bench_bad_input_exits_2(tiny_untied, capsys, arguments, message):
    status = main(["bench", "--model", str(tiny_untied.path), *arguments]
                  if "--build-random" not in arguments else ["bench", *arguments])
    err = capsys.readouterr().err
    assert status == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("jresid: error:"), lines[0]
    assert message in lines[0], lines[0]


def test_bench_missing_model_exits_2(tmp_path, capsys):
    status = main(["bench", "--model", str(tmp_path / "absent")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().count("\n") == 0
    assert "model folder not found" in err
