"""The one config loader: a YAML file (with `inherit:` overlays), `section.field=value`
overrides, and every section built through its type hints and checked, before anything runs.

    config = load_config("configs/quickstart.yaml", ["rl.beta=16"])
    config.finetune, config.rl, config.eval, ...

A file may start from another: `inherit: greencode-base.yaml` (a path relative to the file)
reads that file first and lays this one over it, mapping by mapping; a value here replaces the
inherited one (lists too). Overlays nest.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import yaml

from greencode_jax.config.base import build_section
from greencode_jax.config.fields import did_you_mean
from greencode_jax.config.sections import (FINETUNE_SECTIONS, CheckpointSection, DataSection, EvalSection,
                                           FinetuneConfig, ModelSection, ParallelSection, RunSection, TrainSection)
from greencode_jax.config.serve import ServeSection
from greencode_jax.config.stages import CertifySection, EnergySection, RLSection, RolloutsSection
from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import read_yaml

SECTIONS = {"run": RunSection, "model": ModelSection, "data": DataSection, "train": TrainSection,
            "parallel": ParallelSection, "checkpoint": CheckpointSection, "eval": EvalSection,
            "energy": EnergySection, "rollouts": RolloutsSection, "rl": RLSection, "certify": CertifySection,
            "serve": ServeSection}
PIPELINE_SECTIONS = tuple(name for name in SECTIONS if name not in FINETUNE_SECTIONS)  # read by `run`'s later stages
INHERIT = "inherit"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every section of a config file, typed and checked; `mapping` is the resolved YAML mapping.
    `finetune` holds fine-tuning's seven sections, also reachable here by name (`config.train`)."""
    source: str
    mapping: dict
    finetune: FinetuneConfig = FinetuneConfig()
    energy: EnergySection = EnergySection()
    rollouts: RolloutsSection = RolloutsSection()
    rl: RLSection = RLSection()
    certify: CertifySection = CertifySection()
    serve: ServeSection = ServeSection()

    def __getattr__(self, name):  # run, model, data, train, parallel, checkpoint, eval
        if name in FINETUNE_SECTIONS:
            return getattr(self.finetune, name)
        raise AttributeError(f"{type(self).__name__} has no section {name!r}")

    @property
    def finetune_yaml(self) -> str:
        """The resolved fine-tuning config, as finetune writes it into the run's config.yaml."""
        return yaml.safe_dump(self.finetune.to_dict(), sort_keys=False)


def read_config(path: str | Path) -> dict:
    """A config file's mapping with its `inherit:` chain laid out (the file's own values win)."""
    return _read(Path(path), ())


def _read(path: Path, chain: tuple) -> dict:
    resolved = path.resolve()
    if resolved in chain:
        raise GreencodeError(f"{path}: inherits itself ({' -> '.join(str(p) for p in (*chain, resolved))})")
    data = read_yaml(path)
    parent = data.pop(INHERIT, None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise GreencodeError(f"{path}: '{INHERIT}' is {parent!r}, expected the path of another config file")
    parent_path = path.parent / parent
    if not parent_path.exists():
        raise GreencodeError(f"{path}: inherits {parent}, which is not there ({parent_path})")
    return overlay(_read(parent_path, (*chain, resolved)), data)


def overlay(base: dict, top: dict) -> dict:
    """`top` laid over `base`: mappings merge key by key, any other value of `top` replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = overlay(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(data: dict, overrides, source: str) -> dict:
    """`section.field=value` (value read as YAML) replaces or adds a field of a known section.

    Deeper keys (`model.config.rope_scaling.factor=8`) reach into nested mappings.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise GreencodeError(f"override {item!r}: expected section.field=value")
        if parts[0] not in data:
            raise GreencodeError(f"override {item!r}: no section '{parts[0]}' in {source}{did_you_mean(parts[0], data)}")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise GreencodeError(f"override {item!r}: '{part}' is not a mapping in {source}")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides=(), *, sections=tuple(SECTIONS), mapping: dict | None = None,
                source: str | None = None) -> Config:
    """`path` (or an already read `mapping`) with `overrides`, into a `Config`: every section named
    in `sections` is built and checked; the others keep their defaults. Every error is one line
    naming the file (`source`)."""
    source = source or str(path)
    data = read_config(path) if mapping is None else copy.deepcopy(mapping)
    for name in data:
        if name not in SECTIONS:
            raise GreencodeError(f"{source}: unknown section '{name}'{did_you_mean(name, SECTIONS)}; expected "
                                 f"{list(SECTIONS)}")
    for name in SECTIONS:  # every section has defaults, so an override may name one the file leaves out
        if data.get(name) is None:
            data[name] = {}
    data = apply_overrides(data, list(overrides), source)
    built = {name: build_section(SECTIONS[name], data[name], name, source) for name in sections}
    try:  # FinetuneConfig checks across its sections (heads need a pretrained model)
        finetune = FinetuneConfig(**{name: built.pop(name) for name in FINETUNE_SECTIONS if name in built})
    except GreencodeError as error:
        raise GreencodeError(f"{source}: {error}") from None
    return Config(source=source, mapping=data, finetune=finetune, **built)


def load_sections(path, overrides, sections: tuple, command: str) -> Config:
    """What a command that reads only `sections` of a config file takes (train-policy reads `rl`,
    certify `certify` and `eval`): its overrides must name those sections; without a file, the
    sections' defaults with the overrides."""
    for item in overrides:
        if item.partition(".")[0] not in sections:
            allowed = " or ".join(f"{name}.field=value" for name in sections)
            raise GreencodeError(f"override {item!r}: {command} takes {allowed} overrides")
    return load_config(path, overrides, sections=sections, mapping=None if path else {}, source=str(path or command))
