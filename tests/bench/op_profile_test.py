"""op_profile: a profiler trace summed per XLA operation and per kind of operation."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax.bench import op_profile


def _write_trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def _op(pid, name, dur, ts=0.0, tid=1):
    args = {"hlo_op": name}
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "name": name, "dur": dur, "args": args}


def _process(pid, name):
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}


def test_device_kernels_are_summed_per_op_and_kind_per_step(tmp_path):
    events = [
        _process(1, "/host:CPU"),
        _process(2, "/device:GPU:0"),
        _op(1, "fusion.1", 1000.0),  # the host's launch of a kernel: not device time
        _op(2, "fusion.1", 300.0, ts=0),
        _op(2, "fusion.1", 300.0, ts=1000),
        _op(2, "fusion.2", 200.0, ts=2000),
        _op(2, "convolution", 1200.0, ts=3000),
        {"ph": "X", "pid": 2, "ts": 0, "name": "memcpy", "dur": 5000.0, "args": {}},  # no op
    ]
    summary = op_profile.summarize(_write_trace(tmp_path / "t.json.gz", events), steps=2)
    assert summary["total_ms_per_step"] == pytest.approx(1.0)  # 2000 us over 2 steps
    ops = {op["name"]: op for op in summary["ops"]}
    assert [op["name"] for op in summary["ops"]] == ["convolution", "fusion.1", "fusion.2"]
    assert ops["fusion.1"]["ms_per_step"] == pytest.approx(0.3)
    assert ops["fusion.1"]["per_step"] == 1 and ops["convolution"]["share"] == pytest.approx(0.6)
    kinds = {kind["name"]: kind for kind in summary["kinds"]}
    assert (
        kinds["fusion"]["ms_per_step"] == pytest.approx(0.4) and kinds["fusion"]["per_step"] == 1.5
    )
    assert sum(kind["share"] for kind in summary["kinds"]) == pytest.approx(1.0)


def test_host_ops_count_where_the_trace_has_no_device_and_loops_by_their_bodies(tmp_path):
    events = [
        _process(1, "/host:CPU"),
        _op(1, "while.7", 1000.0, ts=0),  # a CPU loop spans the operations of its body
        _op(1, "dot.3", 400.0, ts=100),
        _op(1, "dot.4", 100.0, ts=600),
        _op(1, "dot.3", 50.0, ts=800, tid=2),  # another thread, during the loop: counted
    ]
    summary = op_profile.summarize(_write_trace(tmp_path / "t.json.gz", events), steps=1)
    assert summary["kinds"] == [{"name": "dot", "ms_per_step": 0.55, "share": 1.0, "per_step": 3.0}]


def test_a_trace_without_xla_operations_is_refused(tmp_path):
    path = _write_trace(tmp_path / "t.json.gz", [_process(1, "/host:CPU")])
    with pytest.raises(ValueError, match="no XLA operation events"):
        op_profile.summarize(path, steps=1)


def test_a_captured_cpu_step_lists_operations_of_its_compiled_program(tmp_path):
    step = jax.jit(lambda x: jnp.tanh(x @ x).sum(0) + jnp.cumsum(x, 0)[-1])
    x = jnp.ones((512, 512))
    compiled_text = step.lower(x).compile().as_text()
    step(x).block_until_ready()
    trace, seconds = op_profile.capture(lambda: step(x).block_until_ready(), 3, tmp_path)
    summary = op_profile.summarize(trace, steps=3, wall_s=seconds)
    assert summary["total_ms_per_step"] > 0 and summary["ops"]
    assert summary["wall_ms_per_step"] == pytest.approx(seconds / 3 * 1e3)
    for op in summary["ops"]:
        assert f"{op['name']} " in compiled_text or f"{op['name']}(" in compiled_text
        assert op["per_step"] == 1  # each operation runs once per step
    assert "ms/step wall)" in op_profile.format_summary(summary)
