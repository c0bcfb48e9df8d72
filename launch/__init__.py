"""Launchers for the main entry point: a TPU pod slice, a SLURM GPU cluster, local processes.

Each launcher is a script (`python launch/tpu_pod.py --help`); `launch/README.md` has examples.
"""
