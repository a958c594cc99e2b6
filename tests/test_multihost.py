"""Two processes with 4 CPU devices each give the single-process numbers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import jresid  # noqa: E402
from tests.hf_checkpoints import build_checkpoint, random_ids  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    built = build_checkpoint(tmp_path / "ckpt", tie=False, seed=7, hidden_size=64, num_attention_heads=8,
                             num_key_value_heads=2)
    ids = random_ids(4, 48, 256, seed=5)
    mask = np.ones_like(ids)
    mask[1, :9] = 0
    mask[3, 40:] = 0
    np.savez(tmp_path / "inputs.npz", ids=ids, mask=mask)

    out = tmp_path / "multi.npz"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT
    workers = [
        subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(built.path), str(out), str(i), "2",
                          str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = []
    for worker in workers:
        try:
            logs.append(worker.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            pytest.fail("the worker processes did not finish within 300 s")
    for i, (worker, log) in enumerate(zip(workers, logs)):
        assert worker.returncode == 0, f"process {i} failed:\n{log[-3000:]}"

    multi = np.load(out)
    model = jresid.from_pretrained(built.path)
    logits, cache = model.run_with_cache(ids, mask, names_filter=lambda n: "resid" in n)
    np.testing.assert_allclose(multi["logits"], np.asarray(logits), atol=1e-4, err_msg="logits")
    for name in cache:
        np.testing.assert_allclose(multi[name], np.asarray(cache[name]), atol=1e-5, err_msg=name)
