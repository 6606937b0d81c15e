"""One name-mapping table per family, serving both import and export.

Each entry ties a Hugging Face tensor name to a path in our parameter tree. `{i}`
in a name stands for the decoder layer: our parameter stacks all layers along a
leading axis. Tensors keep PyTorch's layout (Linear weights [out, in]), so none is
transposed on the way in or out.
"""

from __future__ import annotations

from typing import NamedTuple

from greencode_jax.models.config import ModelConfig


class Entry(NamedTuple):
    hf_name: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    path: tuple[str, ...]  # e.g. ("layers", "attn", "q_proj", "kernel")
    per_layer: bool  # stacked over decoder layers; hf_name has "{i}"


def _linear(hf_prefix, path, bias):
    entries = [Entry(f"{hf_prefix}.weight", (*path, "kernel"), "{i}" in hf_prefix)]
    if bias:
        entries.append(Entry(f"{hf_prefix}.bias", (*path, "bias"), "{i}" in hf_prefix))
    return entries


def _norm(hf_prefix, path, bias):
    entries = [Entry(f"{hf_prefix}.weight", (*path, "scale"), "{i}" in hf_prefix)]
    if bias:
        entries.append(Entry(f"{hf_prefix}.bias", (*path, "bias"), "{i}" in hf_prefix))
    return entries


def _opt_table(c: ModelConfig) -> list[Entry]:
    d, layer = "model.decoder", "model.decoder.layers.{i}"
    affine = c.layer_norm_affine
    table = [
        Entry(f"{d}.embed_tokens.weight", ("embed_tokens", "embedding"), False),
        Entry(f"{d}.embed_positions.weight", ("embed_positions", "embedding"), False),
    ]
    if c.has_projection:
        table += _linear(f"{d}.project_in", ("project_in",), False)
        table += _linear(f"{d}.project_out", ("project_out",), False)
    for hf, ours in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("out_proj", "o_proj")):
        table += _linear(f"{layer}.self_attn.{hf}", ("layers", "attn", ours), c.attention_bias)
    if affine:
        table += _norm(f"{layer}.self_attn_layer_norm", ("layers", "attn_norm"), True)
        table += _norm(f"{layer}.final_layer_norm", ("layers", "mlp_norm"), True)
    table += _linear(f"{layer}.fc1", ("layers", "mlp", "fc1"), c.mlp_bias)
    table += _linear(f"{layer}.fc2", ("layers", "mlp", "fc2"), c.mlp_bias)
    if c.has_final_norm and affine:
        table += _norm(f"{d}.final_layer_norm", ("final_norm",), True)
    return table


def _llama_table(c: ModelConfig) -> list[Entry]:
    layer = "model.layers.{i}"
    table = [Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), False)]
    for name in ("q_proj", "k_proj", "v_proj"):
        table += _linear(f"{layer}.self_attn.{name}", ("layers", "attn", name), c.attention_bias)
    table += _linear(f"{layer}.self_attn.o_proj", ("layers", "attn", "o_proj"), c.attention_bias)
    for name in ("gate_proj", "up_proj", "down_proj"):
        table += _linear(f"{layer}.mlp.{name}", ("layers", "mlp", name), c.mlp_bias)
    table += _norm(f"{layer}.input_layernorm", ("layers", "attn_norm"), False)
    table += _norm(f"{layer}.post_attention_layernorm", ("layers", "mlp_norm"), False)
    table += _norm("model.norm", ("final_norm",), False)
    return table


def param_table(config: ModelConfig) -> list[Entry]:
    """Every parameter of the model, in the order Hugging Face lists them."""
    table = _opt_table(config) if config.family == "opt" else _llama_table(config)
    if not config.tie_word_embeddings:
        table.append(Entry("lm_head.weight", ("lm_head", "kernel"), False))
    return table


def hf_names(entry: Entry, num_layers: int) -> list[str]:
    """The Hugging Face tensor names one entry covers (one per layer when stacked)."""
    if not entry.per_layer:
        return [entry.hf_name]
    return [entry.hf_name.format(i=i) for i in range(num_layers)]


def parameter_arrays(table: list[Entry], config: ModelConfig):
    """Yields (our parameter path, entry, HF names it holds) for each of our arrays.

    With stacked layers (`config.scan_layers`) a per-layer entry is one array holding
    every layer; otherwise it is one array per layer, at path ("layers", i, ...).
    """
    for entry in table:
        names = hf_names(entry, config.num_layers)
        if entry.per_layer and not config.scan_layers:
            for layer, name in enumerate(names):
                yield (entry.path[0], layer, *entry.path[1:]), entry, [name]
        else:
            yield entry.path, entry, names


# Tensors some checkpoints carry that are not parameters (buffers) and can be ignored.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")


def canonical_name(name: str) -> str:
    """Adds the `model.` prefix that checkpoints saved from the base model (OPTModel, LlamaModel) lack."""
    if name.startswith(("model.", "lm_head.")):
        return name
    return f"model.{name}"
