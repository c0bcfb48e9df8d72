"""Gradient clipping by the global norm (Pascanu, Mikolov & Bengio 2013, Sec. 3.2, Alg. 2):
``g <- g * max_norm / ||g||`` where ``||g|| >= max_norm``, with ``||g||`` the L2 norm of all
gradients together.

The same clipping as ``optax.clip_by_global_norm``, reading a norm computed once. The train
step needs the norm anyway (its finiteness check and metrics), outside the branch that
applies the update, and optax's transformation computes it again inside that branch, where
XLA cannot share the two: for the DDPM CIFAR-10 U-Net's 304 parameter arrays that was 900
small reductions more per step to compile and run (docs/benchmarks.md). The clip is a
multiplication by one scalar, which XLA fuses into Adam's moment updates (optax's divides
each array in a loop of its own).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """Scale all updates by ``min(1, max_norm / ||updates||)`` (module docstring).

    The norm is the `global_norm` extra argument of ``update`` where given (the train step
    passes ``optax.tree.norm(grads)``), else computed here; the state is empty, as optax's."""
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm} must be positive")

    def update_fn(updates, state, params=None, *, global_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if global_norm is None else global_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
