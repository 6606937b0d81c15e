"""The whole chain of `greencode run` at small shapes: every stage once, then a rerun that skips them."""

import json
import sys
from pathlib import Path

import yaml

from greencode_jax.cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import chain_config, stdlib_corpus, write_chain_cost  # noqa: E402,F401 (fixture)


def test_every_stage_runs_then_a_rerun_skips_them(stdlib_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = chain_config(stdlib_corpus, write_chain_cost(stdlib_corpus, tmp_path / "cost.json"))
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "chain"
    for stage in ("finetune", "calibrate", "rollouts", "policy", "certify", "evaluate"):
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
    assert out.count("up to date") == 6, out
    # Another run name (and log cadence) with the same config reuses every stage directory of the store.
    assert main(["run", str(path), "run.name=other", "run.log_every=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 6, out
    other = tmp_path / "runs" / "other"
    assert (other / "evaluate").resolve() == (run / "evaluate").resolve()
    assert (other / "evaluate").resolve().parent.parent == tmp_path / "runs" / ".stages"
    assert main(["run", str(path), "rl.beta=2"]) == 0
    out = capsys.readouterr().out
    assert "[rollouts] up to date" in out and "[policy] done in" in out and "[evaluate] done in" in out, out
    assert "[certify] done in" in out, out  # the policy changed: its certification is made again
    # A corrupt output of an earlier stage is named with its stage; the others stay for the rerun.
    (run / "eval.json").write_text('{"split": "te')
    assert main(["run", str(path), "rl.beta=2"]) == 2
    err = capsys.readouterr().err
    assert f"[finetune] {Path('runs/chain/eval.json')}: unreadable" in err and "Traceback" not in err, err
    assert (run / "policy").is_dir() and (run / "evaluate" / "summary.json").is_file()
