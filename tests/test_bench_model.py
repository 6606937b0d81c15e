"""`greencode bench forward --model DIR` and `bench decode --model DIR`: a tiny random Llama built
here, as a Hugging Face directory and as our checkpoint, benched against transformers in the same
run at the benches' smallest settings; and bench decode's rows can be checked by hand."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

import greencode_jax as gc
from greencode_jax.bench.decode_report import _ms
from greencode_jax.cli.main import main

TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(the Hugging Face directory, our checkpoint of it with exits 0 and 2)."""
    root = tmp_path_factory.mktemp("bench_model")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    model.save_pretrained(root / "hf")
    ours = gc.load_pretrained(root / "hf", exit_layers=[0], scan_layers=False)
    gc.save_checkpoint(ours, root / "checkpoint")
    return root / "hf", root / "checkpoint"


@pytest.mark.parametrize("which", ["hf", "checkpoint"])
def test_bench_forward_takes_a_model_directory(tiny_models, which, tmp_path, capsys):
    model_dir = dict(zip(["hf", "checkpoint"], tiny_models))[which]
    out = tmp_path / "forward.json"
    assert main(["bench", "forward", "--model", str(model_dir), "--tokens", "8", "--repeats", "1", "--skip-memory",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    kind = "a Hugging Face directory" if which == "hf" else "a greencode checkpoint"
    assert f"bench forward: model {model_dir} ({kind}, llama, 3 layers), batch 1 x 8 tokens" in printed
    assert re.search(r"transformers PyTorch +[0-9.]+ tokens/s", printed)
    assert "ratio ours / PyTorch" in printed
    r = json.loads(out.read_text())
    assert (r["model"], r["shape"]) == (str(model_dir), None) and r["torch_tokens_per_s"] > 0


@pytest.mark.parametrize("which, exits, expected", [("hf", None, [0, 1, 2]), ("checkpoint", None, [0, 2]),
                                                    ("checkpoint", "1", [1, 2])])
def test_bench_decode_takes_a_model_directory_with_its_exits(tiny_models, which, exits, expected, tmp_path, capsys):
    model_dir = dict(zip(["hf", "checkpoint"], tiny_models))[which]
    out = tmp_path / "decode.json"
    args = ["bench", "decode", "--model", str(model_dir), "--prompt", "4", "--new", "2", "--repeats", "1",
            "--json", str(out)] + (["--exit-layers", exits] if exits else [])
    assert main(args) == 0
    printed = capsys.readouterr().out
    kind = "a Hugging Face directory" if which == "hf" else "a greencode checkpoint"
    assert f"bench decode: model {model_dir} ({kind}, llama, 3 layers)" in printed
    assert f"exits {expected}" in printed
    assert re.search(r"\n  transformers +-?[0-9.]+ ms/token -> ours", printed)
    r = json.loads(out.read_text())
    assert r["exit_layers"] == expected and r["model"] == str(model_dir)
    _check_rows_by_hand(r, printed)


def _check_rows_by_hand(r: dict, printed: str):
    """Each ratio row shows the medians it can be checked against; the JSON holds every round."""
    assert "columns: ms/token is each row's median over the 1 rounds" in printed
    full_ms = r["rows"]["Full()"]["seconds_per_token"] * 1e3
    for name, row in r["rows"].items():
        if name == "Full()":
            continue
        row_ms = row["seconds_per_token"] * 1e3
        line = next(line for line in printed.splitlines() if line.strip().startswith(name))
        assert (f"{row_ms:.2f} ms/token = {row['ratio_to_full']:.3f}x Full() [{_ms(row_ms)}/{_ms(full_ms)} ms = "
                f"{row_ms / full_ms:.3f}x]") in line
        assert len(row["seconds_per_token_rounds"]) == 1
        assert row["seconds_per_token"] == row["seconds_per_token_rounds"][0]


def test_bench_refuses_a_shape_and_a_model_together(tiny_models, capsys):
    assert main(["bench", "forward", "--shape", "tiny-llama", "--model", str(tiny_models[0])]) == 2
    assert f"--shape tiny-llama and --model {tiny_models[0]}: give one of the two" in capsys.readouterr().err


def test_bench_decode_names_a_missing_model_directory(tmp_path, capsys):
    assert main(["bench", "decode", "--model", str(tmp_path / "nowhere"), "--new", "2", "--repeats", "1"]) == 2
    assert f"greencode: error: {tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err
