"""One `jresid bench` workload, run in a fresh Python process.

`jresid bench` starts this module once per workload and shape
(`python -m jresid.bench_worker SPEC.json`), so that each process's peak
memory covers only its own load and runs. The spec names the workload, the
checkpoint, the shape and the repeats; the result is written as JSON to the
spec's `result` path:

- `load_s`: seconds from the start of the load until the parameters are
  ready on the device;
- `first_s`: the first call, which for jresid includes compilation;
- `times_s`: the timed calls, after `warmup` untimed ones;
- `peak_rss_bytes` (and `rss_after_import_bytes`, `peak_rss_after_load_bytes`):
  the process's peak resident set size, read from `/proc/self/status`
  (VmHWM) or `getrusage`;
- `device_peak_bytes`: peak accelerator memory, where the backend reports it;
- `parts`: timings of pieces of the workload, run after the peak was read.

Every workload runs on the same token ids, drawn with `numpy` from `seed`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

JRESID_WORKLOADS = ("jresid-analyze", "jresid-streamed", "jresid-forward", "matmul")
REFERENCE_WORKLOADS = ("tl-metrics", "tl-forward", "bridge-resid")
WORKLOADS = JRESID_WORKLOADS + REFERENCE_WORKLOADS

_RESID_POINTS = ("hook_resid_pre", "hook_resid_post")

# A 4096 x 4096 float32 product is 137 GFLOP: about a second on a 2-core CPU.
DEFAULT_MATMUL_SIZE_CPU = 4096
DEFAULT_MATMUL_SIZE_ACCELERATOR = 8192


# ---------------------------------------------------------------------------
# Measurement helpers


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size in bytes."""
    value = _proc_status_bytes("VmHWM")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # getrusage reports kilobytes on Linux and bytes on macOS.
    return peak if platform.system() == "Darwin" else peak * 1024


def current_rss_bytes() -> int | None:
    """Return this process's resident set size in bytes, or None where /proc is missing."""
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def time_calls(call: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Return the first call's seconds and the seconds of `repeats` calls after `warmup` more.

    `call` must return only once its work is finished (synchronise inside it).
    """
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, times


def _timing(first: float, times: list[float]) -> dict[str, Any]:
    return {"first_s": first, "times_s": times, "median_s": statistics.median(times)}


def token_ids(spec: dict) -> Any:
    """Return the spec's `[batch, length]` int64 token ids, the same in every workload."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    return rng.integers(0, spec["vocab_size"], size=(spec["batch"], spec["length"]), dtype=np.int64)


# ---------------------------------------------------------------------------
# jresid workloads


def _jax_device_peak() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None  # the CPU backend reports no device memory
    return stats.get("peak_bytes_in_use")


def _load_jresid(spec: dict, result: dict):
    import jax

    import jresid

    result["rss_after_import_bytes"] = current_rss_bytes()
    start = time.perf_counter()
    model = jresid.from_pretrained(spec["model"], dtype=spec["dtype"])
    jax.block_until_ready(model.state)
    result["load_s"] = time.perf_counter() - start
    result["peak_rss_after_load_bytes"] = peak_rss_bytes()
    result["param_bytes"] = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(model.state))
    result["backend"] = jax.default_backend()
    result["device"] = str(jax.local_devices()[0].device_kind)
    return model


def run_jresid_analyze(spec: dict, result: dict) -> None:
    """Time `jresid.analyze` with default options: forward, four metrics, sequence complexity, modes."""
    import numpy as np

    import jresid

    model = _load_jresid(spec, result)
    ids = token_ids(spec)
    mask = np.ones_like(ids)
    outputs = {}

    def analysis():
        outputs["result"] = jresid.analyze(model, ids, mask)

    result.update(_timing(*time_calls(analysis, spec["warmup"], spec["repeats"])))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["device_peak_bytes"] = _jax_device_peak()
    if spec.get("metrics_out"):
        analysis_result = outputs["result"]
        np.savez(spec["metrics_out"], **{name: getattr(analysis_result, name)
                                          for name in ("energy", "innovation", "expansion", "complexity")})

    # The four metrics alone, to split the cost of the sequence complexity from the rest.
    def four_metrics():
        jresid.analyze(model, ids, mask, sequence_complexity=False)

    result["parts"] = {"analyze, no sequence complexity":
                       _timing(*time_calls(four_metrics, spec["warmup"], spec["repeats"]))}


def run_jresid_streamed(spec: dict, result: dict) -> None:
    """Time `StreamedModel.analyze` with default options: the analysis reading one block's weights at a time."""
    import jax
    import numpy as np

    import jresid

    result["rss_after_import_bytes"] = current_rss_bytes()
    start = time.perf_counter()
    model = jresid.stream_pretrained(spec["model"], dtype=spec["dtype"])
    result["load_s"] = time.perf_counter() - start
    result["peak_rss_after_load_bytes"] = peak_rss_bytes()
    result["param_bytes"] = model.param_bytes
    result["backend"] = jax.default_backend()
    result["device"] = str(jax.local_devices()[0].device_kind)
    ids = token_ids(spec)
    mask = np.ones_like(ids)
    result.update(_timing(*time_calls(lambda: model.analyze(ids, mask), spec["warmup"], spec["repeats"])))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["device_peak_bytes"] = _jax_device_peak()


def run_jresid_forward(spec: dict, result: dict) -> None:
    """Time `Model.forward` (logits for every position), then the blocks without the unembedding."""
    import functools

    import jax
    import numpy as np
    from flax import nnx

    from jresid.capture import LN_FINAL, CaptureSpec

    model = _load_jresid(spec, result)
    ids = token_ids(spec)
    mask = np.ones_like(ids)

    result.update(_timing(*time_calls(lambda: jax.block_until_ready(model.forward(ids, mask)),
                                      spec["warmup"], spec["repeats"])))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["device_peak_bytes"] = _jax_device_peak()

    # The final norm's output keeps the blocks alive in the compiled program
    # while the [B, T, V] unembedding is left out.
    @functools.partial(jax.jit, static_argnums=0)
    def blocks_only(graphdef, state, ids_BT, mask_BT):
        module = nnx.merge(graphdef, state)
        output = module(ids_BT, mask_BT, capture=CaptureSpec(ln_final=True), return_logits=False)
        return output.captures[LN_FINAL]

    ids_j, mask_j = model.prepare_inputs(ids, mask)
    result["parts"] = {"forward without logits": _timing(*time_calls(
        lambda: jax.block_until_ready(blocks_only(model.graphdef, model.state, ids_j, mask_j)),
        spec["warmup"], spec["repeats"]))}


def run_matmul(spec: dict, result: dict) -> None:
    """Measure jitted matmul rates: one large square product, then the forward's own shapes.

    float32 runs at `Precision.HIGHEST`, as jresid's float32 model does, so
    accelerators do not drop to TF32 or bfloat16 passes.
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(spec["dtype"] or "float32")
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    result["backend"] = jax.default_backend()
    result["device"] = str(jax.local_devices()[0].device_kind)
    result["matmul_dtype"] = dtype.name
    result["matmul_precision"] = precision.name

    def rate(rows: int, inner: int, columns: int) -> dict[str, Any]:
        keys = jax.random.split(jax.random.key(0))
        left = jax.random.normal(keys[0], (rows, inner), dtype)
        right = jax.random.normal(keys[1], (inner, columns), dtype)
        product = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision))
        first, times = time_calls(lambda: product(left, right).block_until_ready(),
                                  spec["warmup"], spec["repeats"])
        median = statistics.median(times)
        return {"shape": [rows, inner, columns], "median_s": median, "first_s": first,
                "flop_per_s": 2.0 * rows * inner * columns / median}

    size = spec.get("matmul_size") or (DEFAULT_MATMUL_SIZE_CPU if jax.default_backend() == "cpu"
                                       else DEFAULT_MATMUL_SIZE_ACCELERATOR)
    result["square"] = rate(size, size, size)
    result["shapes"] = {label: rate(*shape) for label, shape in spec.get("matmul_shapes", {}).items()}
    result["load_s"] = 0.0
    result.update({key: result["square"][key] for key in ("first_s", "median_s")})
    result["times_s"] = [result["square"]["median_s"]]
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["device_peak_bytes"] = _jax_device_peak()


# ---------------------------------------------------------------------------
# TransformerLens workloads


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _torch_device_peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def _load_reference(spec: dict, result: dict, backend: str, use_attn_result: bool):
    import torch

    from jresid import reference

    result["rss_after_import_bytes"] = current_rss_bytes()
    device = _torch_device()
    start = time.perf_counter()
    if backend == "hooked":
        model = reference.load_hooked_transformer(spec["model"], spec["dtype"] or "float32",
                                                  use_attn_result=use_attn_result)
    else:
        model = reference.load_transformer_bridge(spec["model"], spec["dtype"] or "float32",
                                                  use_attn_result=use_attn_result)
    if device != "cpu":
        # NOTE: the accelerator path moves the CPU-built model over; it has
        # not been run on a GPU in this repository's tests.
        model = model.to(device)
    _torch_sync(device)
    result["load_s"] = time.perf_counter() - start
    result["peak_rss_after_load_bytes"] = peak_rss_bytes()
    result["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    result["backend"] = device
    result["torch_threads"] = torch.get_num_threads()
    return model, torch.from_numpy(token_ids(spec)).to(device), device


def run_tl_metrics(spec: dict, result: dict) -> None:
    """Time HookedTransformer `run_with_cache` plus the four metrics in PyTorch (`bench_baseline`)."""
    import numpy as np
    import torch

    from jresid import bench_baseline

    model, ids, device = _load_reference(spec, result, "hooked", use_attn_result=True)
    layers = model.cfg.n_layers
    outputs = {}

    def workflow():
        with torch.inference_mode():
            _, cache = model.run_with_cache(ids, names_filter=bench_baseline.cache_names_filter)
            metrics = bench_baseline.metrics_from_cache(cache, layers)
            outputs["metrics"] = {name: value.float().cpu().numpy() for name, value in metrics.items()}
        _torch_sync(device)

    result.update(_timing(*time_calls(workflow, spec["warmup"], spec["repeats"])))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["device_peak_bytes"] = _torch_device_peak(device)
    if spec.get("metrics_out"):
        np.savez(spec["metrics_out"], **outputs["metrics"])

    # The two halves on their own, to show where the workflow's time goes.
    cached = {}

    def capture():
        with torch.inference_mode():
            cached["cache"] = model.run_with_cache(ids, names_filter=bench_baseline.cache_names_filter)[1]
        _torch_sync(device)

    def metrics_only():
        with torch.inference_mode():
            bench_baseline.metrics_from_cache(cached["cache"], layers)
        _torch_sync(device)

    result["parts"] = {"run_with_cache alone": _timing(*time_calls(capture, spec["warmup"], spec["repeats"])),
                       "metrics alone (PyTorch)": _timing(*time_calls(metrics_only, spec["warmup"],
                                                                      spec["repeats"]))}


def run_tl_forward(spec: dict, result: dict) -> None:
    """Time the HookedTransformer forward pass (logits, no cache, no per-head results)."""
    import torch

    model, ids, device = _load_reference(spec, result, "hooked", use_attn_result=False)

    def forward():
        with torch.inference_mode():
            model(ids)
        _torch_sync(device)

    result.update(_timing(*time_calls(forward, spec["warmup"], spec["repeats"])))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["device_peak_bytes"] = _torch_device_peak(device)


def run_bridge_resid(spec: dict, result: dict) -> None:
    """Time TransformerBridge `run_with_cache` of `hook_resid_pre` and `hook_resid_post` alone."""
    import torch

    model, ids, device = _load_reference(spec, result, "bridge", use_attn_result=False)

    def capture():
        with torch.inference_mode():
            model.run_with_cache(ids, names_filter=lambda name: name.endswith(_RESID_POINTS))
        _torch_sync(device)

    result.update(_timing(*time_calls(capture, spec["warmup"], spec["repeats"])))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["device_peak_bytes"] = _torch_device_peak(device)


RUNNERS = {
    "jresid-analyze": run_jresid_analyze,
    "jresid-streamed": run_jresid_streamed,
    "jresid-forward": run_jresid_forward,
    "matmul": run_matmul,
    "tl-metrics": run_tl_metrics,
    "tl-forward": run_tl_forward,
    "bridge-resid": run_bridge_resid,
}


def main(argv: list[str]) -> int:
    """Run the workload of the spec file `argv[0]` and write its result file."""
    if len(argv) != 1:
        print("usage: python -m jresid.bench_worker SPEC.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        spec = json.load(handle)
    logging.basicConfig(level=logging.INFO if spec.get("verbose") else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result: dict[str, Any] = {"workload": spec["workload"], "batch": spec["batch"], "length": spec["length"]}
    RUNNERS[spec["workload"]](spec, result)
    with open(spec["result"], "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.exit(main(sys.argv[1:]))
