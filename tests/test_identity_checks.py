"""Mismatched inputs are refused: a corpus of another tokenizer, a policy of another checkpoint,
a non-finite policy, a garbage rollout store, a cost model fitted on another architecture.

Tiny shapes: a 2-layer Llama over the session's stdlib corpus (its BPE tokenizer saved with the
checkpoint, as a fine-tune from scratch does), a second corpus with another BPE of the same size,
and a second checkpoint of the same shape with other weights.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import greencode_jax as gc
from conftest import assert_no_output
from greencode_jax.cli.main import main
from greencode_jax.errors import GreencodeError

sys.path.insert(0, str(Path(__file__).parent))
from rl_helpers import synthetic_arrays, write_synthetic_store  # noqa: E402
from test_train_support import stdlib_corpus  # noqa: E402,F401 (fixture)

HIDDEN = 32
EXITS = (0, 1)
ARCH = dict(model_type="llama", hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _checkpoint(out: Path, vocab_size: int, seed: int, tokenizer_dir=None, eos=None) -> Path:
    from greencode_jax.models import ModelConfig, Origin, init_model

    config = ModelConfig.from_hf(dict(ARCH, vocab_size=vocab_size, eos_token_id=eos), exit_layers=[0])
    model = init_model(config, seed=seed)
    model.origin = Origin(None if tokenizer_dir is None else str(tokenizer_dir))  # as finetune's final/ does
    return gc.save_checkpoint(model, out)


def _save_policy(out: Path, fingerprint=None, params=None) -> Path:
    params = params or gc.policies.Learned.init_params(jax.random.key(0), HIDDEN, widths=(8,))
    metadata = {} if fingerprint is None else {"trained_on": {"rollouts": "/somewhere/rollouts/train",
                                                              "model": {"checkpoint": "/somewhere/final",
                                                                        "fingerprint": fingerprint}}}
    return gc.policies.Learned(params, exit_layers=EXITS).save(out, metadata)


def _recorded(checkpoint: Path, key: str):
    return json.loads((checkpoint / "greencode_config.json").read_text())[key]


@pytest.fixture(scope="module")
def world(stdlib_corpus, tmp_path_factory):
    from greencode_jax.data import PreparedData, PrepareOptions, prepare_data

    root = tmp_path_factory.mktemp("identity")
    corpus = PreparedData(stdlib_corpus)
    tok = corpus.tokenizer()
    # Another BPE of the same size, trained on other text (asyncio's sources, not the first stdlib files).
    other = root / "other_corpus"
    prepare_data(PrepareOptions(lang="python", source=str(Path(json.__file__).parents[1] / "asyncio"), out=str(other),
                                vocab_size=512, line_samples=0, workers=1, progress=False))
    a = _checkpoint(root / "a", tok.vocab_size, 1, stdlib_corpus / "tokenizer", tok.eos_id)
    b = _checkpoint(root / "b", tok.vocab_size, 2, stdlib_corpus / "tokenizer", tok.eos_id)
    small = _checkpoint(root / "small", 300, 3)  # no tokenizer files: only the vocabulary size can be checked
    return {"root": root, "corpus": stdlib_corpus, "tok": tok, "other": other, "a": a, "b": b, "small": small}


def test_tokenizer_fingerprint_is_the_vocabulary_not_the_files(tmp_path):
    from greencode_jax.data.tokenizer import tokenizer_fingerprint, train_bpe

    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]
    other_texts = [f"class C{i}:\n    value = '{'ab' * (i % 5)}'\n" for i in range(300)]
    tok = train_bpe(texts, 300)
    tok.save(tmp_path / "one")
    tok.save(tmp_path / "two")
    # Reformatting the files changes nothing.
    path = tmp_path / "two" / "tokenizer.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=None, sort_keys=True))
    fingerprint = tokenizer_fingerprint(tmp_path / "one")
    assert fingerprint == tokenizer_fingerprint(tmp_path / "two") == tok.fingerprint()
    assert len(fingerprint) == 16
    # The same files as a checkpoint holds them (no greencode metadata): read through transformers.
    (tmp_path / "hf").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "one" / name, tmp_path / "hf" / name)
    assert tokenizer_fingerprint(tmp_path / "hf") == fingerprint
    other = train_bpe(other_texts, 300)
    assert other.vocab_size == tok.vocab_size and tokenizer_fingerprint(tmp_path / "nothing") is None
    assert other.fingerprint() != fingerprint


def test_prepare_json_and_checkpoints_record_the_tokenizer_fingerprint(world, tmp_path):
    from greencode_jax.convert.fingerprint import model_tokenizer_fingerprint
    from greencode_jax.data import PreparedData
    from greencode_jax.data.tokenizer import tokenizer_fingerprint

    fingerprint = json.loads((world["corpus"] / "prepare.json").read_text())["tokenizer"]["fingerprint"]
    assert fingerprint == tokenizer_fingerprint(world["corpus"] / "tokenizer") == world["tok"].fingerprint()
    assert _recorded(world["a"], "tokenizer_fingerprint") == fingerprint == model_tokenizer_fingerprint(world["a"])
    assert _recorded(world["small"], "tokenizer_fingerprint") is None
    assert model_tokenizer_fingerprint(world["small"]) is None
    # A corpus prepared before prepare.json recorded it: computed from its tokenizer files.
    old = tmp_path / "old"
    shutil.copytree(world["corpus"], old)
    manifest = json.loads((old / "prepare.json").read_text())
    del manifest["tokenizer"]["fingerprint"]
    (old / "prepare.json").write_text(json.dumps(manifest))
    assert PreparedData(old).tokenizer_fingerprint == fingerprint
    other = PreparedData(world["other"])
    assert other.tokenizer().vocab_size == world["tok"].vocab_size and other.tokenizer_fingerprint != fingerprint


def _refused(capsys, argv, out: Path, *needles):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("greencode: error: "), captured.err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    assert_no_output(out)
    assert not out.with_name(out.name + ".partial").exists()
    return err


def test_collect_rollouts_and_evaluate_refuse_a_corpus_of_another_tokenizer(world, tmp_path, capsys):
    from greencode_jax.data import PreparedData

    ckpt_fp = _recorded(world["a"], "tokenizer_fingerprint")
    other_fp = PreparedData(world["other"]).tokenizer_fingerprint
    out = tmp_path / "rollouts"
    err = _refused(capsys, ["collect-rollouts", str(world["a"]), "--data", str(world["other"]), "--out", str(out),
                            "--episodes", "2", "--no-progress"], out, world["other"], other_fp, world["a"], ckpt_fp)
    assert "holds another tokenizer" in err
    out = tmp_path / "evaluation"
    _refused(capsys, ["evaluate", str(world["a"]), "--data", str(world["other"]), "--out", str(out), "--no-progress"],
             out, world["other"], other_fp, world["a"], ckpt_fp)
    # --base is checked too.
    _refused(capsys, ["evaluate", str(world["a"]), "--data", str(world["corpus"]), "--base", str(world["small"]),
                      "--out", str(out), "--no-progress"], out, "--base", world["small"], "vocabulary of 300")


def test_a_model_without_tokenizer_files_still_refuses_ids_beyond_its_vocabulary(world, tmp_path, capsys):
    out = tmp_path / "rollouts"
    # 512 ids into a 300-row embedding used to be clamped silently.
    _refused(capsys, ["collect-rollouts", str(world["small"]), "--data", str(world["corpus"]), "--out", str(out),
                      "--episodes", "2", "--no-progress"], out, world["corpus"],
             f"{world['tok'].vocab_size} tokens", world["small"], "vocabulary of 300")


def test_model_fingerprint_ignores_layout_dtype_and_exits_but_not_weights(world):
    from greencode_jax.convert.fingerprint import compute_model_fingerprint, model_fingerprint

    recorded = _recorded(world["a"], "fingerprint")
    stacked = gc.load_pretrained(world["a"], scan_layers=True)
    per_layer = gc.load_pretrained(world["a"], scan_layers=False, exit_layers=[0, 1])
    assert compute_model_fingerprint(stacked) == compute_model_fingerprint(per_layer) == recorded
    bf16 = gc.load_pretrained(world["a"], dtype="bfloat16")
    assert model_fingerprint(bf16) == recorded  # carried from the checkpoint
    assert compute_model_fingerprint(bf16) != recorded  # its weights, rounded, are not the saved ones
    assert _recorded(world["b"], "fingerprint") != recorded
    # One weight of the second layer's query projection changed.
    kernel = per_layer.layers[1].attn.q_proj.kernel
    kernel.set_value(kernel.get_value().at[0, 0].add(0.5))
    assert compute_model_fingerprint(per_layer) != recorded


def test_a_policy_of_another_checkpoint_is_refused_unless_allowed(world, tmp_path):
    a_fp, b_fp = _recorded(world["a"], "fingerprint"), _recorded(world["b"], "fingerprint")
    policy = _save_policy(tmp_path / "policy", a_fp)
    a, b = gc.load_pretrained(world["a"]), gc.load_pretrained(world["b"])
    assert gc.policies.Learned.load(policy, 0.5, model=a).exit_layers == EXITS
    with pytest.raises(GreencodeError, match=rf"policy.json: trained on another checkpoint \(/somewhere/final, "
                                             rf"rollouts /somewhere/rollouts/train; fingerprint {a_fp}\) than "
                                             rf"{world['b']} \(fingerprint {b_fp}\); pass allow_foreign=True"):
        gc.policies.Learned.load(policy, 0.5, model=b)
    assert gc.policies.Learned.load(policy, 0.5, model=b, allow_foreign=True).exit_layers == EXITS
    unrecorded = _save_policy(tmp_path / "unrecorded")
    with pytest.raises(GreencodeError, match="records no fingerprint of the checkpoint it was trained on"):
        gc.policies.Learned.load(unrecorded, model=a)
    gc.policies.Learned.load(unrecorded)  # no model given: nothing to compare


def test_evaluate_refuses_a_foreign_policy_and_with_the_flag_says_so_in_the_report(world, tmp_path, capsys):
    a_fp, b_fp = _recorded(world["a"], "fingerprint"), _recorded(world["b"], "fingerprint")
    policy = _save_policy(tmp_path / "policy", a_fp)
    config = tmp_path / "eval.yaml"
    config.write_text("eval:\n  max_context: 48\n")
    out = tmp_path / "evaluation"
    argv = ["evaluate", str(world["b"]), "--data", str(world["corpus"]), "--out", str(out), "--samples", "1",
            "--policies", "full; learned@0.5", "--policy", str(policy), "--protocols", "completion",
            "--config", str(config), "--set", "cpu_backend=estimate", "--no-progress"]
    _refused(capsys, argv, out, f"--policy {policy}", a_fp, b_fp, "/somewhere/final", "--allow-foreign-policy")
    assert main([*argv, "--allow-foreign-policy"]) == 0
    capsys.readouterr()
    report = (out / "report.md").read_text()
    line = next(line for line in report.splitlines() if line.startswith("- learned policy:"))
    assert "trained on another checkpoint than the one evaluated" in line and a_fp in line and b_fp in line
    # The config field does what the flag does.
    config.write_text("eval:\n  max_context: 48\n  allow_foreign_policy: true\n")
    argv[5] = str(tmp_path / "again")  # --out
    assert main(argv) == 0
    capsys.readouterr()
    with pytest.raises(GreencodeError, match="field 'eval.allow_foreign_policy' is 'yes', expected true or false"):
        from greencode_jax.config import EvalConfig

        EvalConfig.from_dict({"allow_foreign_policy": "yes"})


def test_a_policy_with_nan_is_refused_and_its_weights_get_the_usual_mode(world, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    policy = _save_policy(tmp_path / "policy", _recorded(world["a"], "fingerprint"))
    weights = policy / "actor.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((policy / "policy.json").stat().st_mode) == 0o666 & ~umask
    for name, bad in (("layers.0.w", np.nan), ("obs_std", np.inf)):
        tensors = load_file(str(weights))
        tensors[name].reshape(-1)[3] = bad
        save_file(tensors, str(weights), metadata={"format": "np"})
        with pytest.raises(GreencodeError, match=rf"actor.safetensors: tensor '{name}' holds NaN or inf"):
            gc.policies.Learned.load(policy)
        out = tmp_path / "evaluation"
        _refused(capsys, ["evaluate", str(world["a"]), "--data", str(world["corpus"]), "--out", str(out),
                          "--policy", str(policy), "--no-progress"], out, weights, name, "NaN or inf")
        policy = _save_policy(tmp_path / f"policy_{name}", _recorded(world["a"], "fingerprint"))
        weights = policy / "actor.safetensors"


def test_a_garbage_obs_stats_file_says_to_collect_again(tmp_path):
    from greencode_jax.rl.store import RolloutStore

    store = write_synthetic_store(tmp_path / "store", synthetic_arrays(episodes=8, hidden=4), chunk=8)
    (store / "obs_stats.npz").write_bytes(b"not numpy at all" * 8)
    with pytest.raises(GreencodeError) as error:
        RolloutStore(store)
    message = str(error.value)
    assert "obs_stats.npz: not a NumPy .npz archive" in message and "collect the rollouts again" in message
    assert "allow_pickle" not in message and "\n" not in message
    np.save(store / "obs_stats.npy", np.zeros(3))  # an .npy array under the archive's name
    os.replace(store / "obs_stats.npy", store / "obs_stats.npz")
    with pytest.raises(GreencodeError, match="not a NumPy .npz archive"):
        RolloutStore(store)


def _cost(path: Path, num_layers=None, architecture=None, **extra) -> Path:
    record = {"a_j": 0.25, "b_j_per_layer": 0.5, "method": "estimated", **extra}
    if num_layers is not None:
        record["num_layers"] = num_layers
    if architecture is not None:
        record["architecture"] = architecture
    path.write_text(json.dumps(record))
    return path


def _architecture(vocab_size: int, **changes) -> dict:
    """The tiny checkpoints' architecture, written out by hand."""
    return {"family": "llama", "num_layers": 2, "hidden_size": HIDDEN, "vocab_size": vocab_size, "num_heads": 4,
            "num_kv_heads": 2, "intermediate_size": 64, "head_dim": 8, **changes}


def test_cost_models_of_another_architecture_are_refused(world, tmp_path, capsys):
    from greencode_jax.energy.cost_model import architecture, load_cost_model

    vocab = world["tok"].vocab_size
    model = architecture(gc.load_pretrained(world["a"]).config)
    assert model == _architecture(vocab)
    # Another checkpoint of this architecture (another weights fingerprint): accepted.
    fit = load_cost_model(_cost(tmp_path / "same.json", 2, _architecture(vocab), weights_fingerprint="other"), model)
    assert fit["a_j"] == 0.25 and fit["num_layers"] == 2
    cases = [
        (_cost(tmp_path / "eight.json", 8, _architecture(vocab, num_layers=8)),
         "fitted on a model of 8 layers, but this model has 2"),
        (_cost(tmp_path / "wide.json", 2, _architecture(vocab, hidden_size=64, intermediate_size=128)),
         r"another architecture \(hidden_size=64, intermediate_size=128\) than this model's \(hidden_size=32, "
         r"intermediate_size=64\)"),
        (_cost(tmp_path / "old.json"), "records no 'num_layers'.*greencode energy calibrate MODEL --out FILE"),
    ]
    for path, match in cases:
        with pytest.raises(GreencodeError, match=match):
            load_cost_model(path, model)
    # Through evaluate and through train-policy's energy reward.
    out = tmp_path / "evaluation"
    _refused(capsys, ["evaluate", str(world["a"]), "--data", str(world["corpus"]), "--out", str(out),
                      "--cost-model", str(cases[0][0]), "--no-progress"], out, f"--cost-model {cases[0][0]}",
             "model of 8 layers", "has 2")
    arrays = synthetic_arrays(episodes=16, decisions=1, hidden=8)
    store = write_synthetic_store(tmp_path / "store", arrays, exit_layers=(0, 1), chunk=16)
    out = tmp_path / "policy"
    _refused(capsys, ["train-policy", str(store), "--out", str(out), "rl.reward=energy",
                      f"rl.cost_model={cases[0][0]}", "--no-progress"], out, f"rl.cost_model {cases[0][0]}",
             "model of 8 layers", "has 2")


def test_finetune_refuses_a_corpus_of_another_tokenizer_than_its_pretrained_model(world, tmp_path):
    from greencode_jax.cli.train_cmd import finetune_config_from_dict
    from greencode_jax.data import PreparedData
    from greencode_jax.train import train

    sections = {
        "run": {"name": "mismatch", "out_dir": str(tmp_path / "runs"), "progress": False},
        "model": {"init": str(world["a"]), "exit_layers": [0]},
        "data": {"path": str(world["other"]), "seq_len": 32},
        "train": {"steps": 1, "batch_size": 4},
    }
    config, resolved = finetune_config_from_dict(sections, "mismatch.yaml")
    with pytest.raises(GreencodeError) as error:
        train(config, source="mismatch.yaml", resolved_yaml=resolved, progress=False)
    message = str(error.value)
    for needle in ("mismatch.yaml: data.path", str(world["other"]), PreparedData(world["other"]).tokenizer_fingerprint,
                   f"model.init {world['a']}", _recorded(world["a"], "tokenizer_fingerprint")):
        assert needle in message, (needle, message)
    assert not (tmp_path / "runs").exists()
