"""The tiny served model of the serve tests: a random untied Llama (GQA, 4 layers) with a
byte-level BPE trained here that has fill-in-the-middle tokens, saved as a model directory
that `greencode serve` loads (weights, config, tokenizer files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import MAX_POSITIONS, randomize_

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
SEED = 5
_SESSION: dict = {}


def _training_texts() -> list[str]:
    """Python source to train the BPE on: this project's own generate package (fixed text)."""
    root = Path(__file__).resolve().parents[1] / "greencode_jax" / "generate"
    return [p.read_text() for p in sorted(root.glob("*.py"))]


def build_served_model(out: Path, fim: bool = True) -> Path:
    import torch
    import transformers

    from greencode_jax.data.tokenizer import train_bpe

    tokenizer = train_bpe(_training_texts(), 320, FIM_TOKENS if fim else ())
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = randomize_(transformers.LlamaForCausalLM(config).to(torch.float32), SEED)
    model.save_pretrained(out)
    tokenizer.save(out)
    return out


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory) -> Path:
    if "dir" not in _SESSION:
        _SESSION["dir"] = build_served_model(tmp_path_factory.mktemp("served") / "tiny-llama")
    return _SESSION["dir"]
