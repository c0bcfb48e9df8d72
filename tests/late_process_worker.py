"""One of two processes on 127.0.0.1 that sum a global array, process 1 arriving late.

    python tests/late_process_worker.py ADDRESS PROCESS_ID DELAY_S {together,plain}

Run by tests/compilation_test.py. "together" calls the sum through
`compilation.CompiledTogether`; "plain" calls the bare jit, the control that dies once the
delay passes gloo's 30 s wait for a peer.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def main(address: str, process_id: int, delay_s: float, mode: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=2, process_id=process_id)
    from diffusion_jax.runtime import compilation, parallel

    mesh = parallel.make_mesh()
    rows = NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))
    local = np.full((1,), process_id + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(rows, local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))
    if mode == "together":
        total = compilation.CompiledTogether(total, "sum")
    if process_id == 1:
        time.sleep(delay_s)
    print(f"total {float(total(x).addressable_data(0))}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
