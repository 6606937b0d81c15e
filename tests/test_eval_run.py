"""`evaluate` and `greencode evaluate` end to end on a tiny random Llama and a tiny prepared corpus.

One evaluation of every policy family at batch sizes 1 and 3 over both protocols is shared
by most tests (one compile per policy kind and batch size); the others reuse its compiled
programs. Independent references: transformers' greedy generate for Full(), the corpus's
own token files for the targets, hand sums for the modelled joules and the agreement.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import greencode_jax as gc
from conftest import assert_no_output, randomize_
from greencode_jax.errors import GreencodeError
from greencode_jax.config import EvalConfig

SAMPLES = 5
EXITS = (0, 1)  # + the last layer, 2
COST = {"a_j": 0.25, "b_j_per_layer": 0.5, "method": "estimated", "depths": [1, 2, 3], "num_layers": 3}
SPEC = ("full; base; fixed; confidence:softmax_max@0.04; confidence:top2_margin@0.01; learned@0.5,1.0")
CONFIG = EvalConfig(max_context=64, line_new_tokens=15)  # every prompt in one 64-token bucket
NAMES = ["alpha", "beta", "gamma", "delta", "value", "items", "total", "count", "result", "key"]
RECORD_FIELDS = {"sample", "protocol", "policy", "family", "setting", "batch_size", "prediction", "target",
                 "metrics", "exit_layers", "mean_exit_layer", "layers_computed", "tokens", "seconds", "energy",
                 "agreement_with_full", "token_ids"}


def _python_files(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        funcs = []
        for j in range(int(rng.integers(1, 10))):  # files of different lengths: prompts of different lengths
            a, b, c = rng.choice(NAMES, 3)
            funcs.append(f"def {a}_{i}_{j}({b}, {c}):\n    {a} = {b} + {c} * {j}\n    return {a}\n")
        (root / f"mod{i:02d}.py").write_text("\n".join(funcs))
    return root


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The corpus, the checkpoint and a base model, a policy and a cost model, built once."""
    from greencode_jax.convert import save_checkpoint
    from greencode_jax.data import PreparedData, PrepareOptions, prepare_data

    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    prepare_data(PrepareOptions(lang="python", source=str(_python_files(root / "src", 40, 0)), out=str(data),
                                vocab_size=400, workers=1, split=(0.6, 0.1, 0.3), progress=False))
    vocab = PreparedData(data).tokenizer().vocab_size
    hf = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf._attn_implementation = "eager"
    paths = {"data": data}
    for name, seed in (("checkpoint", 11), ("base", 12)):
        torch.manual_seed(seed)
        torch_model = randomize_(transformers.LlamaForCausalLM(hf), seed)  # O(1) logits: varied tokens and exits
        torch_model.save_pretrained(root / f"{name}_hf")
        save_checkpoint(gc.load_pretrained(root / f"{name}_hf", exit_layers=list(EXITS)), root / name)
        paths[name], paths[f"{name}_torch"] = root / name, torch_model
    params = gc.policies.Learned.init_params(jax.random.key(0), 32)
    from greencode_jax.convert.fingerprint import model_fingerprint

    trained_on = {"model": {"checkpoint": str(root / "checkpoint"),
                            "fingerprint": model_fingerprint(gc.load_pretrained(root / "checkpoint"))}}
    gc.policies.Learned(params, exit_layers=(*EXITS, 2)).save(root / "policy", {"note": "random actor",
                                                                               "trained_on": trained_on})
    gc.policies.Learned(params, exit_layers=(0, 1, 2, 3)).save(root / "policy_other_exits")
    gc.policies.Learned(gc.policies.Learned.init_params(jax.random.key(0), 48),
                        exit_layers=(*EXITS, 2)).save(root / "policy_other_width")
    architecture = {"family": "llama", "num_layers": 3, "hidden_size": 32, "vocab_size": vocab, "num_heads": 4,
                    "num_kv_heads": 2, "intermediate_size": 64, "head_dim": 8}
    (root / "cost.json").write_text(json.dumps({**COST, "architecture": architecture}))
    paths.update(policy=root / "policy", cost=root / "cost.json", root=root)
    return paths


def _evaluate(env, out, **kw):
    kw.setdefault("config", CONFIG)
    kw.setdefault("progress", False)
    return gc_evaluate(env["checkpoint"], env["data"], out, **kw)


def gc_evaluate(*args, **kw):
    from greencode_jax.eval.run import evaluate

    return evaluate(*args, **kw)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def full_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "all"
    summary = _evaluate(env, out, policy_dir=env["policy"], base=env["base"], policies=SPEC, samples=SAMPLES,
                        batch_size=[1, 3], cost_model=env["cost"])
    return out, summary, _records(out)


def test_every_family_over_both_protocols_gives_records_summary_and_report(full_run):
    out, summary, records = full_run
    labels = ["full", "base", "fixed:0", "fixed:1", "confidence:softmax_max@0.04", "confidence:top2_margin@0.01",
              "learned@0.5", "learned@1.0"]
    assert len(records) == 2 * 2 * len(labels) * SAMPLES
    assert all(set(r) == RECORD_FIELDS for r in records)
    assert {r["family"] for r in records} == {"full", "base", "fixed", "confidence", "learned"}
    for protocol in ("completion", "line"):
        keys = summary["protocols"][protocol]["policies"]
        assert set(keys) == {f"{label} (batch {b})" for label in labels for b in (1, 3)}
        assert summary["protocols"][protocol]["pareto_cost"] == "modelled"
    assert json.loads((out / "summary.json").read_text()) == summary
    report = (out / "report.md").read_text()
    assert "learned@1.0" in report and "modelled energy:" in report and "J/token = 0.25 + 0.5 x layers" in report
    assert ("Only estimates exist here" in report) == (jax.default_backend() == "cpu")
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG" and (out / "exits.png").stat().st_size > 0
    # the policies really exit early somewhere, per sequence (not every token at one layer)
    for label in ("confidence:softmax_max@0.04", "learned@0.5"):
        exits = {e for r in records if r["policy"] == label for e in r["exit_layers"][1:]}
        assert len(exits) > 1, (label, exits)


def test_batch_of_three_gives_the_same_tokens_as_batch_one(full_run):
    _, _, records = full_run
    by = {(r["protocol"], r["policy"], r["sample"], r["batch_size"]): r for r in records}
    pairs = [(r, by[(r["protocol"], r["policy"], r["sample"], 3)]) for r in records if r["batch_size"] == 1]
    assert len(pairs) == len(records) // 2
    for one, three in pairs:
        assert one["token_ids"] == three["token_ids"], one["policy"]
        assert one["exit_layers"] == three["exit_layers"] and one["prediction"] == three["prediction"]
    # (5 samples at batch 3: the last batch holds 2 samples and a filler row)


def test_full_matches_transformers_greedy_and_targets_are_the_corpus_tokens(env, full_run):
    from greencode_jax.data import PreparedData

    _, _, records = full_run
    data = PreparedData(env["data"])
    tokenizer, store = data.tokenizer(), data.tokens("test")
    torch_model = env["checkpoint_torch"]
    full = [r for r in records if r["policy"] == "full" and r["protocol"] == "completion" and r["batch_size"] == 1]
    assert len(full) == SAMPLES and len({len(r["token_ids"]) for r in full}) >= 1
    for r in full:
        ids = np.asarray(store.doc(r["sample"]))[:-1]  # the stored document, its EOS separator dropped
        context = min(int(len(ids) * 0.2), 64 - 15)
        assert r["target"] == tokenizer.decode(ids[context:context + 15])
        with torch.no_grad():
            ref = torch_model.generate(torch.from_numpy(ids[None, :context].astype(np.int64)), max_new_tokens=15,
                                       do_sample=False, eos_token_id=2, pad_token_id=0)[0, context:].tolist()
        assert r["token_ids"] == ref
        assert r["prediction"] == tokenizer.decode([t for t in r["token_ids"] if t != 2])


def test_line_predictions_are_cut_where_codexglue_ends_a_line(env, full_run):
    from greencode_jax.data import PreparedData

    _, _, records = full_run
    gts = {s["id"]: s["gt"] for s in PreparedData(env["data"]).line_samples()}
    line = [r for r in records if r["protocol"] == "line"]
    assert {r["target"] for r in line} <= set(gts.values())
    for r in line:
        assert r["target"] == gts[r["sample"]]
        assert "<EOL>" not in r["prediction"].split() and r["prediction"] == r["prediction"].strip()


def test_energy_time_agreement_and_exits_per_record(full_run):
    _, _, records = full_run
    full = {(r["protocol"], r["batch_size"], r["sample"]): r["token_ids"] for r in records if r["policy"] == "full"}
    for r in records:
        exits = np.asarray(r["exit_layers"])
        assert r["tokens"] == len(exits) == len(r["token_ids"]) and exits[0] == 2  # the prompt pass: full depth
        assert r["mean_exit_layer"] == pytest.approx(exits.mean())
        assert r["layers_computed"] == pytest.approx(exits.mean() + 1)
        modelled = r["energy"]["modelled"]
        assert modelled["method"] == "estimated"
        assert modelled["joules"] == pytest.approx(sum(0.25 + 0.5 * (e + 1) for e in exits))
        measured = r["energy"]["measured"]
        assert measured["method"] in ("counter", "integrated_power", "estimated", "counter+integrated_power")
        assert measured["joules"] is not None and measured["joules"] >= 0 and r["seconds"] > 0
        ours, theirs = r["token_ids"], full[(r["protocol"], r["batch_size"], r["sample"])]
        if r["family"] == "base":
            assert r["agreement_with_full"] is None
        else:
            same = sum(a == b for a, b in zip(ours, theirs))
            assert r["agreement_with_full"] == pytest.approx(same / max(len(ours), len(theirs)))
        if r["policy"] == "learned@1.0":  # a threshold P(exit) > T never reaches: Full()'s tokens, all layers
            assert set(exits) == {2} and ours == theirs
        if r["policy"] == "fixed:0":
            assert set(exits[1:]) <= {0}


def _without_timing(summary: dict) -> dict:
    """summary.json less what a rerun cannot reproduce: seconds, tokens/s and the measured joules."""
    out = json.loads(json.dumps(summary))
    for proto in out["protocols"].values():
        for p in proto["policies"].values():
            for key in ("seconds", "tokens_per_s"):
                p.pop(key)
            p["energy"].pop("measured")
            p["saved_vs_full"].pop("measured")
    return out


def test_an_interrupted_evaluation_resumes_to_the_same_summary(env, full_run, tmp_path):
    out, summary, records = full_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for name in ("summary.json", "report.md", "pareto.png", "exits.png"):
        (resumed / name).unlink()
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    kept = 41  # into the first batch of 3 (1 of its 3 records), then half a line, as a kill mid-write leaves it
    (resumed / "samples.jsonl").write_text("".join(lines[:kept]) + lines[kept][: len(lines[kept]) // 2])
    again = _evaluate(env, resumed, policy_dir=env["policy"], base=env["base"], policies=SPEC, samples=SAMPLES,
                      batch_size=[1, 3], cost_model=env["cost"])
    after = (resumed / "samples.jsonl").read_text().splitlines(keepends=True)
    assert after[:kept] == lines[:kept]  # finished records were kept, not redone
    assert len(after) == len(lines) and all(line.endswith("\n") for line in after)
    keys = [(r["protocol"], r["batch_size"], r["policy"], r["sample"]) for r in map(json.loads, after)]
    assert len(set(keys)) == len(keys)
    assert _without_timing(again) == _without_timing(summary)
    # a rerun of a finished evaluation redoes nothing
    before = (resumed / "samples.jsonl").read_bytes()
    _evaluate(env, resumed, policy_dir=env["policy"], base=env["base"], policies=SPEC, samples=SAMPLES,
              batch_size=[1, 3], cost_model=env["cost"])
    assert (resumed / "samples.jsonl").read_bytes() == before


def test_resuming_with_other_settings_is_refused(env, full_run, tmp_path):
    out, _, _ = full_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(GreencodeError, match="other settings .*policies"):
        _evaluate(env, copy, policy_dir=env["policy"], base=env["base"], policies="full; fixed:0", samples=SAMPLES,
                  batch_size=[1, 3], cost_model=env["cost"])
    assert sorted(p.name for p in copy.iterdir()) == before


def test_missing_measurement_and_cost_model_are_null_with_reasons(env, tmp_path):
    from greencode_jax.energy import EnergyConfig

    out = tmp_path / "unmetered"
    summary = _evaluate(env, out, policies="full; fixed:0", samples=2, protocols=["completion"],
                        energy_config=EnergyConfig(cpu_backend="off"))
    records = _records(out)
    assert len(records) == 4
    for r in records:
        measured, modelled = r["energy"]["measured"], r["energy"]["modelled"]
        assert measured["joules"] is None and measured["method"] == "unavailable"
        assert "CPU metering is off" in measured["reason"]
        assert modelled["joules"] is None and "no cost model" in modelled["reason"]
    policy = summary["protocols"]["completion"]["policies"]["fixed:0"]
    measured = policy["energy"]["measured"]
    assert measured["mean"] is None and "CPU metering is off" in measured["reason"]
    assert policy["energy"]["modelled"]["mean"] is None and policy["saved_vs_full"] == {"measured": None,
                                                                                          "modelled": None}
    assert "modelled energy: unavailable" in (out / "report.md").read_text()


def test_bad_input_raises_one_error_and_writes_nothing(env, tmp_path):
    from greencode_jax.data import PrepareOptions, prepare_data

    out = tmp_path / "out"
    cases = [
        (dict(policy_dir=env["root"] / "policy_other_width", policies="learned@0.9"), "--policy .*hidden size is 32"),
        (dict(policy_dir=env["root"] / "policy_other_exits", policies="learned@0.9"),
         r"--policy .*trained on exit layers \[0, 1, 2, 3\]"),
        (dict(policies="full; greedy@0.9"), "unknown policy family 'greedy'"),
        (dict(policies="fixed:5"), r"layer 5 is not one of the model's exit layers \[0, 1, 2\]"),
        (dict(cost_model=tmp_path / "absent.json"), "--cost-model .*no such cost model"),
    ]
    for kwargs, match in cases:
        with pytest.raises(GreencodeError, match=match):
            _evaluate(env, out, samples=2, **kwargs)
        assert_no_output(out)
    (tmp_path / "raw").mkdir()
    with pytest.raises(GreencodeError, match="not a prepared corpus"):
        gc_evaluate(env["checkpoint"], tmp_path / "raw", out, config=CONFIG, progress=False)
    assert_no_output(out)
    no_test = tmp_path / "no_test"
    prepare_data(PrepareOptions(lang="python", source=str(_python_files(tmp_path / "src", 8, 1)), out=str(no_test),
                                vocab_size=400, workers=1, split=(1.0, 0.0, 0.0), progress=False))
    with pytest.raises(GreencodeError, match="the test split is empty"):
        gc_evaluate(env["checkpoint"], no_test, out, config=CONFIG, progress=False)
    assert_no_output(out)
    with pytest.raises(GreencodeError, match="no line-level samples"):
        gc_evaluate(env["checkpoint"], no_test, out, protocols=["line"], config=CONFIG, progress=False)
    assert_no_output(out)


def test_the_command_prints_the_main_table_and_the_paths(env, tmp_path, capsys):
    from greencode_jax.cli.main import main

    config = tmp_path / "eval.yaml"
    config.write_text("eval:\n  max_context: 64\n  line_new_tokens: 15\n  split: test\n  batches: 4\n")
    out = tmp_path / "cli"
    argv = ["evaluate", str(env["checkpoint"]), "--data", str(env["data"]), "--out", str(out), "--samples", "2",
            "--policies", "full; fixed:0; learned@1.0", "--policy", str(env["policy"]), "--protocols", "completion",
            "--cost-model", str(env["cost"]), "--config", str(config), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "completion (2 samples; Pareto cost: modelled)" in printed
    table = printed.split("completion (2 samples")[1]
    assert "fixed:0" in table and "learned@1.0" in table and "J modelled" in table
    assert f"wrote {out}/summary.json" in printed and f"wrote {out}/report.md" in printed
    other = list(argv)
    other[7] = "3"  # --samples 3 into the same directory: other settings, refused
    assert main(other) == 2 and "other settings (config.samples 2 there, 3 here; " in capsys.readouterr().err


def test_the_command_refuses_bad_input_in_one_line(env, tmp_path, capsys):
    from greencode_jax.cli.main import main

    out = tmp_path / "cli"
    code = main(["evaluate", str(env["checkpoint"]), "--data", str(env["data"]), "--out", str(out),
                 "--policies", "full; warp", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown policy family 'warp'" in err
    assert_no_output(out)


def test_bench_eval_times_the_loop_and_bare_generate_on_the_same_samples(env):
    from greencode_jax.bench.eval import format_bench_eval, run_bench_eval

    result = run_bench_eval(env["checkpoint"], env["data"], samples=3, policy="learned@0.5", policy_dir=env["policy"],
                            repeats=1, config=CONFIG)
    assert result["policies"] == ["full", "learned@0.5"] and result["records"] == 6
    assert len(result["times_s"]["bare"]) == len(result["times_s"]["loop"]) == 1
    assert result["ratio"] == pytest.approx(result["loop_s_per_sample"] / result["bare_s_per_sample"])
    assert "ratio" in format_bench_eval(result)
