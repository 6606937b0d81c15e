"""Reading a YAML mapping from a file, with errors that name the file."""

from __future__ import annotations

import dataclasses
import json
import math
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


def check_finite(section_object, section: str):
    """Every float of a config dataclass (and every float in its tuple fields) is finite: NaN or
    an infinity would otherwise flow into training or evaluation and come out as a result."""
    for field in dataclasses.fields(section_object):
        value = getattr(section_object, field.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise GreencodeError(f"field '{section}.{field.name}' is {value!r}, expected finite numbers (not NaN "
                                     "or infinity)")


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """The file's top-level mapping; a missing file, a directory, a binary or unreadable file, bad
    YAML or a non-mapping is our error."""
    path = Path(path)
    if path.is_dir():
        raise GreencodeError(f"{path}: is a directory; expected a YAML {what}")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GreencodeError(f"{path}: {what} not found") from None
    except UnicodeDecodeError:
        raise GreencodeError(f"{path}: not a text file; expected a YAML {what}") from None
    except OSError as error:
        raise GreencodeError(f"{path}: cannot read the {what} ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise GreencodeError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise GreencodeError(f"{path}: expected a mapping at the top level of the {what}")
    return data


def read_json_mapping(path: str | Path, what: str, missing: str = "") -> dict:
    """The JSON object in `path`; a missing file (with the hint `missing`), an unreadable one or
    another JSON value is one error naming `what` the file should be."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GreencodeError(f"{path}: no such {what}" + (f" ({missing})" if missing else "")) from None
    except (OSError, ValueError) as error:
        raise GreencodeError(f"{path}: unreadable {what} ({error})") from None
    if not isinstance(data, dict):
        raise GreencodeError(f"{path}: not a {what} (expected a JSON object)")
    return data
