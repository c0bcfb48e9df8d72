"""Names and shapes of a pytree's arrays, and what differs between two of them: how a
checkpoint or a converted set of weights is checked against the model before it is used."""

from __future__ import annotations

import jax
import numpy as np


def leaf_name(path) -> str:
    """ "params.conv_in.kernel" for a key path."""
    return ".".join(
        str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path
    )


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"params.conv_in.kernel": shape, ...} for every array leaf of a pytree (arrays or
    `jax.ShapeDtypeStruct`s)."""
    return {
        leaf_name(path): tuple(np.shape(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def describe_mismatch(saved: dict, expected: dict, *, found: str = "saved") -> str:
    """The arrays missing, unexpected or of another shape (at most 5 of each, parameters
    first)."""

    def params_first(names):
        return sorted(names, key=lambda name: (not name.startswith("params."), name))

    missing = params_first(set(expected) - set(saved))
    unexpected = params_first(set(saved) - set(expected))
    reshaped = [
        f"{name}: {found} {saved[name]}, model {expected[name]}"
        for name in params_first(set(saved) & set(expected))
        if saved[name] != expected[name]
    ]
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", reshaped)):
        if names:
            parts.append(f"{label}: " + "; ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
    return " | ".join(parts)
