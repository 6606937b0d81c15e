"""Exit heads (models/heads.py) on a frozen backbone: an untrained head is the plain exit, the last
layer and Full() never change, every exit path uses the heads, heads export beside a stock Hugging
Face directory and load back to the same exit logits, and `finetune` with train.method=heads
trains only them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

import greencode_jax as gc
from greencode_jax.cli.main import main
from greencode_jax.generate.record import record_jit
from greencode_jax.models import ModelConfig
from greencode_jax.models.model import init_model

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import stdlib_corpus  # noqa: E402,F401 (fixture)

CONFIG = ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=4, num_heads=2, num_kv_heads=1,
                     head_dim=8, intermediate_size=32, max_position_embeddings=64, norm_eps=1e-5, activation="silu",
                     tie_word_embeddings=True, attention_bias=False, mlp_bias=False, exit_layers=(0, 2),
                     scan_layers=False)


def with_heads(plain, kind="affine", rank=0, scale=0.0, seed=0):
    """`plain`'s weights with exit heads: zero (scale 0), or drawn at `scale`."""
    model = init_model(plain.config.replace(exit_head=kind, exit_head_rank=rank), seed=1)
    state = nnx.state(model, nnx.Param)
    values = nnx.to_pure_dict(state)
    values.update({k: v for k, v in nnx.to_pure_dict(nnx.state(plain, nnx.Param)).items()})
    rng = np.random.default_rng(seed)
    for name, value in values["exit_heads"].items():
        if scale and name != "down":
            values["exit_heads"][name] = (rng.normal(size=value.shape) * scale).astype(np.float32)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def plain():
    return init_model(CONFIG, seed=1)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 64, (2, 10))


@pytest.mark.parametrize("kind, rank", [("affine", 0), ("lowrank", 3)])
def test_a_zero_head_is_the_plain_exit_bit_for_bit(plain, ids, kind, rank):
    zero = with_heads(plain, kind, rank)
    for layer in (0, 2, 3, None):
        assert np.array_equal(np.asarray(plain.logits(ids, layer=layer)), np.asarray(zero.logits(ids, layer=layer)))
    for policy in (gc.policies.Full(), gc.policies.FixedExit(0), gc.policies.Confidence(0.3)):
        a, b = plain.generate(ids, max_new_tokens=6, policy=policy), zero.generate(ids, max_new_tokens=6, policy=policy)
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.exit_layers, b.exit_layers)


def test_trained_heads_change_the_exits_and_never_the_last_layer_or_full(plain, ids):
    headed = with_heads(plain, scale=0.5)
    assert np.array_equal(np.asarray(plain.logits(ids)), np.asarray(headed.logits(ids)))
    assert not np.allclose(np.asarray(plain.logits(ids, layer=0)), np.asarray(headed.logits(ids, layer=0)))
    a, b = plain.generate(ids, max_new_tokens=8, policy=gc.policies.Full()), \
        headed.generate(ids, max_new_tokens=8, policy=gc.policies.Full())
    assert np.array_equal(a.tokens, b.tokens)


def test_generation_exits_through_each_rows_own_head(plain, ids):
    """FixedExit(k)'s first decoded token (from the prompt's full-depth pass) is the last layer's;
    every later one is the argmax of exit k's head over the exit state: a second code path, the
    model's own logits(layer=k) of the same sequence, must predict it."""
    headed = with_heads(plain, scale=0.5)
    for k in (0, 2):
        out = headed.generate(ids, max_new_tokens=5, policy=gc.policies.FixedExit(k))
        tokens = np.asarray(out.tokens)
        sequence = np.concatenate([ids, tokens[:, :-1]], axis=1)
        # with state propagation the layers after k hold k's state: only the exit's own head predicts
        logits = np.asarray(headed.logits(sequence, layer=k))
        predicted = logits[:, ids.shape[1]:].argmax(-1)
        assert np.array_equal(predicted[:, :1], tokens[:, 1:2])  # the first decoded token exits at k


def test_rollouts_judge_agreement_through_the_heads(plain, ids):
    headed = with_heads(plain, scale=1.0)
    valid = np.ones(ids.shape, bool)
    rec = record_jit(headed, ids, valid, new_tokens=4)
    exit0 = np.asarray(headed.logits(ids, layer=0))[:, -1].argmax(-1)
    final = np.asarray(headed.logits(ids))[:, -1].argmax(-1)
    assert np.array_equal(np.asarray(rec.agree)[:, 0, 0], exit0 == final)
    plain_rec = record_jit(plain, ids, valid, new_tokens=4)
    assert np.array_equal(np.asarray(rec.tokens), np.asarray(plain_rec.tokens))  # full depth: unchanged


@pytest.mark.parametrize("kind, rank", [("affine", 0), ("lowrank", 3)])
def test_heads_export_beside_a_stock_directory_and_load_to_the_same_exit_logits(plain, ids, tmp_path, kind, rank):
    import transformers

    headed = with_heads(plain, kind, rank, scale=0.5)
    checkpoint = gc.save_checkpoint(headed, tmp_path / "ckpt")
    exported = gc.export_pretrained(gc.load_pretrained(checkpoint), tmp_path / "hf")
    assert (exported / "exit_heads.safetensors").is_file()
    _, info = transformers.AutoModelForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values())  # stock: no missing, unexpected or mismatched keys
    back = gc.load_pretrained(exported)
    assert back.config.exit_head == kind and back.config.exit_layers == headed.config.exit_layers
    for layer in (0, 2, 3):
        assert np.array_equal(np.asarray(back.logits(ids, layer=layer)), np.asarray(headed.logits(ids, layer=layer)))


def test_a_heads_file_for_another_model_names_both_shapes(plain, tmp_path):
    bigger = init_model(CONFIG.replace(hidden_size=32, head_dim=16), seed=2)
    exported = gc.export_pretrained(with_heads(bigger, scale=0.1), tmp_path / "big")
    small = gc.export_pretrained(plain, tmp_path / "small")
    (small / "exit_heads.safetensors").write_bytes((exported / "exit_heads.safetensors").read_bytes())
    with pytest.raises(gc.GreencodeError, match=r"exit heads for a model of 4 layers and hidden size 32, but this "
                                                 r"model has 4 layers and hidden size 16"):
        gc.load_pretrained(small)


def test_a_headed_checkpoint_keeps_its_exits(plain, tmp_path):
    checkpoint = gc.save_checkpoint(with_heads(plain, scale=0.1), tmp_path / "ckpt")
    with pytest.raises(gc.GreencodeError, match=r"exit heads are trained for exits \[0, 2, 3\]"):
        gc.load_pretrained(checkpoint, exit_layers=[1])


def test_the_fingerprint_covers_the_heads(plain):
    from greencode_jax.convert.fingerprint import compute_model_fingerprint

    a, b = with_heads(plain, scale=0.5, seed=0), with_heads(plain, scale=0.5, seed=1)
    assert compute_model_fingerprint(a) != compute_model_fingerprint(b)


# ---- finetune with train.method=heads -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, stdlib_corpus) -> Path:
    """A small model trained on the corpus (its exits untrained: exit weights on the last layer only)."""
    root = tmp_path_factory.mktemp("heads")
    vocab = json.loads((stdlib_corpus / "prepare.json").read_text())["tokenizer"]["vocab_size"]
    config = {"run": {"name": "base", "out_dir": str(root), "seed": 0, "log_every": 10, "progress": False},
              "model": {"init": "scratch", "exit_layers": [0, 1], "config": {
                  "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
                  "tie_word_embeddings": True, "vocab_size": vocab}},
              "data": {"path": str(stdlib_corpus), "seq_len": 32},
              "train": {"steps": 40, "batch_size": 8, "learning_rate": 3e-3, "exit_weights": [0.0, 0.0, 1.0]},
              "checkpoint": {"every": 40, "keep": 1}, "eval": {"batches": 2}}
    (root / "base.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune", str(root / "base.yaml"), "--no-progress"]) == 0
    return root / "base" / "final"


def test_finetune_heads_trains_the_heads_only(pretrained, stdlib_corpus, tmp_path, capsys):
    config = {"run": {"name": "heads", "out_dir": str(tmp_path), "seed": 0, "log_every": 1, "progress": False},
              "model": {"init": str(pretrained)}, "data": {"path": str(stdlib_corpus), "seq_len": 32},
              "train": {"method": "heads", "steps": 12, "batch_size": 8, "learning_rate": 1e-2,
                        "exit_weights": "uniform"},
              "checkpoint": {"every": 12, "keep": 1}, "eval": {"batches": 2}}
    (tmp_path / "heads.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune", str(tmp_path / "heads.yaml"), "--no-progress"]) == 0
    final = tmp_path / "heads" / "final"
    base, heads = gc.load_pretrained(pretrained), gc.load_pretrained(final)
    assert heads.config.exit_head == "affine"
    ours = nnx.to_pure_dict(nnx.state(heads, nnx.Param))
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(base, nnx.Param))):
        mine = ours
        for key in path:
            mine = mine[key.key]
        assert np.array_equal(np.asarray(value), np.asarray(mine)), path  # the backbone, bit for bit
    records = [json.loads(line) for line in (tmp_path / "heads" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]  # the distillation loss fell
    evaluation = json.loads((tmp_path / "heads" / "eval.json").read_text())
    before = json.loads((pretrained.parent / "eval.json").read_text())
    assert evaluation["exit_loss"]["2"] == before["exit_loss"]["2"]  # the last layer: the same model
    assert evaluation["exit_loss"]["0"] < before["exit_loss"]["0"]  # exit 0 predicts better through its head


def test_heads_need_a_pretrained_backbone(stdlib_corpus, tmp_path, capsys):
    config = {"run": {"name": "x", "out_dir": str(tmp_path)}, "model": {"init": "scratch", "config": {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 64}},
        "data": {"path": str(stdlib_corpus)}, "train": {"method": "heads"}}
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune", str(tmp_path / "x.yaml")]) == 2
    assert "train.method=heads trains exit heads on a frozen, pretrained backbone" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def small_corpus(stdlib_corpus, tmp_path_factory) -> Path:
    """A few files of the stdlib in the big corpus's tokenizer: an epoch of a handful of batches."""
    from greencode_jax.data import PrepareOptions, prepare_data

    out = tmp_path_factory.mktemp("small") / "corpus"
    prepare_data(PrepareOptions(lang="python", out=str(out), max_files=6, tokenizer=str(stdlib_corpus / "tokenizer"),
                                line_samples=0, workers=1, progress=False, split=(0.7, 0.0, 0.3)))
    return out


def test_several_epochs_replay_cached_hidden_states_and_resume(pretrained, small_corpus, tmp_path):
    """With more steps than batches in an epoch, the first epoch's hidden states are cached and
    replayed; an interrupted run (fewer steps, then more) resumes onto the same cache and ends with
    the heads an uninterrupted run has, bit for bit."""
    def config(name, steps):
        return {"run": {"name": name, "out_dir": str(tmp_path), "seed": 0, "log_every": 1, "progress": False},
                "model": {"init": str(pretrained)}, "data": {"path": str(small_corpus), "seq_len": 64},
                "train": {"method": "heads", "steps": steps, "batch_size": 8, "learning_rate": 1e-2,
                          "exit_weights": "uniform"},
                "checkpoint": {"every": 1, "keep": 1}, "eval": {"batches": 1}}

    from greencode_jax.data import PreparedData

    batches = PreparedData(small_corpus).stream("train", seq_len=64, global_batch=8, seed=0).batches_per_epoch
    assert 2 <= batches <= 20
    steps = batches + 3
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump(config("whole", steps)))
    assert main(["finetune", str(tmp_path / "whole.yaml"), "--no-progress"]) == 0
    assert len(list((tmp_path / "whole" / "hidden_cache").glob("*.hidden.npy"))) == batches
    (tmp_path / "part.yaml").write_text(yaml.safe_dump(config("part", steps)))
    # a run that stopped after batches + 1 steps (its checkpoint there), then the same run to the end
    assert main(["finetune", str(tmp_path / "part.yaml"), f"train.steps={batches + 1}", "--no-progress"]) == 0
    assert main(["finetune", str(tmp_path / "part.yaml"), "--no-progress"]) == 0
    a = nnx.to_pure_dict(nnx.state(gc.load_pretrained(tmp_path / "whole" / "final"), nnx.Param))["exit_heads"]
    b = nnx.to_pure_dict(nnx.state(gc.load_pretrained(tmp_path / "part" / "final"), nnx.Param))["exit_heads"]
    for name in a:
        assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])), name


def test_heads_asked_for_on_a_model_without_them_is_one_error(plain, tmp_path):
    checkpoint = gc.save_checkpoint(plain, tmp_path / "full_finetune")
    with pytest.raises(gc.GreencodeError, match=r"full_finetune: has no exit heads"):
        gc.load_pretrained(checkpoint, exit_heads=True)
    exported = gc.export_pretrained(with_heads(plain, scale=0.3), tmp_path / "hf")
    attached = gc.load_pretrained(checkpoint, exit_heads=exported / "exit_heads.safetensors")
    assert np.array_equal(np.asarray(attached.logits(np.arange(8)[None], layer=0)),
                          np.asarray(gc.load_pretrained(exported).logits(np.arange(8)[None], layer=0)))
