"""Logical-axis sharding rules: the ONE table saying which mesh axes each logical axis uses.

Arrays are described by logical axes ("batch", "embed", "vocab", ...); `RULES` maps each to
mesh axes. Parameters are sharded along `fsdp` on their model-width ("embed") axis and
replicated along `data`; the batch is split over both axes, so every device holds a
different slice of it. A mesh axis is left out of a dimension it does not divide (a
24-row bias on 16 devices stays replicated) or when an earlier dimension already uses it.
"""

from __future__ import annotations

from typing import Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # examples of a batch
    ("embed", "fsdp"),  # the model width: every parameter has one such axis, FSDP shards it
    ("vocab", None),
    ("heads", None),  # query / key / value heads x head_dim
    ("mlp", None),  # MLP hidden units
    ("word_embed", None),  # OPT's word_embed_proj_dim when it differs from the hidden size
    ("positions", None),  # OPT's learned positions
    ("layers", None),  # the stacked-layer axis of a scanned model
    ("norm", None),  # norm scales and biases (small; replicated)
    ("length", None),  # sequence positions
    ("micro", None),  # gradient-accumulation micro-batches
)
_TABLE = dict(RULES)


def logical_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array of `shape` with these logical axes under `RULES`."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in _TABLE:
            raise ValueError(f"logical axis {name!r} has no rule in parallel.rules.RULES")
        target = _TABLE.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept, divisor = [], 1
        for axis in axes:
            n = mesh.shape[axis]
            if n > 1 and axis not in used and size % (divisor * n) == 0:
                kept.append(axis)
                divisor *= n
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(logical_axes, shape, mesh))
