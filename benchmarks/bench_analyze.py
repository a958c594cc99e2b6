"""Cost of the fused analysis against the forward pass alone, its memory, and its compilations.

Prints, for a Qwen2-0.5B-shaped model with random weights (float32):

1. wall time of the forward pass alone (blocks only, and with logits) and of
   `jresid.analyze` (forward plus all four metrics and the mode labels), the
   median of several runs after warm-up, and their ratio;
2. XLA's peak temporary memory of the analysis program at 24 and 48 layers,
   from the compiled program's memory analysis (no run needed), to show that
   it does not grow with depth;
3. how many programs `analyze` compiles for a series of prompt lengths.

    python benchmarks/bench_analyze.py [--tokens 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import importlib

import jresid

# `jresid.analyze` is also the name of the function the package exports.
analyze_lib = importlib.import_module("jresid.analyze")
from jresid.config import Qwen2Config
from jresid.metrics import MetricOptions
from jresid.model import Qwen2
from jresid.pretrained import Model

QWEN2_05B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)


def random_model(layers: int = 24, abstract: bool = False) -> Model:
    config = Qwen2Config.from_dict(dict(QWEN2_05B, num_hidden_layers=layers))
    if abstract:
        module = nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))
    else:
        module = Qwen2(config, rngs=nnx.Rngs(0))
    return Model(module, tokenizer=None, path=None)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Return (first call seconds, median of `repeats` later calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


@jax.jit
def _blocks_only(graphdef_state, ids, mask):
    graphdef, state = graphdef_state
    module = nnx.merge(graphdef, state)
    out = module(ids, mask, return_logits=False, capture=jresid.CaptureSpec(ln_final=True))
    return out.captures["ln_final.hook_normalized"]


def bench_time(tokens: int, repeats: int, options: MetricOptions) -> dict:
    model = random_model()
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, tokens))
    mask = np.ones_like(ids)
    ids_j, mask_j = model.prepare_inputs(ids, mask)
    real_rows = jnp.ones((ids.shape[0],), jnp.int32)

    blocks = jax.jit(lambda state, i, m: _blocks_only.__wrapped__((model.graphdef, state), i, m))
    results = {
        "forward (blocks only)": timed(lambda: blocks(model.state, ids_j, mask_j), repeats),
        "forward (with logits)": timed(lambda: model.forward(ids, mask), repeats),
    }
    option_dict = dataclasses.asdict(options)
    results["analyze"] = timed(lambda: analyze_lib._analyze_program(
        model.graphdef, model.state, ids_j, mask_j, real_rows, options, jresid.CaptureSpec(), None
    ), repeats)
    no_sequence = dataclasses.replace(options, sequence_complexity=False)
    results["analyze without sequence complexity"] = timed(lambda: analyze_lib._analyze_program(
        model.graphdef, model.state, ids_j, mask_j, real_rows, no_sequence, jresid.CaptureSpec(), None
    ), repeats)
    del option_dict
    return results


def bench_memory(tokens: int, options: MetricOptions) -> dict:
    out = {}
    for layers in (24, 48):
        model = random_model(layers, abstract=True)
        ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
        rows = jax.ShapeDtypeStruct((1,), jnp.int32)
        lowered = analyze_lib._analyze_program.lower(model.graphdef, model.state, ids, ids, rows, options,
                                                     jresid.CaptureSpec(), None)
        stats = lowered.compile().memory_analysis()
        out[layers] = stats
    return out


def bench_compilations(options: MetricOptions) -> tuple[list[int], int]:
    config = Qwen2Config.from_dict(dict(QWEN2_05B, vocab_size=512, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = Model(Qwen2(config, rngs=nnx.Rngs(0)), tokenizer=None, path=None)
    before = analyze_lib.compile_count()
    lengths = [3, 7, 16, 17, 30, 31, 33, 60, 64, 65, 100, 127, 128, 129, 200, 255, 256, 300, 511, 512]
    rng = np.random.default_rng(1)
    for length in lengths:
        jresid.analyze(model, rng.integers(0, 512, size=(1, length)))
    return lengths, analyze_lib.compile_count() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="prompt length in tokens (default: 512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after warm-up (default: 5)")
    args = parser.parse_args()
    options = MetricOptions(sequence_complexity=True)

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    print(f"metric options: {options}")
    print(f"\n1. time at 1 x {args.tokens} tokens, Qwen2-0.5B shape (24 layers, d 896), float32")
    results = bench_time(args.tokens, args.repeats, options)
    base = results["forward (blocks only)"][1]
    for name, (first, median) in results.items():
        print(f"   {name:40s} first call {first:7.2f} s   median {median:7.3f} s   "
              f"ratio to blocks-only forward {median / base:5.3f}")

    print(f"\n2. XLA peak temporary memory of analyze at {args.tokens} tokens")
    for layers, stats in bench_memory(args.tokens, options).items():
        print(f"   {layers} layers: temp {stats.temp_size_in_bytes / 2**20:8.1f} MiB, "
              f"arguments {stats.argument_size_in_bytes / 2**20:8.1f} MiB, "
              f"outputs {stats.output_size_in_bytes / 2**20:6.2f} MiB")

    lengths, compiled = bench_compilations(options)
    print(f"\n3. {len(lengths)} calls with lengths {lengths}: {compiled} compilations "
          f"(buckets {sorted({analyze_lib.bucket_length(n) for n in lengths})})")


if __name__ == "__main__":
    main()
