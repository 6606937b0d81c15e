"""`Section`: the base of every config section: built from a YAML mapping through the field
types, validated in `__post_init__`, written back as YAML-ready values."""

from __future__ import annotations

import dataclasses

import yaml

from greencode_jax.config.fields import coerce, did_you_mean, field_types
from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import check_finite


class Section:
    """Mixin of a frozen config dataclass. `NAME` is its YAML section; `UNKNOWN` words an unknown field."""

    NAME = ""
    UNKNOWN = "unknown field '{section}.{key}'"

    @classmethod
    def from_dict(cls, values, source: str = ""):
        """The section from a YAML mapping: a misspelt field is named with its closest valid one, each
        value is read as its type hint says (`fields.coerce`), then the section checks itself."""
        return build_section(cls, values, cls.NAME, source or f"{cls.NAME or 'config'} section")

    def with_overrides(self, items: list[str], source: str = "--set"):
        """This section with `FIELD=VALUE` strings (VALUE read as YAML) applied on top."""
        values = dataclasses.asdict(self)
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise GreencodeError(f"{source} {item!r}: expected FIELD=VALUE")
            values[key.strip()] = yaml.safe_load(raw)
        return type(self).from_dict(values, source)

    def to_dict(self) -> dict:
        """Plain values (tuples as lists), as YAML and JSON write them."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def check_hosts(section) -> None:
    """`<section>.hosts`: the processes (one per host) a stage runs as under `greencode sweep`."""
    if isinstance(section.hosts, bool) or section.hosts < 1:
        raise GreencodeError(f"{section.NAME}.hosts={section.hosts!r}: expected a positive integer (processes, one "
                             "per host)")


def build_section(cls, values, section: str, source: str):
    """`cls` (a config dataclass, a `Section` or not) from the mapping `values` of YAML section
    `section` read from `source`; every error is one line that starts with `source`."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise GreencodeError(f"{source}: section '{section}' must be a mapping of fields")
    types_ = field_types(cls)
    metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}
    unknown_template = getattr(cls, "UNKNOWN", Section.UNKNOWN)
    typed = {}
    for key, value in values.items():
        if key not in types_:
            raise GreencodeError(f"{source}: {unknown_template.format(section=section, key=key)}"
                                 f"{did_you_mean(key, types_)}")
        try:
            typed[key] = coerce(value, types_[key], f"{section}.{key}", metadata[key].get("expected", ""))
        except GreencodeError as error:
            raise GreencodeError(f"{source}: {error}") from None
    try:
        built = cls(**typed)
        check_finite(built, section)
    except GreencodeError as error:
        raise GreencodeError(f"{source}: {error}") from None
    return built


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
