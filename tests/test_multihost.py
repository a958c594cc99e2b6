"""Two processes with 4 CPU devices each give the single-process captures, logits and metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import jresid  # noqa: E402
from jresid.analyze import analyze  # noqa: E402
from tests.hf_checkpoints import build_checkpoint, random_ids  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_all(workers, kind: str, timeout: int = 300) -> list[str]:
    """Wait for every process, kill them all on a timeout, and return their output once all exit 0."""
    logs = []
    for worker in workers:
        try:
            logs.append(worker.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            pytest.fail(f"the {kind} processes did not finish within {timeout} s")
    for i, (worker, log) in enumerate(zip(workers, logs)):
        assert worker.returncode == 0, f"process {i} failed:\n{log[-3000:]}"
    return logs


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
    logs = wait_for_all(workers, "worker")

    multi = np.load(out)
    model = jresid.from_pretrained(built.path)
    logits, cache = model.run_with_cache(ids, mask, names_filter=lambda n: "resid" in n)
    np.testing.assert_allclose(multi["logits"], np.asarray(logits), atol=1e-4, err_msg="logits")
    for name in cache:
        np.testing.assert_allclose(multi[name], np.asarray(cache[name]), atol=1e-5, err_msg=name)

    single = analyze(model, ids, mask)
    for name in ("energy", "innovation", "expansion", "complexity", "sequence_complexity"):
        expected = getattr(single, name)
        scale = max(1.0, float(np.nanmax(np.abs(expected))))
        np.testing.assert_allclose(multi[f"analyze.{name}"], expected, rtol=1e-4, atol=1e-5 * scale,
                                   equal_nan=True, err_msg=f"analyze {name}")
    np.testing.assert_array_equal(multi["analyze.mode"], single.mode, err_msg="analyze mode")


PROMPTS = [
    "Ana lives in Oslo. Ben lives in Lima. Where does Ben live?",
    "7 + 5 = 12. 12 * 2 =",
    "List: sun moon tree. Again:",
    "The big dog runs to the park. In other words,",
    "Alice has 3 apples. Bob gives her 4 more. Now Alice has",
    "Cal is taller than Dan. Dan is taller than Eve. So",
]


def run_cli(args, env, cwd):
    return subprocess.Popen([sys.executable, "-m", "jresid.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_process_sweep_matches_one(tmp_path):
    import json

    import pandas as pd

    from jresid.cli import default_model_path
    from jresid.sweep import Sweep, read_prompts

    model_path = default_model_path()
    if not os.path.isdir(model_path):
        pytest.skip("the shipped model is missing")
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text}) + "\n"
                                    for i, text in enumerate(PROMPTS)))

    single_out = tmp_path / "single"
    Sweep(jresid.from_pretrained(model_path), read_prompts(str(prompts_file), jsonl=True), str(single_out),
          batch_size=4).run(progress=False)

    multi_out = tmp_path / "multi"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    workers = [
        run_cli(["sweep", str(prompts_file), "--out", str(multi_out), "--batch-size", "4", "--quiet",
                 "--mesh", "data=4,model=2", "--coordinator-address", f"127.0.0.1:{port}",
                 "--num-processes", "2", "--process-id", str(i)], env, ROOT)
        for i in range(2)
    ]
    logs = wait_for_all(workers, "sweep")
    assert "6 prompts" in logs[0], "process 0 should report the sweep"
    assert "results in" not in logs[1], "only process 0 should report the sweep"

    keys = ["prompt_id", "layer", "position"]
    for kind in ("tokens", "layers"):
        expected = pd.read_parquet(single_out / kind).sort_values(keys[:2] + (["position"] if kind == "tokens" else []))
        found = pd.read_parquet(multi_out / kind).sort_values(keys[:2] + (["position"] if kind == "tokens" else []))
        assert len(found) == len(expected), f"{kind}: {len(found)} rows, expected {len(expected)}"
        for column in expected.columns:
            want, got = expected[column].to_numpy(), found[column].to_numpy()
            if want.dtype.kind == "f":
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, equal_nan=True, err_msg=f"{kind}.{column}")
            else:
                assert (got == want).all(), f"{kind}.{column} differs"
