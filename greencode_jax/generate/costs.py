"""What one generated token costs, counted: the decoder layers it computed, the exit-head (LM head)
evaluations it made and the exit decisions it paid for. The cost model (energy/calibrate.py)
prices each count; this module says how many of each a token of a given policy takes.

    layers     exit layer + 1 (later layers only project K/V for the cache, priced in the intercept)
    heads      1: the LM head once, on the exit state; a Confidence policy also evaluates it at every
               decision it reaches (the logits of the one it exits at are reused)
    decisions  the exit decisions reached (each a conditional, and a Learned MLP or a head): every
               decision layer up to the exit; Full() and the base model make none

`calibration_workloads` builds the decode workloads that vary the three counts independently, so a
least-squares fit can tell them apart.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from greencode_jax.generate.decode import decision_layers
from greencode_jax.generate.policies import Confidence, FixedExit, Full, Learned

FAMILIES_WITHOUT_DECISIONS = ("full", "base")


def token_counts(config, family: str, exit_layer: int) -> tuple[int, int, int]:
    """(layers, head evaluations, decisions) of one token that exited after `exit_layer`, generated
    by a policy of `family` ("full", "base", "fixed", "confidence", "learned")."""
    last = config.num_layers - 1
    if family in FAMILIES_WITHOUT_DECISIONS:
        return config.num_layers, 1, 0
    decisions = [d for d in config.exit_layers if d < last]
    reached = sum(1 for d in decisions if d <= exit_layer)
    heads = reached + (exit_layer == last) if family == "confidence" else 1
    return exit_layer + 1, heads, reached


def sequence_counts(config, family: str, exit_layers) -> np.ndarray:
    """[tokens, 3] counts of a generated sequence (its exit layers, -1 padding dropped)."""
    return np.array([token_counts(config, family, int(e)) for e in exit_layers if int(e) >= 0],
                    dtype=np.float64).reshape(-1, 3)


@dataclasses.dataclass
class Workload:
    label: str
    step: Callable  # runs one generation, returns its JAX outputs
    tokens: int  # tokens one step generates
    counts: tuple[float, float, float]  # mean (layers, heads, decisions) per generated token


def _mean_counts(config, family: str, exit_layer: int, new_tokens: int) -> tuple[float, float, float]:
    """The first token comes from the prompt's full-depth pass; the other new_tokens - 1 from the policy."""
    first = np.array(token_counts(config, "full", config.num_layers - 1), np.float64)
    rest = np.array(token_counts(config, family, exit_layer), np.float64)
    return tuple(float(x) for x in (first + (new_tokens - 1) * rest) / new_tokens)


def calibration_workloads(model, *, prompt_tokens: int, new_tokens: int, batch: int, depths=None,
                          seed: int = 0) -> list[Workload]:
    """KV-cached greedy decoding of `new_tokens` tokens after a random prompt, by policies chosen so
    that layers, head evaluations and decisions vary independently: Full(); FixedExit(k) at each
    decision layer k (or those giving `depths`, numbers of layers computed); a Confidence policy
    that never exits (a head at every decision); a Learned policy (random actor) that never exits
    (its MLP at every decision)."""
    config = model.config
    last = config.num_layers - 1
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, prompt_tokens), dtype=np.int32)
    decisions = decision_layers(config, FixedExit(last))
    exits = decisions if depths is None else [d - 1 for d in depths if d - 1 in decisions]
    actor = Learned.init_params(jax.random.key(seed), config.hidden_size)
    choices = [("Full()", Full(), "full", last)]
    choices += [(f"FixedExit({k})", FixedExit(k), "fixed", k) for k in exits]
    if decisions:
        choices += [("Confidence, never exits", Confidence(2.0), "confidence", last),
                    ("Learned, never exits", Learned(actor, 1.0, exit_layers=config.exit_layers), "learned", last)]

    def workload(label, policy, family, exit_layer):
        def step():
            return model.generate(ids, max_new_tokens=new_tokens, policy=policy, stop_tokens=()).tokens

        return Workload(label, step, batch * new_tokens, _mean_counts(config, family, exit_layer, new_tokens))

    return [workload(*choice) for choice in choices]
