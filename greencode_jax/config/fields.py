"""A config field's value as its type hint reads it, and the one did-you-mean of every config error."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing

from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import as_float


def did_you_mean(word: str, options) -> str:
    """The text " (did you mean 'x'?)" naming the closest of `options`, or "" when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@functools.cache
def field_types(cls) -> dict:
    """{field: its type hint} of a config dataclass (hints written as strings are resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _alternatives(hint) -> tuple:
    """The types a hint allows, outermost first: `float | None` -> (float, None)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(None if a is type(None) else a for a in typing.get_args(hint))
    return (hint,)


def _name(kind) -> str:
    if kind is None:
        return "null"
    if kind is tuple or typing.get_origin(kind) is tuple:
        return "a list"
    return kind.__name__


def coerce(value, hint, field: str, expected: str = ""):
    """`value` (as YAML gave it) as a field of type `hint` holds it, or one error naming `field`:
    a float field also takes an int and a numeric string such as `1e-5` (PyYAML reads those as
    strings), a str field reads YAML's null as "", a tuple field takes a YAML list (its items
    coerced to the tuple's item type when it names one). `expected` words the error (default: the
    hint's types)."""
    alternatives = _alternatives(hint)
    if value is None:
        if None in alternatives:
            return None
        if str in alternatives:
            return ""  # `data.prepare_lang=` and `prepare_lang:` are YAML nulls: the empty string
    for kind in alternatives:
        if kind is None:
            continue
        origin = typing.get_origin(kind) or kind
        if origin is tuple and isinstance(value, (list, tuple)):
            item_hint = (typing.get_args(kind) or (None,))[0]
            try:
                return tuple(coerce(v, item_hint, field) if item_hint is not None else _plain(v) for v in value)
            except GreencodeError:
                break  # the whole list is named below
        if origin is float:
            number = as_float(value)
            if isinstance(number, float):
                return number
        elif origin is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif origin in (bool, str, dict):
            if isinstance(value, origin):
                return value
    expected = expected or " or ".join(_name(k) for k in alternatives)
    raise GreencodeError(f"field '{field}' is {value!r}, expected {expected}")


def _plain(item):
    """An item of an untyped list: a numeric string becomes the float it spells (`[1e-1, 9E-1]`)."""
    return as_float(item) if isinstance(item, str) else item
