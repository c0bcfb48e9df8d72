"""Tests of bench/logging_cost.py: the step timed unlogged and logged to a local and a
GCS-emulator workdir, every logged step's row written there. No timing is asserted."""

import json

import jax.numpy as jnp

from diffusion_jax.bench import logging_cost
from diffusion_jax.bench.options import BenchOptions
from diffusion_jax.runtime import storage


def test_each_workdir_gets_one_row_per_logged_step_and_a_ratio(tmp_path, gcs_emulator):
    remote = gcs_emulator.new_bucket() + "/bench"
    options = BenchOptions(repeats=3, warmup=2, log_to=(str(tmp_path), remote))
    step = jnp.zeros(())

    def run():
        return None, {"loss": step + 0.5, "grad_norm": step + 1.0}

    results = logging_cost.bench_logging(run, options)
    assert set(results) == {"none", str(tmp_path), remote}
    assert results["none"]["ratio"] == 1.0 and len(results["none"]["times_s"]) == 3
    for workdir in (str(tmp_path), remote):
        entry = results[workdir]
        assert entry["ratio"] > 0 and entry["close_s"] >= 0
        assert entry["remote"] == (workdir == remote)
        lines = (
            storage.as_path(
                entry["written_to"],
            )
            .joinpath("metrics.jsonl")
            .read_text()
        )
        rows = [json.loads(line) for line in lines.splitlines()]
        assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]  # warm-up and timed steps
        assert rows[0] == {"step": 1, "loss": 0.5, "grad_norm": 1.0}
