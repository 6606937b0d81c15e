"""The sections of the stages after fine-tuning: `energy` (the meter's backends and the
calibration), `rollouts`, `rl` (the reward and PPO) and `certify`."""

from __future__ import annotations

import dataclasses

from greencode_jax.config.base import Section, check_hosts
from greencode_jax.errors import GreencodeError
from greencode_jax.yamlfile import check_finite

# Backend choices per kind of device. "auto" tries them in order: GPU counter -> integrated power ->
# estimate; TPU power metric -> duty-cycle estimate; CPU RAPL -> CPU-time estimate. Naming one forces
# it (unavailable if it cannot work).
GPU_BACKENDS = ("auto", "counter", "power", "estimate", "off")
TPU_BACKENDS = ("auto", "metric", "estimate", "off")
CPU_BACKENDS = ("auto", "rapl", "estimate", "off")

# Not a measured figure: a round number of the order of a server CPU's TDP per core
# (e.g. 205 W / 24 cores). Every estimate records it; set `watts_per_core` for your CPU.
DEFAULT_WATTS_PER_CORE = 10.0

REWARDS = ("greencode", "energy")  # rl.reward
LOSSES = ("risk", "textual")  # certify.loss
FAMILIES = ("learned", "confidence")  # certify.families
GRID = (1.0, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)  # certify.thresholds


def check_levels(delta: float, epsilon: float):
    """A Learn-then-Test risk level and error rate, each strictly between 0 and 1."""
    for name, value in (("delta", delta), ("epsilon", epsilon)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise GreencodeError(f"certify.{name}={value!r}: expected a number strictly between 0 and 1")


@dataclasses.dataclass(frozen=True)
class EnergyConfig(Section):
    """Which backend measures each kind of device, and the constants behind estimates."""
    NAME = "energy"
    UNKNOWN = "unknown energy config field '{key}'"
    gpu_backend: str = "auto"
    tpu_backend: str = "auto"
    cpu_backend: str = "auto"
    include_host_cpu: bool = True  # also meter the host CPU beside the accelerators
    poll_interval_s: float = 0.05  # background power / duty-cycle sampling period
    watts_per_core: float = DEFAULT_WATTS_PER_CORE  # CPU estimate: W per busy core
    gpu_watts: float | None = None  # GPU estimate: constant draw (default: the NVML power limit)
    tpu_idle_w: float | None = None  # TPU estimate: overrides the per-generation constant
    tpu_peak_w: float | None = None
    tpu_power_metric: str | None = None  # tpumonitoring metric to integrate (default: any name with "power")
    tpu_constants: str | None = None  # YAML of per-generation idle/peak watts (default: the packaged one)
    powercap_root: str = "/sys/class/powercap"
    counter_period_s: float = 0.1  # NVML energy counter refresh period (~20-100 ms): shorter windows warn

    def __post_init__(self):
        for name, choices in (("gpu_backend", GPU_BACKENDS), ("tpu_backend", TPU_BACKENDS),
                              ("cpu_backend", CPU_BACKENDS)):
            if getattr(self, name) not in choices:
                raise GreencodeError(f"energy config: {name}={getattr(self, name)!r}; expected one of {list(choices)}")
        try:
            check_finite(self, "energy")
        except GreencodeError as error:
            raise GreencodeError(f"energy config: {error}") from None
        for name in ("poll_interval_s", "watts_per_core", "counter_period_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise GreencodeError(f"energy config: {name}={value!r}; expected a positive number")
        for name in ("gpu_watts", "tpu_idle_w", "tpu_peak_w"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise GreencodeError(f"energy config: {name}={value!r}; expected a non-negative number of watts")
        if self.tpu_idle_w is not None and self.tpu_peak_w is not None and self.tpu_idle_w > self.tpu_peak_w:
            raise GreencodeError(f"energy config: tpu_idle_w={self.tpu_idle_w} exceeds tpu_peak_w={self.tpu_peak_w}")
        if not isinstance(self.include_host_cpu, bool):
            raise GreencodeError(f"energy config: include_host_cpu={self.include_host_cpu!r}; expected true or false")


@dataclasses.dataclass(frozen=True)
class EnergySection(Section):
    """`greencode run`'s calibrate stage: `greencode energy calibrate` on the fine-tuned checkpoint."""
    NAME = "energy"
    repeats: int = 2
    min_seconds: float = 1.0
    tokens: int = 16
    new_tokens: int = 32
    batch: int = 1
    set: tuple[str, ...] = ()  # EnergyConfig overrides, e.g. [cpu_backend=estimate]
    cost_model: str = ""  # use this fit (`energy calibrate --out` JSON, e.g. from the target GPU) instead of calibrating


@dataclasses.dataclass(frozen=True)
class RolloutsSection(Section):
    """`greencode run`'s rollouts stage: `greencode collect-rollouts`, a training and a validation store."""
    NAME = "rollouts"
    episodes: int = 512
    validation_episodes: int = 128
    validation_split: str = "dev"
    batch_size: int = 16
    hidden_dtype: str = "float32"
    max_context: int = 0  # 0: what the model's positions allow
    seed: int = 0
    hosts: int = 1  # `greencode sweep`: collection as this many processes, one per host (in no stage key)

    def __post_init__(self):
        check_hosts(self)


@dataclasses.dataclass(frozen=True)
class RLSection(Section):
    NAME = "rl"
    # reward (GREEN-CODE's): on exit +1 at l*, -alpha per layer late, -beta per layer early,
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
    hidden: tuple[int, ...] = (64, 64)
    seeds: int = 1  # K seeds trained in one program (vmap); the best on the validation store is kept
    seed: int = 0
    # the run
    checkpoint_every: int = 20  # updates per compiled block; a training-state checkpoint after each
    thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # of the validation table
    hosts: int = 1  # `greencode sweep`: PPO as this many processes, one per host (in no stage key)

    def __post_init__(self):
        def bad(field, expected):
            raise GreencodeError(f"rl.{field}={getattr(self, field)!r}: expected {expected}")

        check_hosts(self)

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


@dataclasses.dataclass(frozen=True)
class CertifySection(Section):
    """The `certify` config section (and `greencode certify`'s flags)."""
    NAME = "certify"
    split: str = "dev"  # the calibration split: disjoint from evaluate's test split
    samples: int = 0  # calibration samples (0: every document of the split that gives one)
    loss: str = "risk"  # risk (ROUGE-L below the full model's) or textual (any token differs)
    delta: float = 0.0  # the bound on the expected loss; 0: delta_relative x the full model's mean ROUGE-L (risk)
    delta_relative: float = 0.02
    epsilon: float = 0.1  # the guarantee holds with probability >= 1 - epsilon
    bound: str = "hoeffding_bentkus"
    families: tuple = FAMILIES  # learned (needs a policy) and/or confidence (softmax_max)
    thresholds: tuple = GRID  # candidates; walked from the largest (the most conservative)
    batch_size: int = 16

    def __post_init__(self):
        check_finite(self, "certify")
        if self.loss not in LOSSES:
            raise GreencodeError(f"certify.loss={self.loss!r}: expected one of {LOSSES}")
        if self.delta:
            check_levels(self.delta, self.epsilon)
        else:
            check_levels(self.delta_relative, self.epsilon)
            if self.loss == "textual":
                raise GreencodeError("certify.loss=textual needs certify.delta (no ROUGE-L to scale delta_relative)")
        families = (self.families,) if isinstance(self.families, str) else tuple(self.families)
        if not families or not set(families) <= set(FAMILIES):
            raise GreencodeError(f"certify.families={self.families!r}: expected a list of {FAMILIES}")
        object.__setattr__(self, "families", families)
        grid = tuple(sorted({float(t) for t in self.thresholds}, reverse=True))
        if not grid or not all(0.0 <= t <= 1.0 for t in grid):
            raise GreencodeError(f"certify.thresholds={self.thresholds!r}: expected thresholds in 0..1")
        object.__setattr__(self, "thresholds", grid)
        for name in ("samples", "batch_size"):
            if getattr(self, name) < (0 if name == "samples" else 1):
                raise GreencodeError(f"certify.{name}={getattr(self, name)!r}: expected a "
                                     + ("non-negative" if name == "samples" else "positive") + " integer")
