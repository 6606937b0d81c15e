"""Shared fixtures: tiny random PyTorch transformers models built in the test, never downloaded.

Every model is re-randomised so activations and logits are O(1) (Hugging Face's default
init, std 0.02, makes logits so small that any parity check passes trivially), saved with
`save_pretrained` into a session temp dir together with two small tokenizer files, and
run once in PyTorch (fp32, eval mode, eager attention) on shared inputs. Everything is
built lazily and cached for the session, so each variant is built, loaded and compiled
once whatever the number of tests that use it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import greencode_jax as gc

SEQ_LEN = 520  # >= 500: RoPE bugs hide on short prompts; > 64 exercises llama3's scaling
NUM_PAD = 7  # left padding of the second row in the padded batch
MAX_POSITIONS = 640

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (transformers config class, config kwargs, seed). Shapes are tiny on purpose.
VARIANTS = {
    # OPT, pre-LayerNorm (opt-125m style); OPT ties its head by default.
    "opt_pre_tied": ("opt", dict(
        vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
        do_layer_norm_before=True, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1), 1),
    # OPT with an untied head, and no biases anywhere (enable_bias=False).
    "opt_pre_untied": ("opt", dict(
        vocab_size=103, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
        do_layer_norm_before=True, word_embed_proj_dim=48, tie_word_embeddings=False, enable_bias=False,
        bos_token_id=2, eos_token_id=2, pad_token_id=1), 2),
    # OPT post-LayerNorm with project_in/project_out (opt-350m style): no final layer norm.
    "opt_post_proj": ("opt", dict(
        vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_dim=96,
        do_layer_norm_before=False, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1), 3),
    # Llama, multi-query (one K/V head), tied head.
    "llama_kv1_tied": ("llama", dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0), 4),
    # Llama GQA with 2 K/V heads, untied, biases on attention and MLP, head_dim != hidden/heads.
    "llama_kv2_bias": ("llama", dict(
        vocab_size=113, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        head_dim=12, intermediate_size=80, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0), 5),
    # Llama with full multi-head attention (K/V heads = heads), untied, 4 layers.
    "llama_mha": ("llama", dict(
        vocab_size=107, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0), 6),
    # Llama 3 rope scaling; head_dim 16 puts inverse frequencies in all three llama3 regimes.
    "llama3_rope": ("llama", dict(
        vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, tie_word_embeddings=True, rope_parameters=dict(LLAMA3_ROPE),
        bos_token_id=1, eos_token_id=2, pad_token_id=0), 7),
}

TOKENIZER_FILES = {
    "tokenizer_config.json": {"model_max_length": MAX_POSITIONS, "padding_side": "left",
                              "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
    "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
}


def hf_config(name: str):
    family, kwargs, _ = VARIANTS[name]
    if family == "opt":
        return transformers.OPTConfig(max_position_embeddings=MAX_POSITIONS, dropout=0.0, attention_dropout=0.0,
                                      **kwargs)
    return transformers.LlamaConfig(max_position_embeddings=MAX_POSITIONS, **kwargs)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draws every parameter so activations and logits are O(1), deterministically.

    Linear weights ~ N(0, 1/sqrt(fan_in)), biases ~ N(0, 0.1), norm weights ~ 1 + N(0, 0.1),
    norm biases ~ N(0, 0.1), embeddings ~ N(0, 1). A tied LM head shares the embedding's
    tensor, so it is drawn once (as an embedding).
    """
    gen = torch.Generator().manual_seed(seed)
    done: set[int] = set()

    def draw(param, std, mean=0.0):
        if param is None or id(param) in done:
            return
        done.add(id(param))
        param.copy_(mean + std * torch.randn(param.shape, generator=gen, dtype=torch.float32))

    modules = list(model.named_modules())
    with torch.no_grad():
        for _, module in modules:  # embeddings first, so a tied head keeps the embedding's scale
            if isinstance(module, torch.nn.Embedding):
                draw(module.weight, 1.0)
        for _, module in modules:
            if isinstance(module, torch.nn.Linear):
                draw(module.weight, module.in_features ** -0.5)
                draw(module.bias, 0.1)
            elif isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                draw(getattr(module, "weight", None), 0.1, mean=1.0)
                draw(getattr(module, "bias", None), 0.1)
    undrawn = [n for n, p in model.named_parameters() if id(p) not in done]
    assert not undrawn, f"parameters left at HF's default init: {undrawn}"
    return model.eval()


def build_torch_model(name: str) -> torch.nn.Module:
    family, _, seed = VARIANTS[name]
    cls = transformers.OPTForCausalLM if family == "opt" else transformers.LlamaForCausalLM
    config = hf_config(name)
    config._attn_implementation = "eager"  # the plainest reference implementation
    torch.manual_seed(seed)
    model = randomize_(cls(config).to(torch.float32), seed)
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def write_tokenizer_files(directory: Path):
    for file_name, content in TOKENIZER_FILES.items():
        (Path(directory) / file_name).write_text(json.dumps(content, indent=2) + "\n")


def make_inputs(vocab_size: int, pad_token_id: int, seed: int):
    """ids [2, SEQ_LEN] (not containing pad), an all-ones mask, and a mask with NUM_PAD left pads in row 1."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(2, SEQ_LEN), dtype=np.int64)
    padded_ids = ids.copy()
    padded_ids[1, :NUM_PAD] = pad_token_id
    full_mask = np.ones_like(ids)
    padded_mask = full_mask.copy()
    padded_mask[1, :NUM_PAD] = 0
    return ids, full_mask, padded_ids, padded_mask


def hf_generate_position_ids(mask: np.ndarray) -> torch.Tensor:
    """Positions the way transformers' generate() derives them from a left-padded mask."""
    mask = torch.from_numpy(mask).long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def torch_exit_head(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The reference exit head built from the PyTorch model's own modules:
    final norm (when the model has one) -> OPT's project_out (when present) -> lm_head."""
    if isinstance(model, transformers.OPTForCausalLM):
        decoder = model.model.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
    else:
        hidden = model.model.norm(hidden)
    return model.lm_head(hidden)


@dataclasses.dataclass
class Variant:
    """One tiny model: its HF directory, the PyTorch model, shared inputs and PyTorch outputs."""

    name: str
    family: str
    path: Path
    torch_model: torch.nn.Module
    ids: np.ndarray
    full_mask: np.ndarray
    padded_ids: np.ndarray
    padded_mask: np.ndarray

    @property
    def num_layers(self) -> int:
        return self.torch_model.config.num_hidden_layers

    @functools.cached_property
    def ours(self):
        """Our fp32 model loaded from the HF directory (cached: one JAX compile per variant and shape)."""
        return gc.load_pretrained(self.path)

    def torch_forward(self, ids, mask, hidden_states=False):
        kwargs = dict(attention_mask=torch.from_numpy(mask).long(), output_hidden_states=hidden_states)
        if self.family == "llama":
            kwargs["position_ids"] = hf_generate_position_ids(mask)
        with torch.no_grad():
            return self.torch_model(torch.from_numpy(ids), **kwargs)

    @functools.cached_property
    def ref_full(self):
        """PyTorch output on the unpadded batch, with every layer's hidden states."""
        return self.torch_forward(self.ids, self.full_mask, hidden_states=True)

    @functools.cached_property
    def ref_padded(self):
        return self.torch_forward(self.padded_ids, self.padded_mask)


class Zoo:
    """Builds each variant on first use and keeps it for the session."""

    def __init__(self, root: Path):
        self.root = root
        self._variants: dict[str, Variant] = {}

    def __getitem__(self, name: str) -> Variant:
        if name not in self._variants:
            family, kwargs, seed = VARIANTS[name]
            model = build_torch_model(name)
            path = self.root / name
            model.save_pretrained(path)
            write_tokenizer_files(path)
            self._variants[name] = Variant(name, family, path, model,
                                           *make_inputs(kwargs["vocab_size"], kwargs["pad_token_id"], seed))
        return self._variants[name]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("hf_models"))


@pytest.fixture(scope="session", params=list(VARIANTS))
def variant(request, zoo) -> Variant:
    """Each tiny model in turn."""
    return zoo[request.param]


@pytest.fixture
def highest_precision():
    """fp32 matmuls at full precision (TPUs otherwise use bf16 passes, GPUs may use TF32)."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


def assert_no_output(out: Path):
    """Neither the output nor any hidden temporary sibling (`.NAME.tmp-*`, `.NAME.old-*`) is left behind."""
    out = Path(out)
    assert not out.exists(), f"{out} was left behind"
    leftovers = sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
    assert not leftovers, f"temporary siblings left behind: {leftovers}"


# Every executable XLA:CPU compiles keeps memory maps of its own (the generate tests alone leave
# 10,000), and Linux allows a process vm.max_map_count of them (65,530 by default): the whole
# suite in one process crossed it, and the next compile crashed (a segfault in
# backend_compile_and_load). Between test modules, once the process holds more than
# MAP_LIMIT maps, JAX's caches are cleared: the executables and their maps go, and a module
# that runs later compiles what it needs again (rarely, so the suite stays fast).
MAP_LIMIT = 30_000


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no such limit to watch
        return 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    if (nextitem is None or nextitem.module is not item.module) and _memory_maps() > MAP_LIMIT:
        import gc as garbage
        import sys

        if "jax" in sys.modules:
            sys.modules["jax"].clear_caches()
        garbage.collect()
