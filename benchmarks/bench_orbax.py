"""Restore time of an Orbax checkpoint against loading the same model's safetensors.

Builds a Qwen2-0.5B-shaped checkpoint with random weights (float32, about
2 GB) unless --model points at an existing folder, and converts it once
with `jresid convert`. Then fresh Python processes load each format in turn
with `jresid.from_pretrained` (single device, or --mesh). The script prints
the median wall time and peak resident set size of each format.

    python benchmarks/bench_orbax.py [--model DIR] [--repeats 3] [--mesh data=2,model=4]

The page cache is warm for both formats after the first round, so the
figures compare reading from memory; the first round is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import jax
    import jresid
    from jresid.sharding import mesh_from_spec
    jax.numpy.zeros(1).block_until_ready()
    mesh = mesh_from_spec(sys.argv[2]) if sys.argv[2] else None
    start = time.perf_counter()
    model = jresid.from_pretrained(sys.argv[1], mesh=mesh)
    jax.block_until_ready(model.state)
    seconds = time.perf_counter() - start
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.state))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "param_bytes": param_bytes, "peak_rss": peak}))
""")


def load_once(path: pathlib.Path, mesh: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mesh], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="existing safetensors checkpoint folder (default: build a 0.5B-shaped one)")
    parser.add_argument("--repeats", type=int, default=3, help="loads of each format after the first (default: 3)")
    parser.add_argument("--mesh", default="", help="mesh such as 'data=2,model=4' (default: one device)")
    args = parser.parse_args()

    env = dict(os.environ)
    if args.mesh:
        env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = pathlib.Path(scratch)
        folder = pathlib.Path(args.model) if args.model else scratch / "qwen2-0.5b-shape"
        if not args.model:
            print(f"building a Qwen2-0.5B-shaped float32 checkpoint in {folder} ...", flush=True)
            subprocess.run([sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
                            f"import bench_load, pathlib; bench_load.build(pathlib.Path({str(folder)!r}))"],
                           check=True)
        orbax_folder = scratch / "orbax"
        print(f"converting to {orbax_folder} ...", flush=True)
        subprocess.run([sys.executable, "-m", "jresid.cli", "convert", "--model", str(folder), "--out",
                        str(orbax_folder)], check=True, env=env)

        formats = {"safetensors": folder, "orbax": orbax_folder}
        first = {name: load_once(path, args.mesh, env) for name, path in formats.items()}
        runs = {name: [] for name in formats}
        for _ in range(args.repeats):
            for name, path in formats.items():
                runs[name].append(load_once(path, args.mesh, env))
                print(f"{name}: {runs[name][-1]['seconds']:.2f} s", flush=True)

    gb = 1e9
    print(f"\nmesh: {args.mesh or 'one device'}; parameters {first['orbax']['param_bytes'] / gb:.2f} GB")
    print(f"{'format':<12} {'first load s':>12} {'median s':>9} {'min s':>7} {'peak RSS GB':>12}")
    for name in formats:
        seconds = [r["seconds"] for r in runs[name]]
        peak = max(r["peak_rss"] for r in runs[name])
        print(f"{name:<12} {first[name]['seconds']:>12.2f} {statistics.median(seconds):>9.2f} {min(seconds):>7.2f} "
              f"{peak / gb:>12.2f}")
    ratio = statistics.median(r["seconds"] for r in runs["orbax"]) / statistics.median(
        r["seconds"] for r in runs["safetensors"])
    print(f"orbax / safetensors median time: {ratio:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
