"""`greencode run`: one config for every stage, with finetune's did-you-mean errors."""

from pathlib import Path

import pytest

from greencode_jax.cli.main import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("override, expected", [
    ("rl.bta=2", "unknown field 'rl.bta' (did you mean 'beta'?)"),
    ("rollouts.episdes=3", "unknown field 'rollouts.episdes' (did you mean 'episodes'?)"),
    ("energy.repeat=3", "unknown field 'energy.repeat' (did you mean 'repeats'?)"),
    ("train.stpes=3", "unknown field 'train.stpes' (did you mean 'steps'?)"),
    ("rl.minibatch_size=500", "rl.minibatch_size=500: expected a divisor"),
])
def test_a_bad_field_of_any_stage_is_one_clear_error_before_anything_runs(override, expected, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", override]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written: not even runs/


@pytest.mark.parametrize("init, expected", [
    ("no/such/model", "[finetune] "),
    ("no/such/model.gguf", "no/such/model.gguf: no such GGUF file"),
])
def test_a_model_init_that_is_no_model_names_the_stage_and_leaves_nothing(init, expected, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", f"model.init={init}", "model.config=null", "run.out_dir=out/runs"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "no/such/model" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # neither out/ nor out/runs/quickstart/


def test_finetune_reads_its_own_sections_of_a_whole_pipeline_config():
    from greencode_jax.cli.train_cmd import load_finetune_config

    config, _ = load_finetune_config(CONFIGS / "quickstart.yaml", [])
    assert config.model.exit_layers == (1, 3, 5) and config.eval.batches == 8
    with pytest.raises(Exception, match=r"unknown field 'eval.sampels' \(did you mean 'samples'\?\)"):
        load_finetune_config(CONFIGS / "quickstart.yaml", ["eval.sampels=3"])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads_as_a_whole_pipeline(name):
    """A shipped config that a field rename broke would only fail after its corpus and fine-tune:
    each one loads through the pipeline's loader and its policy list expands on its own exits."""
    from greencode_jax.config import load_config
    from greencode_jax.eval.spec import policy_choices

    config = load_config(CONFIGS / name)
    finetune, energy, rollouts, rl, evaluate = config.finetune, config.energy, config.rollouts, config.rl, config.eval
    exits = tuple(finetune.model.exit_layers)
    choices = policy_choices(evaluate.policies, exits, have_base=True, have_policy=True)
    assert any(c.family == "full" for c in choices) and any(c.family == "learned" for c in choices)
    assert all(c.layer in exits for c in choices if c.family == "fixed"), (name, exits)
    assert energy.repeats >= 1 and rollouts.episodes > 0 and rl.total_timesteps > 0


@pytest.mark.slow
def test_the_quickstart_end_to_end(tmp_path, monkeypatch):
    """The embedded default as a newcomer runs it (about ten minutes on a 2-core CPU)."""
    import json

    monkeypatch.chdir(tmp_path)
    assert main(["run"]) == 0
    summary = json.loads((tmp_path / "runs/quickstart/evaluate/summary.json").read_text())
    rows = summary["protocols"]["completion"]["policies"]
    assert any(r["family"] == "learned" and r["pareto"] for r in rows.values())
