"""Metrics as JSON lines (`metrics.jsonl` in the run directory), one record per logged step.

On resume, records past the checkpoint's step (logged after the last save, before the
interruption) are dropped first, so the file reads as one uninterrupted run.
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


class MetricsLog:
    """Appends records to `path` (only on the primary process: `enabled`)."""

    def __init__(self, path: str | Path, resume_step: int | None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        if self.path.exists():
            kept = []
            if resume_step is not None:
                for line in self.path.read_text().splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
                    if record.get("step", 0) <= resume_step:
                        kept.append(line)
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")

    def write(self, record: dict):
        if not self.enabled:
            return
        self._file.write(json.dumps(_plain(record)) + "\n")
        self._file.flush()

    def close(self):
        if self.enabled:
            self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
