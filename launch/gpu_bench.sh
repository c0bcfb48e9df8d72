#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md ("GPU results") in one command: ours against
# diffusers' UNet2DModel on the same GPU, in bfloat16 and in float32, DDPM CIFAR-10 U-Net.
#
#   launch/gpu_bench.sh wheels        # here, with a package registry: fill .whl/
#   launch/gpu_bench.sh run OUT_DIR   # there, on the GPU machine: no registry needed
#
# `wheels` downloads, for CPython 3.12 on x86-64 Linux, the packages that a machine with
# JAX, flax, optax, orbax, chex and PyTorch (CUDA) but nothing else lacks to import the
# benchmark and diffusers; `run` installs them from .whl/ (if there) into /tmp/site, then
# writes OUT_DIR/bench_{bfloat16,float32,bfloat16_select}.json and .log and OUT_DIR/gpu.txt
# (8 files, what the lent machine sends back). Each
# benchmark run takes a few minutes on an H100 / H200 (compiles included).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  diffusers==0.42.1 importlib_metadata==8.7.0
  ml_collections==1.1.0
  grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
  tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 googleapis-common-protos==1.70.0
  immutabledict==4.3.1 toml==0.10.2
)

wheels() {
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  python3 -m pip wheel -q --no-deps -w .whl promise==2.3  # pure Python, sdist only on PyPI
  du -sh .whl
}

run() {
  local out=${1:?usage: launch/gpu_bench.sh run OUT_DIR}
  mkdir -p "$out"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    >"$out/gpu.txt" 2>&1 || true
  for dtype in bfloat16 float32; do
    python3 -m diffusion_jax.bench --config configs/cifar10.py --compare diffusers \
      --batch_size 128 --sample_batch_size 128 --dtype "$dtype" --samplers ddim \
      --steps 20,50 --repeats 10 --warmup 5 --out "$out/bench_$dtype.json" 2>&1 |
      tee "$out/bench_$dtype.log"
  done
  # The train step with `where(finite, new, old)` instead of `lax.cond` (a conditional may
  # cost XLA:GPU a host round trip): compare its img/s with bench_bfloat16.json's.
  python3 -m diffusion_jax.bench --config configs/cifar10.py --batch_size 128 \
    --dtype bfloat16 --samplers= --repeats 10 --warmup 5 --skip_with select \
    --out "$out/bench_bfloat16_select.json" 2>&1 | tee "$out/bench_bfloat16_select.log"
}

case "${1:-}" in
  wheels) wheels ;;
  run) run "${2:-}" ;;
  *) echo "usage: launch/gpu_bench.sh wheels | run OUT_DIR" >&2; exit 2 ;;
esac
