"""`greencode run`: one config for every stage, with finetune's did-you-mean errors."""

import pytest

from greencode_jax.cli.main import main


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
