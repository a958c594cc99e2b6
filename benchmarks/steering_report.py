"""Measure how far steering toward each mode moves that mode's metrics and token share.

Derives directions from the built-in prompt set (seed 0), then steers a
held-out set drawn with another seed and compares each steered run with the
unsteered one, both labelled with the directions' calibration:

* for every mode, layer and operation (add at several alphas, scale, ablate):
  the change of the mode's share of tokens and of the mean energy (in % of
  the unsteered mean), expansion and complexity. These are averaged over the
  layers the intervention can change. Also the mean KL divergence of the
  next-token distribution from the unsteered one;
* learned vectors (one per mode at one layer): the loss before and after,
  and the same shifts on the held-out set;
* greedy continuations of a few prompts, unsteered and steered.

Writes the tables to stdout (Markdown) and every number to --json.

    .venv/bin/python benchmarks/steering_report.py --json runs/steering_report.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import jax
import numpy as np

import jresid
from jresid.analyze import analyze
from jresid.cli import default_model_path
from jresid.generate import generate
from jresid.steering import STEERABLE_MODES, builtin_prompts, derive_directions, learn_steering_vector

logger = logging.getLogger("steering_report")

ADD_ALPHAS = (0.5, 1.0, 2.0, 4.0)
SCALE_ALPHAS = (1.0, 3.0)
EXAMPLES = (
    "Ana lives in Oslo. Ben lives in Lima. Where does Ben live?",
    "7 + 5 =",
    "List: sun moon tree. Again:",
    "Alice has 3 apples. Bob gives her 4 more. Now Alice has",
)


def affected_layers(operation: str, layer: int, num_layers: int) -> list[int]:
    """Layers whose updates the intervention can change: later ones for add, this one too for scale/ablate."""
    return list(range(layer if operation != "add" else layer + 1, num_layers))


def mean_kl(model, ids, mask, intervention) -> float:
    """Mean KL divergence (nats per token) of the steered next-token distribution from the unsteered one."""
    plain = np.asarray(model.forward(ids, mask), dtype=np.float64)
    steered = np.asarray(model.forward(ids, mask, interventions=intervention), dtype=np.float64)
    log_p = plain - np.logaddexp.reduce(plain, axis=-1, keepdims=True)
    log_q = steered - np.logaddexp.reduce(steered, axis=-1, keepdims=True)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return float(kl[mask.astype(bool)].mean())


def shifts(before, after, mode: str, layers: list[int]) -> dict[str, float]:
    """Mean over `layers` of the changes of the mode's share and of each metric's mean."""
    shares_before, shares_after = before.mode_shares(), after.mode_shares()
    means_before, means_after = before.layer_means(), after.layer_means()
    energy_change = [(means_after["energy"][j] - means_before["energy"][j]) / means_before["energy"][j]
                     for j in layers]
    return {
        "share_before_pct": float(100 * np.mean([shares_before[mode][j] for j in layers])),
        "share_change_pp": float(100 * np.mean([shares_after[mode][j] - shares_before[mode][j] for j in layers])),
        "energy_change_pct": float(100 * np.mean(energy_change)),
        "expansion_change": float(np.mean([means_after["expansion"][j] - means_before["expansion"][j]
                                           for j in layers])),
        "complexity_change": float(np.mean([means_after["complexity"][j] - means_before["complexity"][j]
                                            for j in layers])),
    }


def format_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_model_path(), help="checkpoint folder (default: the shipped model)")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    parser.add_argument("--learn-steps", type=int, default=60, help="steps per learned vector (default: 60)")
    parser.add_argument("--learn-layer", type=int, default=1, help="layer of the learned vectors (default: 1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()

    model = jresid.from_pretrained(args.model)
    num_layers = model.config.num_hidden_layers
    directions = derive_directions(model, builtin_prompts(seed=0))
    held_out = builtin_prompts(per_kind=16, seed=1)
    ids, mask = model.tokenize(held_out)
    calibration = directions.calibration
    options = directions.options.to_dict()
    plain = analyze(model, ids, mask, calibration=calibration, **options)
    report = {
        "model": args.model,
        "direction_prompts": directions.num_prompts,
        "direction_tokens": directions.total_tokens,
        "held_out_prompts": len(held_out),
        "held_out_tokens": int(mask.sum()),
        "counts": {f"layer {layer}": dict(zip(STEERABLE_MODES, directions.counts[slot].tolist()))
                   for slot, layer in enumerate(directions.layers)},
        "unsteered_shares": {mode: plain.mode_shares()[mode].tolist() for mode in STEERABLE_MODES},
        "rows": [],
        "learned": [],
        "examples": [],
    }

    print(f"# Steering report: {args.model}\n")
    print(f"Directions from {directions.num_prompts} built-in prompts ({directions.total_tokens} tokens); "
          f"measured on {len(held_out)} held-out prompts ({int(mask.sum())} tokens).\n")
    print("Tokens per mode behind the directions:\n")
    print(format_row(["layer", *STEERABLE_MODES]))
    print(format_row(["---"] * 4))
    for slot, layer in enumerate(directions.layers):
        print(format_row([str(layer), *(str(int(c)) for c in directions.counts[slot])]))
    print()

    settings = [("add", alpha) for alpha in ADD_ALPHAS] + [("scale", alpha) for alpha in SCALE_ALPHAS]
    settings.append(("ablate", 1.0))
    for mode in STEERABLE_MODES:
        print(f"## Toward {mode}\n")
        print(format_row(["operation", "layer", "alpha", "share before (%)", "share change (pp)",
                          "energy change (%)", "expansion change", "complexity change", "KL (nats/token)"]))
        print(format_row(["---"] * 9))
        for layer in range(num_layers):
            for operation, alpha in settings:
                layers = affected_layers(operation, layer, num_layers)
                if not layers:
                    continue
                try:
                    intervention = directions.intervention(mode, layer, operation, alpha)
                except ValueError as error:
                    logger.info("skipped %s %s at layer %d: %s", mode, operation, layer, error)
                    continue
                steered = analyze(model, ids, mask, calibration=calibration, interventions=intervention, **options)
                row = {"mode": mode, "operation": operation, "layer": layer, "alpha": alpha,
                       **shifts(plain, steered, mode, layers), "kl": mean_kl(model, ids, mask, intervention)}
                report["rows"].append(row)
                print(format_row([operation, str(layer), f"{alpha:g}", f"{row['share_before_pct']:.1f}",
                                  f"{row['share_change_pp']:+.1f}", f"{row['energy_change_pct']:+.1f}",
                                  f"{row['expansion_change']:+.4f}", f"{row['complexity_change']:+.3f}",
                                  f"{row['kl']:.3f}"]))
        print()

    print(f"## Learned vectors at blocks.{args.learn_layer}.hook_resid_post\n")
    print(format_row(["mode", "steps", "loss before", "loss after", "signature after", "KL after", "norm / bound",
                      "held-out share change (pp)", "energy (%)", "expansion", "complexity"]))
    print(format_row(["---"] * 11))
    train_ids, train_mask = model.tokenize(builtin_prompts(seed=0))
    for mode in STEERABLE_MODES:
        learned = learn_steering_vector(model, train_ids, train_mask, layer=args.learn_layer, mode=mode,
                                        calibration=calibration, steps=args.learn_steps, options=directions.options)
        best = min(learned.history, key=lambda record: record["loss"])
        intervention = learned.intervention()
        steered = analyze(model, ids, mask, calibration=calibration, interventions=intervention, **options)
        layers = affected_layers("add", args.learn_layer, num_layers)
        row = {"mode": mode, "steps": len(learned.history), "loss_before": learned.history[0]["loss"],
               "loss_after": best["loss"], "signature_after": best["signature"], "kl_after": best["kl"],
               "norm": float(np.linalg.norm(learned.vector)), "max_norm": learned.max_norm,
               "converged": learned.converged, **shifts(plain, steered, mode, layers),
               "held_out_kl": mean_kl(model, ids, mask, intervention)}
        report["learned"].append(row)
        print(format_row([mode, str(row["steps"]), f"{row['loss_before']:.3f}", f"{row['loss_after']:.3f}",
                          f"{row['signature_after']:.3f}", f"{row['kl_after']:.3f}",
                          f"{row['norm']:.1f} / {row['max_norm']:.1f}", f"{row['share_change_pp']:+.1f}",
                          f"{row['energy_change_pct']:+.1f}", f"{row['expansion_change']:+.4f}",
                          f"{row['complexity_change']:+.3f}"]))
    print()

    print("## Continuations (greedy, 16 tokens)\n")
    example_ids, example_mask = model.tokenize(list(EXAMPLES))
    eos = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else None
    plain_texts = generate(model, example_ids, example_mask, max_new_tokens=16, eos_token_id=eos).texts(
        model.tokenizer)
    for mode, layer, alpha in (("reasoning", 1, 2.0), ("recall", 1, 2.0), ("refinement", 2, 4.0)):
        intervention = directions.intervention(mode, layer, "add", alpha)
        texts = generate(model, example_ids, example_mask, max_new_tokens=16, eos_token_id=eos,
                         interventions=intervention).texts(model.tokenizer)
        print(f"add {alpha:g} x {mode} mean difference at layer {layer}:\n")
        for prompt, before, after in zip(EXAMPLES, plain_texts, texts):
            report["examples"].append({"mode": mode, "layer": layer, "alpha": alpha, "prompt": prompt,
                                       "unsteered": before, "steered": after})
            print(f"- `{prompt}` unsteered `{before!r}`, steered `{after!r}`")
        print()

    elapsed = time.perf_counter() - started
    report["seconds"] = elapsed
    report["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()}
    print(f"Took {elapsed:.0f} s on {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs), "
          f"JAX {jax.__version__} ({jax.default_backend()}).")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
