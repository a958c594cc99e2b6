"""The `jresid` command line: parses arguments, calls the library, prints.

Bad input (a missing model folder, an empty prompt, a malformed prompts
file, an output folder of another run) ends with one `jresid: error: ...`
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger("jresid")

DEFAULT_MODEL_ENV = "JRESID_DEFAULT_MODEL"
DEFAULT_MODEL_NAME = "jresid-tiny-qwen2"


def default_model_path() -> str:
    """The shipped model: $JRESID_DEFAULT_MODEL, else models/jresid-tiny-qwen2 next to the package."""
    if os.environ.get(DEFAULT_MODEL_ENV):
        return os.environ[DEFAULT_MODEL_ENV]
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(here), "models", DEFAULT_MODEL_NAME)


class CommandError(Exception):
    """An error the command line reports in one line."""


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", default=None,
                        help="Hugging Face checkpoint folder of a Qwen2-family model "
                             f"(default: the shipped models/{DEFAULT_MODEL_NAME}, or ${DEFAULT_MODEL_ENV})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="parameter dtype (default: the checkpoint's storage dtype)")
    parser.add_argument("--mesh", metavar="SPEC", default=None,
                        help="device mesh such as 'data=2,model=4' (default: one device)")


def _add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (jax.distributed)")
    group.add_argument("--distributed", action="store_true",
                       help="join the other processes with jax.distributed before loading; on a TPU pod slice "
                            "nothing else is needed, elsewhere give the three options below or set "
                            "JRESID_COORDINATOR_ADDRESS, JRESID_NUM_PROCESSES and JRESID_PROCESS_ID")
    group.add_argument("--coordinator-address", metavar="HOST:PORT", default=None,
                       help="address of process 0's coordinator service (implies --distributed)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="number of processes in the run (implies --distributed)")
    group.add_argument("--process-id", type=int, default=None,
                       help="this process's index, from 0 (implies --distributed)")


def _start_distributed(args: argparse.Namespace) -> None:
    given = (args.coordinator_address, args.num_processes, args.process_id)
    if not (args.distributed or any(value is not None for value in given)):
        return
    from jresid import distributed

    distributed.initialize(*given)


def _add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    from jresid.metrics import MetricOptions

    defaults = MetricOptions()
    group = parser.add_argument_group("metric options (see docs/metrics.md)")
    group.add_argument("--history", choices=("window", "full", "ema"), default=defaults.history,
                       help=f"history subspace for expansion (default: {defaults.history})")
    group.add_argument("--window", type=int, default=defaults.window,
                       help=f"positions in the window history, in tokens (default: {defaults.window})")
    group.add_argument("--decay", type=float, default=defaults.decay,
                       help=f"per-token weight decay of the ema history, in (0, 1) (default: {defaults.decay})")
    group.add_argument("--energy-fraction", type=float, default=defaults.energy_fraction,
                       help="share of the ema history's squared norm its subspace keeps, in (0, 1] "
                            f"(default: {defaults.energy_fraction})")
    group.add_argument("--complexity-basis", choices=("components", "window", "sequence"),
                       default=defaults.complexity_basis,
                       help=f"rows of the complexity matrix (default: {defaults.complexity_basis})")
    group.add_argument("--complexity-window", type=int, default=defaults.complexity_window,
                       help=f"updates in the window basis, in tokens (default: {defaults.complexity_window})")
    group.add_argument("--rank-measure", choices=("effective", "numerical", "stable", "participation"),
                       default=defaults.rank_measure, help=f"rank measure (default: {defaults.rank_measure})")
    group.add_argument("--rtol", type=float, default=defaults.rtol,
                       help=f"relative singular value cut-off for spans and numerical rank (default: {defaults.rtol})")
    group.add_argument("--eps", type=float, default=defaults.eps,
                       help=f"update norm at or below which an update has no direction (default: {defaults.eps})")
    parser.add_argument("--calibration", metavar="FILE", default=None,
                        help="mode calibration JSON saved by an earlier run (default: calibrate on this run)")


def _metric_options(args: argparse.Namespace) -> dict:
    return dict(history=args.history, window=args.window, decay=args.decay, energy_fraction=args.energy_fraction,
                complexity_basis=args.complexity_basis, complexity_window=args.complexity_window,
                rank_measure=args.rank_measure, rtol=args.rtol, eps=args.eps)


def _load_model(args: argparse.Namespace):
    import jresid

    path = args.model or default_model_path()
    if not os.path.isdir(path):
        if args.model is None:
            raise CommandError(f"the shipped model is missing at {path}; pass --model DIR or set {DEFAULT_MODEL_ENV}")
        raise CommandError(f"model folder not found: {path}")
    if getattr(args, "stream_blocks", False):
        if args.mesh:
            raise CommandError("--stream-blocks runs on one device; drop --mesh, or drop --stream-blocks "
                               "to shard the loaded model")
        logger.info("opening %s to read one block at a time", path)
        return jresid.stream_pretrained(path, dtype=args.dtype)
    mesh = None
    if getattr(args, "mesh", None):
        from jresid.sharding import mesh_from_spec

        mesh = mesh_from_spec(args.mesh)
    logger.info("loading %s", path)
    return jresid.from_pretrained(path, dtype=args.dtype, mesh=mesh)


def _prompts_from_args(args) -> list:
    from jresid.sweep import Prompt, read_prompts

    if args.prompt is not None:
        if not args.prompt.strip():
            raise CommandError("the prompt is empty; pass some text to --prompt")
        return [Prompt("0", args.prompt, 0)]
    return read_prompts(args.prompts)


def cmd_analyze(args: argparse.Namespace) -> int:
    from jresid import plots, results
    from jresid.analyze import analyze
    from jresid.pretrained import pad_token_ids
    from jresid.sweep import tokenize_prompts

    options = _metric_options(args)
    from jresid.metrics import MetricOptions

    MetricOptions(**options)  # reject bad options before loading the model
    prompts = _prompts_from_args(args)
    model = _load_model(args)
    token_ids = tokenize_prompts(model, prompts)
    ids, mask = pad_token_ids(token_ids, padding_side="right")
    if args.stream_blocks:
        result = model.analyze(ids, mask, calibration=args.calibration, **options)
    else:
        result = analyze(model, ids, mask, calibration=args.calibration, **options)

    prompt_ids = [p.id for p in prompts]
    print(f"model: {model.path} ({model.config.num_hidden_layers} layers, d_model {model.config.hidden_size})")
    print(f"{len(prompts)} prompt(s), {int(result.valid.sum())} tokens")
    print(result.summary_table())

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        results.write_table(results.token_table(result, prompt_ids, model.tokenizer),
                            os.path.join(args.out, "tokens.parquet"))
        results.write_table(results.layer_table(result, prompt_ids), os.path.join(args.out, "layers.parquet"))
        result.calibration.save(os.path.join(args.out, "calibration.json"))
        results.write_json({
            "model": results.model_identity(model),
            "options": result.options.to_dict(),
            "prompts": [{"id": p.id, "prompt": p.text} for p in prompts],
            "stream_blocks": bool(args.stream_blocks),
            "versions": results.versions(),
        }, os.path.join(args.out, "run.json"))
        if not args.no_plots:
            _plot_prompts(result, prompt_ids, model.tokenizer, args.out, plots, results)
        print(f"wrote {args.out}")
    return 0


def _plot_prompts(result, prompt_ids, tokenizer, out, plots, results) -> None:
    from jresid.analyze import METRIC_NAMES

    limit = 20
    for row, prompt_id in enumerate(prompt_ids[:limit]):
        real = result.valid[row]
        _, texts = results.prompt_tokens(result, row, tokenizer)
        values = {name: getattr(result, name)[row][:, real] for name in METRIC_NAMES}
        stem = os.path.join(out, f"prompt-{_safe(prompt_id)}")
        plots.metric_heatmaps(values, texts, stem + "-metrics.png", title=f"prompt {prompt_id}")
        plots.mode_map(result.mode[row][:, real], texts, result.mode_names, stem + "-modes.png",
                       title=f"prompt {prompt_id}: mode per layer and token")
    if len(prompt_ids) > limit:
        logger.info("plotted the first %d of %d prompts", limit, len(prompt_ids))
    masked = {name: getattr(result, name) for name in METRIC_NAMES}
    plots.layer_curves(masked, os.path.join(out, "layer_curves.png"),
                       title="per-layer mean over tokens (band: 10th-90th percentile)")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:60]


def cmd_sweep(args: argparse.Namespace) -> int:
    from jresid.metrics import MetricOptions
    from jresid.sweep import Sweep, read_prompts

    options = _metric_options(args)
    MetricOptions(**options)
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    prompts = read_prompts(args.prompts, jsonl=True)
    if args.stream_blocks and (args.distributed or args.coordinator_address or args.num_processes is not None
                               or args.process_id is not None):
        raise CommandError("--stream-blocks runs in one process; drop the jax.distributed options, or drop "
                           "--stream-blocks to share the sweep between processes")
    _start_distributed(args)
    model = _load_model(args)
    sweep = Sweep(model, prompts, args.out, batch_size=args.batch_size, calibration=args.calibration, **options)
    summary = sweep.run(progress=not args.quiet)
    import jax

    if jax.process_index() != 0:
        return 0
    print(f"{summary['num_prompts']} prompts, {summary['num_tokens']} tokens in {summary['num_batches']} batches; "
          f"results in {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np

    from jresid import reference

    model = _load_model(args)
    if args.prompt:
        if model.tokenizer is None:
            raise CommandError(f"{model.path} has no tokenizer; omit --prompt to compare on random token ids")
        ids, mask = model.tokenize(args.prompt)
    else:
        rng = np.random.default_rng(args.seed)
        ids = rng.integers(0, model.config.vocab_size, size=(1, args.length))
        mask = None
    backends = ("hooked", "bridge") if args.backend == "both" else (args.backend,)
    failed = False
    for backend in backends:
        report = reference.compare_with_transformer_lens(
            model, ids, mask, backend=backend, atol_resid=args.atol, atol_logits=args.atol_logits,
            rtol=args.rtol,
        )
        print(report.format(per_layer=args.per_layer))
        failed |= not report.passed
    return 1 if failed else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jresid import orbax_store

    if os.path.isdir(args.out) and os.listdir(args.out):
        raise CommandError(f"{args.out} exists and is not empty; choose a new folder for the Orbax checkpoint")
    model = _load_model(args)
    orbax_store.save(model, args.out)
    print(f"wrote the Orbax checkpoint {args.out}; load it with --model {args.out} or jresid.from_pretrained")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from jresid import bench

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    options = bench.options_from_args(args, default_model_path(), progress=progress)
    report = bench.run_bench(options, progress=progress)
    print(report.format())
    if args.json:
        bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    return 1 if report.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jresid",
        description="Measure what each transformer block of a Qwen2-family model adds to the residual stream.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = commands.add_parser("analyze", help="analyse one prompt or a file of prompts",
                                  description="Run the model on prompts and print per-layer metric means; "
                                              "with --out, also write tables and plots.")
    source = analyze.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt to analyse")
    source.add_argument("--prompts", metavar="FILE", help="prompts, one per line, or JSONL with id and prompt")
    analyze.add_argument("--out", metavar="DIR", help="write tokens.parquet, layers.parquet, plots and run.json here")
    analyze.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    analyze.add_argument("--stream-blocks", action="store_true",
                         help="read one block's weights at a time instead of loading the model: the peak memory "
                              "is about one block's parameters plus the activations, and each run reads every "
                              "block again, so it is slower")
    _add_model_arguments(analyze)
    _add_metric_arguments(analyze)
    analyze.set_defaults(run=cmd_analyze)

    sweep = commands.add_parser("sweep", help="analyse a JSONL file of prompts, resumably",
                                description="Analyse every prompt of a JSONL file ({\"id\": ..., \"prompt\": ...} "
                                            "per line) in batches, writing one Parquet part per batch. "
                                            "Rerunning the same command resumes where it stopped.")
    sweep.add_argument("prompts", metavar="PROMPTS.jsonl", help="JSONL prompts file")
    sweep.add_argument("--out", metavar="DIR", required=True, help="output folder (created, or resumed)")
    sweep.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.add_argument("--stream-blocks", action="store_true",
                       help="read one block's weights at a time instead of loading the model (one process, "
                            "one device); each batch reads every block again, so it is slower")
    _add_model_arguments(sweep)
    _add_distributed_arguments(sweep)
    _add_metric_arguments(sweep)
    sweep.set_defaults(run=cmd_sweep)

    compare = commands.add_parser("compare", help="check jresid against TransformerLens on a checkpoint",
                                  description="Run TransformerLens (needs the 'reference' extra) and jresid on the "
                                              "same tokens and print the largest difference per capture point. "
                                              "Exits 1 when a difference exceeds its tolerance.")
    compare.add_argument("--backend", choices=("hooked", "bridge", "both"), default="hooked",
                         help="TransformerLens HookedTransformer, TransformerBridge, or both (default: hooked)")
    compare.add_argument("--prompt", metavar="TEXT", help="compare on this text (default: random token ids)")
    compare.add_argument("--length", type=int, default=256, help="random prompt length in tokens (default: 256)")
    compare.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default: 0)")
    compare.add_argument("--atol", type=float, default=1e-5,
                         help="absolute tolerance for activations (default: 1e-5)")
    compare.add_argument("--atol-logits", type=float, default=1e-4,
                         help="absolute tolerance for logits (default: 1e-4)")
    compare.add_argument("--rtol", type=float, default=1e-6,
                         help="relative tolerance, times the largest |value| of each row, added to the "
                              "absolute one (default: 1e-6)")
    compare.add_argument("--per-layer", action="store_true", help="print one row per layer and point")
    _add_model_arguments(compare)
    compare.set_defaults(run=cmd_compare)

    convert = commands.add_parser("convert", help="convert a safetensors checkpoint to an Orbax checkpoint",
                                  description="Write the model's parameters as an Orbax checkpoint, which "
                                              "restores straight into any device mesh.")
    convert.add_argument("--out", metavar="CKPT", required=True, help="new folder for the Orbax checkpoint")
    _add_model_arguments(convert)
    convert.set_defaults(run=cmd_convert)

    from jresid.cli_steer import add_parser as add_steer_parser

    add_steer_parser(commands)

    from jresid.bench import add_arguments as add_bench_arguments

    bench = commands.add_parser("bench", help="time jresid against TransformerLens and the device's matmul rate",
                                description="Time jresid's fused analysis and forward pass, TransformerLens' "
                                            "run_with_cache plus the same metrics in PyTorch, its forward pass, "
                                            "and TransformerBridge, on one checkpoint, with the same tokens and "
                                            "dtype. Each workload runs in its own process; the table gives "
                                            "median times, tokens per second and peak memory. TransformerLens "
                                            "workloads need the 'reference' extra and are skipped without it.")
    add_bench_arguments(bench)
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    # jresid checks prompt lengths itself; transformers' own length warning would be a second line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from jresid.checkpoint import CheckpointError
    from jresid.config import ConfigError

    try:
        return args.run(args)
    except (CommandError, ConfigError, CheckpointError, ValueError, FileNotFoundError, ImportError) as error:
        if args.verbose:
            raise
        print(f"jresid: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jresid: interrupted; rerun the same command to resume a sweep", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
