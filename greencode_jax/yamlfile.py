"""Reading a YAML mapping from a file, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import yaml

from greencode_jax.errors import GreencodeError


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
