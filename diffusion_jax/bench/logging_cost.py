"""What logging costs the train step: the step timed alone and with its scalars logged after
every step to each of several workdirs (a local one, gs://BUCKET/bench), side by side.

    python -m diffusion_jax.bench --config configs/digits.py --tiny \
        --log_to=/tmp/bench_local,gs://BUCKET/bench

Each logged step does what the training loop does at a logging step: it reads the step's
scalars to the host and hands them to a `MetricsWriter` (metrics.jsonl and TensorBoard, in a
local staging directory for a remote workdir, uploaded by a background thread). The callables
take turns, repetition by repetition (`interleaved_times`), so that a shared machine slows all
alike; the ratio of each to the unlogged step is the cost of logging there. The writers' final
upload (`close`) is timed apart: it happens once, when a run ends.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable

import jax

from diffusion_jax.bench.measure import interleaved_times
from diffusion_jax.bench.options import BenchOptions
from diffusion_jax.runtime import metrics_writer, storage


def _logged(run: Callable[[], tuple], writer: metrics_writer.MetricsWriter) -> Callable:
    """`run` then its scalars written, step by step, as the training loop logs them."""
    step = iter(range(1, 1 << 62))

    def run_and_log():
        _, metrics = run()
        scalars = {name: float(value) for name, value in jax.device_get(metrics).items()}
        writer.write_scalars(next(step), scalars)

    return run_and_log


def bench_logging(run: Callable[[], tuple], options: BenchOptions) -> dict:
    """{"none": {...}, WORKDIR: {...}, ...}: median step seconds unlogged and logged to each
    of `options.log_to` (a fresh subfolder of each), their ratio to the unlogged step, and
    each writer's closing upload."""
    folder = f"bench_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:8]}"
    writers = {
        workdir: metrics_writer.MetricsWriter(storage.as_path(workdir) / folder, enabled=True)
        for workdir in options.log_to
    }
    fns = {"none": lambda: run()}
    fns.update({workdir: _logged(run, writer) for workdir, writer in writers.items()})
    times = interleaved_times(fns, repeats=options.repeats, warmup=options.warmup)
    baseline = statistics.median(times["none"])
    results = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        results[name] = {"median_s": median, "times_s": seconds, "ratio": median / baseline}
    for workdir, writer in writers.items():
        start = time.perf_counter()
        writer.close()
        results[workdir]["close_s"] = time.perf_counter() - start
        results[workdir]["remote"] = storage.is_remote(workdir)
        results[workdir]["written_to"] = str(storage.as_path(workdir) / folder)
    return results
