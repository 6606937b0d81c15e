"""Metrics as JSON lines, one record per line: `metrics.jsonl` of a fine-tuning run (one record
per logged step: `MetricsLog`) and of a policy's training (one record per update and seed:
`append_metrics`).

On resume, records past the checkpoint (logged after the last save, before the interruption)
are dropped first (`trim_metrics`), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from greencode_jax.atomic import atomic_write_text


def _plain(value):
    """JSON-ready: numpy scalars and arrays to Python numbers and lists; nan/inf as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _line(record: dict) -> str:
    return json.dumps(_plain(record)) + "\n"


def trim_metrics(path: str | Path, key: str, last: int | None):
    """Keeps the records of `path` whose `key` (a missing one counts as 0) is at most `last`, and
    none when `last` is None; a line cut short by a crash goes too. Nothing to do without the file."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    if last is not None:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if record.get(key, 0) <= last:
                kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def append_metrics(path: str | Path, records):
    """Appends `records` to `path`, one line each."""
    with open(path, "a") as f:
        for record in records:
            f.write(_line(record))


class MetricsLog:
    """Appends records to `path` (only on the primary process: `enabled`), after dropping those
    logged past `resume_step` (all of them when it is None: a fresh start)."""

    def __init__(self, path: str | Path, resume_step: int | None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        trim_metrics(self.path, "step", resume_step)
        self._file = open(self.path, "a")

    def write(self, record: dict):
        if not self.enabled:
            return
        self._file.write(_line(record))
        self._file.flush()

    def close(self):
        if self.enabled:
            self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
