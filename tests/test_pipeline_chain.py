"""The whole chain of `greencode run` at small shapes: every stage once, then a rerun that skips them."""

import json
import sys
from pathlib import Path

import yaml

from greencode_jax.cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import TINY_LLAMA, stdlib_corpus  # noqa: E402,F401 (fixture)


def test_every_stage_runs_then_a_rerun_skips_them(stdlib_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cost = tmp_path / "cost.json"
    vocab = json.loads((stdlib_corpus / "prepare.json").read_text())["tokenizer"]["vocab_size"]
    architecture = {"family": "llama", "num_layers": 2, "hidden_size": 32, "vocab_size": vocab, "num_heads": 4,
                    "num_kv_heads": 2, "intermediate_size": 64, "head_dim": 8}  # TINY_LLAMA's
    cost.write_text(json.dumps({"a_j": 0.01, "b_j_per_layer": 0.002, "method": "estimated", "num_layers": 2,
                                "architecture": architecture}))
    config = {
        "run": {"name": "chain", "out_dir": "runs", "seed": 0, "log_every": 1, "progress": False},
        "model": {"init": "scratch", "exit_layers": [0], "config": dict(TINY_LLAMA)},
        "data": {"path": str(stdlib_corpus), "seq_len": 32},
        "train": {"steps": 4, "batch_size": 8, "learning_rate": 3e-3},
        "checkpoint": {"every": 4, "keep": 1},
        "eval": {"batches": 1, "samples": 3, "max_context": 48, "pad_prompts": 64,
                 "policies": "full; fixed:0; confidence:softmax_max@0.5; learned@0.5,1.0", "protocols": ["completion"]},
        # A given fit: calibrating a model this small measures noise (the calibration has tests of its own).
        "energy": {"cost_model": str(cost)},
        "rollouts": {"episodes": 8, "validation_episodes": 4, "batch_size": 4, "max_context": 40},
        "rl": {"num_envs": 8, "num_steps": 16, "minibatch_size": 64, "total_timesteps": 256, "hidden": [8, 8],
               "checkpoint_every": 2},
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "chain"
    for stage in ("finetune", "calibrate", "rollouts", "policy", "evaluate"):
        assert f"[{stage}] done in" in out, out
    summary = json.loads((run / "evaluate" / "summary.json").read_text())
    policies = summary["protocols"]["completion"]["policies"]
    assert {"full", "fixed:0", "confidence:softmax_max@0.5", "learned@0.5", "learned@1.0"} <= set(policies)
    for name in ("report.md", "pareto.png", "exits.png"):
        assert (run / "evaluate" / name).is_file()
    assert "learned@0.5" in out and "report: runs/chain/evaluate/report.md" in out
    # A rerun skips every stage; a change of the reward reruns only the policy and the evaluation.
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 5, out
    assert main(["run", str(path), "rl.beta=2"]) == 0
    out = capsys.readouterr().out
    assert "[rollouts] up to date" in out and "[policy] done in" in out and "[evaluate] done in" in out, out
    # A corrupt output of an earlier stage is named with its stage; the others stay for the rerun.
    (run / "eval.json").write_text('{"split": "te')
    assert main(["run", str(path), "rl.beta=2"]) == 2
    err = capsys.readouterr().err
    assert f"[finetune] {Path('runs/chain/eval.json')}: unreadable" in err and "Traceback" not in err, err
    assert (run / "policy").is_dir() and (run / "evaluate" / "summary.json").is_file()
