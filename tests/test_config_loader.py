"""The one config loader (greencode_jax.config): `inherit:` overlays, overrides, coercion from type
hints, one did-you-mean, sections that check themselves, and every command reading through it."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from greencode_jax.config import (SECTIONS, CertifySection, CheckpointSection, EnergyConfig, FinetuneConfig,
                                  ModelSection, RLSection, RunSection, TrainSection, load_config, load_sections,
                                  read_config)
from greencode_jax.errors import GreencodeError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


# ---- inherit: overlays ---------------------------------------------------------------------------------------------

def test_a_file_overlays_the_one_it_inherits(tmp_path):
    write(tmp_path / "base" / "root.yaml", {"train": {"steps": 5, "learning_rate": 1e-3}, "rl": {"hidden": [8, 8]},
                                            "model": {"exit_layers": [1, 3]}})
    write(tmp_path / "base" / "mid.yaml", {"inherit": "root.yaml", "train": {"steps": 7}, "run": {"name": "mid"}})
    child = write(tmp_path / "child.yaml", {"inherit": "base/mid.yaml", "rl": {"hidden": [4]}, "run": {"seed": 3}})
    mapping = read_config(child)
    # the child's values win key by key inside a section; a list is replaced, not merged; paths are relative
    # to the file that names them
    assert mapping == {"train": {"steps": 7, "learning_rate": 1e-3}, "rl": {"hidden": [4]},
                       "model": {"exit_layers": [1, 3]}, "run": {"name": "mid", "seed": 3}}
    config = load_config(child, ["train.steps=9"])
    assert (config.train.steps, config.train.learning_rate, config.rl.hidden, config.run.name) == (9, 1e-3, (4,), "mid")
    assert "inherit" not in config.mapping


def test_an_inherit_cycle_or_a_missing_parent_is_named(tmp_path):
    write(tmp_path / "a.yaml", {"inherit": "b.yaml"})
    write(tmp_path / "b.yaml", {"inherit": "a.yaml"})
    with pytest.raises(GreencodeError, match="inherits itself"):
        read_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", {"inherit": "nowhere.yaml"})
    with pytest.raises(GreencodeError, match=r"c.yaml: inherits nowhere.yaml, which is not there"):
        read_config(tmp_path / "c.yaml")
    write(tmp_path / "d.yaml", {"inherit": 3})
    with pytest.raises(GreencodeError, match="'inherit' is 3, expected the path of another config file"):
        read_config(tmp_path / "d.yaml")


def test_the_paper_configs_are_overlays_that_differ_only_where_the_papers_runs_do():
    configs = {name: load_config(REPO / "configs" / f"{name}.yaml") for name in
               ("llama3.2-3b-python", "llama3.2-3b-java", "opt-2.7b-python", "opt-2.7b-java")}
    for name in configs:
        assert yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["inherit"] == "base/greencode-paper.yaml"
    shared = [s for s in SECTIONS if s not in ("run", "model", "data")]
    first = next(iter(configs.values()))
    assert all(getattr(c, s) == getattr(first, s) for c in configs.values() for s in shared)
    assert len({(c.model.init, c.model.exit_layers, c.data.path, c.run.name) for c in configs.values()}) == 4


# ---- fields read through their type hints ----------------------------------------------------------------------

def test_fields_are_read_as_their_type_hints_say(tmp_path):
    path = write(tmp_path / "c.yaml", {"model": {"exit_layers": [0, 2]}, "rl": {"thresholds": [1, "5e-1"]},
                                       "data": {"prepare_lang": None, "prepare_split": [1, "0", 0]},
                                       "energy": {"set": ["cpu_backend=estimate"]}})
    config = load_config(path)
    assert config.model.exit_layers == (0, 2) and config.rl.thresholds == (1.0, 0.5)
    assert config.data.prepare_lang == "" and config.data.prepare_split == (1.0, 0.0, 0.0)
    assert all(type(v) is float for v in config.data.prepare_split)
    assert config.energy.set == ("cpu_backend=estimate",)
    with pytest.raises(GreencodeError, match=r"field 'model.exit_layers' is \[0, 'x'\], expected a list of 0-based"):
        load_config(path, ["model.exit_layers=[0, x]"])
    with pytest.raises(GreencodeError, match=r"field 'rl.hidden' is \[64, 'wide'\], expected a list"):
        load_config(path, ["rl.hidden=[64, wide]"])
    assert EnergyConfig().with_overrides(["gpu_watts=300"]).gpu_watts == 300.0  # float | None
    assert EnergyConfig().with_overrides(["gpu_watts=null"]).gpu_watts is None


def test_every_section_checks_itself_when_built_in_code():
    for build, message in [(lambda: TrainSection(batch_size=0), "train.batch_size=0; expected a positive integer"),
                           (lambda: TrainSection(method="lora"), "train.method='lora'"),
                           (lambda: RunSection(log_every=0), "run.log_every=0"),
                           (lambda: CheckpointSection(resume="sometimes"), "checkpoint.resume='sometimes'"),
                           (lambda: RLSection(clip=1.5), "rl.clip=1.5"),
                           (lambda: CertifySection(loss="textual"), "certify.loss=textual needs certify.delta"),
                           (lambda: FinetuneConfig(train=TrainSection(method="heads")),
                            "train.method=heads trains exit heads on a frozen, pretrained backbone")]:
        with pytest.raises(GreencodeError, match=message.replace("(", r"\(").replace("[", r"\[")):
            build()
    assert FinetuneConfig(model=ModelSection(init="some/model"), train=TrainSection(method="heads")).train.method == \
        "heads"


def test_one_did_you_mean_for_sections_fields_and_overrides(tmp_path):
    path = write(tmp_path / "c.yaml", {"certfy": {}})
    with pytest.raises(GreencodeError, match=r"unknown section 'certfy' \(did you mean 'certify'\?\)"):
        load_config(path)
    path = write(tmp_path / "d.yaml", {"rollouts": {"episdes": 3}})
    with pytest.raises(GreencodeError, match=r"unknown field 'rollouts.episdes' \(did you mean 'episodes'\?\)"):
        load_config(path)
    with pytest.raises(GreencodeError, match=r"no section 'rll' .*\(did you mean 'rl'\?\)"):
        load_config(write(tmp_path / "e.yaml", {}), ["rll.beta=2"])


def test_a_command_that_reads_some_sections_refuses_overrides_of_others(tmp_path):
    path = write(tmp_path / "c.yaml", {"rl": {"beta": 4}, "train": {"steps": 1}})
    assert load_sections(path, ["rl.alpha=2"], ("rl",), "train-policy").rl.alpha == 2.0
    with pytest.raises(GreencodeError, match="override 'train.steps=3': train-policy takes rl.field=value overrides"):
        load_sections(path, ["train.steps=3"], ("rl",), "train-policy")
    assert load_sections(None, ["certify.delta=0.1"], ("certify", "eval"), "certify").certify.delta == 0.1


def test_no_module_outside_the_config_package_defines_its_own_did_you_mean():
    """The config loader's did_you_mean is the only caller of difflib in the package."""
    offenders = []
    for path in (REPO / "greencode_jax").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                 for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        if "difflib" in names and path.parent.name != "config":
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_every_section_round_trips_through_its_yaml():
    for name, cls in SECTIONS.items():
        default = cls()
        again = cls.from_dict(yaml.safe_load(yaml.safe_dump(default.to_dict())), "round trip")
        assert again == default, name
        assert dataclasses.is_dataclass(again) and getattr(cls, "NAME") == name
