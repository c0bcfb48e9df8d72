"""Command-line entry point: train, evaluate or sample with a config file.

    python -m diffusion_jax.main --config configs/cifar10.py --workdir /tmp/cifar10
    python -m diffusion_jax.main --config configs/digits.py:tiny --workdir /tmp/d \
        --config.training.num_steps=100
    python -m diffusion_jax.main --config configs/cifar10.py --workdir /tmp/cifar10 --mode sample

The same command runs on one CPU, one GPU, eight TPU cores or a TPU pod. This file is
intentionally kept short: each mode is one function call.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax.runs import evaluate, sample, train
from diffusion_jax.runtime import compilation, host_memory, parallel, workdir

RUNS = {
    "train": train.train_and_evaluate,
    "eval": evaluate.evaluate,
    "sample": sample.sample,
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/cifar10.py (or configs/cifar10.py:tiny).",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", list(RUNS), "What to do.")
flags.DEFINE_bool("force", False, "Take over the workdir lock of another training run.")
flags.mark_flags_as_required(["config", "workdir"])


def check_workdir(workdir: str) -> None:
    """A directory of the filesystem: the run writes it with Python's file functions, which
    would turn gs://bucket/run into a local folder ./gs:/bucket/run on each host."""
    if "://" in workdir:
        raise app.UsageError(
            f"--workdir={workdir}: URLs are not supported; give a directory of the filesystem. "
            "Hosts of a multi-host run need one they all share: a bucket mounted with "
            "gcsfuse (e.g. /gcs/BUCKET/run) or an NFS / Filestore path."
        )


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    check_workdir(FLAGS.workdir)
    host_memory.retain_freed_memory()  # before JAX creates its CPU client: no page faults per step
    parallel.initialize_distributed(config.parallel)
    compilation.use_persistent_cache(config.parallel.compilation_cache_dir, FLAGS.workdir)
    logging.info("Config:\n%s", config)
    with workdir.lock(FLAGS.workdir, force=FLAGS.force, exclusive=FLAGS.mode == "train"):
        RUNS[FLAGS.mode](config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
