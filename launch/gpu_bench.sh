#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md ("GPU results") in one command: ours against
# diffusers' UNet2DModel on the same GPU, in bfloat16 and in float32, DDPM CIFAR-10 U-Net;
# and against diffusers' UNet2DConditionModel and AutoencoderKL, Stable Diffusion 1.5's U-Net
# and the SD autoencoder with random weights, in bfloat16.
#
#   launch/gpu_bench.sh wheels                  # here, with a package registry: fill .whl/
#   launch/gpu_bench.sh run OUT_DIR [PART ...]  # there, on the GPU machine: no registry
#
# `wheels` downloads, for CPython 3.12 on x86-64 Linux, the packages that a machine with
# JAX, flax, optax, orbax, chex and PyTorch (CUDA) but nothing else lacks to import the
# benchmark and diffusers; `run` installs them from .whl/ (if there) into /tmp/site, then
# writes OUT_DIR/gpu.txt and, for each PART (bfloat16, float32, select, sd15_unet, sd_vae;
# all five if none is named), OUT_DIR/bench_PART.json and .log: 11 files, what the lent
# machine sends back. Each part takes a few minutes on an H100 / H200 (compiles included);
# run the parts as separate commands where one command's time is limited, bfloat16 first.
#
# GPU_BENCH_WHEELS names another wheel folder than .whl/. GPU_BENCH_FLAGS, appended to each
# benchmark's flags, rehearses the script on a CPU:
#   GPU_BENCH_FLAGS="--tiny --batch_size 4 --sample_batch_size 4 --steps 2 --repeats 1
#     --warmup 1 --sample_repeats 1 --sample_warmup 0" launch/gpu_bench.sh run /tmp/rehearsal
#   GPU_BENCH_FLAGS="--tiny --latent_size 8 --text_tokens 5 --generation_steps 2 --image_size
#     16 --repeats 1 --warmup 1 --sample_repeats 1" launch/gpu_bench.sh run /tmp/r sd15_unet sd_vae
set -euo pipefail
CALLER_DIR=$PWD  # relative OUT_DIR and GPU_BENCH_WHEELS are the caller's
cd "$(dirname "$0")/.."

absolute() {  # absolute PATH: a relative one is taken from the caller's directory
  if [[ $1 = /* ]]; then echo "$1"; else echo "$CALLER_DIR/$1"; fi
}

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

install_wheels() {
  local wheel_dir
  wheel_dir=$(if [[ -n ${GPU_BENCH_WHEELS:-} ]]; then absolute "$GPU_BENCH_WHEELS"; else echo .whl; fi)
  if compgen -G "$wheel_dir/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$wheel_dir"/*.whl
    export PYTHONPATH=/tmp/site:.
  fi
}

# One benchmark run: PART is bfloat16 or float32 (ours against diffusers, train and DDIM
# 20 / 50 steps, and our train step's time per XLA operation over 3 profiled steps), or select (ours alone, bfloat16, the train step with `where(finite, new,
# old)` instead of `lax.cond`, which may cost XLA:GPU a host round trip: compare its img/s
# with bench_bfloat16.json's), or sd15_unet (SD 1.5's U-Net at 64 x 64 latents, batch 2, 77
# text states: one call, and 25-step guided DDIM and DPM-Solver++ loops, ours one compiled
# program, diffusers' StableDiffusionPipeline loop), or sd_vae (the SD autoencoder's encode
# and decode at 256 x 256, batch 1); both ours against diffusers, weights in bfloat16.
bench() {
  local out=$1 part=$2 extra
  read -ra extra <<<"${GPU_BENCH_FLAGS:-}"
  local cifar10=(--config configs/cifar10.py --batch_size 128 --repeats 10 --warmup 5)
  local latent=(--compare diffusers --dtype bfloat16 --repeats 10 --warmup 3)
  local flags
  case "$part" in
    bfloat16 | float32)
      flags=("${cifar10[@]}" --compare diffusers --dtype "$part" --sample_batch_size 128
        --samplers ddim --steps 20,50 --profile_steps 3 --profile_dir "/tmp/profile_$part") ;;
    select) flags=("${cifar10[@]}" --dtype bfloat16 --samplers= --skip_with select) ;;
    sd15_unet) flags=("${latent[@]}" --model sd15_unet --samplers ddim,dpm_solver++
      --generation_steps 25 --sample_repeats 3 --sample_warmup 1) ;;
    sd_vae) flags=("${latent[@]}" --model sd_vae --image_size 256) ;;
  esac
  python3 -m diffusion_jax.bench "${flags[@]}" "${extra[@]}" \
    --out "$out/bench_$part.json" 2>&1 | tee "$out/bench_$part.log"
}

run() {
  local out=${1:?usage: launch/gpu_bench.sh run OUT_DIR [PART ...]}
  out=$(absolute "$out")
  shift
  local parts=("$@")
  ((${#parts[@]})) || parts=(bfloat16 float32 select sd15_unet sd_vae)
  for part in "${parts[@]}"; do
    case "$part" in
      bfloat16 | float32 | select | sd15_unet | sd_vae) ;;
      *) echo "unknown part '$part'; allowed: bfloat16 float32 select sd15_unet sd_vae" >&2
        exit 2 ;;
    esac
  done
  mkdir -p "$out"
  install_wheels
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    >"$out/gpu.txt" 2>&1 || true
  for part in "${parts[@]}"; do
    bench "$out" "$part"
  done
}

case "${1:-}" in
  wheels) wheels ;;
  run) shift; run "$@" ;;
  *) echo "usage: launch/gpu_bench.sh wheels | run OUT_DIR [PART ...]" >&2; exit 2 ;;
esac
