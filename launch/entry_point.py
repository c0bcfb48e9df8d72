"""The command line of `python -m diffusion_jax.main`, shared by every launcher.

The launchers only build this command and decide where and how many times it runs; what
one process does is the main entry point's business.
"""

from __future__ import annotations

from collections.abc import Sequence

MODES = ("train", "eval", "sample")

# Config keys through which a launcher wires `jax.distributed.initialize`; a launcher that
# sets them refuses user overrides of the same keys rather than silently picking one.
PARALLEL_WIRING_KEYS = (
    "parallel.coordinator_address",
    "parallel.num_processes",
    "parallel.process_id",
)


def check_overrides(overrides: Sequence[str], *, reserved_keys: Sequence[str] = ()) -> None:
    """Raises ValueError unless every override is `--config.KEY=VALUE` with KEY not reserved."""
    for override in overrides:
        if not override.startswith("--config.") or "=" not in override:
            raise ValueError(
                f"config override {override!r}: overrides must look like --config.section.key=value"
            )
        key = override[len("--config.") : override.index("=")]
        if key in reserved_keys:
            raise ValueError(
                f"config override {override!r}: this launcher sets {key} itself; "
                f"leave out any of {', '.join(reserved_keys)}"
            )


def main_command(
    *,
    config: str,
    workdir: str,
    mode: str = "train",
    overrides: Sequence[str] = (),
    python: str = "python",
) -> list[str]:
    """argv of one `python -m diffusion_jax.main` process (unquoted, one string per argument)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: must be one of {', '.join(MODES)}")
    if not config:
        raise ValueError("config: a config file such as configs/cifar10.py is required")
    if not workdir:
        raise ValueError("workdir: a directory (shared by all hosts of a multi-host run)")
    check_overrides(overrides)
    return [
        python,
        "-m",
        "diffusion_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--mode={mode}",
        *overrides,
    ]


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits a launcher's argv at the first `--`: (launcher options, config overrides)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]
