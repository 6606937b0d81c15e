"""Watching the steps: each step's metrics are read one step late (so the host never waits
on the device it is feeding), checked for finiteness, written to metrics.jsonl every
`log_every` steps, shown on the progress bar, and timed."""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax

from greencode_jax.errors import GreencodeError


def check_finite(step: int, m: dict, exit_layers, last_saved: int | None, checkpoint_dir: Path):
    """Stops the run when the loss, gradient norm or parameter norm is not finite."""
    values = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "param_norm": float(m["param_norm"])}
    if all(math.isfinite(v) for v in values.values()):
        return
    per_exit = ", ".join(f"{layer}: {float(v):.4g}" for layer, v in zip(exit_layers, m["exit_loss"]))
    kept = (f"the last good checkpoint is step {last_saved} in {checkpoint_dir}" if last_saved is not None
            else "no checkpoint was written")
    raise GreencodeError(
        f"step {step}: training diverged (loss={values['loss']:.4g}, grad_norm={values['grad_norm']:.4g}, "
        f"param_norm={values['param_norm']:.4g}; exit losses {per_exit}); stopped without saving this step, "
        f"{kept}. Lower train.learning_rate, add train.warmup_steps or set train.clip_norm")


class StepMonitor:
    def __init__(self, exit_layers, log, bar, start: int, total_steps: int, log_every: int, tokens_per_step: int,
                 checkpoint_dir: Path, last_saved: int | None):
        self.exit_layers, self.log, self.bar = tuple(exit_layers), log, bar
        self.start, self.total_steps, self.log_every = start, total_steps, log_every
        self.tokens_per_step, self.checkpoint_dir = tokens_per_step, checkpoint_dir
        self.last_saved = last_saved  # the latest step known to be saved (the divergence message names it)
        self.stop_requested = False  # some process received SIGTERM / SIGINT
        self.started = time.perf_counter()
        self._last_time, self._last_step = self.started, start
        self._steady_steps, self._steady_seconds, self._first_seen = 0, 0.0, False

    def observe(self, step: int, metrics):
        """Reads step `step`'s metrics (blocking until that step is done)."""
        m = jax.device_get(metrics)
        check_finite(step, m, self.exit_layers, self.last_saved, self.checkpoint_dir)
        self.stop_requested |= bool(m["stop"])
        now = time.perf_counter()
        if self._first_seen:  # the first step's time is mostly compilation
            self._steady_steps += step - self._last_step
            self._steady_seconds += now - self._last_time
        self._first_seen = True
        if step % self.log_every == 0 or step == self.total_steps or step == self.start + 1:
            rate = self.tokens_per_step * (step - self._last_step) / max(now - self._last_time, 1e-9)
            layers = [str(layer) for layer in self.exit_layers]
            self.log.write({"step": step, "loss": m["loss"], "learning_rate": m["learning_rate"],
                            "grad_norm": m["grad_norm"], "param_norm": m["param_norm"],
                            "exit_loss": dict(zip(layers, m["exit_loss"])),
                            "exit_accuracy": dict(zip(layers, m["exit_accuracy"])),
                            "tokens_per_s": rate, "elapsed_s": now - self.started})
            self.bar.set_postfix(loss=f"{float(m['loss']):.4f}", tok_s=f"{rate:,.0f}", refresh=False)
        self._last_time, self._last_step = now, step

    @property
    def tokens_per_s(self) -> float | None:
        """Training throughput after the first (compiling) step."""
        return self.tokens_per_step * self._steady_steps / self._steady_seconds if self._steady_seconds else None
