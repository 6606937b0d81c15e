"""The validation table: on a store's tokens, what a policy's exits agree with and cost.

For a threshold T, a token exits at the first decision exit whose P(exit) > T (Learned's
rule) or, with `Confidence`, whose top softmax probability >= T; otherwise it runs to the
last layer. Reported: the fraction of tokens whose exit agrees with the final layer, the
mean layers computed per token, and the exit accuracy against l* (the first agreeing exit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from greencode_jax.rl.env import first_agreeing
from greencode_jax.rl.networks import actor_logits


def exit_probabilities(actor, obs_mean, obs_std, hidden, batch: int = 8192) -> np.ndarray:
    """P(exit) [N, T, X] for hidden [N, T, X, E] (in slices, so a large store fits)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    fn = jax.jit(lambda h: jax.nn.softmax(actor_logits(actor, obs_mean, obs_std, h), -1)[:, 1])
    out = [np.asarray(fn(jnp.asarray(flat[i:i + batch]))) for i in range(0, len(flat), batch)]
    return np.concatenate(out).reshape(hidden.shape[:-1])


def exits_at(decide: np.ndarray) -> np.ndarray:
    """Index of the first True along the last axis, X where none."""
    x = decide.shape[-1]
    return np.where(decide.any(-1), np.argmax(decide, -1), x)


def table_row(index: np.ndarray, agree: np.ndarray, layers) -> dict:
    layers = np.asarray(layers)
    full = np.concatenate([agree, np.ones(agree.shape[:-1] + (1,), bool)], -1)
    agrees = np.take_along_axis(full, index[..., None], -1)[..., 0]
    lstar = first_agreeing(agree, layers)
    return {"agreement": float(agrees.mean()), "mean_layers": float((layers[index] + 1).mean()),
            "mean_exit_layer": float(layers[index].mean()), "exit_accuracy": float((layers[index] == lstar).mean())}


def validation_table(p_exit, agree, confidence, layers, thresholds) -> dict:
    layers = np.asarray(layers)
    oracle = first_agreeing(agree, layers)
    rows = {"learned": [], "confidence": []}
    for t in thresholds:
        rows["learned"].append({"threshold": t, **table_row(exits_at(p_exit > t), agree, layers)})
        if confidence is not None:
            rows["confidence"].append({"threshold": t, **table_row(exits_at(confidence >= t), agree, layers)})
    return {"tokens": int(agree.shape[0] * agree.shape[1]), "oracle_mean_layers": float((oracle + 1).mean()),
            "oracle_mean_exit_layer": float(oracle.mean()), "full_layers": int(layers[-1] + 1), **rows}


def deterministic_return(p_exit, rewards, threshold: float = 0.5) -> float:
    """Mean episode return of the policy that exits where P(exit) > threshold."""
    index = exits_at(p_exit > threshold)  # [N, T]
    x = p_exit.shape[-1]
    steps = np.arange(x)
    cont = np.where(steps < index[..., None], rewards[..., 0], 0.0).sum(-1)
    exit_r = np.take_along_axis(rewards[..., 1], np.minimum(index, x - 1)[..., None], -1)[..., 0]
    total = cont + np.where(index < x, exit_r, 0.0)
    return float(total.sum(-1).mean())


def format_table(table: dict) -> str:
    lines = [f"validation on {table['tokens']} tokens: oracle (exit at l*) computes {table['oracle_mean_layers']:.2f} "
             f"of {table['full_layers']} layers",
             "  threshold | learned: agrees  layers  at l* | confidence (softmax_max): agrees  layers"]
    conf = {row["threshold"]: row for row in table.get("confidence", [])}
    for row in table["learned"]:
        c = conf.get(row["threshold"])
        tail = f"{c['agreement']:.3f}  {c['mean_layers']:6.2f}" if c else "n/a"
        lines.append(f"  {row['threshold']:9.2f} | {row['agreement']:.3f}  {row['mean_layers']:6.2f}  "
                     f"{row['exit_accuracy']:.3f} | {tail}")
    return "\n".join(lines)
