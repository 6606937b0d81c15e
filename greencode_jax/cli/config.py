"""YAML configs with `section.field=value` overrides, into typed frozen dataclasses."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math

import yaml

from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import as_float, check_finite, read_yaml  # noqa: F401  (read_yaml re-exported for the CLI)

def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """`section.field=value` (value parsed as YAML) replaces or adds a field of a known section.

    Deeper keys (`model.rope_parameters.factor=8`) reach into nested mappings.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise GreencodeError(f"override {item!r}: expected section.field=value")
        if parts[0] not in data:
            raise GreencodeError(f"override {item!r}: no section '{parts[0]}' in {source}{_hint(parts[0], data)}")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise GreencodeError(f"override {item!r}: '{part}' is not a mapping in {source}")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def typed_section(cls, values: dict, section: str, source: str):
    """Builds dataclass `cls` from a section, naming any misspelt field and its closest valid one.

    A float field also takes an int and a numeric string such as `1e-5` (see `as_float`). A str
    field reads an empty value as "": YAML reads `data.prepare_lang=` (and `prepare_lang:`) as null.
    """
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise GreencodeError(f"{source}: unknown field '{section}.{key}'{_hint(key, names)}")
    typed = {}
    for key, value in values.items():
        expected = type(names[key].default)
        if expected is float:
            value = as_float(value)
        elif expected is str and value is None:
            value = ""
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise GreencodeError(f"{source}: field '{section}.{key}' is {value!r}, expected {expected.__name__}")
        typed[key] = value
    section_object = cls(**typed)
    try:
        check_finite(section_object, section)
    except GreencodeError as error:
        raise GreencodeError(f"{source}: {error}") from None
    return section_object


def finite_float(text: str) -> float:
    """argparse type of a float flag: NaN and infinities are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _hint(word, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
