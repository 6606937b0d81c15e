"""argparse types shared by the commands (config files themselves load through greencode_jax.config)."""

from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """argparse type of a float flag: NaN and infinities are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
