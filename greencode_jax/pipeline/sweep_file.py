"""A sweep file: a base pipeline config and the arms of a study, read and checked before anything runs.

    name: rl-ablation
    base: ../quickstart.yaml          # relative to this file
    grid: {rl.reward: [greencode, energy], rl.beta: [4, 8, 16]}   # every combination
    zip: {rl.beta: [4, 8], rl.learning_rate: [1e-4, 3e-4]}        # varied together (equal lengths)
    arms: [{name: full, set: {train.method: full}}]                # named override sets
    seeds: [0, 1]                     # each arm repeated over run.seed: mean and spread

The arms are every explicit arm (or the base alone) x every grid combination x every zip row. An
arm's name is its own `name` joined with its grid and zip values (`beta=8,reward=energy`). Each
arm x seed is one run of the pipeline: the base config with the arm's overrides, checked by the
one config loader (an unknown field is named with its nearest name and the arm).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from pathlib import Path

import yaml

from greencode_jax.config import Config, did_you_mean, load_config
from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import read_yaml

KEYS = ("name", "base", "grid", "zip", "arms", "seeds")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")


@dataclasses.dataclass(frozen=True)
class Run:
    """One arm x seed: its overrides of the base and its loaded config."""
    arm: str
    seed: int | None
    overrides: tuple
    config: Config

    @property
    def name(self) -> str:
        return self.arm if self.seed is None else f"{self.arm}-seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    base: Path
    varied: tuple  # the fields the arms vary, in the file's order
    arms: dict  # arm name -> {field: value} (its overrides as values)
    runs: tuple  # Run, arm by arm, seed by seed


def override(field: str, value) -> str:
    """`field=value`, the value written so that the loader's YAML reads it back as it is."""
    plain = value if isinstance(value, str) and yaml.safe_load(value) == value and "=" not in value else None
    return f"{field}={plain if plain is not None else json.dumps(value)}"


def read_sweep(path: str | Path) -> Sweep:
    """The sweep file at `path`, every arm's config loaded: every error is one line naming the file."""
    path = Path(path)
    data = read_yaml(path)
    for key in data:
        if key not in KEYS:
            raise GreencodeError(f"{path}: unknown key '{key}'{did_you_mean(key, KEYS)}; expected {list(KEYS)}")
    name = data.get("name") or path.stem
    if not isinstance(name, str) or not _NAME.match(name):
        raise GreencodeError(f"{path}: name {name!r}: expected letters, digits and . _ - (a directory name)")
    base = _base(path, data.get("base"))
    axes = _grid(path, data.get("grid")) + _zip(path, data.get("zip"))
    explicit = _explicit_arms(path, data.get("arms"))
    seeds = _seeds(path, data.get("seeds"))
    arms, varied = {}, []
    for (arm_name, arm_set), combination in itertools.product(explicit, itertools.product(*axes)):
        values = dict(arm_set)
        parts = [arm_name] if arm_name else []
        for row in combination:
            values.update(row)
            parts += [f"{_short(field, axes)}={_show(value)}" for field, value in row.items()]
        name_of_arm = ",".join(parts) or "base"
        if name_of_arm in arms:
            raise GreencodeError(f"{path}: two arms are named '{name_of_arm}'; give each arm its own name")
        arms[name_of_arm] = values
        varied += [field for field in values if field not in varied]
    runs = tuple(_run(path, base, arm, values, seed) for arm, values in arms.items() for seed in seeds)
    return Sweep(name=name, path=path, base=base, varied=tuple(varied), arms=arms, runs=runs)


def _base(path: Path, base) -> Path:
    if not isinstance(base, str) or not base:
        raise GreencodeError(f"{path}: 'base' is {base!r}; expected the path of a pipeline config (relative to "
                             "this file)")
    resolved = Path(os.path.normpath(path.parent / base))
    if not resolved.is_file():
        raise GreencodeError(f"{path}: base {base} is not there ({resolved})")
    try:
        load_config(resolved)
    except GreencodeError as error:
        raise GreencodeError(f"{path}: base {base} does not load: {error}") from None
    return resolved


def _fields(path: Path, what: str, mapping) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict) or not mapping:
        raise GreencodeError(f"{path}: '{what}' must map section.field to a non-empty list of values")
    for field, values in mapping.items():
        if not isinstance(field, str) or len(field.split(".")) < 2:
            raise GreencodeError(f"{path}: {what} field {field!r}: expected section.field")
        if not isinstance(values, list) or not values:
            raise GreencodeError(f"{path}: {what} field '{field}' has {values!r}; expected a non-empty list of "
                                 "values")
    return mapping


def _grid(path: Path, grid) -> list:
    """One axis per grid field: its values as {field: value} rows."""
    return [[{field: value} for value in values] for field, values in _fields(path, "grid", grid).items()]


def _zip(path: Path, zipped) -> list:
    """One axis for all zip fields: row i sets every field to its i-th value."""
    zipped = _fields(path, "zip", zipped)
    if not zipped:
        return []
    lengths = {field: len(values) for field, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise GreencodeError(f"{path}: the zip lists differ in length ({lengths}); zip varies its fields "
                             "together, so each needs as many values")
    rows = next(iter(lengths.values()))
    return [[{field: values[i] for field, values in zipped.items()} for i in range(rows)]]


def _explicit_arms(path: Path, arms) -> list:
    if arms is None:
        return [("", {})]
    if not isinstance(arms, list) or not arms:
        raise GreencodeError(f"{path}: 'arms' must be a non-empty list of {{name: ..., set: {{field: value}}}}")
    out = []
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict) or set(arm) - {"name", "set"} or not isinstance(arm.get("set", {}), dict):
            raise GreencodeError(f"{path}: arms[{i}] is {arm!r}; expected {{name: ..., set: {{field: value}}}}")
        values = arm.get("set") or {}
        name = arm.get("name") or ",".join(f"{field.split('.')[-1]}={_show(v)}" for field, v in values.items())
        if not isinstance(name, str) or not _NAME.match(name):
            raise GreencodeError(f"{path}: arms[{i}] name {name!r}: expected letters, digits and . _ - = ,")
        out.append((name, values))
    return out


def _seeds(path: Path, seeds) -> list:
    if seeds is None:
        return [None]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in seeds):
        raise GreencodeError(f"{path}: 'seeds' is {seeds!r}; expected a non-empty list of integers (run.seed)")
    if len(set(seeds)) != len(seeds):
        raise GreencodeError(f"{path}: 'seeds' repeats a seed ({seeds})")
    return seeds


def _short(field: str, axes: list) -> str:
    """A field's last part (`beta`), unless another varied field ends the same way."""
    fields = {f for axis in axes for row in axis[:1] for f in row}
    last = field.split(".")[-1]
    return last if sum(f.split(".")[-1] == last for f in fields) == 1 else field


def _show(value) -> str:
    """A value as an arm's name shows it (a directory name: no spaces, no slashes)."""
    text = value if isinstance(value, str) else json.dumps(value).replace(" ", "")
    return text.replace("/", "_")


def _run(path: Path, base: Path, arm: str, values: dict, seed) -> Run:
    overrides = tuple(override(field, value) for field, value in values.items())
    if seed is not None:
        overrides += (override("run.seed", seed),)
    try:
        config = load_config(base, overrides + (override("run.name", arm),))
    except GreencodeError as error:
        raise GreencodeError(f"{path}: arm '{arm}': {error}") from None
    return Run(arm=arm, seed=seed, overrides=overrides, config=config)
