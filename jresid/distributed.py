"""Several hosts: `jax.distributed` start-up and moving batches and results across processes.

On a TPU pod slice, `initialize()` needs no arguments: every worker finds
the others through the TPU metadata. On GPU clusters (or several processes
on one machine), pass the coordinator address, the process count and this
process's id, or set `JRESID_COORDINATOR_ADDRESS`, `JRESID_NUM_PROCESSES`
and `JRESID_PROCESS_ID`.

Every process runs the same program on the same global batch description.
Each process feeds only the rows its devices hold, and results are gathered
so that process 0 writes them once.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "JRESID_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JRESID_NUM_PROCESSES"
ENV_PROCESS_ID = "JRESID_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start `jax.distributed`, from arguments, the environment, or TPU auto-detection.

    Raises:
        ValueError: some but not all of the three settings are given.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])

    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "multi-process runs need all three of the coordinator address, the process count and the "
            f"process id (--coordinator-address/{ENV_COORDINATOR}, --num-processes/{ENV_NUM_PROCESSES}, "
            f"--process-id/{ENV_PROCESS_ID}); on TPU pods give none of them"
        )
    # CPU devices of different processes talk through gloo; the setting does
    # not affect GPUs or TPUs. Asking for the backend here would start it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given):
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    logger.info("process %d of %d, %d local and %d global devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
    return jax.process_index() == 0


def gather(tree):
    """Bring a pytree of (possibly multi-process) arrays to host NumPy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(fetch, tree)


def share_of(count: int) -> range:
    """Return the indices, out of `count` work items, that this process handles: every process_count-th one."""
    return range(jax.process_index(), count, jax.process_count())


def broadcast_json(value=None):
    """Send a JSON-ready value from process 0 to every process; other processes' `value` is ignored."""
    if jax.process_count() == 1:
        return value
    import json

    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(value).encode("utf-8") if is_main_process() else b"", dtype=np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array([payload.size], dtype=np.int64))[0])
    buffer = np.zeros(max(size, 1), dtype=np.uint8)
    buffer[:payload.size] = payload
    buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return json.loads(buffer[:size].tobytes().decode("utf-8"))


def allgather_sequences(local: dict[int, list[int] | None], count: int) -> list[list[int] | None]:
    """Combine every process's share of `count` integer sequences into the full list, on every process.

    Args:
        local: this process's items, by global index; `None` marks an item
            that failed here, and comes back as `None` everywhere.
        count: the number of items over all processes.
    """
    if jax.process_count() == 1:
        return [local.get(index) for index in range(count)]
    from jax.experimental import multihost_utils

    per_process = -(-count // jax.process_count())
    widest = max([len(seq) for seq in local.values() if seq] + [1])
    width = int(np.max(multihost_utils.process_allgather(np.array([widest], dtype=np.int32))))

    ids = np.zeros((per_process, width), dtype=np.int32)
    lengths = np.full((per_process,), -1, dtype=np.int32)
    where = np.full((per_process,), -1, dtype=np.int32)
    for slot, (index, seq) in enumerate(sorted(local.items())):
        where[slot] = index
        if seq is not None:
            lengths[slot] = len(seq)
            ids[slot, :len(seq)] = seq
    all_ids, all_lengths, all_where = (np.asarray(multihost_utils.process_allgather(x)) for x in (ids, lengths, where))

    out: list[list[int] | None] = [None] * count
    for ids_row, length, index in zip(all_ids.reshape(-1, width), all_lengths.reshape(-1), all_where.reshape(-1)):
        if index >= 0 and length >= 0:
            out[index] = ids_row[:length].tolist()
    return out
