"""Reading a YAML mapping from a file, with errors that name the file."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from greencode_jax.errors import GreencodeError

# A decimal number as YAML 1.2 writes one. PyYAML (YAML 1.1) wants a dot in a float, so it reads
# `1e-5` or `3E+2` as strings; a float field takes such a string as the number it spells.
_FLOAT_TEXT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def as_float(value):
    """`value` as a float field reads it: an int or a numeric string such as `1e-5` becomes a
    float; anything else (a bool too) comes back unchanged, for the caller to reject by name."""
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and _FLOAT_TEXT.fullmatch(value):
        return float(value)
    return value


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """The file's top-level mapping; a missing file, bad YAML or a non-mapping is our error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GreencodeError(f"{path}: {what} not found") from None
    except yaml.YAMLError as error:
        raise GreencodeError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise GreencodeError(f"{path}: expected a mapping at the top level of the {what}")
    return data
