"""Profile `jresid.analyze`: where the time of one call goes, operation by operation.

Usage:
    python benchmarks/profile_analyze.py --model DIR [--shape 1x512] [--top 25] [--no-sequence-complexity]

Runs the analysis twice to compile and warm up, then once under
`jax.profiler.trace`. Then prints the operations of the compiled program
that took the most time in total over the call. Each row gives the number
of executions and, where XLA recorded one, the JAX operation the row came
from, such as `btd,df->btf/dot_general` for an MLP projection. Host
callbacks (`pure_callback`) are the NumPy eigensolvers. Operations inside
the layer loop run once per block.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile

import jax
import numpy as np

import jresid
from jresid.analyze import analyze


def parse_shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise SystemExit(f"--shape {text!r} is invalid; use BATCHxLENGTH such as 1x512")
    return int(match.group(1)), int(match.group(2))


def op_sources(hlo_text: str) -> dict[str, str]:
    """Map each instruction name of the compiled HLO to the JAX operation in its metadata."""
    sources = {}
    pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", re.MULTILINE)
    for name, op_name in pattern.findall(hlo_text):
        # The last two path parts name the operation, such as `btd,df->btf/dot_general`.
        sources[name] = "/".join(op_name.split("/")[-2:])
    return sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--shape", default="1x512", help="BATCHxLENGTH of random token ids (default: 1x512)")
    parser.add_argument("--top", type=int, default=25, help="operations to list (default: 25)")
    parser.add_argument("--no-sequence-complexity", action="store_true", help="leave the sequence complexity out of the profiled analysis")
    args = parser.parse_args()

    batch, length = parse_shape(args.shape)
    model = jresid.from_pretrained(args.model)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(batch, length))
    options = {"sequence_complexity": not args.no_sequence_complexity}
    for _ in range(2):
        analyze(model, ids, **options)

    analyze_module = sys.modules["jresid.analyze"]
    calls = []
    program = analyze_module._analyze_program

    def recording(*call_args, **call_kwargs):
        calls.append(call_args)
        return program(*call_args, **call_kwargs)

    analyze_module._analyze_program = recording
    try:
        with tempfile.TemporaryDirectory() as folder:
            with jax.profiler.trace(folder, create_perfetto_trace=True):
                analyze(model, ids, **options)
            trace_file = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)[0]
            with gzip.open(trace_file) as handle:
                trace = json.load(handle)
    finally:
        analyze_module._analyze_program = program
    sources = op_sources(program.lower(*calls[0]).compile().as_text())

    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total_us = collections.Counter()
    count = collections.Counter()
    call_us = 0.0
    for event in events:
        if event.get("ph") != "X":
            continue
        name = event["name"]
        if name.startswith("$") or "::" in name or name.startswith("Pjit") or name == "shard_args":
            if name.startswith("$") and name.endswith(" analyze"):
                call_us = max(call_us, event.get("dur", 0))
            continue
        total_us[name] += event.get("dur", 0)
        count[name] += 1

    print(f"jresid.analyze at {batch}x{length}, {model.config.num_hidden_layers} blocks, "
          f"jax {jax.__version__}, backend {jax.default_backend()}; call {call_us / 1e6:.3f} s")
    print(f"{'ms':>9} {'runs':>6}  operation (source)")
    for name, micros in total_us.most_common(args.top):
        source = sources.get(name, "")
        print(f"{micros / 1e3:9.1f} {count[name]:6d}  {name} ({source})" if source else
              f"{micros / 1e3:9.1f} {count[name]:6d}  {name}")


if __name__ == "__main__":
    main()
