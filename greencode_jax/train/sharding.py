"""Which logical axes each model parameter (and its optimiser moments) has, and the
resulting shardings on a mesh. The mesh axes behind the logical names live in one place:
`greencode_jax.parallel.rules.RULES`."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from greencode_jax.parallel import logical_sharding

# (module name, parameter name) -> logical axes of one layer's parameter
PARAM_AXES = {  # Linear kernels are [out, in] (PyTorch's layout)
    ("embed_tokens", "embedding"): ("vocab", "word_embed"),
    ("embed_positions", "embedding"): ("positions", "embed"),
    ("project_in", "kernel"): ("embed", "word_embed"),
    ("project_out", "kernel"): ("word_embed", "embed"),
    ("lm_head", "kernel"): ("vocab", "word_embed"),
    ("q_proj", "kernel"): ("heads", "embed"), ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("heads", "embed"), ("k_proj", "bias"): ("heads",),
    ("v_proj", "kernel"): ("heads", "embed"), ("v_proj", "bias"): ("heads",),
    ("o_proj", "kernel"): ("embed", "heads"), ("o_proj", "bias"): ("embed",),
    ("fc1", "kernel"): ("mlp", "embed"), ("fc1", "bias"): ("mlp",),
    ("gate_proj", "kernel"): ("mlp", "embed"), ("gate_proj", "bias"): ("mlp",),
    ("up_proj", "kernel"): ("mlp", "embed"), ("up_proj", "bias"): ("mlp",),
    ("fc2", "kernel"): ("embed", "mlp"), ("fc2", "bias"): ("embed",),
    ("down_proj", "kernel"): ("embed", "mlp"), ("down_proj", "bias"): ("embed",),
}
NORMS = ("attn_norm", "mlp_norm", "final_norm")


def _names(path) -> list[str]:
    out = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        out.append(str(name))
    return out


def param_logical_axes(path, shape) -> tuple:
    """Logical axes of a parameter (or an optimiser moment of it) from its tree path.

    The word-embedding width is "word_embed", which equals "embed" unless OPT projects
    (opt-350m), so a tied embedding is sharded along fsdp like the rest. Scalars and
    anything not a parameter (Adam's step count) are replicated.
    """
    names = _names(path)
    if len(shape) == 0 or len(names) < 2:
        return (None,) * len(shape)
    module, leaf = names[-2], names[-1]
    if module == "exit_heads":  # a few small matrices per exit: every device holds them whole
        return (None,) * len(shape)
    if module in NORMS:
        axes = ("norm",)
    elif (module, leaf) in PARAM_AXES:
        axes = PARAM_AXES[(module, leaf)]
    else:
        raise ValueError(f"parameter {'/'.join(names)} has no entry in train.sharding.PARAM_AXES")
    if "layers" in names and len(shape) == len(axes) + 1:  # stacked layers (per-layer ones have no such axis)
        axes = ("layers", *axes)
    if len(axes) != len(shape):
        raise ValueError(f"parameter {'/'.join(names)}: logical axes {axes} do not fit shape {tuple(shape)}")
    return axes


def _word_embed_as_embed(axes, hidden_size: int, word_embed_size: int):
    return tuple("embed" if a == "word_embed" and hidden_size == word_embed_size else a for a in axes)


def tree_shardings(tree, mesh: Mesh, hidden_size: int, word_embed_size: int):
    """NamedSharding for every leaf of a parameter / optimiser-state / train-state tree."""

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        axes = _word_embed_as_embed(param_logical_axes(path, shape), hidden_size, word_embed_size)
        return logical_sharding(axes, shape, mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
