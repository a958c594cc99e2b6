"""The report of `jresid bench`: FLOP counts, ratios, agreement of the metrics, and tables.

`jresid.bench` runs the workloads. This module computes the time and
memory ratios against TransformerLens and the achieved FLOP/s against the
measured matmul rate from their results, and renders them as text and JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
from typing import TYPE_CHECKING, Any

import numpy as np

from jresid.config import Qwen2Config

if TYPE_CHECKING:
    from jresid.bench import BenchOptions

WORKLOAD_LABELS = {
    "jresid-analyze": "jresid analyze (forward + metrics)",
    "jresid-streamed": "jresid analyze, one block in memory",
    "jresid-forward": "jresid forward (logits)",
    "tl-metrics": "TL run_with_cache + metrics",
    "tl-forward": "TL HookedTransformer forward",
    "bridge-resid": "TL bridge run_with_cache resid",
}

METRIC_NAMES = ("energy", "innovation", "expansion", "complexity")


# ---------------------------------------------------------------------------
# FLOP count


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Floating-point operations of one forward pass, a multiply-add counted as 2.

    Attributes:
        projections: q, k, v and o projections of every block.
        mlp: gate, up and down projections of every block.
        attention: scores `q k^T` and the weighted sum of values, over the
            full `length x length` square that a dense attention computes.
        unembedding: the logits of every position.
    """

    projections: int
    mlp: int
    attention: int
    unembedding: int

    @property
    def blocks(self) -> int:
        """FLOPs of the blocks alone, without the unembedding."""
        return self.projections + self.mlp + self.attention

    @property
    def total(self) -> int:
        return self.blocks + self.unembedding


def forward_flops(config: Qwen2Config, batch: int, length: int) -> FlopCount:
    """Count the matmul FLOPs of a forward pass over `batch x length` tokens from the config.

    Norms, rotary embeddings, softmax, biases and the SwiGLU product are
    elementwise and left out: an estimated 0.2% of the total for the 0.5B
    shape at 512 tokens.
    """
    tokens = batch * length
    width = config.hidden_size
    query_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    layers = config.num_hidden_layers
    projections = 2 * tokens * width * (2 * query_width + 2 * kv_width) * layers
    mlp = 2 * tokens * 3 * width * config.intermediate_size * layers
    attention = 2 * 2 * batch * length * length * query_width * layers
    unembedding = 2 * tokens * width * config.vocab_size
    return FlopCount(projections, mlp, attention, unembedding)


# ---------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class WorkloadResult:
    """One workload at one shape: the worker's JSON, or why it failed or was skipped."""

    workload: str
    batch: int
    length: int
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and bool(self.data)

    @property
    def median_s(self) -> float | None:
        return self.data.get("median_s") if self.ok else None

    @property
    def compile_s(self) -> float | None:
        """First call minus the median call: compilation and one-time set-up."""
        if not self.ok:
            return None
        return max(0.0, self.data["first_s"] - self.data["median_s"])

    @property
    def peak_bytes(self) -> int | None:
        """Peak device memory where reported, else peak host RSS."""
        if not self.ok:
            return None
        return self.data.get("device_peak_bytes") or self.data.get("peak_rss_bytes")


def compare_metric_files(scratch: pathlib.Path, shapes) -> dict[str, dict[str, Any]]:
    """Compare the metrics of `jresid-analyze` and `tl-metrics` where both ran, per shape."""
    agreement = {}
    for batch, length in shapes:
        ours_path = scratch / f"jresid-analyze-{batch}x{length}.metrics.npz"
        theirs_path = scratch / f"tl-metrics-{batch}x{length}.metrics.npz"
        if not (ours_path.is_file() and theirs_path.is_file()):
            continue
        ours, theirs = np.load(ours_path), np.load(theirs_path)
        rows = {}
        for name in METRIC_NAMES:
            a = ours[name].astype(np.float64)
            b = theirs[name].astype(np.float64)
            both = np.isfinite(a) & np.isfinite(b)
            difference = np.abs(a - b)[both]
            # Energy has the model's scale, so its difference is relative.
            if name == "energy":
                difference = difference / np.maximum(np.abs(b[both]), 1e-30)
            rows[name] = {
                "max_difference": float(difference.max()) if difference.size else 0.0,
                "relative": name == "energy",
                "nan_pattern_equal": bool(np.array_equal(np.isnan(a), np.isnan(b))),
                "over_1e-3": int((difference > 1e-3).sum()),
                "values": int(both.sum()),
            }
        agreement[f"{batch}x{length}"] = rows
    return agreement


# ---------------------------------------------------------------------------
# Environment


def load_average() -> float | None:
    """Return the 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Describe the machine and the installed versions, for the report."""
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("jresid", "jax", "jaxlib", "flax", "torch",
                                                       "transformer-lens", "transformers")},
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1 (set by jresid bench)"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
    }


# ---------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class BenchReport:
    """Every workload's result, the matmul rate, and the comparisons built from them."""

    options: BenchOptions
    config: Qwen2Config
    environment: dict[str, Any]
    results: list[WorkloadResult] = dataclasses.field(default_factory=list)
    matmul: WorkloadResult | None = None
    agreement: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    reference_skipped: str | None = None

    @property
    def failed(self) -> bool:
        """True when a workload that ran failed (skipped ones do not count)."""
        results = [*self.results, *([self.matmul] if self.matmul else [])]
        return any(result.error for result in results)

    def result(self, workload: str, batch: int, length: int) -> WorkloadResult | None:
        for result in self.results:
            if (result.workload, result.batch, result.length) == (workload, batch, length):
                return result
        return None

    def matmul_rate(self) -> float | None:
        """Return the square matmul's FLOP/s, or None when it did not run."""
        if self.matmul is None or not self.matmul.ok:
            return None
        return self.matmul.data["square"]["flop_per_s"]

    def comparisons(self, batch: int, length: int) -> dict[str, float | None]:
        """Ratios at one shape; None where a workload is missing."""
        def median(workload):
            result = self.result(workload, batch, length)
            return result.median_s if result else None

        def peak(workload):
            result = self.result(workload, batch, length)
            return result.peak_bytes if result else None

        def ratio(a, b):
            return a / b if a is not None and b else None

        analyze = self.result("jresid-analyze", batch, length)
        param_bytes = analyze.data.get("param_bytes") if analyze and analyze.ok else None
        flops = forward_flops(self.config, batch, length)
        forward = self.result("jresid-forward", batch, length)
        blocks_s = None
        if forward and forward.ok:
            blocks_s = forward.data["parts"]["forward without logits"]["median_s"]
        return {
            "analyze / tl-metrics time": ratio(median("jresid-analyze"), median("tl-metrics")),
            "analyze / bridge-resid time": ratio(median("jresid-analyze"), median("bridge-resid")),
            "analyze / jresid forward time": ratio(median("jresid-analyze"), median("jresid-forward")),
            "analyze / jresid forward without logits time": ratio(median("jresid-analyze"), blocks_s),
            "jresid forward / tl-forward time": ratio(median("jresid-forward"), median("tl-forward")),
            "analyze / tl-metrics peak memory": ratio(peak("jresid-analyze"), peak("tl-metrics")),
            "analyze peak memory / parameter bytes": ratio(peak("jresid-analyze"), param_bytes),
            "streamed analyze / tl-metrics time": ratio(median("jresid-streamed"), median("tl-metrics")),
            "streamed analyze / tl-metrics peak memory": ratio(peak("jresid-streamed"), peak("tl-metrics")),
            "streamed analyze peak memory / parameter bytes": ratio(peak("jresid-streamed"), param_bytes),
            "forward FLOP/s / matmul rate": ratio(ratio(flops.total, median("jresid-forward")), self.matmul_rate()),
            "forward without logits FLOP/s / matmul rate": ratio(ratio(flops.blocks, blocks_s), self.matmul_rate()),
        }

    def achieved_flop_rates(self, batch: int, length: int) -> dict[str, float | None]:
        """FLOP/s of jresid's forward, with and without logits, from `forward_flops`."""
        flops = forward_flops(self.config, batch, length)
        forward = self.result("jresid-forward", batch, length)
        if forward is None or not forward.ok:
            return {"forward": None, "forward without logits": None}
        blocks_s = forward.data["parts"]["forward without logits"]["median_s"]
        return {"forward": flops.total / forward.median_s, "forward without logits": flops.blocks / blocks_s}

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready built-in types."""
        return {
            "options": dataclasses.asdict(self.options),
            "model": {"path": self.options.model, "layers": self.config.num_hidden_layers,
                      "hidden_size": self.config.hidden_size, "heads": self.config.num_attention_heads,
                      "kv_heads": self.config.num_key_value_heads,
                      "intermediate_size": self.config.intermediate_size, "vocab_size": self.config.vocab_size},
            "environment": self.environment,
            "reference_skipped": self.reference_skipped,
            "matmul": None if self.matmul is None else dataclasses.asdict(self.matmul),
            "results": [dataclasses.asdict(result) for result in self.results],
            "comparisons": {f"{b}x{t}": self.comparisons(b, t) for b, t in self.options.shapes},
            "achieved_flop_per_s": {f"{b}x{t}": self.achieved_flop_rates(b, t) for b, t in self.options.shapes},
            "flops": {f"{b}x{t}": dataclasses.asdict(forward_flops(self.config, b, t))
                      for b, t in self.options.shapes},
            "agreement": self.agreement,
            "failed": self.failed,
        }

    def format(self) -> str:
        """Render the report as plain-text tables."""
        return "\n".join(_format_report(self))


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def _load(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _format_report(report: BenchReport) -> list[str]:
    env = report.environment
    config = report.config
    memory = env.get("memory_bytes")
    versions = ", ".join(f"{name} {value}" for name, value in env["versions"].items() if value)
    lines = [
        f"model: {report.options.model} ({config.num_hidden_layers} layers, d_model {config.hidden_size}, "
        f"heads {config.num_attention_heads}/{config.num_key_value_heads}, vocabulary {config.vocab_size})",
        f"dtype {report.options.dtype or 'storage'}, seed {report.options.seed}, "
        f"{report.options.repeats} timed runs after {report.options.warmup} warm-up run(s); times are medians",
        f"machine: {env['cpu']}, {env['cpu_count']} CPU(s), {_gb(memory)} GB RAM",
        f"versions: {versions}",
        f"1-minute load average: {_load(env.get('load_average_before'))} before, "
        f"{_load(env.get('load_average_after'))} after",
    ]
    lines.append("compile s: the first call minus the median. RSS load GB and RSS peak GB: the workload "
                 "process's peak resident memory when the load ends and over the whole run. device GB: peak "
                 "accelerator memory, where the backend reports it.")
    if report.reference_skipped:
        lines.append(f"TransformerLens workloads skipped: {report.reference_skipped}")

    rate = report.matmul_rate()
    if report.matmul is not None:
        lines.append("")
        if report.matmul.ok:
            square = report.matmul.data["square"]
            lines.append(f"matmul ({report.matmul.data['backend']}, {report.matmul.data['device']}, "
                         f"{report.matmul.data['matmul_dtype']}, precision {report.matmul.data['matmul_precision']}):"
                         f" {square['shape'][0]}^3 at {rate / 1e9:.1f} GFLOP/s")
            for label, shape_rate in report.matmul.data["shapes"].items():
                rows, inner, columns = shape_rate["shape"]
                lines.append(f"  {label:<32} [{rows}x{inner}]x[{inner}x{columns}] "
                             f"{shape_rate['flop_per_s'] / 1e9:8.1f} GFLOP/s "
                             f"({shape_rate['flop_per_s'] / rate:.0%} of the square)")
        else:
            lines.append(f"matmul: failed: {report.matmul.error}")

    header = (f"{'workload':<36} {'median s':>9} {'compile s':>9} {'load s':>7} {'tokens/s':>9} "
              f"{'RSS load GB':>11} {'RSS peak GB':>11} {'device GB':>9}")
    for batch, length in report.options.shapes:
        lines += ["", f"shape {batch} x {length} ({batch * length} tokens)", header, "-" * len(header)]
        for workload in report.options.workloads:
            if workload == "matmul":
                continue
            result = report.result(workload, batch, length)
            label = WORKLOAD_LABELS[workload]
            if result is None:
                continue
            if result.skipped:
                lines.append(f"{label:<36} skipped")
                continue
            if result.error:
                lines.append(f"{label:<36} failed: {result.error}")
                continue
            data = result.data
            compile_s = result.compile_s if workload.startswith("jresid") else None
            lines.append(f"{label:<36} {_seconds(result.median_s):>9} {_seconds(compile_s):>9} "
                         f"{data['load_s']:>7.1f} {batch * length / result.median_s:>9.0f} "
                         f"{_gb(data.get('peak_rss_after_load_bytes')):>11} {_gb(data.get('peak_rss_bytes')):>11} "
                         f"{_gb(data.get('device_peak_bytes')):>9}")
            for part, timing in data.get("parts", {}).items():
                lines.append(f"  {part:<34} {_seconds(timing['median_s']):>9}")
        flops = forward_flops(config, batch, length)
        lines.append("")
        lines.append(f"  forward FLOPs (matmuls, counted from the config): {flops.total / 1e9:.4g} G, "
                     f"{flops.blocks / 1e9:.4g} G without logits")
        for name, value in report.achieved_flop_rates(batch, length).items():
            if value is not None:
                lines.append(f"  jresid {name}: {value / 1e9:.1f} GFLOP/s")
        for name, value in report.comparisons(batch, length).items():
            if value is not None:
                lines.append(f"  {name:<48} {value:8.3f}")
        agreement = report.agreement.get(f"{batch}x{length}")
        if agreement:
            cells = ", ".join(f"{name} {row['max_difference']:.1e}{' (relative)' if row['relative'] else ''}"
                              for name, row in agreement.items())
            same_nan = all(row["nan_pattern_equal"] for row in agreement.values())
            lines.append(f"  jresid vs TL metrics, max |difference|: {cells}; "
                         f"NaN positions {'equal' if same_nan else 'DIFFER'}")
    return lines


def write_json(report: BenchReport, path: str | os.PathLike[str]) -> None:
    """Write `report.to_dict()` to `path`."""
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report.to_dict(), handle, indent=2)
