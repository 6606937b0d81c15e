"""`ModelConfig`: the architecture of an early-exit OPT or Llama model.

The config owns its Hugging Face conversion (`from_hf` / `to_hf`), as Levanter's
configs do: every field we read is checked, and any feature we do not implement
(a rope type such as `yarn`, sliding-window attention) raises `GreencodeError`
naming the field instead of silently producing a different model.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any, Mapping

from greencode_jax.config import HEAD_KINDS, did_you_mean
from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import as_float

FAMILIES = ("opt", "llama")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (`rope_scaling` / `rope_parameters` in HF)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model. Hashable, so it can be a static `jit` argument."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    activation: str
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    exit_layers: tuple[int, ...] = ()
    # exit heads (models/heads.py): "" none, "affine" (h + hA + b) or "lowrank" (h + hDU + b, rank exit_head_rank)
    exit_head: str = ""
    exit_head_rank: int = 0
    # OPT only
    pre_layer_norm: bool = True  # False for opt-350m (post-LayerNorm)
    final_layer_norm: bool = True  # OPT post-LN models have none
    layer_norm_affine: bool = True
    embed_dim: int = 0  # word_embed_proj_dim; 0 means hidden_size (no project_in/out)
    # Llama only
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    # token ids, carried through to the exported config
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # how the forward is executed (not part of the architecture)
    scan_layers: bool = True
    remat: bool = False

    def __post_init__(self):
        def bad(field, message):
            raise GreencodeError(f"model config field '{field}': {message}")

        if self.family not in FAMILIES:
            bad("family", f"got {self.family!r}, expected one of {FAMILIES}")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"got {self.activation!r}, expected one of {ACTIVATIONS}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                bad(name, f"got {value!r}, expected a positive integer")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.rope_scaling.rope_type not in ROPE_TYPES:
            bad("rope_scaling.rope_type", f"got {self.rope_scaling.rope_type!r}, supported: {ROPE_TYPES}")
        exits = () if self.exit_layers is None else self.exit_layers
        is_index = lambda i: isinstance(i, numbers.Integral) and not isinstance(i, bool)  # noqa: E731
        if is_index(exits) or isinstance(exits, str) or not all(is_index(i) for i in exits):
            bad("exit_layers", f"got {exits!r}, expected a list of 0-based decoder-layer indices")
        exits = tuple(int(i) for i in exits) or tuple(range(self.num_layers))
        out_of_range = [i for i in exits if not 0 <= i < self.num_layers]
        if out_of_range:
            bad("exit_layers", f"{out_of_range} outside 0..{self.num_layers - 1} (0-based decoder layers)")
        # The last layer is always an exit: the full model is one of the choices.
        object.__setattr__(self, "exit_layers", tuple(sorted(set(exits) | {self.num_layers - 1})))
        if self.exit_head not in ("", *HEAD_KINDS):
            bad("exit_head", f"got {self.exit_head!r}, expected one of {('', *HEAD_KINDS)} ('' for none)")
        if self.exit_head == "lowrank" and not (isinstance(self.exit_head_rank, int) and
                                                0 < self.exit_head_rank <= self.hidden_size):
            bad("exit_head_rank", f"got {self.exit_head_rank!r}, expected a rank in 1..{self.hidden_size}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # ---- derived properties -------------------------------------------------
    @property
    def has_projection(self) -> bool:
        """OPT models whose word embeddings are narrower than the hidden size (opt-350m)."""
        return self.family == "opt" and self.embed_dim not in (0, self.hidden_size)

    @property
    def word_embed_dim(self) -> int:
        return self.embed_dim if self.has_projection else self.hidden_size

    @property
    def has_final_norm(self) -> bool:
        return self.family == "llama" or (self.pre_layer_norm and self.final_layer_norm)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- our own serialisation ---------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "ModelConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GreencodeError(f"{source}: unknown model config field '{unknown[0]}'{did_you_mean(unknown[0], known)}")
        if isinstance(data.get("rope_scaling"), Mapping):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        for key in ("exit_layers", "eos_token_id"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        try:
            return cls(**data)
        except TypeError as error:  # a required field is missing
            raise GreencodeError(f"{source}: {error}") from None

    # ---- Hugging Face -------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config: Any, exit_layers=None, source: str = "config.json") -> "ModelConfig":
        """Reads a transformers config object or a `config.json` dict.

        `exit_layers` overrides the exits stored in the config (our export writes them
        as `greencode_exit_layers`); the default is every layer.
        """
        hf = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        model_type = hf.get("model_type")
        readers = {"opt": _opt_from_hf, "llama": _llama_from_hf}
        if model_type not in readers:
            raise GreencodeError(
                f"{source}: unsupported model_type {model_type!r}; greencode-jax supports {sorted(readers)}")
        fields = readers[model_type](_Reader(hf, source))
        if exit_layers is None:
            exit_layers = hf.get("greencode_exit_layers")
        fields["exit_layers"] = exit_layers if exit_layers is not None else ()  # validated by __post_init__
        return cls(**fields)

    def to_hf(self):
        """The equivalent transformers config object (OPTConfig or LlamaConfig)."""
        import transformers

        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.family == "opt":
            config = transformers.OPTConfig(
                **common, ffn_dim=self.intermediate_size, do_layer_norm_before=self.pre_layer_norm,
                _remove_final_layer_norm=not self.final_layer_norm,
                word_embed_proj_dim=self.word_embed_dim, activation_function=self.activation,
                enable_bias=self.attention_bias, layer_norm_elementwise_affine=self.layer_norm_affine,
                dropout=0.0, attention_dropout=0.0)
            config.architectures = ["OPTForCausalLM"]
        else:
            scaling = self.rope_scaling
            rope = {"rope_type": scaling.rope_type, "rope_theta": self.rope_theta}
            if scaling.rope_type == "linear":
                rope["factor"] = scaling.factor
            elif scaling.rope_type == "llama3":
                rope.update(factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                            high_freq_factor=scaling.high_freq_factor,
                            original_max_position_embeddings=scaling.original_max_position_embeddings)
            config = transformers.LlamaConfig(
                **common, intermediate_size=self.intermediate_size, num_key_value_heads=self.num_kv_heads,
                head_dim=self.head_dim, hidden_act=self.activation, rms_norm_eps=self.norm_eps,
                attention_bias=self.attention_bias, mlp_bias=self.mlp_bias, rope_parameters=rope)
            config.architectures = ["LlamaForCausalLM"]
        config.greencode_exit_layers = list(self.exit_layers)
        return config


class _Reader:
    """Typed access to a HF config dict, with errors that name the field."""

    def __init__(self, hf: dict, source: str):
        self.hf, self.source = hf, source

    def get(self, key, kind, default=None, required=False):
        if key not in self.hf or self.hf[key] is None:
            if required:
                raise GreencodeError(f"{self.source}: missing required field '{key}'")
            return default
        value = as_float(self.hf[key]) if kind is float else self.hf[key]  # `1e-6` from a YAML model section
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
            isinstance(value, kind) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
        if not ok:
            raise GreencodeError(f"{self.source}: field '{key}' is {value!r}, expected {kind.__name__}")
        return kind(value) if kind is float else value

    def refuse(self, key, message):
        raise GreencodeError(f"{self.source}: field '{key}' {message}; greencode-jax does not support it")


def _token_ids(r: _Reader) -> dict:
    eos = r.hf.get("eos_token_id")
    return dict(bos_token_id=r.hf.get("bos_token_id"), pad_token_id=r.hf.get("pad_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos)


def _opt_from_hf(r: _Reader) -> dict:
    hidden = r.get("hidden_size", int, required=True)
    heads = r.get("num_attention_heads", int, required=True)
    if hidden % heads:
        r.refuse("num_attention_heads", f"= {heads} does not divide hidden_size={hidden}")
    pre_ln = r.get("do_layer_norm_before", bool, True)
    activation = r.get("activation_function", str, "relu")
    if activation not in ACTIVATIONS:
        r.refuse("activation_function", f"= {activation!r}")
    bias = r.get("enable_bias", bool, True)
    return dict(
        family="opt", vocab_size=r.get("vocab_size", int, required=True), hidden_size=hidden,
        num_layers=r.get("num_hidden_layers", int, required=True), num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, intermediate_size=r.get("ffn_dim", int, required=True),
        max_position_embeddings=r.get("max_position_embeddings", int, required=True),
        norm_eps=1e-5,  # torch.nn.LayerNorm's default, which OPT uses
        activation=activation, tie_word_embeddings=r.get("tie_word_embeddings", bool, True),
        attention_bias=bias, mlp_bias=bias, pre_layer_norm=pre_ln,
        final_layer_norm=not r.get("_remove_final_layer_norm", bool, False),
        layer_norm_affine=r.get("layer_norm_elementwise_affine", bool, True),
        embed_dim=r.get("word_embed_proj_dim", int, hidden), **_token_ids(r))


def _llama_from_hf(r: _Reader) -> dict:
    hidden = r.get("hidden_size", int, required=True)
    heads = r.get("num_attention_heads", int, required=True)
    for key in ("sliding_window", "layer_types"):
        value = r.hf.get(key)
        if value and (key != "layer_types" or any(t != "full_attention" for t in value)):
            r.refuse(key, f"= {value!r} asks for sliding-window attention")
    if r.hf.get("pretraining_tp", 1) not in (1, None):
        r.refuse("pretraining_tp", f"= {r.hf['pretraining_tp']}")
    activation = r.get("hidden_act", str, "silu")
    if activation not in ACTIVATIONS:
        r.refuse("hidden_act", f"= {activation!r}")
    theta, scaling = _rope_from_hf(r)
    return dict(
        family="llama", vocab_size=r.get("vocab_size", int, required=True), hidden_size=hidden,
        num_layers=r.get("num_hidden_layers", int, required=True), num_heads=heads,
        num_kv_heads=r.get("num_key_value_heads", int, heads), head_dim=r.get("head_dim", int, hidden // heads),
        intermediate_size=r.get("intermediate_size", int, required=True),
        max_position_embeddings=r.get("max_position_embeddings", int, required=True),
        norm_eps=r.get("rms_norm_eps", float, 1e-6), activation=activation,
        tie_word_embeddings=r.get("tie_word_embeddings", bool, False),
        attention_bias=r.get("attention_bias", bool, False), mlp_bias=r.get("mlp_bias", bool, False),
        rope_theta=theta, rope_scaling=scaling, **_token_ids(r))


def _rope_from_hf(r: _Reader) -> tuple[float, RopeScaling]:
    """Reads `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5)."""
    params = r.hf.get("rope_parameters") or r.hf.get("rope_scaling") or {}
    field = "rope_parameters" if r.hf.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, Mapping):
        r.refuse(field, f"= {params!r} is not a mapping")
    theta = params.get("rope_theta", r.hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        r.refuse(f"{field}.rope_type", f"= {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    try:
        if rope_type == "default":
            scaling = RopeScaling()
        elif rope_type == "linear":
            scaling = RopeScaling("linear", factor=float(params["factor"]))
        else:
            scaling = RopeScaling(
                "llama3", factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except KeyError as missing:
        raise GreencodeError(f"{r.source}: field '{field}' of type {rope_type!r} lacks {missing}") from None
    return float(theta), scaling


def load_json(path, what: str) -> dict:
    """Reads a JSON file, turning a missing or malformed file into our error."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise GreencodeError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GreencodeError(f"{path}: {what} is not valid JSON ({error})") from None
