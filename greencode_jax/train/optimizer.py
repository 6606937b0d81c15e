"""The optimiser: global-norm clipping, then AdamW on a warm-up + constant or cosine schedule.

Weight decay applies to matrices and embeddings (`kernel`, `embedding`) and not to biases
or norm scales, as Hugging Face's Trainer (which GREEN-CODE fine-tuned with) does.
"""

from __future__ import annotations

import jax
import optax

from greencode_jax.errors import GreencodeError

SCHEDULES = ("constant", "cosine")
DECAYED = ("kernel", "embedding")


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, kind: str = "constant",
                           final_ratio: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to `peak` over `warmup_steps` updates, then `peak` (constant) or a
    cosine decay reaching `final_ratio * peak` at `total_steps`."""
    if kind not in SCHEDULES:
        raise GreencodeError(f"train.schedule={kind!r}: expected one of {list(SCHEDULES)}")
    if warmup_steps < 0 or peak < 0:
        raise GreencodeError("train.warmup_steps and train.learning_rate must be non-negative")
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    if kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        decay_steps = max(total_steps - warmup_steps, 1)
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=final_ratio)
    if warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params):
    """True for the parameters weight decay applies to."""

    def decayed(path, _):
        last = path[-1]
        return str(getattr(last, "key", last)) in DECAYED

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(schedule: optax.Schedule, weight_decay: float, clip_norm: float, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) (skipped when clip_norm <= 0) then AdamW."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if clip_norm and clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    return adamw
