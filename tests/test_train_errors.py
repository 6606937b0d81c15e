"""Bad input: a misspelt config field, a checkpoint of another model, a diverging loss."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import yaml

import greencode_jax as gc
from greencode_jax.cli.train_cmd import load_finetune_config
from greencode_jax.cli.train_cmd import main as train_main
from greencode_jax.errors import GreencodeError
from greencode_jax.train import train
from test_train_support import (  # noqa: F401 (fixtures)
    FINISHED_STEPS, TINY_LLAMA, compile_cache, finished_tiny_run, flat_leaves, restore_train_state, run_cli,
    stdlib_corpus, subprocess_env, tiny_config, write_config,
)


@pytest.mark.parametrize("section, field, message", [
    ("train", "learing_rate", "unknown field 'train.learing_rate' (did you mean 'learning_rate'?)"),
    ("checkpoint", "evry", "unknown field 'checkpoint.evry' (did you mean 'every'?)"),
    ("parallel", "fsdb", "unknown field 'parallel.fsdb' (did you mean 'fsdp'?)"),
])
def test_misspelt_field_names_the_closest_valid_one(tmp_path, stdlib_corpus, section, field, message):
    config = tiny_config(stdlib_corpus, tmp_path, "typo")
    config.setdefault(section, {})[field] = 1
    path = write_config(tmp_path / "typo.yaml", config)
    with pytest.raises(GreencodeError) as error:
        load_finetune_config(path, [])
    assert str(error.value) == f"{path}: {message}"


def test_misspelt_section_and_override(tmp_path, stdlib_corpus, capsys):
    config = tiny_config(stdlib_corpus, tmp_path, "typo")
    config["trian"] = config.pop("train")
    path = write_config(tmp_path / "typo.yaml", config)
    with pytest.raises(GreencodeError, match="unknown section 'trian' \\(did you mean 'train'\\?\\)"):
        load_finetune_config(path, [])
    good = write_config(tmp_path / "good.yaml", tiny_config(stdlib_corpus, tmp_path, "typo"))
    assert train_main(["finetune", str(good), "train.stpes=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"greencode: error: {good}: unknown field 'train.stpes' (did you mean 'steps'?)"]


def test_wrongly_typed_fields_are_named(tmp_path, stdlib_corpus):
    path = write_config(tmp_path / "c.yaml", tiny_config(stdlib_corpus, tmp_path, "types"))
    with pytest.raises(GreencodeError, match="field 'train.steps' is 'many', expected int"):
        load_finetune_config(path, ["train.steps=many"])
    with pytest.raises(GreencodeError, match="field 'model.exit_layers' is 3, expected a list"):
        load_finetune_config(path, ["model.exit_layers=3"])
    config, resolved = load_finetune_config(path, ["train.exit_weights=[0.2, 0.8]", "train.learning_rate=1"])
    assert config.train.exit_weights == (0.2, 0.8) and config.train.learning_rate == 1.0
    assert yaml.safe_load(resolved)["train"]["exit_weights"] == [0.2, 0.8]


def _config(path, overrides=()):
    return load_finetune_config(path, list(overrides))[0]


def test_resuming_a_checkpoint_of_another_model_shape_is_refused(finished_tiny_run, tmp_path):
    run = shutil.copytree(finished_tiny_run, tmp_path / "tiny")
    config = _config(finished_tiny_run.parent / "tiny.yaml", [f"run.out_dir={tmp_path}"])
    wider = dataclasses.replace(config, model=dataclasses.replace(
        config.model, config={**TINY_LLAMA, "hidden_size": 48, "intermediate_size": 96}))
    with pytest.raises(GreencodeError) as error:
        train(wider, progress=False)
    message = str(error.value)
    assert message.startswith(f"{run / 'checkpoints' / str(FINISHED_STEPS)}: the checkpoint is of a different model")
    assert "hidden_size=32 there, 48 in this config" in message
    final_only = dataclasses.replace(config, model=dataclasses.replace(config.model, exit_layers=(1,)))
    with pytest.raises(GreencodeError, match=r"exit_layers=\[0, 1\] there, \[1\] in this config"):
        train(final_only, progress=False)


def test_resuming_with_another_optimiser_structure_is_refused(finished_tiny_run, tmp_path):
    shutil.copytree(finished_tiny_run, tmp_path / "tiny")
    config = _config(finished_tiny_run.parent / "tiny.yaml", [f"run.out_dir={tmp_path}", "train.clip_norm=0"])
    with pytest.raises(GreencodeError, match="optimiser state has another structure.*train.clip_norm"):
        train(config, progress=False)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(finished_tiny_run, tmp_path):
    run = shutil.copytree(finished_tiny_run, tmp_path / "tiny")
    before = flat_leaves(restore_train_state(run / "checkpoints", FINISHED_STEPS))
    config = _config(finished_tiny_run.parent / "tiny.yaml",
                     [f"run.out_dir={tmp_path}", f"train.steps={FINISHED_STEPS + 10}", "train.learning_rate=1e30"])
    with pytest.raises(GreencodeError) as error:
        train(config, progress=False)
    message = str(error.value)
    assert message.startswith(f"step {FINISHED_STEPS + 1}: training diverged")
    assert "param_norm=inf" in message
    assert f"the last good checkpoint is step {FINISHED_STEPS} in {run / 'checkpoints'}" in message
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == FINISHED_STEPS  # nothing written after the good one...
    after = flat_leaves(restore_train_state(run / "checkpoints", FINISHED_STEPS))
    assert all(np.array_equal(before[k], after[k]) for k in before)  # ...and the good one is untouched


def test_nan_loss_from_the_first_step_is_reported(finished_tiny_run, tmp_path):
    model = gc.load_pretrained(finished_tiny_run / "final")
    scale = model.final_norm.scale
    scale.set_value(scale.get_value().at[3].set(np.nan))  # every logit of every exit turns NaN
    gc.save_checkpoint(model, tmp_path / "nan_model")
    config = _config(finished_tiny_run.parent / "tiny.yaml",
                     [f"run.out_dir={tmp_path}", "run.name=nan", f"model.init={tmp_path / 'nan_model'}",
                      "model.config=null"])
    with pytest.raises(GreencodeError) as error:
        train(config, progress=False)
    assert str(error.value).startswith("step 1: training diverged (loss=nan")
    assert "no checkpoint was written" in str(error.value)
    assert not (tmp_path / "nan" / "final").exists()
