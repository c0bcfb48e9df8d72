"""Where a compiled step spends its time: JAX's profiler trace, summed per XLA operation.

`capture(run, steps, log_dir)` runs `run()` (one blocking step) `steps` times under
`jax.profiler.trace` and returns the Perfetto trace it wrote and the wall time of the
steps; `summarize(trace, steps)`
adds up the duration of every event that XLA tagged with an `hlo_op` (a fusion, a
convolution, a cuDNN or cuBLAS call, ...) per operation and per kind of operation (the name
without its ".N" suffix), per step. On a GPU the device's own kernel events are counted
(the `/device:` processes of the trace); on a CPU, where XLA runs its operations on host
threads, the host's, where a loop or conditional is counted by the operations of its body.
Thread time is summed, so the total can exceed the wall time of a step (several threads),
and on a GPU it falls short of it where the device idles. On a CPU it also misses what XLA
hands to Eigen's thread pool without a trace event of its own (its convolutions): the CIFAR-10
train step at batch 16, 1.92 s wall on 2 cores (up to 3.8 thread-s), had 1.28 thread-s in
traced operations, 0.37 s of them in transpose_copy_fusions (jaxlib 0.10.2, 2026-12-02).
Compare `total_ms_per_step` with `wall_ms_per_step`.

This is what `--profile_steps` of the benchmark records, so that a run on a lent GPU says
what limits the step without a separate profiling session.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import time
from collections.abc import Callable

import jax

_SUFFIX = re.compile(r"[.:]\d+$")


def capture(
    run: Callable[[], object], steps: int, log_dir: str | pathlib.Path
) -> tuple[pathlib.Path, float]:
    """Runs `run()` `steps` times under the profiler: the Perfetto trace it wrote, and the
    seconds the steps took (the profiler's own start and stop excluded)."""
    log_dir = pathlib.Path(log_dir)
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(steps):
            run()
        seconds = time.perf_counter() - start
    traces = log_dir.glob("plugins/profile/*/perfetto_trace.json.gz")
    return max(traces, key=lambda path: path.stat().st_mtime), seconds


def _process_names(events: list[dict]) -> dict[int, str]:
    return {
        event["pid"]: event["args"]["name"]
        for event in events
        if event.get("ph") == "M" and event.get("name") == "process_name"
    }


def _leaves(events: list[dict]) -> list[dict]:
    """The events that hold no other event of their thread: a CPU's `while` or
    `conditional` spans the operations of its body, which are counted instead."""
    containers = set()
    by_thread = collections.defaultdict(list)
    for index, event in enumerate(events):
        by_thread[event["pid"], event.get("tid")].append(index)
    for indices in by_thread.values():
        indices.sort(key=lambda i: (events[i]["ts"], -float(events[i].get("dur", 0.0))))
        open_events: list[int] = []  # a stack of events that contain the current one
        for index in indices:
            start = events[index]["ts"]
            while open_events and _end(events[open_events[-1]]) <= start:
                open_events.pop()
            if open_events:
                containers.add(open_events[-1])
            open_events.append(index)
    return [event for index, event in enumerate(events) if index not in containers]


def _end(event: dict) -> float:
    return event["ts"] + float(event.get("dur", 0.0))


def op_durations_us(trace: str | pathlib.Path) -> dict[str, tuple[float, int]]:
    """Total microseconds and count of the events of each XLA operation in `trace`, from the
    device processes where the trace has any (GPU, TPU), else from the host (CPU)."""
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    names = _process_names(events)
    op_events = [
        event
        for event in events
        if event.get("ph") == "X" and "hlo_op" in (event.get("args") or {})
    ]
    on_device = [e for e in op_events if names.get(e["pid"], "").startswith("/device:")]
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for event in _leaves(on_device or op_events):
        total = totals[event["args"]["hlo_op"]]
        total[0] += float(event.get("dur", 0.0))
        total[1] += 1
    return {op: (us, count) for op, (us, count) in totals.items()}


def summarize(
    trace: str | pathlib.Path, steps: int, *, wall_s: float | None = None, top: int = 25
) -> dict:
    """Per step: the `top` operations by time, the time per kind of operation, the total
    (milliseconds, share of the total, events), and the wall time where `wall_s` is given."""
    durations = op_durations_us(trace)
    total_us = sum(us for us, _ in durations.values())
    if not durations or total_us <= 0:
        raise ValueError(f"{trace} holds no XLA operation events (hlo_op)")

    def entry(name: str, us: float, count: int) -> dict:
        return {
            "name": name,
            "ms_per_step": us / steps / 1e3,
            "share": us / total_us,
            "per_step": count / steps,
        }

    kinds: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for op, (us, count) in durations.items():
        kind = kinds[_SUFFIX.sub("", op)]
        kind[0] += us
        kind[1] += count
    by_time = lambda item: -item[1][0]
    return {
        "trace": str(trace),
        "steps": steps,
        "total_ms_per_step": total_us / steps / 1e3,
        "wall_ms_per_step": None if wall_s is None else wall_s / steps * 1e3,
        "ops": [entry(op, us, n) for op, (us, n) in sorted(durations.items(), key=by_time)[:top]],
        "kinds": [entry(kind, us, n) for kind, (us, n) in sorted(kinds.items(), key=by_time)],
    }


def format_summary(summary: dict, *, rows: int = 12) -> str:
    """The kinds of operation, then the operations, by time: a few lines for the console."""
    wall = summary["wall_ms_per_step"]
    lines = [
        f"op profile ({summary['steps']} steps, {summary['total_ms_per_step']:.4g} ms/step in"
        " XLA operations" + ("" if wall is None else f", {wall:.4g} ms/step wall") + ")"
    ]
    for title in ("kinds", "ops"):
        for item in summary[title][:rows]:
            lines.append(
                f"  {title[:-1]:<4} {item['name'][:48]:<48} {item['ms_per_step']:>10.4g} ms"
                f" {100 * item['share']:>5.1f}%  x{item['per_step']:g}"
            )
    return "\n".join(lines)
