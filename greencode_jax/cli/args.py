"""Argument types shared by the `greencode` commands' parsers."""

from __future__ import annotations

import argparse
from typing import Callable


def comma_list(text: str, convert: Callable = str, *, expected: str, nonempty: bool = False, unique: bool = False,
               valid: Callable[[list], bool] | None = None) -> list:
    """The stripped, non-empty parts of the comma-separated `text`, each through `convert`: the body
    of an argparse `type=`. An item `convert` refuses (ValueError), no item at all where `nonempty`,
    or a list `valid` refuses is an `ArgumentTypeError` saying "expected {expected}, got {text!r}".
    `unique` keeps a repeated item once, where it first occurs."""
    try:
        values = [convert(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if unique:
        values = list(dict.fromkeys(values))
    if (nonempty and not values) or (valid is not None and not valid(values)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return values
