"""Tests of runtime/metrics_writer.py: strict JSON lines, each step recorded once."""

import json
import math

import pytest

from diffusion_jax.runtime import metrics_writer


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_are_written_as_null(tmp_path):
    writer = metrics_writer.MetricsWriter(tmp_path, enabled=True, start_step=0)
    writer.write_scalars(1, {"loss": float("nan"), "grad_norm": math.inf, "skipped_updates": 1})
    writer.write_scalars(2, {"loss": 0.5, "grad_norm": 1.0, "skipped_updates": 0})
    writer.close()
    rows = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss": None, "grad_norm": None, "skipped_updates": 1}
    assert rows[1]["loss"] == 0.5
    with pytest.raises(ValueError, match="not JSON"):
        _strict(json.dumps({"loss": float("nan")}))  # what was written before


def test_rows_after_the_restored_step_are_dropped(tmp_path):
    writer = metrics_writer.MetricsWriter(tmp_path, enabled=True, start_step=0)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": float(step)})
    writer.close()
    metrics_writer.MetricsWriter(tmp_path, enabled=True, start_step=2).close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [_strict(line)["step"] for line in lines] == [1, 2]
