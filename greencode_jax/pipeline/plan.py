"""Where each stage of a pipeline config puts its outputs, computed from the config alone (no JAX):
the stage store.

Every stage writes into its own directory of the store, `<run.out_dir>/.stages/<stage>-<key>/`, where
the key hashes the config fields that change the stage's result and the keys of the stages it reads
(Marin's executor shape). So `run.name`, logging and progress fields and the store's own paths count
for nothing: two runs (or two arms of a sweep) that differ only in `rl.beta` share their fine-tune,
calibration and rollout directories, and a stage whose directory is done is never made again.
`greencode run` links its run directory's usual names (final, policy, evaluate, ...) to them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from greencode_jax.config import Config
from greencode_jax.pipeline.stages import digest

STAGES = ("finetune", "calibrate", "rollouts", "policy", "certify", "evaluate")
STORE = ".stages"  # under run.out_dir
FINETUNE_RUN = "finetune"  # the fine-tune's own run directory, inside its stage directory
# A run-dependent path inside a key is replaced by this: the upstream key it comes from already counts.
UPSTREAM = "<upstream stage output>"
_NOT_RESULTS = ("name", "out_dir", "progress", "log_every")  # run fields that change no stage's result
# How many processes (hosts) a stage runs as: where it runs, not what it makes (a multi-host run equals a
# one-host run to rounding), so in no key.
HOSTS = "hosts"


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One stage of one config: its key, its directory in the store, the stages it reads, and the
    names `greencode run` links in its run directory -> the paths they stand for."""
    name: str
    key: str
    dir: Path
    deps: tuple
    links: dict
    hosts: int = 1  # processes, one per host (the backend starts them with jax.distributed wired)

    @property
    def job(self) -> str:
        return f"{self.name}-{self.key}"


def store_dir(config: Config) -> Path:
    return Path(config.finetune.run.out_dir) / STORE


def finetune_key_fields(config: Config) -> dict:
    """What the fine-tune's result depends on: its sections, less the run's name, place and logging."""
    fields = config.finetune.to_dict()
    fields["run"] = {k: v for k, v in fields["run"].items() if k not in _NOT_RESULTS}
    fields["parallel"] = _less_hosts(fields["parallel"])
    return fields


def _less_hosts(section: dict) -> dict:
    return {k: v for k, v in section.items() if k != HOSTS}


def policy_rl(config: Config, cost: Path):
    """The `rl` section the policy stage trains with: the energy reward reads the run's calibration."""
    rl = config.rl
    return dataclasses.replace(rl, cost_model=str(cost)) if rl.reward == "energy" and not rl.cost_model else rl


def base_model(config: Config):
    init = config.finetune.model.init
    return None if init == "scratch" else init


def plan_stages(config: Config, store: Path | None = None) -> dict[str, StagePlan]:
    """{stage: StagePlan} of every stage of `config`, in order; nothing is read or written."""
    store = Path(store) if store is not None else store_dir(config)
    keys = {"finetune": digest(finetune_key_fields(config))}
    keys["calibrate"] = digest(keys["finetune"], dataclasses.asdict(config.energy))
    keys["rollouts"] = digest(keys["finetune"], _less_hosts(dataclasses.asdict(config.rollouts)))
    keys["policy"] = digest(keys["rollouts"], keys["calibrate"],
                            _less_hosts(dataclasses.asdict(policy_rl(config, Path(UPSTREAM)))))
    protocol = {k: config.eval.evaluation_fields()[k] for k in ("context_fraction", "new_tokens", "max_context")}
    keys["certify"] = digest(keys["policy"], dataclasses.asdict(config.certify), protocol)
    evaluation = dict(config.eval.evaluation_fields(), certified=UPSTREAM)
    keys["evaluate"] = digest(keys["policy"], keys["certify"], evaluation, str(base_model(config)))
    dirs = {name: store / f"{name}-{keys[name]}" for name in STAGES}
    run = dirs["finetune"] / FINETUNE_RUN
    links = {"finetune": {name: run / name for name in ("final", "eval.json", "config.yaml", "metrics.jsonl")},
             "calibrate": {"cost_model.json": dirs["calibrate"] / "cost_model.json"},
             "rollouts": {"rollouts": dirs["rollouts"] / "rollouts"},
             "policy": {"policy": dirs["policy"] / "policy"},
             "certify": {"certify.json": dirs["certify"] / "certify.json"},
             "evaluate": {"evaluate": dirs["evaluate"] / "evaluate"}}
    deps = {"finetune": (), "calibrate": ("finetune",), "rollouts": ("finetune",),
            "policy": ("finetune", "calibrate", "rollouts"), "certify": ("finetune", "policy"),
            "evaluate": ("finetune", "calibrate", "policy", "certify")}
    hosts = {"finetune": config.finetune.parallel.hosts, "rollouts": config.rollouts.hosts, "policy": config.rl.hosts}
    return {name: StagePlan(name, keys[name], dirs[name], deps[name], links[name], hosts.get(name, 1))
            for name in STAGES}
