"""Train jresid's default model: a small Qwen2 checkpoint on a generated corpus.

    python models/train_default.py --out models/jresid-tiny-qwen2

Steps, each seeded from `--seed`:

1. Generate the training text with `corpus.py` (recall, reasoning and
   refinement episodes).
2. Train a byte-level BPE tokenizer on it with `tokenizers`, with
   `<|endoftext|>` as end-of-text and padding token and no BOS.
3. Train `jresid.model.Qwen2` (Flax NNX) with optax AdamW on windows of the
   token stream, in float32: short windows first, then longer windows with
   fewer rows for the last `--final-steps` steps (same tokens per step).
4. Evaluate train and held-out loss and answer accuracy on fresh prompts of
   every task, write the checkpoint with `jresid.checkpoint.save_pretrained`,
   reload it with `jresid.from_pretrained` and check that its logits match.

The numbers go to the log and to `training_report.json` in the output folder.
On the same machine with the same package versions, the same seed writes the
same `tokenizer.json` and `model.safetensors`. Only the timings in the report
change between runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

MODELS_DIR = pathlib.Path(__file__).resolve().parent
# models/ is not a package: import corpus.py from here, and jresid from this checkout.
sys.path.insert(0, str(MODELS_DIR))
sys.path.insert(1, str(MODELS_DIR.parent))
import corpus  # noqa: E402

from jresid.checkpoint import save_pretrained  # noqa: E402
from jresid.config import Qwen2Config  # noqa: E402
from jresid.model import Qwen2  # noqa: E402
from jresid.pretrained import flat_params, from_pretrained  # noqa: E402

logger = logging.getLogger("train_default")

DEFAULT_OUT = MODELS_DIR / "jresid-tiny-qwen2"
# The BPE trainer stops earlier when the corpus has no more pairs to merge
# (941 tokens for seed 0).
TOKENIZER_VOCAB_SIZE = 1024
TOKENIZER_TRAINING_DOCUMENTS = 20_000

MODEL_FIELDS = dict(
    model_type="qwen2",
    architectures=["Qwen2ForCausalLM"],
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
    use_sliding_window=False,
    # transformers 5.25 rejects a null max_window_layers, which save_pretrained
    # writes when the config leaves it unset. Qwen2 checkpoints set it to the depth.
    max_window_layers=4,
    torch_dtype="float32",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help="checkpoint folder to write (created if missing, files replaced)")
    parser.add_argument("--steps", type=int, default=5000, help="optimizer steps in total")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the corpus, the tokenizer, the initial weights and the batch order")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--final-steps", type=int, default=800,
                        help="last steps that train on --final-seq-len windows")
    parser.add_argument("--final-seq-len", type=int, default=128,
                        help="tokens per training sequence in the last --final-steps steps; the batch "
                             "shrinks so that a step keeps --batch-size times --seq-len tokens")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup-steps", type=int, default=100, help="steps of linear learning-rate warmup")
    parser.add_argument("--weight-decay", type=float, default=0.1,
                        help="AdamW weight decay, applied to kernels and the embedding only")
    parser.add_argument("--eval-examples", type=int, default=256, help="fresh prompts per evaluation task")
    parser.add_argument("--log-every", type=int, default=250, help="steps between progress lines")

    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "final_seq_len", "eval_examples", "log_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.final_steps <= args.steps:
        parser.error(f"--final-steps must be between 0 and --steps={args.steps}, got {args.final_steps}")
    if (args.batch_size * args.seq_len) % args.final_seq_len:
        parser.error(f"--batch-size times --seq-len ({args.batch_size * args.seq_len}) must be a multiple "
                     f"of --final-seq-len={args.final_seq_len}")
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps must be at least 0 and below --steps={args.steps}, got {args.warmup_steps}")
    longest = max(args.seq_len, args.final_seq_len)
    if longest + 1 > MODEL_FIELDS["max_position_embeddings"]:
        parser.error(f"training sequences of {longest} tokens do not fit in "
                     f"max_position_embeddings={MODEL_FIELDS['max_position_embeddings']}")
    return args


# --------------------------------------------------------------------------
# Tokenizer and token stream.
# --------------------------------------------------------------------------


def train_tokenizer(documents: list[str], max_length: int):
    """Train a byte-level BPE tokenizer and return it as a transformers `Qwen2Tokenizer`.

    transformers 5 loads every folder whose config sets `model_type: qwen2`
    with `Qwen2Tokenizer`, which applies Qwen2's NFC normalizer and
    pre-tokenizer (digits one by one) whatever `tokenizer.json` specifies. Training
    with the same normalizer and pre-tokenizer keeps training, evaluation and
    `AutoTokenizer` on one tokenization. Every byte has a token, so any text
    round-trips. `<|endoftext|>` is the end-of-text and padding token, and no
    BOS is added.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[corpus.END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)

    trained = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in trained["merges"]]
    return Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=merges,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def token_stream(tokenizer, documents: list[str]) -> np.ndarray:
    """Encode documents into one int32 stream, each document followed by `<|endoftext|>`."""
    end_id = tokenizer.token_to_id(corpus.END_OF_TEXT)
    pieces = []
    for encoding in tokenizer.encode_batch(documents):
        pieces.append(np.asarray(encoding.ids, dtype=np.int32))
        pieces.append(np.asarray([end_id], dtype=np.int32))
    return np.concatenate(pieces)


def documents_for_tokens(tokens: int, seed: int, split: str, tokens_per_document: float) -> list[str]:
    """Generate enough documents for about `tokens` tokens, plus 10 percent margin."""
    count = int(math.ceil(1.1 * tokens / tokens_per_document)) + 16
    return corpus.generate_documents(count, seed, split)


def split_windows(stream: np.ndarray, length: int, count: int, start: int = 0) -> tuple[np.ndarray, int]:
    """Cut `count` consecutive windows of `length + 1` tokens (inputs plus shifted targets) from `start`.

    Returns the windows `[count, length + 1]` and the offset after the last one.
    """
    if count == 0:
        return np.zeros((0, length + 1), dtype=stream.dtype), start
    end = start + count * length
    if end + 1 > len(stream):
        raise ValueError(f"the token stream has {len(stream)} tokens, but {count} windows of {length} "
                         f"from offset {start} need {end + 1}")
    windows = np.stack([stream[offset:offset + length + 1] for offset in range(start, end, length)])
    return windows, end


# --------------------------------------------------------------------------
# Model, loss and optimizer.
# --------------------------------------------------------------------------


def model_config(vocab_size: int, end_id: int) -> Qwen2Config:
    fields = dict(MODEL_FIELDS, vocab_size=vocab_size, bos_token_id=end_id, eos_token_id=end_id)
    return Qwen2Config.from_dict(fields, source="train_default.py")


def parameter_name(path) -> str:
    return ".".join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))


def decay_mask(params):
    """Select the kernels and the embedding for weight decay; norm gains and biases are left out."""
    def is_decayed(path, _):
        name = parameter_name(path)
        return name.endswith("kernel") or name.endswith("embedding")

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(args) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.learning_rate,
        warmup_steps=args.warmup_steps,
        decay_steps=args.steps,
        end_value=0.1 * args.learning_rate,
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask),
    )
    return optimizer, schedule


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy in nats, over positions with nonzero weight."""
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    if weights_BT is None:
        return losses_BT.mean()
    return (losses_BT * weights_BT).sum() / weights_BT.sum()


def make_train_step(graphdef, optimizer):
    def loss_fn(params, windows_BT):
        module = nnx.merge(graphdef, params)
        logits_BTV = module(windows_BT[:, :-1], None, return_logits=True).logits
        return cross_entropy(logits_BTV, windows_BT[:, 1:])

    @jax.jit
    def train_step(params, opt_state, windows_BT):
        loss, grads = jax.value_and_grad(loss_fn)(params, windows_BT)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def make_forward(graphdef, params):
    """Return a jitted `forward(ids_BT, mask_BT) -> logits_BTV` for fixed parameters."""
    @jax.jit
    def forward(params, ids_BT, mask_BT):
        return nnx.merge(graphdef, params)(ids_BT, mask_BT, return_logits=True).logits

    return lambda ids_BT, mask_BT: forward(params, ids_BT, mask_BT)


def train(args, config: Qwen2Config, phases: list[tuple[np.ndarray, int]]):
    """Train from a seeded random init and return `(graphdef, params, losses, load_averages)`.

    Each phase is `(windows, batch_size)`, run in order until its windows
    are used up once, in a seeded random order. `losses` has one value per
    step. `load_averages` has the 1-minute system load average at each
    progress line, because other processes on the machine change tokens/s.
    """
    module = Qwen2(config, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(module, nnx.Param)
    optimizer, schedule = make_optimizer(args)
    opt_state = optimizer.init(params)
    train_step = make_train_step(graphdef, optimizer)

    rng = np.random.default_rng(args.seed)
    losses, load_averages, pending = [], [], []
    step = 0
    interval_start = time.perf_counter()
    for windows, batch_size in phases:
        order = rng.permutation(len(windows))
        tokens_per_step = batch_size * (windows.shape[1] - 1)
        for first in range(0, len(windows), batch_size):
            batch = windows[order[first:first + batch_size]]
            params, opt_state, loss = train_step(params, opt_state, jnp.asarray(batch))
            pending.append(loss)
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                values = [float(value) for value in pending]
                losses.extend(values)
                elapsed = time.perf_counter() - interval_start
                load_averages.append(os.getloadavg()[0])
                logger.info("step %d/%d  seq_len %d  loss %.4f  lr %.2e  %.0f tokens/s  load %.1f", step, args.steps,
                            windows.shape[1] - 1, np.mean(values), float(schedule(step - 1)),
                            len(values) * tokens_per_step / elapsed, load_averages[-1])
                pending = []
                interval_start = time.perf_counter()
    return graphdef, params, losses, load_averages


# --------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------


def windows_loss(forward, windows: np.ndarray, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy of `forward` over token windows `[N, T + 1]`."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = jnp.asarray(windows[start:start + batch_size])
        mask = jnp.ones(batch[:, :-1].shape, dtype=jnp.int32)
        logits = forward(batch[:, :-1], mask)
        total += float(cross_entropy(logits, batch[:, 1:])) * batch.shape[0]
        count += batch.shape[0]
    return total / count


def encode_example(tokenizer, example: corpus.Example) -> tuple[list[int], int]:
    """Return the token ids of prompt plus answer, and how many of them are the prompt."""
    prompt_ids = tokenizer.encode(example.prompt, add_special_tokens=False)
    full_ids = tokenizer.encode(example.prompt + example.answer, add_special_tokens=False)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError(f"the tokenization of {example.prompt!r} changes when the answer "
                         f"{example.answer!r} follows it, so the answer tokens are not defined")
    return full_ids, len(prompt_ids)


def answer_accuracy(forward, tokenizer, examples: list[corpus.Example], batch_size: int = 64) -> float:
    """Fraction of examples for which greedy decoding after the prompt produces the answer text.

    With the answer fed back in, every answer token being the argmax is the
    same as greedy decoding producing the answer, so one forward pass per
    batch suffices.
    """
    encoded = [encode_example(tokenizer, example) for example in examples]
    # One padded length for all batches, a multiple of 64, so that `forward` compiles once per task.
    length = 64 * math.ceil(max(len(full_ids) for full_ids, _ in encoded) / 64)
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = encoded[start:start + batch_size]
        ids = np.zeros((batch_size, length), dtype=np.int32)
        mask = np.zeros((batch_size, length), dtype=np.int32)
        spans = []
        for row, (full_ids, prompt_length) in enumerate(chunk):
            ids[row, :len(full_ids)] = full_ids
            mask[row, :len(full_ids)] = 1
            spans.append((prompt_length, len(full_ids)))
        mask[len(chunk):, 0] = 1  # unused rows: one real token so that every row is valid
        predicted = np.asarray(jnp.argmax(forward(jnp.asarray(ids), jnp.asarray(mask)), axis=-1))
        for row, (prompt_length, end) in enumerate(spans):
            # The logits at position t predict token t + 1.
            guesses = predicted[row, prompt_length - 1:end - 1]
            targets = ids[row, prompt_length:end]
            # The last answer token may merge with what follows it in the
            # training text (".\n" after "."), so it counts as correct when
            # the predicted token's text starts with the expected text.
            last_matches = tokenizer.decode([int(guesses[-1])]).startswith(tokenizer.decode([int(targets[-1])]))
            if np.array_equal(guesses[:-1], targets[:-1]) and last_matches:
                correct += 1
    return correct / len(examples)


def chance_level(examples: list[corpus.Example]) -> float | None:
    """Accuracy of guessing uniformly among the answers stated in each prompt, or None if not defined."""
    if not all(example.choices for example in examples):
        return None
    return float(np.mean([1.0 / example.choices for example in examples]))


def evaluate_tasks(forward, tokenizer, count: int, seed: int) -> dict[str, dict[str, float | None]]:
    results = {}
    for task in corpus.TASKS:
        examples = corpus.task_examples(task, count, seed)
        accuracy = answer_accuracy(forward, tokenizer, examples)
        results[task] = {"accuracy": accuracy, "chance": chance_level(examples)}
        chance = results[task]["chance"]
        logger.info("task %-24s accuracy %.3f%s", task, accuracy,
                    "" if chance is None else f"  (chance {chance:.3f})")
    return results


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


def machine_description() -> dict[str, object]:
    model_name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model_name,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "optax": optax.__version__,
    }


def save_checkpoint(out: pathlib.Path, params, config: Qwen2Config, tokenizer) -> None:
    arrays = {name: np.asarray(value, dtype=np.float32) for name, value in flat_params(params).items()}
    save_pretrained(arrays, config, out)
    tokenizer.save_pretrained(out)


def check_reload(out: pathlib.Path, forward, tokenizer) -> float:
    """Reload the written folder with jresid and return the largest logit difference to the trained model."""
    model = from_pretrained(out)
    ids = np.asarray([tokenizer.encode(corpus.task_examples("reasoning_word_gain", 1, 0)[0].prompt)], np.int32)
    mask = np.ones_like(ids)
    difference = float(jnp.max(jnp.abs(model.forward(ids, mask) - forward(jnp.asarray(ids), jnp.asarray(mask)))))
    if difference > 1e-5:
        raise RuntimeError(f"the checkpoint reloaded from {out} gives logits {difference:.2e} away from the trained model")
    return difference


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    load_at_start = os.getloadavg()
    timings = {}

    phase = time.perf_counter()
    tokenizer_documents = corpus.generate_documents(TOKENIZER_TRAINING_DOCUMENTS, args.seed, "train")
    tokenizer = train_tokenizer(tokenizer_documents, MODEL_FIELDS["max_position_embeddings"])
    raw_tokenizer = tokenizer.backend_tokenizer
    tokens_per_document = len(token_stream(raw_tokenizer, tokenizer_documents[:2000])) / 2000
    tokens_per_step = args.batch_size * args.seq_len
    train_tokens = args.steps * tokens_per_step
    documents = documents_for_tokens(train_tokens, args.seed, "train", tokens_per_document)
    train_stream = token_stream(raw_tokenizer, documents)
    short_windows, offset = split_windows(train_stream, args.seq_len, (args.steps - args.final_steps) * args.batch_size)
    final_batch_size = tokens_per_step // args.final_seq_len
    final_windows, _ = split_windows(train_stream, args.final_seq_len, args.final_steps * final_batch_size, offset)
    heldout_documents = documents_for_tokens(64 * args.final_seq_len, args.seed, "heldout", tokens_per_document)
    heldout_windows, _ = split_windows(token_stream(raw_tokenizer, heldout_documents), args.final_seq_len, 64)
    end_id = raw_tokenizer.token_to_id(corpus.END_OF_TEXT)
    config = model_config(raw_tokenizer.get_vocab_size(), end_id)
    timings["data_seconds"] = time.perf_counter() - phase
    logger.info("corpus: %d documents, %d tokens; tokenizer: %d tokens; model: %d parameters",
                len(documents), len(train_stream), raw_tokenizer.get_vocab_size(), config.param_count)

    phase = time.perf_counter()
    phases = [(short_windows, args.batch_size), (final_windows, final_batch_size)]
    graphdef, params, losses, load_averages = train(args, config, [p for p in phases if len(p[0])])
    timings["train_seconds"] = time.perf_counter() - phase

    phase = time.perf_counter()
    forward = make_forward(graphdef, params)
    uniform_loss = math.log(raw_tokenizer.get_vocab_size())
    train_loss = windows_loss(forward, final_windows[:64] if len(final_windows) else short_windows[:64])
    heldout_loss = windows_loss(forward, heldout_windows)
    logger.info("loss: train %.4f, held-out %.4f, uniform baseline log(V) %.4f", train_loss, heldout_loss,
                uniform_loss)
    tasks = evaluate_tasks(forward, tokenizer, args.eval_examples, args.seed)
    timings["eval_seconds"] = time.perf_counter() - phase

    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out, params, config, tokenizer)
    reload_difference = check_reload(args.out, forward, tokenizer)
    timings["total_seconds"] = time.perf_counter() - started

    report = {
        "command": "python models/train_default.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "arguments": {key: str(value) if isinstance(value, pathlib.Path) else value
                      for key, value in vars(args).items()},
        "config": config.to_dict(),
        "parameters": config.param_count,
        "tokenizer_vocab_size": raw_tokenizer.get_vocab_size(),
        "train_documents": len(documents),
        "train_tokens_seen": train_tokens,
        "loss": {
            "uniform_log_vocab": uniform_loss,
            "train_last_100_steps": float(np.mean(losses[-100:])),
            "train_final_params": train_loss,
            "heldout": heldout_loss,
            "first_step": losses[0],
        },
        "tasks": tasks,
        "reload_max_logit_difference": reload_difference,
        "timings": timings,
        "load_average_1min": {"start": load_at_start[0], "max_during_training": max(load_averages),
                              "end": os.getloadavg()[0]},
        "machine": machine_description(),
    }
    with open(args.out / "training_report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    logger.info("wrote %s in %.0f s (training %.0f s)", args.out, timings["total_seconds"], timings["train_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
