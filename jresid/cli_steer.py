"""The `jresid steer` command: steer a prompt's continuation toward a mode and show what changed.

It prints the unsteered and steered continuations side by side, then the
per-layer shift of the metrics on the prompt's tokens (steered minus
unsteered). Both runs label modes with the calibration that came with the
directions, so mode shares are comparable.

Every check of the arguments runs before the model's weights are read.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import textwrap

import numpy as np

from jresid.cli import _add_model_arguments, default_model_path

logger = logging.getLogger("jresid")

MODES = ("refinement", "recall", "reasoning")
OPERATIONS = ("add", "scale", "ablate")
POINTS = ("hook_resid_pre", "hook_resid_post")
_COLUMN_WIDTH = 38


class SteerError(ValueError):
    """Invalid input to `jresid steer`; `jresid.cli.main` prints it as one line and exits with status 2.

    A ValueError, so that `main` catches it even when the command line runs
    as `python -m jresid.cli`, where `jresid.cli` is imported twice and its
    CommandError class exists twice.
    """


def add_parser(commands) -> None:
    """Register `steer` on the `jresid` subcommand parsers."""
    steer = commands.add_parser(
        "steer", help="steer a continuation toward a mode and show the metric shift",
        description="Generate a continuation of --prompt with and without an intervention at one layer, print "
                    "both side by side, and print the per-layer shift of every metric's mean and of the mode "
                    "shares on the prompt's tokens (steered minus unsteered). Without --directions, the "
                    "directions come from a built-in set of 96 prompts (32 each of recall, reasoning and "
                    "refinement text in the shipped model's training format), labelled with tercile "
                    "boundaries measured on that set. See docs/steering.md.")

    steer.add_argument("--mode", required=True, metavar="MODE",
                       help="mode to steer toward: refinement, recall or reasoning")
    steer.add_argument("--layer", required=True, type=int, metavar="L", help="block index, 0-based")
    steer.add_argument("--alpha", default="1.0", metavar="A",
                       help="strength, a finite number (default: 1.0). add: multiple of the mode's mean "
                            "difference (or of the learned vector); scale: the subspace component of the "
                            "update is multiplied by 1 + A; ablate: A times that component is removed "
                            "(1 removes it). 0 reproduces the unsteered model")
    steer.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    steer.add_argument("--operation", default="add", metavar="OP",
                       help="add, scale or ablate (default: add)")
    steer.add_argument("--point", default="hook_resid_post", metavar="POINT",
                       help="where an add applies: hook_resid_pre or hook_resid_post of --layer "
                            "(default: hook_resid_post; scale and ablate need hook_resid_post)")

    steer.add_argument("--directions", metavar="FILE",
                       help="directions .npz saved by --save-directions or ModeDirections.save "
                            "(default: derive them from the built-in prompt set, about 10 s for the shipped model)")
    steer.add_argument("--save-directions", metavar="FILE", help="write the directions used to this .npz file")
    steer.add_argument("--rank", type=int, default=4, metavar="K",
                       help="singular directions per mode when deriving directions (default: 4)")

    steer.add_argument("--max-new-tokens", type=int, default=24, metavar="N",
                       help="tokens to generate per continuation (default: 24)")
    steer.add_argument("--temperature", type=float, default=0.0, metavar="T",
                       help="sampling temperature; 0 is greedy (default: 0)")
    steer.add_argument("--top-k", type=int, default=0, metavar="K",
                       help="sample only from the K most likely tokens; 0 keeps all (default: 0)")
    steer.add_argument("--seed", type=int, default=0, help="seed of the sampling key (default: 0)")

    learn = steer.add_argument_group("learned steering vector")
    learn.add_argument("--learn", action="store_true",
                       help="optimise a steering vector toward --mode on the built-in prompts and add it "
                            "(times --alpha) in place of the mean difference; needs --operation add")
    learn.add_argument("--steps", type=int, default=60, metavar="N",
                       help="maximum optimisation steps, each a forward and backward pass over the prompts "
                            "(default: 60)")
    learn.add_argument("--kl-weight", type=float, default=1.0, metavar="W",
                       help="weight in the loss of the KL divergence (nats per token) from the unsteered "
                            "next-token distribution (default: 1.0)")
    learn.add_argument("--max-norm", type=float, default=None, metavar="X",
                       help="norm bound of the learned vector, in residual-stream units (default: the mean "
                            "norm of the residual stream at that point on the prompts)")
    learn.add_argument("--quiet", action="store_true", help="no progress bar while learning")

    _add_model_arguments(steer)
    steer.set_defaults(run=cmd_steer)


def _validate(args: argparse.Namespace) -> float:
    """Check every argument that needs no model; return alpha."""
    if args.mode not in MODES:
        raise SteerError(f"--mode {args.mode!r} is invalid; use one of {', '.join(MODES)}")
    if args.operation not in OPERATIONS:
        raise SteerError(f"--operation {args.operation!r} is invalid; use one of {', '.join(OPERATIONS)}")
    if args.point not in POINTS:
        raise SteerError(f"--point {args.point!r} is invalid; use one of {', '.join(POINTS)}")

    if args.operation != "add" and args.point != "hook_resid_post":
        raise SteerError(f"--operation {args.operation} edits the block's update, so it needs "
                           "--point hook_resid_post")
    try:
        alpha = float(args.alpha)
    except ValueError:
        raise SteerError(f"--alpha {args.alpha!r} is not a number; pass a finite number such as 2.0") from None
    if not math.isfinite(alpha):
        raise SteerError(f"--alpha {args.alpha!r} is not finite; pass a finite number such as 2.0")
    if not args.prompt.strip():
        raise SteerError("the prompt is empty; pass some text to --prompt")

    if args.layer < 0:
        raise SteerError(f"--layer {args.layer} is out of range; use a block index >= 0")
    for name, value, minimum in (("--max-new-tokens", args.max_new_tokens, 1), ("--rank", args.rank, 1),
                                 ("--steps", args.steps, 1), ("--top-k", args.top_k, 0)):
        if value < minimum:
            raise SteerError(f"{name} {value} is invalid; use an integer >= {minimum}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise SteerError(f"--temperature {args.temperature} is invalid; use a finite number >= 0 (0 is greedy)")
    if not math.isfinite(args.kl_weight) or args.kl_weight < 0:
        raise SteerError(f"--kl-weight {args.kl_weight} is invalid; use a finite number >= 0")
    if args.max_norm is not None and (not math.isfinite(args.max_norm) or args.max_norm <= 0):
        raise SteerError(f"--max-norm {args.max_norm} is invalid; use a finite number > 0")
    if args.learn and args.operation != "add":
        raise SteerError("--learn learns a vector to add; use it with --operation add")
    if args.directions is not None and not os.path.isfile(args.directions):
        raise SteerError(f"directions file not found: {args.directions}")
    return alpha


def _check_layer(args: argparse.Namespace) -> None:
    """Read config.json alone and check --layer against the model's depth."""
    from jresid.config import Qwen2Config

    path = args.model or default_model_path()
    if not os.path.isdir(path):
        if args.model is None:
            raise SteerError(f"the shipped model is missing at {path}; pass --model DIR")
        raise SteerError(f"model folder not found: {path}")
    config = Qwen2Config.from_json(path)
    if args.layer >= config.num_hidden_layers:
        raise SteerError(f"--layer {args.layer} is out of range for {path}, which has "
                           f"{config.num_hidden_layers} blocks; use 0 to {config.num_hidden_layers - 1}")


def cmd_steer(args: argparse.Namespace) -> int:
    from jresid.analyze import analyze
    from jresid.cli import _load_model
    from jresid.generate import generate
    from jresid.steering import ModeDirections, builtin_prompts, derive_directions

    alpha = _validate(args)
    _check_layer(args)
    directions = None
    if args.directions is not None:
        directions = ModeDirections.load(args.directions)
        if args.layer not in directions.layers:
            raise SteerError(f"{args.directions} covers layers {list(directions.layers)}, not --layer "
                               f"{args.layer}; pick one of those or omit --directions")
        directions.direction(args.mode, args.layer)  # raises when the mode has no token there

    model = _load_model(args)
    if model.tokenizer is None:
        raise SteerError(f"{model.path} has no tokenizer; steer needs one to read --prompt")
    ids, mask = model.tokenize([args.prompt])
    prompt_tokens = int(mask.sum())
    limit = model.config.max_position_embeddings
    if prompt_tokens + args.max_new_tokens > limit:
        raise SteerError(f"the prompt has {prompt_tokens} tokens; with --max-new-tokens {args.max_new_tokens} "
                           f"that exceeds the model's {limit} positions")

    if directions is None:
        logger.info("deriving directions from the built-in prompt set")
        directions = derive_directions(model, builtin_prompts(), rank=args.rank)
        source = f"derived from {directions.num_prompts} built-in prompts ({directions.total_tokens} tokens)"
    else:
        directions.check_model(model, args.directions)
        source = f"loaded from {args.directions}"
    if args.save_directions:
        directions.save(args.save_directions)

    if args.learn:
        intervention, description = _learned_intervention(args, model, directions, alpha)
    else:
        intervention = directions.intervention(args.mode, args.layer, args.operation, alpha, args.point)
        description = _describe(args, directions, alpha)

    eos = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else None
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    key=args.seed, eos_token_id=eos)
    plain = generate(model, ids, mask, **settings)
    steered = generate(model, ids, mask, interventions=intervention, **settings)

    calibration = directions.calibration
    # The mean table includes the sequence complexity, which costs one T x T eigendecomposition per layer.
    options = dict(directions.options.to_dict(), sequence_complexity=True)
    before = analyze(model, ids, mask, calibration=calibration, **options)
    after = analyze(model, ids, mask, calibration=calibration, interventions=intervention, **options)

    print(f"model: {model.path} ({model.config.num_hidden_layers} layers, d_model {model.config.hidden_size})")
    print(f"steering: {description}")
    print(f"directions: {source}; counts at layer {args.layer}: " + ", ".join(
        f"{mode} {int(count)}" for mode, count in zip(MODES, directions.counts[directions.layers.index(args.layer)])))
    print(f"prompt: {args.prompt}")
    print()
    print(_side_by_side(plain.texts(model.tokenizer)[0], steered.texts(model.tokenizer)[0]))
    print()
    print(f"metric shift on the prompt's {prompt_tokens} tokens (steered minus unsteered; mode shares in "
          "percentage points)")
    print(_shift_table(before, after))
    print()
    changed = int((np.asarray(plain.tokens) != np.asarray(steered.tokens)).sum())
    print(f"{changed} of {args.max_new_tokens} generated tokens differ")
    return 0


def _describe(args, directions, alpha: float) -> str:
    where = f"blocks.{args.layer}.{args.point}"
    if args.operation == "add":
        norm = float(np.linalg.norm(directions.direction(args.mode, args.layer)))
        return f"add {alpha:g} x the {args.mode} mean difference (norm {norm:.4g}) at {where}"
    rank = directions.subspace(args.mode, args.layer).shape[0]
    if args.operation == "scale":
        return (f"scale the update's component in the {args.mode} subspace (rank {rank}) by 1 + {alpha:g} "
                f"at {where}")
    return f"ablate {alpha:g} x the update's component in the {args.mode} subspace (rank {rank}) at {where}"


def _learned_intervention(args, model, directions, alpha: float):
    from tqdm.auto import tqdm

    from jresid.steering import builtin_prompts, learn_steering_vector

    ids, mask = model.tokenize(builtin_prompts())
    bar = tqdm(total=args.steps, unit="step", desc="learning", disable=args.quiet)

    def show(step, record):
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4g}", kl=f"{record['kl']:.3g}")

    try:
        learned = learn_steering_vector(
            model, ids, mask, layer=args.layer, mode=args.mode, calibration=directions.calibration,
            point=args.point, steps=args.steps, kl_weight=args.kl_weight, max_norm=args.max_norm,
            callback=show, options=directions.options)
    except FloatingPointError as error:
        raise SteerError(f"learning the steering vector failed: {error}") from error
    finally:
        bar.close()
    first, last = learned.history[0], min(learned.history, key=lambda record: record["loss"])
    description = (f"add {alpha:g} x a learned {args.mode} vector (norm {np.linalg.norm(learned.vector):.4g}, "
                   f"bound {learned.max_norm:.4g}) at blocks.{args.layer}.{args.point}; loss {first['loss']:.4g} "
                   f"-> {last['loss']:.4g} (signature {last['signature']:.4g}, KL {last['kl']:.4g}) in "
                   f"{len(learned.history)} steps" + (", converged" if learned.converged else ""))
    return learned.intervention(alpha), description


def _wrap(text: str) -> list[str]:
    # Newlines would break the two columns apart, so they show as a visible mark.
    lines = textwrap.wrap(text.replace("\n", " \u21b5 "), _COLUMN_WIDTH) or [""]
    return lines


def _side_by_side(left: str, right: str) -> str:
    left_lines, right_lines = _wrap(left), _wrap(right)
    rows = max(len(left_lines), len(right_lines))
    left_lines += [""] * (rows - len(left_lines))
    right_lines += [""] * (rows - len(right_lines))
    out = [f"{'unsteered':<{_COLUMN_WIDTH}} | steered", f"{'-' * _COLUMN_WIDTH}-+-{'-' * _COLUMN_WIDTH}"]
    out += [f"{a:<{_COLUMN_WIDTH}} | {b}" for a, b in zip(left_lines, right_lines)]
    return "\n".join(out)


def _shift_table(before, after) -> str:
    from jresid.analyze import METRIC_NAMES

    means_before, means_after = before.layer_means(), after.layer_means()
    shares_before, shares_after = before.mode_shares(), after.mode_shares()
    names = before.mode_names
    header = f"{'layer':>5} " + " ".join(f"{name:>11}" for name in METRIC_NAMES) + " " + " ".join(
        f"{name[:12]:>12}" for name in names)
    lines = [header]
    for layer in range(before.num_layers):
        row = f"{layer:>5} " + " ".join(
            f"{means_after[name][layer] - means_before[name][layer]:>+11.4g}" for name in METRIC_NAMES)
        row += " " + " ".join(
            f"{100 * (shares_after[name][layer] - shares_before[name][layer]):>+12.1f}" for name in names)
        lines.append(row)
    return "\n".join(lines)
