"""Command-line entry point: train, evaluate or sample with a config file.

    python -m diffusion_jax.main --config configs/cifar10.py --workdir /tmp/cifar10
    python -m diffusion_jax.main --config configs/digits.py:tiny --workdir /tmp/d \
        --config.training.num_steps=100
    python -m diffusion_jax.main --config configs/cifar10.py --workdir /tmp/cifar10 --mode sample
    python -m diffusion_jax.main --config configs/cifar10.py --workdir gs://BUCKET/cifar10

The same command runs on one CPU, one GPU, eight TPU cores or a TPU pod. The console shows
the run's progress, its warnings and a closing summary; everything else JAX, Orbax and absl
log goes to WORKDIR/logs/<mode>.log (`--verbosity=0` shows it on the console too). An error
is one line naming what to fix, its traceback in that file. This file is intentionally kept
short: each mode is one function call.

The workdir may be a URL (gs://bucket/run, the shared workdir of a TPU pod's hosts): its bucket
and this machine's access to it are checked before anything else (`storage.check_access`).
"""

import os
import pathlib
import sys
import tempfile

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax.runs import autoencoder, autoencoder_eval, evaluate, sample, train
from diffusion_jax.runtime import compilation, console, host_memory, parallel, storage, workdir

MODES = ("train", "eval", "sample")
RUNS = {  # config.task -> mode -> run
    "diffusion": {
        "train": train.train_and_evaluate,
        "eval": evaluate.evaluate,
        "sample": sample.sample,
    },
    "autoencoder": {
        "train": autoencoder.train,
        "eval": autoencoder_eval.evaluate,
        "sample": autoencoder_eval.reconstruct,
    },
}

INTERRUPTED = (
    "stopped at once by a second Ctrl-C; the run continues from its last checkpoint when "
    "started again"
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/cifar10.py (or configs/cifar10.py:tiny).",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", list(MODES), "What to do.")
flags.DEFINE_bool("force", False, "Take over the workdir lock of another training run.")
flags.mark_flags_as_required(["config", "workdir"])


def log_file(workdir: str, mode: str, process_index: int) -> os.PathLike:
    """WORKDIR/logs/<mode>.log (process 0; <mode>.process_<i>.log for the others); sampling or
    evaluating a workdir that holds no checkpoints leaves it untouched, and logs to the
    temporary directory instead."""
    name = mode if process_index == 0 else f"{mode}.process_{process_index}"
    workdir = storage.as_path(workdir)
    if mode == "train" or (workdir / "checkpoints").is_dir():
        return workdir / "logs" / f"{name}.log"
    return pathlib.Path(tempfile.gettempdir()) / f"diffusion_jax_{name}.log"


def run_of(config, mode: str):
    """The function that runs `mode` for the config's task."""
    if config.task not in RUNS:
        raise ValueError(f"task={config.task!r}; allowed: {list(RUNS)}")
    return RUNS[config.task][mode]


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    verbose = FLAGS["verbosity"].present
    logs = console.LogRouting(verbose=verbose)
    host_memory.retain_freed_memory()  # before JAX creates its CPU client: no page faults per step
    try:
        storage.check_access(FLAGS.workdir, write=FLAGS.mode == "train")  # before any compute
        parallel.initialize_distributed(config.parallel)
        logs.to_file(log_file(FLAGS.workdir, FLAGS.mode, jax.process_index()))
        compilation.use_persistent_cache(config.parallel.compilation_cache_dir, FLAGS.workdir)
        logging.info("Config:\n%s", config)
        with workdir.lock(FLAGS.workdir, force=FLAGS.force, exclusive=FLAGS.mode == "train"):
            run_of(config, FLAGS.mode)(config, FLAGS.workdir)
    except KeyboardInterrupt as interrupt:  # a second Ctrl-C: stop at once, no traceback
        console.report_error(interrupt, logs.path, message=INTERRUPTED)
        sys.exit(130)
    except Exception as error:
        if verbose:
            raise
        console.report_error(error, logs.path)
        sys.exit(1)
    finally:
        logs.close()  # a remote log file: its last lines uploaded


if __name__ == "__main__":
    app.run(main)
