"""Peak host memory while loading a checkpoint of at least 1 GB.

Builds a Qwen2-0.5B-shaped checkpoint with random weights (transformers,
float32, about 2 GB) unless --model points at an existing folder, then loads
it in a fresh Python process and prints that process's peak resident set
size next to the checkpoint size and the parameters' bytes.

    python benchmarks/bench_load.py [--model DIR] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

QWEN2_05B_SHAPE = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
)

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import jax
    import jresid
    start = time.perf_counter()
    model = jresid.from_pretrained(sys.argv[1], dtype=sys.argv[2] or None)
    jax.block_until_ready(model.state)
    seconds = time.perf_counter() - start
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.state))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    baseline = json.loads(sys.argv[3])
    print(json.dumps({"seconds": seconds, "param_bytes": param_bytes, "peak_rss": peak}))
""")

BASELINE = textwrap.dedent("""
    import json, resource
    import jax, jax.numpy as jnp
    import jresid
    jnp.zeros(1).block_until_ready()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def build(folder: pathlib.Path) -> None:
    import torch
    import transformers

    config = transformers.Qwen2Config(**QWEN2_05B_SHAPE)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="1GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="existing checkpoint folder (default: build a 0.5B-shaped one)")
    parser.add_argument("--dtype", default="", help="parameter dtype (default: the storage dtype)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        folder = pathlib.Path(args.model) if args.model else pathlib.Path(scratch) / "qwen2-0.5b-shape"
        if not args.model:
            print(f"building a Qwen2-0.5B-shaped float32 checkpoint in {folder} ...", flush=True)
            subprocess.run([sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
                            f"import bench_load, pathlib; bench_load.build(pathlib.Path({str(folder)!r}))"],
                           check=True)
        files = list(folder.glob("*.safetensors"))
        checkpoint_bytes = sum(f.stat().st_size for f in files)

        baseline = int(subprocess.run([sys.executable, "-c", BASELINE], check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1])
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), args.dtype, json.dumps(baseline)],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])

    gb = 1e9
    print(f"checkpoint files:         {checkpoint_bytes / gb:.2f} GB in {len(files)} file(s)")
    print(f"parameters loaded:        {result['param_bytes'] / gb:.2f} GB")
    print(f"load time:                {result['seconds']:.1f} s")
    print(f"peak RSS, idle jax+jresid: {baseline / gb:.2f} GB")
    print(f"peak RSS during load:     {result['peak_rss'] / gb:.2f} GB")
    extra = result["peak_rss"] - baseline - result["param_bytes"]
    print(f"peak above baseline + parameters: {extra / gb:.2f} GB "
          f"({extra / checkpoint_bytes:.0%} of the checkpoint)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
