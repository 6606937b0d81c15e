"""The `rl` config section: the reward, PPO's hyperparameters (GREEN-CODE's by default) and
the training run. Loaded like finetune's sections (typed, misspelt fields named)."""

from __future__ import annotations

import dataclasses

from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import check_finite

REWARDS = ("greencode", "energy")


@dataclasses.dataclass(frozen=True)
class RLSection:
    # reward (REFERENCE §1): on exit +1 at l*, -alpha per layer late, -beta per layer early,
    # -epsilon late and wrong; on continue +1 before l*, -gamma per layer past it; negatives / (gamma_r * L_max)
    reward: str = "greencode"
    alpha: float = 1.0
    beta: float = 1.0
    gamma_r: float = 1.0  # GREEN-CODE's reward gamma (not the discount)
    epsilon: float = 0.1
    energy_weight: float = 0.0  # reward "energy": price per joule; 0 = 1 / (J per layer), the greencode scale
    cost_model: str = ""  # reward "energy": the JSON `greencode energy calibrate --out` wrote
    # PPO (Stable-Baselines3's PPO as GREEN-CODE ran it)
    total_timesteps: int = 500_000
    num_envs: int = 64
    num_steps: int = 64  # per environment and update: num_envs x num_steps = SB3's n_steps 4096
    minibatch_size: int = 512
    epochs: int = 6
    learning_rate: float = 5e-5  # decays linearly to 0 over the updates
    discount: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: float = 0.5
    adam_eps: float = 1e-5
    normalize_advantages: bool = True
    hidden: tuple = (64, 64)
    seeds: int = 1  # K seeds trained in one program (vmap); the best on the validation store is kept
    seed: int = 0
    # the run
    checkpoint_every: int = 20  # updates per compiled block; a training-state checkpoint after each
    thresholds: tuple = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # of the validation table

    def __post_init__(self):
        def bad(field, expected):
            raise GreencodeError(f"rl.{field}={getattr(self, field)!r}: expected {expected}")

        check_finite(self, "rl")  # before the range checks: NaN passes every comparison
        if self.reward not in REWARDS:
            bad("reward", f"one of {REWARDS}")
        for name in ("total_timesteps", "num_envs", "num_steps", "minibatch_size", "epochs", "seeds",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                bad(name, "a positive integer")
        for name in ("learning_rate", "gamma_r", "adam_eps"):
            if getattr(self, name) <= 0:
                bad(name, "a positive number")
        for name in ("alpha", "beta", "epsilon", "energy_weight", "value_coef", "entropy_coef", "max_grad_norm"):
            if getattr(self, name) < 0:
                bad(name, "0 or more")
        for name in ("discount", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, "a number in [0, 1]")
        if not 0 < self.clip < 1:
            bad("clip", "a number in (0, 1)")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if not self.thresholds or not all(0.0 <= t <= 1.0 for t in self.thresholds):
            bad("thresholds", "a non-empty list of thresholds in 0..1 (P(exit) is a probability)")
        if not self.hidden or min(self.hidden) < 1:
            bad("hidden", "a list of positive layer widths, e.g. [64, 64]")
        batch = self.num_envs * self.num_steps
        if batch % self.minibatch_size or self.num_steps % (batch // self.minibatch_size):
            bad("minibatch_size", f"a divisor of num_envs x num_steps = {batch} whose count of minibatches "
                f"({batch}/{self.minibatch_size}) divides num_steps={self.num_steps} (minibatches are groups of "
                "time steps, shared by every device)")
        if self.total_timesteps < batch:
            bad("total_timesteps", f"at least one update of num_envs x num_steps = {batch} steps")

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    def num_minibatches(self) -> int:
        return self.steps_per_update // self.minibatch_size

