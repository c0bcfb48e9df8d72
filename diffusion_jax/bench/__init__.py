"""The benchmark: train and sampling throughput, MFU, compile time and memory, side by side
with diffusers; `python -m diffusion_jax.bench --config ...`."""
