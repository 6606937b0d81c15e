"""Llama GGUF files: written here with the gguf package's own writer from a tiny random Llama
(llama.cpp's tensor names and Q/K permutation, a byte-level BPE vocabulary), then read by
greencode-jax and compared with transformers' own GGUF load and with the original model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

import greencode_jax as gc  # noqa: E402
from greencode_jax.errors import GreencodeError  # noqa: E402
from tests.conftest import randomize_  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "e r", "Ġ a", "i n", "Ġt h", "Ġ =", "d e", "Ġ (", "r e", "Ġ s"]
SEQ = 96
TOLERANCE = 1e-4  # two float32 programs (XLA vs PyTorch) over a few layers: rounding, not a bug


def byte_level_vocab() -> list[str]:
    """GPT-2's byte-to-unicode alphabet, the merges' products, then the special tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars + ["".join(m.split()) for m in MERGES] + SPECIALS


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf Q/K permutation (rotate-half pairs -> interleaved)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]) \
        .swapaxes(1, 2).reshape(weights.shape)


def tiny_llama(vocab_size: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=vocab_size - 3, eos_token_id=vocab_size - 3,
        pad_token_id=vocab_size - 3, attn_implementation="eager")
    return randomize_(transformers.LlamaForCausalLM(config), seed=11).eval()


def write_gguf(model, path, architecture="llama", qtype=None, raw_type_for=None):
    """`model` as a GGUF file; `qtype` quantises the 2-D weights; `raw_type_for` = (name, type)
    writes that tensor as raw zero bytes of another type."""
    c = model.config
    tokens = byte_level_vocab()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(len(tokens) - 3)
    writer.add_eos_token_id(len(tokens) - 3)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, ours in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{ours}.weight"
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        name, data = names[hf_name], tensor.numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            data = permute(data, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = permute(data, c.num_key_value_heads)
        if raw_type_for is not None and raw_type_for[0] == name:
            block, size = gguf.GGML_QUANT_SIZES[raw_type_for[1]]
            raw = np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=raw_type_for[1])  # shapes in bytes for quantised types
        elif qtype is not None and data.ndim == 2:
            writer.add_tensor(name, gguf.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(len(byte_level_vocab()))
    f32 = write_gguf(model, root / "tiny-f32.gguf")
    q8 = write_gguf(model, root / "tiny-q8_0.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    return model, f32, q8


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENCODE_CACHE_DIR", str(tmp_path / "cache"))


def transformers_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def token_ids(path, text: str) -> np.ndarray:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tokenizer(text)["input_ids"]
    return np.asarray([(ids * (SEQ // len(ids) + 1))[:SEQ]])


def logits_of(torch_model, ids) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.tensor(ids)).logits.numpy()


def test_gguf_file_tokens_differ_from_the_original_in_q_and_k():
    """The writer really permutes (else the check below would not test transformers' unpermute)."""
    q = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    assert not np.array_equal(permute(q, 4), q)


@pytest.mark.parametrize("which", ["f32", "q8"])
def test_our_import_matches_transformers_gguf_load(files, which):
    model, f32, q8 = files
    path = f32 if which == "f32" else q8
    ids = token_ids(path, "def add(a, b):\n    return a + b\nclass Tree(object):\n    pass\n")
    ours = gc.load_pretrained(path, exit_layers=[0, 1])
    assert (ours.config.family, ours.config.num_layers, ours.config.exit_layers) == ("llama", 3, (0, 1, 2))
    import jax

    with jax.default_matmul_precision("highest"):
        got = np.asarray(ours.logits(ids))
    reference = logits_of(transformers_gguf(path), ids)
    assert np.abs(reference).max() > 1.0  # O(1) logits: the comparison below means something
    assert np.abs(got - reference).max() < TOLERANCE
    if which == "f32":  # no quantisation: the GGUF round trip is the original model
        assert np.abs(got - logits_of(model, ids)).max() < TOLERANCE
    else:  # Q8_0 changed the weights: the comparison with transformers above ran on quantised ones
        assert np.abs(got - logits_of(model, ids)).max() > 1e-3


def test_q8_0_weights_are_within_half_a_quantisation_step(files):
    """Q8_0 stores blocks of 32 as int8 times d = max|block| / 127 (d in float16): each
    dequantised weight is within d/2 of the original, plus 127 x float16's rounding of d."""
    from safetensors.numpy import load_file

    from greencode_jax.convert import resolve_model_dir

    model, _, q8 = files
    weights = load_file(str(resolve_model_dir(q8) / "model.safetensors"))
    original = model.state_dict()["model.layers.1.mlp.up_proj.weight"].numpy()
    got = weights["model.layers.1.mlp.up_proj.weight"]
    blocks = original.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    bound = d / 2 + 127 * d * 2.0**-11
    error = np.abs(got.reshape(-1, 32) - blocks)
    assert (error <= bound).all() and error.max() > 0


def test_converted_directory_is_cached_and_keeps_the_tokenizer(files, tmp_path):
    from greencode_jax.convert import resolve_model_dir
    from greencode_jax.data.tokenizer import load_hf_tokenizer

    _, f32, _ = files
    first = resolve_model_dir(f32)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(f32) == first and (first / "model.safetensors").stat().st_mtime_ns == mtime
    text = "def f(x):\n    return x + 1\n"
    ours = load_hf_tokenizer(first)
    theirs = transformers.AutoTokenizer.from_pretrained(str(f32.parent), gguf_file=f32.name)
    assert ours.encode(text) == theirs(text)["input_ids"]


def test_convert_from_hf_writes_a_checkpoint_from_gguf(files, tmp_path):
    _, f32, _ = files
    out = tmp_path / "nested" / "ckpt"
    run = subprocess.run([sys.executable, "-m", "greencode_jax.cli.main", "convert-from-hf", str(f32), str(out),
                          "--exit-layers", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "llama, 3 layers, exits [1, 2]" in run.stdout
    assert (out / "tokenizer.json").exists()
    loaded = gc.load_pretrained(out)
    assert loaded.config.exit_layers == (1, 2)


def test_unsupported_architecture_is_refused(files, tmp_path):
    model, _, _ = files
    path = write_gguf(model, tmp_path / "gpt2.gguf", architecture="gpt2")
    with pytest.raises(GreencodeError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported"):
        gc.load_pretrained(path)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_unsupported_quantisation_is_refused_naming_the_tensor(files, tmp_path):
    model, _, _ = files
    path = write_gguf(model, tmp_path / "q8k.gguf", raw_type_for=("blk.1.ffn_up.weight", gguf.GGMLQuantizationType.Q8_K))
    with pytest.raises(GreencodeError, match=r"tensor 'blk\.1\.ffn_up\.weight' is quantised as Q8_K"):
        gc.load_pretrained(path)


def test_bad_gguf_files_get_one_line_on_the_command_line(files, tmp_path):
    _, f32, _ = files
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(f32.read_bytes()[: f32.stat().st_size // 2])
    for path, expected in [(truncated, "not a readable GGUF file"), (tmp_path / "absent.gguf", "no such GGUF file")]:
        run = subprocess.run([sys.executable, "-m", "greencode_jax.cli.main", "convert-from-hf", str(path),
                              str(tmp_path / "out")], capture_output=True, text=True)
        assert run.returncode == 2
        assert expected in run.stderr and "Traceback" not in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert not (tmp_path / "out").exists()


def test_finetune_from_a_gguf_prepares_the_corpus_with_its_tokenizer(files, tmp_path):
    """model.init: FILE.gguf with data.prepare_tokenizer: model: the corpus is tokenised by the GGUF's
    own tokenizer (raw source view), the run trains from the GGUF's weights, final/ keeps the tokenizer."""
    from greencode_jax.cli.train_cmd import finetune_config_from_dict
    from greencode_jax.data.tokenizer import load_hf_tokenizer
    from greencode_jax.train import train

    _, f32, _ = files
    data = tmp_path / "data" / "corpus"
    sections = {
        "run": {"name": "gguf", "out_dir": str(tmp_path / "runs"), "progress": False, "log_every": 1},
        "model": {"init": str(f32), "exit_layers": [1], "scan_layers": True},
        "data": {"path": str(data), "seq_len": 32, "prepare_lang": "python", "prepare_tokenizer": "model",
                 "prepare_view": "raw", "prepare_max_files": 12},
        "train": {"steps": 2, "batch_size": 4, "learning_rate": 1e-3},
        "checkpoint": {"every": 2, "keep": 1},
        "eval": {"split": "train", "batches": 1},  # 12 files may leave the test split empty
    }
    config, resolved = finetune_config_from_dict(sections, "gguf.yaml")
    result = train(config, source="gguf.yaml", resolved_yaml=resolved, progress=False)
    manifest = json.loads((data / "prepare.json").read_text())
    assert manifest["view"] == "raw" and manifest["tokenizer"]["vocab_size"] == len(byte_level_vocab())
    text = "import os\nprint(os.sep)\n"
    theirs = transformers.AutoTokenizer.from_pretrained(str(f32.parent), gguf_file=f32.name)
    assert load_hf_tokenizer(result.final_checkpoint).encode(text) == theirs(text)["input_ids"]
    assert gc.load_pretrained(result.final_checkpoint).config.exit_layers == (1, 2)
    # final/ holds the tokenizer it was trained with: the corpus passes the later stages' check.
    from greencode_jax.convert.fingerprint import model_tokenizer_fingerprint
    from greencode_jax.data import PreparedData

    assert model_tokenizer_fingerprint(result.final_checkpoint) == PreparedData(data).tokenizer_fingerprint is not None


def test_prepare_tokenizer_model_needs_a_pretrained_model(tmp_path):
    from greencode_jax.cli.train_cmd import finetune_config_from_dict
    from greencode_jax.train import train

    sections = {"run": {"name": "x", "out_dir": str(tmp_path / "runs")},
                "model": {"init": "scratch", "config": {"model_type": "llama", "hidden_size": 16,
                                                        "intermediate_size": 32, "num_hidden_layers": 2,
                                                        "num_attention_heads": 2}},
                "data": {"path": str(tmp_path / "corpus"), "prepare_lang": "python", "prepare_tokenizer": "model"}}
    config, resolved = finetune_config_from_dict(sections, "x.yaml")
    with pytest.raises(GreencodeError, match="data.prepare_tokenizer=model needs a pretrained model.init"):
        train(config, source="x.yaml", resolved_yaml=resolved, progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "corpus").exists()
