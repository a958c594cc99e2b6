"""Time the residual update metrics alone, one layer of one sequence.

Usage:
    python benchmarks/bench_metrics.py [--positions 512] [--width 896] [--heads 14]

Each function is jitted, run once to compile, then run `--repeats` times.
The table gives the compile time and the median and minimum run time in
milliseconds. Run it with OPENBLAS_NUM_THREADS=1 (see docs/metrics.md). The slow histories ("full", and "ema" with a slowly decaying
weight) run `--slow-repeats` times. The inputs are synthetic: a rank-32
signal plus noise, with a first token 1000 times larger than the rest, as
Qwen2 layers often have.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jresid.metrics import (
    MetricOptions,
    complexity_components,
    complexity_from_gram,
    complexity_sequence,
    complexity_window,
    component_gram,
    energy,
    expansion,
    innovation,
    layer_metrics,
)


def make_inputs(positions: int, width: int, heads: int, seed: int = 0):
    """Return synthetic updates [T, D], components [T, H + 1, D] and a valid mask."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(positions, 32)) @ rng.normal(size=(32, width))
    components = rng.normal(size=(positions, heads + 1, width)).astype(np.float32)
    components[:, :, :] += 0.1 * signal[:, None, :].astype(np.float32)
    components[0] *= 1000.0
    updates = components.sum(axis=1)
    valid = np.ones(positions, dtype=bool)
    return jnp.asarray(updates), jnp.asarray(components), jnp.asarray(valid)


def time_function(fn, args, repeats: int) -> tuple[float, float, float]:
    """Return (compile seconds, median ms, min ms) of a jitted call."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_seconds = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append((time.perf_counter() - start) * 1e3)
    return compile_seconds, statistics.median(runs), min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=512, help="sequence length T")
    parser.add_argument("--width", type=int, default=896, help="model width D")
    parser.add_argument("--heads", type=int, default=14, help="attention heads H")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per fast function")
    parser.add_argument("--slow-repeats", type=int, default=2, help="timed runs per slow history")
    parser.add_argument("--skip-slow", action="store_true", help="skip the 'full' and 'ema' histories")
    args = parser.parse_args()

    updates, components, valid = make_inputs(args.positions, args.width, args.heads)
    defaults = MetricOptions()
    gram = jax.jit(component_gram)(components)

    cases = [
        ("energy", jax.jit(lambda u, v: energy(u, v)), (updates, valid), args.repeats),
        (
            f"innovation window={defaults.window}",
            jax.jit(lambda u, v: innovation(u, v, window=defaults.window)),
            (updates, valid),
            args.repeats,
        ),
        (
            "innovation window=None",
            jax.jit(lambda u, v: innovation(u, v, window=None)),
            (updates, valid),
            args.repeats,
        ),
    ]
    for window in sorted({4, 8, 16, defaults.window}):
        cases.append(
            (
                f"expansion window={window}",
                jax.jit(lambda u, v, w=window: expansion(u, v, history="window", window=w)),
                (updates, valid),
                args.repeats,
            )
        )
    cases += [
        ("component_gram", jax.jit(component_gram), (components,), args.repeats),
        (
            "complexity_from_gram effective",
            jax.jit(lambda g, v: complexity_from_gram(g, v)),
            (gram, valid),
            args.repeats,
        ),
        (
            "complexity_components effective",
            jax.jit(lambda c, v: complexity_components(c, v)),
            (components, valid),
            args.repeats,
        ),
        (
            f"complexity_window window={defaults.complexity_window}",
            jax.jit(lambda u, v: complexity_window(u, v, window=defaults.complexity_window)),
            (updates, valid),
            args.repeats,
        ),
        (
            "complexity_sequence effective",
            jax.jit(lambda u, v: complexity_sequence(u, v)),
            (updates, valid),
            args.repeats,
        ),
        (
            "layer_metrics defaults, from component Gram",
            jax.jit(lambda u, v, g: layer_metrics(u, v, None, defaults, component_gram_TRR=g)),
            (updates, valid, gram),
            args.repeats,
        ),
        (
            "layer_metrics defaults, from components",
            jax.jit(lambda u, v, c: layer_metrics(u, v, c, defaults)),
            (updates, valid, components),
            args.repeats,
        ),
        (
            "layer_metrics defaults + sequence_complexity",
            jax.jit(
                lambda u, v, g: layer_metrics(
                    u, v, None, MetricOptions(sequence_complexity=True), component_gram_TRR=g
                )
            ),
            (updates, valid, gram),
            args.repeats,
        ),
    ]
    if not args.skip_slow:
        for decay in (0.5, 0.8, 0.9):
            cases.append(
                (
                    f"expansion ema decay={decay}",
                    jax.jit(lambda u, v, d=decay: expansion(u, v, history="ema", decay=d)),
                    (updates, valid),
                    args.slow_repeats,
                )
            )
        cases.append(
            (
                "expansion full",
                jax.jit(lambda u, v: expansion(u, v, history="full")),
                (updates, valid),
                args.slow_repeats,
            )
        )

    print(
        f"T={args.positions} D={args.width} H={args.heads} float32, jax {jax.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"backend {jax.default_backend()}"
    )
    print(f"{'function':<48} {'compile s':>10} {'median ms':>10} {'min ms':>10}")
    for name, fn, fn_args, repeats in cases:
        compile_seconds, median_ms, min_ms = time_function(fn, fn_args, repeats)
        print(f"{name:<48} {compile_seconds:>10.2f} {median_ms:>10.2f} {min_ms:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
