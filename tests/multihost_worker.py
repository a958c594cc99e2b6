"""One process of the multi-process test: 4 CPU devices, joined with the others on 127.0.0.1.

Usage: python -m tests.multihost_worker CHECKPOINT OUT.npz PROCESS_ID NUM_PROCESSES PORT
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"


def main() -> None:
    checkpoint, out, process_id, num_processes, port = sys.argv[1:6]

    from jresid import distributed

    distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))

    import jax
    import numpy as np

    import jresid
    from jresid import sharding

    assert jax.device_count() == 4 * int(num_processes), jax.devices()
    mesh = sharding.make_mesh(data=2, model=jax.device_count() // 2)
    model = jresid.from_pretrained(checkpoint, mesh=mesh)
    ids = np.load(os.path.join(os.path.dirname(out), "inputs.npz"))
    logits, cache = model.run_with_cache(ids["ids"], ids["mask"], names_filter=lambda n: "resid" in n)
    arrays = distributed.gather({"logits": logits, **dict(cache.items())})

    from jresid.analyze import analyze

    result = analyze(model, ids["ids"], ids["mask"])
    for name in ("energy", "innovation", "expansion", "complexity", "mode", "sequence_complexity"):
        arrays[f"analyze.{name}"] = getattr(result, name)
    if distributed.is_main_process():
        np.savez(out, **{name: np.asarray(value) for name, value in arrays.items()})


if __name__ == "__main__":
    main()
