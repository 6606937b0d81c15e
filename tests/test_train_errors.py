"""Bad input: a misspelt config field, a checkpoint of another model, a diverging loss."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import yaml

import greencode_jax as gc
from greencode_jax.config import build_section as typed_section
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
    # overrides on both sides of an option all count
    assert train_main(["finetune", str(good), "train.steps=3", "--no-progress", "train.stpes=3"]) == 2
    assert "unknown field 'train.stpes'" in capsys.readouterr().err


def test_wrongly_typed_fields_are_named(tmp_path, stdlib_corpus):
    path = write_config(tmp_path / "c.yaml", tiny_config(stdlib_corpus, tmp_path, "types"))
    with pytest.raises(GreencodeError, match="field 'train.steps' is 'many', expected int"):
        load_finetune_config(path, ["train.steps=many"])
    with pytest.raises(GreencodeError, match="field 'model.exit_layers' is 3, expected a list"):
        load_finetune_config(path, ["model.exit_layers=3"])
    config, resolved = load_finetune_config(path, ["train.exit_weights=[0.2, 0.8]", "train.learning_rate=1"])
    assert config.train.exit_weights == (0.2, 0.8) and config.train.learning_rate == 1.0
    assert yaml.safe_load(resolved)["train"]["exit_weights"] == [0.2, 0.8]


def test_float_fields_take_exponents_without_a_dot(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-5, 3E+2 and -2e0 as strings, not floats
    assert yaml.safe_load("a: 1e-5")["a"] == "1e-5"
    path = tmp_path / "exp.yaml"
    path.write_text("run:\n  name: 1e-5\ntrain:\n  learning_rate: 1e-5\n  adam_eps: 3E-8\n  final_lr_ratio: .5\n"
                    "  epochs: 2\n  exit_weights: [1e-1, 9E-1]\n")
    config, resolved = load_finetune_config(path, [])
    t = config.train
    assert (t.learning_rate, t.adam_eps, t.final_lr_ratio, t.epochs) == (1e-5, 3e-8, 0.5, 2.0)
    assert all(type(v) is float for v in (t.learning_rate, t.adam_eps, t.final_lr_ratio, t.epochs))
    assert t.exit_weights == (0.1, 0.9) and config.run.name == "1e-5"  # a str field keeps the string
    assert yaml.safe_load(resolved)["train"]["learning_rate"] == 1e-5  # written back as a YAML float

    config, _ = load_finetune_config(path, ["train.learning_rate=3e-4", "train.weight_decay=-2e0",
                                            "train.clip_norm=+1E+2", "train.exit_weights=[2e-1, 8e-1]"])
    t = config.train
    assert (t.learning_rate, t.weight_decay, t.clip_norm, t.exit_weights) == (3e-4, -2.0, 100.0, (0.2, 0.8))


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=fast", "field 'train.learning_rate' is 'fast', expected float"),
    ("train.learning_rate=nan", "field 'train.learning_rate' is 'nan', expected float"),  # YAML's NaN is .nan
    ("train.adam_eps=1e-8x", "field 'train.adam_eps' is '1e-8x', expected float"),
    ("train.adam_eps=1.5.2", "field 'train.adam_eps' is '1.5.2', expected float"),
    ("train.steps=1e3", "field 'train.steps' is '1e3', expected int"),  # only float fields read numeric strings
    ("checkpoint.async_save=1e0", "field 'checkpoint.async_save' is '1e0', expected bool"),
])
def test_non_numeric_strings_for_float_fields_are_still_named(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-5\n")
    with pytest.raises(GreencodeError) as error:
        load_finetune_config(path, [override])
    assert str(error.value) == f"{path}: {message}"


def test_typed_section_reads_numeric_strings_only_for_float_fields():
    @dataclasses.dataclass(frozen=True)
    class Section:
        rate: float = 0.5
        count: int = 1
        label: str = ""

    assert typed_section(Section, {"rate": "1e-5", "count": 2, "label": "2e3"}, "s", "f.yaml") == Section(
        1e-5, 2, "2e3")
    assert typed_section(Section, {"rate": "-.5E+1"}, "s", "f.yaml").rate == -5.0
    for bad in ("1e-5 ", "inf", "0x10", "", "1e"):
        with pytest.raises(GreencodeError) as error:
            typed_section(Section, {"rate": bad}, "s", "f.yaml")
        assert str(error.value) == f"f.yaml: field 's.rate' is {bad!r}, expected float"


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


def test_resuming_a_checkpoint_with_in_out_kernels_is_refused(finished_tiny_run, tmp_path):
    """Checkpoints from before format version 2 hold Linear kernels [in, out] and say nothing of
    it: square kernels would restore transposed without a shape error, so resuming is refused."""
    import json

    run = shutil.copytree(finished_tiny_run, tmp_path / "tiny")
    meta_file = run / "checkpoints" / str(FINISHED_STEPS) / "meta" / "metadata"  # Orbax's JsonSave item
    meta = json.loads(meta_file.read_text())
    assert meta["state"].pop("kernel_layout") == "out_in"
    meta_file.write_text(json.dumps(meta))
    config = _config(finished_tiny_run.parent / "tiny.yaml", [f"run.out_dir={tmp_path}"])
    with pytest.raises(GreencodeError, match=r"stores Linear kernels \[in, out\].*choose another run.name"):
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
