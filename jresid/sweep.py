"""Resumable sweeps over many prompts, written one Parquet part per batch.

Layout of a sweep's output folder:

    manifest.json          model, options, batch size and a hash of the prompts
    calibration.json       tercile boundaries used for every mode label
    tokens/part-NNNNN.parquet   per-token rows of batch NNNNN
    layers/part-NNNNN.parquet   per-layer rows of batch NNNNN
    summary.json, layer_curves.png   written when every batch is done

The batch plan is a pure function of the prompts and the batch size (prompts
sorted by token count, then cut into batches), and each part is written
atomically, so a crash loses at most the batch in flight and rerunning the
same command skips finished parts and ends with the same files as an
uninterrupted run. Mode labels use one calibration for the whole sweep: the
one given, or else the one computed on the first batch, saved before any
part is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from jresid import distributed
from jresid import modes as modes_lib
from jresid.analyze import METRIC_NAMES, analyze
from jresid.metrics import MetricOptions
from jresid.results import layer_table, model_identity, token_table, versions, write_json, write_table

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class SweepError(ValueError):
    """Bad prompts or an output folder that belongs to another sweep."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    line: int


def read_prompts(path: str, *, jsonl: bool | None = None) -> list[Prompt]:
    """Read prompts from a JSONL file (`{"id": ..., "prompt": ...}` per line) or a text file (one per line).

    Blank lines are skipped. In a text file, a prompt's id is its line number.

    Raises:
        SweepError: a malformed line, a missing or empty prompt, or a repeated
            id, naming the line.
    """
    if not os.path.isfile(path):
        raise SweepError(f"prompts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if jsonl is None:
        first = next((line for line in lines if line.strip()), "")
        jsonl = path.endswith(".jsonl") or first.lstrip().startswith("{")

    prompts = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if jsonl:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SweepError(f"{path}:{number}: invalid JSON ({error.msg}); each line must be "
                                 '{"id": ..., "prompt": ...}') from None
            if not isinstance(record, dict) or "prompt" not in record:
                raise SweepError(f'{path}:{number}: missing "prompt"; each line must be {{"id": ..., "prompt": ...}}')
            text = record["prompt"]
            prompt_id = str(record.get("id", number))
            if not isinstance(text, str):
                raise SweepError(f'{path}:{number}: "prompt" must be a string, got {type(text).__name__}')
        else:
            text, prompt_id = line, str(number)
        if not text.strip():
            raise SweepError(f"{path}:{number}: the prompt is empty")
        if prompt_id in seen:
            raise SweepError(f"{path}:{number}: id {prompt_id!r} repeats the id of line {seen[prompt_id]}")
        seen[prompt_id] = number
        prompts.append(Prompt(prompt_id, text, number))
    if not prompts:
        raise SweepError(f"{path} holds no prompts")
    return prompts


def encode_prompt(model, prompt: Prompt) -> list[int]:
    """Tokenise one prompt and check its length."""
    ids = model.tokenizer(prompt.text, add_special_tokens=True)["input_ids"]
    if not ids:
        raise SweepError(f"prompt {prompt.id!r} (line {prompt.line}) has no tokens")
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise SweepError(f"prompt {prompt.id!r} (line {prompt.line}) has {len(ids)} tokens, more than the "
                         f"model's context of {limit} (max_position_embeddings); shorten it")
    return ids


def tokenize_prompts(model, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Tokenise every prompt and check its length before any compute.

    With several processes, each tokenises its share (every
    process_count-th prompt) and the token ids are exchanged, so that every
    process plans the same batches.
    """
    if model.tokenizer is None:
        raise SweepError(f"the model at {model.path} has no tokenizer files; a sweep needs text prompts tokenised")
    local = {}
    for index in distributed.share_of(len(prompts)):
        try:
            local[index] = encode_prompt(model, prompts[index])
        except SweepError:
            if jax.process_count() == 1:
                raise
            local[index] = None
    encoded = distributed.allgather_sequences(local, len(prompts))
    for index, ids in enumerate(encoded):
        if ids is None:
            encode_prompt(model, prompts[index])  # raises the same error on every process
    return encoded


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group prompt indices into batches of similar length, in a fixed order."""
    if batch_size < 1:
        raise SweepError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps([prompt.id, prompt.text]).encode())
    return digest.hexdigest()


class Sweep:
    """A sweep of `prompts` through `model`, writing into `out`.

    Args:
        model: a `Model` from `jresid.from_pretrained`, or a `StreamedModel`
            from `jresid.stream_pretrained` (one block's weights at a time).
        calibration: a `Calibration` (or its file) used for every batch;
            `None` calibrates on the first batch.
        options: metric options, as for `jresid.analyze`.
    """

    def __init__(self, model, prompts: Sequence[Prompt], out: str, *, batch_size: int = 8,
                 calibration: modes_lib.Calibration | str | None = None, **options):
        self.model = model
        self.prompts = list(prompts)
        self.out = out
        self.batch_size = batch_size
        self.options = MetricOptions(**options)
        if isinstance(calibration, str):
            calibration = modes_lib.Calibration.load(calibration)
        self.given_calibration = calibration
        self.token_ids = tokenize_prompts(model, self.prompts)
        self.batches = plan_batches([len(ids) for ids in self.token_ids], batch_size)

    def manifest(self) -> dict:
        return {
            "format_version": MANIFEST_VERSION,
            "model": model_identity(self.model),
            "options": self.options.to_dict(),
            "batch_size": self.batch_size,
            "num_prompts": len(self.prompts),
            "num_batches": len(self.batches),
            "prompts_sha256": prompts_digest(self.prompts),
            "calibration": "given" if self.given_calibration is not None else "first batch",
        }

    def _check_folder(self) -> None:
        """Create the folder, or check that it contains an earlier run of this same sweep.

        With several processes, process 0 owns the folder and broadcasts
        to the others whether it may be used.
        """
        problem = None
        if distributed.is_main_process():
            try:
                self._check_folder_here()
            except SweepError as error:
                problem = str(error)
        problem = distributed.broadcast_json(problem)
        if problem:
            raise SweepError(problem)

    def _check_folder_here(self) -> None:
        path = os.path.join(self.out, "manifest.json")
        expected = self.manifest()
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                found = json.load(f)
            for key in ("format_version", "model", "options", "batch_size", "prompts_sha256", "calibration"):
                if found.get(key) != expected[key]:
                    raise SweepError(
                        f"{self.out} holds results of a different sweep: its {key} is {found.get(key)!r}, this "
                        f"run's is {expected[key]!r}. Use another --out folder, or rerun with the same model, "
                        "prompts and options to resume."
                    )
            return
        if os.path.isdir(self.out) and os.listdir(self.out):
            raise SweepError(f"{self.out} is not empty and holds no sweep manifest; choose an empty or new --out folder")
        write_json({**expected, "versions": versions()}, path)

    def part_path(self, kind: str, index: int) -> str:
        return os.path.join(self.out, kind, f"part-{index:05d}.parquet")

    def is_done(self, index: int) -> bool:
        return os.path.isfile(self.part_path("tokens", index)) and os.path.isfile(self.part_path("layers", index))

    def run(self, progress: bool = True) -> dict:
        """Run every batch not yet written; return the summary."""
        from tqdm.auto import tqdm

        self._check_folder()
        calibration = self._calibration()
        pending = distributed.broadcast_json(
            [i for i in range(len(self.batches)) if not self.is_done(i)] if distributed.is_main_process() else None
        )
        progress = progress and distributed.is_main_process()
        if len(pending) < len(self.batches):
            logger.info("resuming: %d of %d batches already written", len(self.batches) - len(pending),
                        len(self.batches))
        total_tokens = sum(len(self.token_ids[i]) for b in pending for i in self.batches[b])
        bar = tqdm(total=total_tokens, unit="tok", disable=not progress, desc="sweep", smoothing=0.1)
        start = time.perf_counter()
        done_tokens = 0
        try:
            for index in pending:
                calibration = self._run_batch(index, calibration)
                tokens = sum(len(self.token_ids[i]) for i in self.batches[index])
                done_tokens += tokens
                bar.update(tokens)
                rate = done_tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(batch=f"{index + 1}/{len(self.batches)}", tok_per_s=f"{rate:.0f}")
                logger.debug("batch %d written (%d tokens)", index, tokens)
        finally:
            bar.close()
        return distributed.broadcast_json(self._finish() if distributed.is_main_process() else None)

    def _calibration(self) -> modes_lib.Calibration | None:
        found = self._calibration_here() if distributed.is_main_process() else None
        if jax.process_count() == 1:
            return found
        found = distributed.broadcast_json(None if found is None else found.to_dict())
        return None if found is None else modes_lib.Calibration.from_dict(found)

    def _calibration_here(self) -> modes_lib.Calibration | None:
        path = os.path.join(self.out, "calibration.json")
        if self.given_calibration is not None:
            if not os.path.isfile(path):
                self.given_calibration.save(path)
            return self.given_calibration
        if os.path.isfile(path):
            return modes_lib.Calibration.load(path)
        return None

    def _run_batch(self, index: int, calibration):
        from jresid.pretrained import pad_token_ids

        rows = self.batches[index]
        ids, mask = pad_token_ids([self.token_ids[i] for i in rows], padding_side="right")
        from jresid.streaming import StreamedModel

        if isinstance(self.model, StreamedModel):
            result = self.model.analyze(ids, mask, calibration=calibration, **self.options.to_dict())
        else:
            result = analyze(self.model, ids, mask, calibration=calibration, **self.options.to_dict())
        if calibration is None:
            calibration = result.calibration
            if distributed.is_main_process():
                calibration.save(os.path.join(self.out, "calibration.json"))
        if not distributed.is_main_process():
            return calibration  # results are gathered on every process; process 0 writes them
        prompt_ids = [self.prompts[i].id for i in rows]
        write_table(layer_table(result, prompt_ids), self.part_path("layers", index))
        write_table(token_table(result, prompt_ids, self.model.tokenizer), self.part_path("tokens", index))
        return calibration

    def _finish(self) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from jresid import plots

        table = pa.concat_tables([pq.read_table(self.part_path("layers", i)) for i in range(len(self.batches))])
        L = self.model.config.num_hidden_layers
        curves = {}
        for name in METRIC_NAMES:
            values = table.column(f"{name}_mean").to_numpy(zero_copy_only=False).astype(np.float64)
            layer = table.column("layer").to_numpy()
            per_layer = np.full((L, len(self.prompts)), np.nan)
            for index in range(L):
                chosen = values[layer == index]
                per_layer[index, : len(chosen)] = chosen
            curves[name] = per_layer  # [L, prompts]: each prompt's mean is one sample
        plots.layer_curves(curves, os.path.join(self.out, "layer_curves.png"),
                           title=f"{len(self.prompts)} prompts: per-layer means (band: 10th-90th percentile over prompts)")
        summary = {
            "num_prompts": len(self.prompts),
            "num_batches": len(self.batches),
            "num_tokens": int(sum(len(ids) for ids in self.token_ids)),
            "layer_means": {name: np.nanmean(curves[name], axis=1).tolist() for name in METRIC_NAMES},
        }
        write_json(summary, os.path.join(self.out, "summary.json"))
        return summary
