"""Where arrays live: the device mesh, shardings, global batches, multi-host start-up, pmap.

Two ways to spread a train step over devices, chosen by `parallel.strategy`:

- "data" (default) and "fsdp": `jax.jit` over a 1-D `Mesh` with axis "data". The batch is
  split along "data"; parameters (and optimizer and EMA state) are replicated ("data") or
  each split along its largest axis divisible by the device count ("fsdp", fully sharded
  data parallel: XLA gathers a parameter where it is used and reduce-scatters its gradient).
  One program serves one CPU, one GPU, eight TPU cores or a pod.
- "pmap": the older `jax.pmap` path (in maintenance mode in JAX), for those who want it:
  the state is replicated with a leading device axis and gradients are averaged with
  `lax.pmean` inside the step, which `make_train_step(axis_name=...)` provides.

A `Strategy` hides the difference from the training loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax.runtime.compilation import CompiledTogether

STRATEGIES = ("data", "fsdp", "pmap")
DATA_AXIS = "data"
PMAP_AXIS = "batch"


def initialize_distributed(parallel_config: ml_collections.ConfigDict) -> None:
    """Start multi-host JAX; call before any other JAX call.

    With `parallel.coordinator_address` set (GPU or CPU clusters), every process passes the
    same address and process count and its own id; CPU processes exchange data through the
    `parallel.cpu_collectives` implementation (gloo). Without it, JAX looks for a cluster it
    knows (Cloud TPU pods, SLURM, ...) and a lone machine runs as a single process.
    """
    if parallel_config.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", parallel_config.cpu_collectives)
        local_ids = tuple(parallel_config.local_device_ids) or None
        jax.distributed.initialize(
            coordinator_address=parallel_config.coordinator_address,
            num_processes=parallel_config.num_processes,
            process_id=parallel_config.process_id,
            local_device_ids=local_ids,
        )
        return
    try:
        jax.distributed.initialize()
    except ValueError as error:  # no cluster found: a single process
        logging.info("Single process (no cluster detected: %s)", error)


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over all devices of all processes."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_size(
    global_batch_size: int, num_devices: int, *, option: str = "training.batch_size"
) -> None:
    if global_batch_size < 1 or global_batch_size % num_devices:
        raise ValueError(
            f"{option}={global_batch_size} does not divide over the {num_devices} "
            f"devices; allowed: a positive multiple of {num_devices}"
        )


def fsdp_partition_spec(shape: tuple[int, ...], num_shards: int, min_size: int) -> PartitionSpec:
    """Shard the largest axis divisible by `num_shards`; replicate small or indivisible arrays."""
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for axis in np.argsort(shape, kind="stable")[::-1]:
        if shape[axis] % num_shards == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state, mesh: Mesh, *, strategy: str, fsdp_min_size: int):
    """NamedShardings for every leaf of a (possibly abstract) state pytree."""
    if strategy == "data":
        return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), abstract_state)
    return jax.tree.map(
        lambda leaf: NamedSharding(
            mesh, fsdp_partition_spec(tuple(leaf.shape), mesh.size, fsdp_min_size)
        ),
        abstract_state,
    )


def global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """One global array per key from each process's rows [B_local, ...] (split on "data")."""
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in local_batch.items()
    }


def to_host(tree) -> Any:
    """Numpy copies of a pytree of (possibly multi-host sharded) arrays, on every process."""
    return jax.tree.map(
        lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree
    )


@dataclasses.dataclass
class MeshStrategy:
    """jit over a Mesh: "data" replicates the state, "fsdp" shards it."""

    mesh: Mesh
    strategy: str
    fsdp_min_size: int

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def state_shardings(self, abstract_state):
        return state_shardings(
            abstract_state, self.mesh, strategy=self.strategy, fsdp_min_size=self.fsdp_min_size
        )

    def init_state(self, create_fn: Callable, rng: jax.Array):
        """create_fn(rng) -> state, run so that the state is born sharded."""
        shardings = self.state_shardings(jax.eval_shape(create_fn, rng))
        return jax.jit(create_fn, out_shardings=shardings)(rng)

    def restore_target(self, abstract_state):
        """Abstract arrays with this mesh's shardings: orbax restores onto them."""
        return jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            abstract_state,
            self.state_shardings(abstract_state),
        )

    def place_restored(self, state):
        return state

    def checkpointable(self, state):
        return state

    def compile_train_step(self, train_step: Callable, abstract_state) -> Callable:
        shardings = self.state_shardings(abstract_state)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        jitted = jax.jit(
            train_step,
            in_shardings=(shardings, self.batch_sharding(), replicated),
            out_shardings=(shardings, replicated),
            donate_argnums=(0,),
        )
        return CompiledTogether(jitted, "train_step")

    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def device_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return global_batch(local_batch, self.batch_sharding())

    def inference_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return self.device_batch(local_batch)

    def params_for_inference(self, params):
        return params


def _first_replica(x: jax.Array) -> jax.Array:
    """This process's first copy of a pmapped array [devices, ...] -> [...]."""
    shard = x.addressable_data(0)
    return shard[0] if shard.ndim == x.ndim else shard  # some JAX versions keep the axis


@dataclasses.dataclass
class PmapStrategy:
    """jax.pmap over the local devices of every process; the state has a device axis."""

    devices: list

    @property
    def num_devices(self) -> int:
        return jax.device_count()

    def _replicate(self, tree):
        """A copy per local device on a leading axis, placed as pmap places its outputs (so
        the train step sees the same input shardings at every call and compiles once)."""
        count = len(self.devices)
        stacked = jax.tree.map(lambda x: np.stack([np.asarray(x)] * count), tree)
        return jax.pmap(lambda x: x)(stacked)  # over every process's devices, as training

    def init_state(self, create_fn: Callable, rng: jax.Array):
        return self._replicate(jax.jit(create_fn)(rng))

    def _host_sharding(self):
        """Where a checkpoint's arrays live: this process's first device, or with several
        processes replicated on all devices (Orbax saves no process-local array there)."""
        if jax.process_count() == 1:
            return jax.sharding.SingleDeviceSharding(self.devices[0])
        return NamedSharding(Mesh(np.asarray(jax.devices()), ("replica",)), PartitionSpec())

    def restore_target(self, abstract_state):
        sharding = self._host_sharding()
        return jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            abstract_state,
        )

    def place_restored(self, state):
        return self._replicate(jax.tree.map(lambda x: x.addressable_data(0), state))

    def checkpointable(self, state):
        """The state without its device axis (the copies are identical); with several
        processes as global arrays replicated on every device."""
        local = jax.tree.map(_first_replica, state)
        if jax.process_count() == 1:
            return local
        sharding = self._host_sharding()
        return multihost_utils.host_local_array_to_global_array(
            local, sharding.mesh, PartitionSpec()
        )

    def compile_train_step(self, train_step: Callable, abstract_state) -> Callable:
        stepped = CompiledTogether(
            jax.pmap(train_step, axis_name=PMAP_AXIS, in_axes=(0, 0, None), donate_argnums=(0,)),
            "train_step",
            dispatch_jitted=jax.process_count() > 1,
        )

        def step(state, batch, rng):
            new_state, metrics = stepped(state, batch, rng)
            return new_state, jax.tree.map(lambda x: x[0], metrics)

        return step

    def device_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """[B_local, ...] -> [local devices, B_local / local devices, ...] (pmap shards it)."""
        count = len(self.devices)
        return {
            key: value.reshape(count, -1, *value.shape[1:]) for key, value in local_batch.items()
        }

    def inference_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows on its first device (inference runs there, under jit)."""
        return jax.device_put(local_batch, self.devices[0])

    def params_for_inference(self, params):
        return jax.tree.map(_first_replica, params)


Strategy = MeshStrategy | PmapStrategy


def make_strategy(parallel_config: ml_collections.ConfigDict) -> Strategy:
    if parallel_config.strategy not in STRATEGIES:
        raise ValueError(
            f"parallel.strategy={parallel_config.strategy!r}; allowed: {list(STRATEGIES)}"
        )
    if parallel_config.strategy == "pmap":
        return PmapStrategy(devices=jax.local_devices())
    return MeshStrategy(
        mesh=make_mesh(),
        strategy=parallel_config.strategy,
        fsdp_min_size=parallel_config.fsdp_min_size,
    )


# ---------------------------------------------------------------- rows of global arrays


def _unique_shards(array: jax.Array) -> list:
    """This process's shards of a global array split on its first axis, in global order."""
    unique = {shard.index[0].start or 0: shard for shard in array.addressable_shards}
    return [unique[start] for start in sorted(unique)]


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array split on its first axis, in global order."""
    return np.concatenate([np.asarray(shard.data) for shard in _unique_shards(array)])


def local_row_positions(array: jax.Array) -> np.ndarray:
    """The global row index of each of `local_rows(array)`."""
    return np.concatenate(
        [np.arange(*shard.index[0].indices(array.shape[0])) for shard in _unique_shards(array)]
    )


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every process's rows, concatenated in process order (on every process)."""
    if jax.process_count() == 1:
        return rows
    return np.asarray(multihost_utils.process_allgather(rows, tiled=True))
