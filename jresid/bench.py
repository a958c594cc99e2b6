"""`jresid bench`: jresid against TransformerLens, and against the device's matmul rate.

On one checkpoint, with the same token ids, dtype and shapes, the benchmark
runs these workloads, each in its own process (`jresid.bench_worker`) so
that each peak memory figure covers one load and one workload:

- `jresid-analyze`: `jresid.analyze` with default options (forward pass,
  the four metrics with the component complexity, the sequence complexity
  and the mode labels, in one compiled program);
- `jresid-streamed`: the same analysis through `jresid.stream_pretrained`,
  which reads one block's weights at a time instead of loading the model;
- `jresid-forward`: `Model.forward`, logits for every position;
- `matmul`: a large jitted matmul, the device's measured rate, and the
  forward's own matmul shapes;
- `tl-metrics`: HookedTransformer `run_with_cache` of the four capture
  points the metrics need, then the metrics in plain PyTorch
  (`jresid.bench_baseline`);
- `tl-forward`: the HookedTransformer forward pass;
- `bridge-resid`: TransformerBridge `run_with_cache` of the residual stream
  alone.

The TransformerLens workloads need the `reference` extra and are skipped,
with a note, without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from jresid.bench_worker import (
    DEFAULT_MATMUL_SIZE_ACCELERATOR,
    DEFAULT_MATMUL_SIZE_CPU,
    JRESID_WORKLOADS,
    REFERENCE_WORKLOADS,
    WORKLOADS,
)
from jresid import bench_report
from jresid.bench_report import BenchReport, WorkloadResult, write_json  # noqa: F401  (used by the CLI)
from jresid.config import Qwen2Config

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[reference]'"
DEFAULT_SHAPES = ((1, 512), (4, 256))
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1

# Random checkpoints `--build-random` can write, as transformers Qwen2Config fields.
RANDOM_MODELS = {
    "qwen2-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
}
_BUILD_MARKER = "jresid-bench-random.json"

WORKLOAD_GROUPS = {
    "jresid": JRESID_WORKLOADS,
    "tl": REFERENCE_WORKLOADS,
    "all": WORKLOADS,
}

class BenchError(ValueError):
    """Invalid benchmark input, reported by the command line in one line."""


# ---------------------------------------------------------------------------
# Inputs


def parse_shape(text: str) -> tuple[int, int]:
    """Parse 'BATCHxLENGTH' such as '4x256' into `(4, 256)`.

    Raises:
        BenchError: the text is not two positive integers joined by 'x'.
    """
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise BenchError(f"--shape {text!r} is invalid; use BATCHxLENGTH with positive integers, such as 4x256")
    return int(match.group(1)), int(match.group(2))


def select_workloads(names: list[str] | None) -> tuple[str, ...]:
    """Expand `--only` names and groups into workloads, in the benchmark's fixed order.

    Raises:
        BenchError: an unknown name.
    """
    if not names:
        return WORKLOADS
    chosen: set[str] = set()
    for entry in names:
        for name in (part.strip() for part in entry.split(",")):
            if name in WORKLOAD_GROUPS:
                chosen.update(WORKLOAD_GROUPS[name])
            elif name in WORKLOADS:
                chosen.add(name)
            else:
                allowed = ", ".join([*WORKLOAD_GROUPS, *WORKLOADS])
                raise BenchError(f"--only {name!r} is invalid; use one or more of {allowed}")
    return tuple(name for name in WORKLOADS if name in chosen)


def reference_unavailable_reason() -> str | None:
    """Return why the TransformerLens workloads cannot run, or None when torch and transformer_lens exist."""
    missing = [name for name in ("torch", "transformer_lens") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed; install the reference extra with {INSTALL_HINT}"


# ---------------------------------------------------------------------------
# Random checkpoint


def check_random_model_name(name: str) -> None:
    """Raise `BenchError` unless `name` is a key of `RANDOM_MODELS`."""
    if name not in RANDOM_MODELS:
        raise BenchError(f"--build-random {name!r} is invalid; use one of {', '.join(RANDOM_MODELS)}")


def build_random_checkpoint(name: str, workdir: str | os.PathLike[str], seed: int = 0) -> pathlib.Path:
    """Write a checkpoint of the named shape with random weights, or reuse an earlier one.

    transformers builds and saves the model (float32, its default
    initialisation, `torch.manual_seed(seed)`), in a child process so that
    the roughly 2 GB of the 0.5B shape are freed before any measurement.
    The folder counts as built only once a marker file with the shape and
    seed is written, so an interrupted build is redone.

    Raises:
        BenchError: an unknown name, or torch is missing.
    """
    check_random_model_name(name)
    folder = pathlib.Path(workdir) / f"{name}-random-seed{seed}"
    wanted = {"name": name, "seed": seed, "config": RANDOM_MODELS[name]}
    marker = folder / _BUILD_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == wanted:
                logger.info("reusing the random checkpoint %s", folder)
                return folder
        except (OSError, json.JSONDecodeError):
            logger.warning("unreadable build marker %s; rebuilding", marker)
    if importlib.util.find_spec("torch") is None:
        raise BenchError(f"--build-random needs PyTorch to build the checkpoint with transformers; "
                         f"install the reference extra with {INSTALL_HINT}")

    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=workdir))
    logger.info("building the random checkpoint %s", folder)
    code = ("import json, sys, torch, transformers; "
            "config = transformers.Qwen2Config(**json.loads(sys.argv[1])); "
            "torch.manual_seed(int(sys.argv[2])); "
            "transformers.Qwen2ForCausalLM(config).save_pretrained(sys.argv[3], max_shard_size='1GB')")
    completed = subprocess.run([sys.executable, "-c", code, json.dumps(RANDOM_MODELS[name]), str(seed),
                                str(scratch)], capture_output=True, text=True)
    if completed.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise RuntimeError(f"building the random checkpoint failed: {_last_line(completed.stderr)}")
    (scratch / _BUILD_MARKER).write_text(json.dumps(wanted))
    if folder.exists():
        shutil.rmtree(folder)
    scratch.rename(folder)
    return folder


# ---------------------------------------------------------------------------
# FLOP count


def forward_matmul_shapes(config: Qwen2Config, batch: int, length: int) -> dict[str, tuple[int, int, int]]:
    """Return the forward's main matmuls as `(rows, inner, columns)`, keyed by a label.

    Shapes with the same number of tokens get the same labels, so the
    matmul workload times each distinct shape once.
    """
    tokens = batch * length
    width = config.hidden_size
    return {
        f"{tokens} tokens, q/o projection": (tokens, width, config.num_attention_heads * config.head_dim),
        f"{tokens} tokens, MLP gate/up": (tokens, width, config.intermediate_size),
        f"{tokens} tokens, MLP down": (tokens, config.intermediate_size, width),
        f"{tokens} tokens, unembedding": (tokens, width, config.vocab_size),
    }


# ---------------------------------------------------------------------------
# Running


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """Settings of one benchmark run.

    Attributes:
        model: checkpoint folder.
        shapes: `(batch, length)` pairs.
        repeats: timed calls per workload.
        warmup: untimed calls after the first.
        workloads: which workloads to run, in order.
        dtype: parameter dtype, or None for the checkpoint's storage dtype
            (TransformerLens then uses float32).
        seed: seed of the random token ids.
        matmul_size: side of the square matmul, or None for the backend's
            default (chosen in the worker, so this process never starts an
            accelerator backend that would hold device memory).
        verbose: log details in the workers too.
    """

    model: str
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES
    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    workloads: tuple[str, ...] = WORKLOADS
    dtype: str | None = "float32"
    seed: int = 0
    matmul_size: int | None = None
    verbose: bool = False

    def validate_settings(self) -> None:
        """Raise `BenchError` for settings that are invalid on any checkpoint."""
        if self.repeats < 1:
            raise BenchError(f"--repeats {self.repeats} is invalid; use at least 1")
        if self.warmup < 0:
            raise BenchError(f"--warmup {self.warmup} is invalid; use 0 or more")
        if self.matmul_size is not None and self.matmul_size < 1:
            raise BenchError(f"--matmul-size {self.matmul_size} is invalid; use a positive integer")
        if not self.shapes:
            raise BenchError("no --shape given; pass at least one, such as --shape 1x512")

    def validate(self, config: Qwen2Config) -> None:
        """Raise `BenchError` for settings that cannot run on `config`."""
        self.validate_settings()
        for batch, length in self.shapes:
            if length > config.max_position_embeddings:
                raise BenchError(f"--shape {batch}x{length} is longer than the model's "
                                 f"max_position_embeddings={config.max_position_embeddings}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def run_workload(spec: dict, scratch: pathlib.Path) -> WorkloadResult:
    """Run one workload in a fresh Python process and collect its result file."""
    name = f"{spec['workload']}-{spec['batch']}x{spec['length']}"
    spec = dict(spec, result=str(scratch / f"{name}.result.json"))
    spec_path = scratch / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    # docs/metrics.md: jaxlib's eigensolvers slow down 10 to 50 times when
    # OpenBLAS threads compete with XLA's.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "jresid.bench_worker", str(spec_path)],
                               capture_output=True, text=True, env=env)
    logger.info("%s finished in %.1f s with status %d", name, time.perf_counter() - start, completed.returncode)
    result = WorkloadResult(spec["workload"], spec["batch"], spec["length"])
    if completed.returncode != 0:
        if completed.returncode < 0:
            result.error = f"killed by signal {-completed.returncode} (out of memory?)"
        else:
            result.error = _last_line(completed.stderr)
        logger.warning("%s failed: %s", name, result.error)
        logger.debug("%s stderr:\n%s", name, completed.stderr)
        return result
    result.data = json.loads(pathlib.Path(spec["result"]).read_text())
    return result


def run_bench(options: BenchOptions, progress: Callable[[str], None] | None = None) -> BenchReport:
    """Run every selected workload at every shape and return the report.

    Args:
        options: what to run.
        progress: called with a short line before each workload starts.

    Raises:
        BenchError: invalid options or an unreadable checkpoint config.
    """
    if not os.path.isdir(options.model):
        raise BenchError(f"model folder not found: {options.model}")
    config = Qwen2Config.from_json(options.model)
    options.validate(config)
    skipped_reason = None
    if any(name in REFERENCE_WORKLOADS for name in options.workloads):
        skipped_reason = reference_unavailable_reason()

    report = BenchReport(options=options, config=config, environment=bench_report.environment_info(),
                         reference_skipped=skipped_reason)
    report.environment["load_average_before"] = bench_report.load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jresid-bench-") as scratch_name:
        scratch = pathlib.Path(scratch_name)
        for workload in options.workloads:
            if workload == "matmul":
                report.matmul = _run_matmul(options, config, scratch, progress)
                continue
            for batch, length in options.shapes:
                if workload in REFERENCE_WORKLOADS and skipped_reason:
                    report.results.append(WorkloadResult(workload, batch, length, skipped=skipped_reason))
                    continue
                if progress:
                    progress(f"running {workload} at {batch}x{length} ...")
                metrics_out = scratch / f"{workload}-{batch}x{length}.metrics.npz"
                spec = _spec(options, config, workload, batch, length)
                if workload in ("jresid-analyze", "tl-metrics"):
                    spec["metrics_out"] = str(metrics_out)
                result = run_workload(spec, scratch)
                report.results.append(result)
        report.agreement = bench_report.compare_metric_files(scratch, options.shapes)
    report.environment["load_average_after"] = bench_report.load_average()
    report.environment["bench_seconds"] = time.perf_counter() - started
    return report


def _spec(options: BenchOptions, config: Qwen2Config, workload: str, batch: int, length: int) -> dict:
    return {"workload": workload, "model": options.model, "dtype": options.dtype, "batch": batch,
            "length": length, "repeats": options.repeats, "warmup": options.warmup, "seed": options.seed,
            "vocab_size": config.vocab_size, "verbose": options.verbose}


def _run_matmul(options: BenchOptions, config: Qwen2Config, scratch: pathlib.Path,
                progress: Callable[[str], None] | None) -> WorkloadResult:
    shapes = {}
    for batch, length in options.shapes:
        shapes.update(forward_matmul_shapes(config, batch, length))
    size = options.matmul_size
    if progress:
        progress(f"running matmul ({size or 'default'} square, and the forward's shapes) ...")
    spec = dict(_spec(options, config, "matmul", 0, 0), matmul_size=size, matmul_shapes=shapes)
    # Matmul rates need a warm-up and three samples to be stable, even with --repeats 1.
    spec["repeats"] = max(options.repeats, 3)
    spec["warmup"] = max(options.warmup, 1)
    return run_workload(spec, scratch)


# ---------------------------------------------------------------------------
# Command line


def add_arguments(parser) -> None:
    """Add the `jresid bench` options to an argparse parser."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", default=None,
                        help="Hugging Face checkpoint folder of a Qwen2-family model (default: the shipped "
                             "models/jresid-tiny-qwen2, or $JRESID_DEFAULT_MODEL)")
    source.add_argument("--build-random", metavar="NAME", default=None,
                        help=f"build a checkpoint with random weights of a known shape in --workdir, or reuse "
                             f"the one built before; one of: {', '.join(RANDOM_MODELS)} (qwen2-0.5b is "
                             "about 2 GB in float32)")
    parser.add_argument("--workdir", metavar="DIR", default=os.path.join("runs", "bench"),
                        help="folder for --build-random checkpoints (default: runs/bench)")
    parser.add_argument("--shape", metavar="BxT", action="append", default=None,
                        help="batch size x prompt length in tokens; repeat for several "
                             "(default: --shape 1x512 --shape 4x256)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"timed runs per workload; the median is reported (default: {DEFAULT_REPEATS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help="untimed runs after the first call, which compiles "
                             f"(default: {DEFAULT_WARMUP})")
    parser.add_argument("--only", metavar="NAME", action="append", default=None,
                        help="run only these workloads, comma-separated or repeated: groups "
                             f"{', '.join(WORKLOAD_GROUPS)}, or {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="parameter dtype of every workload (default: float32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random token ids and of --build-random weights (default: 0)")
    parser.add_argument("--matmul-size", type=int, default=None, metavar="N",
                        help=f"side of the square matmul that measures the device's rate, in elements "
                             f"(default: {DEFAULT_MATMUL_SIZE_CPU} on CPU, {DEFAULT_MATMUL_SIZE_ACCELERATOR} on "
                             "accelerators)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the full report as JSON here")


def options_from_args(args, default_model: str, progress: Callable[[str], None] | None = None) -> BenchOptions:
    """Build `BenchOptions` from parsed arguments, building a random checkpoint if asked.

    Args:
        args: the parsed `jresid bench` arguments.
        default_model: checkpoint folder used without --model and --build-random.
        progress: called with a line before a checkpoint build starts.

    Raises:
        BenchError: invalid arguments.
    """
    shapes = tuple(parse_shape(text) for text in args.shape) if args.shape else DEFAULT_SHAPES
    options = BenchOptions(model=args.model or default_model, shapes=shapes, repeats=args.repeats,
                           warmup=args.warmup, workloads=select_workloads(args.only), dtype=args.dtype,
                           seed=args.seed, matmul_size=args.matmul_size,
                           verbose=bool(getattr(args, "verbose", False)))
    # Checked before --build-random spends minutes writing a checkpoint.
    options.validate_settings()
    if args.build_random:
        check_random_model_name(args.build_random)
        if progress:
            progress(f"building or reusing the {args.build_random} random checkpoint in {args.workdir} ...")
        model = build_random_checkpoint(args.build_random, args.workdir, seed=args.seed)
        options = dataclasses.replace(options, model=str(model))
    return options
