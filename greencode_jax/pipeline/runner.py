"""`greencode run`: the main job, stage by stage, as a library function.

    data (prepared by finetune if absent) -> finetune -> calibrate -> collect (train +
    validation rollouts) -> train policy -> certify -> evaluate -> report
Everything goes under runs/<name>/ as each stage's own command writes it. A stage is
skipped when its output exists for the same inputs: pipeline.json keeps, per stage, a hash
of the config fields it reads and of the stages before it. An interrupted run (Ctrl-C,
SIGTERM) stops inside a stage that resumes (finetune, collect, train-policy, evaluate)
or between stages; the same call continues.

One YAML file holds every stage's section (greencode_jax.config): finetune's (run, model, data,
train, parallel, checkpoint, eval) plus `energy` (calibration), `rollouts` (collection), `rl`
(PPO) and `certify`. The `eval` section serves both finetune (its held-out loss: split,
batches, every) and the evaluation (samples, policies, protocols, ...).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import yaml

from greencode_jax import ownership
from greencode_jax.atomic import atomic_write_text, write_json_output
from greencode_jax.config import Config, load_config
from greencode_jax.convert import load_model_config
from greencode_jax.energy.calibrate_run import calibrate
from greencode_jax.energy.cost_model import architecture, describe, load_cost_model
from greencode_jax.errors import GreencodeError
from greencode_jax.eval.certify_run import certify as run_certify
from greencode_jax.eval.run import evaluate
from greencode_jax.locks import output_lock
from greencode_jax.pipeline.stages import Stages, digest, read_stage_json, say
from greencode_jax.rl.collect import collect_rollouts
from greencode_jax.rl.train import train_policy
from greencode_jax.train import train
from greencode_jax.train.loop import check_run_directory

QUICKSTART = Path(__file__).with_name("quickstart.yaml")


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    run_dir: Path
    eval_dir: Path  # summary.json, report.md, pareto.png, exits.png
    policy_dir: Path
    seconds: dict  # per stage, this call's (0 when up to date)


def run_pipeline(config_path=None, overrides=(), *, log=say, show_evaluation=None) -> PipelineResult:
    """`greencode run`: every stage of the config at `config_path` (default: the embedded quickstart)
    with `overrides`, each skipped when its outputs exist for the same inputs. `log` receives the
    progress lines; `show_evaluation(eval_json)` is called after the fine-tune stage."""
    config = load_config(config_path or QUICKSTART, list(overrides))
    finetune = config.finetune
    run_dir = Path(finetune.run.out_dir) / finetune.run.name
    inputs = {"config": config_path, "data": finetune.data.path or None,
              "model": None if finetune.model.init == "scratch" else finetune.model.init}
    check_run_directory(run_dir, inputs)
    with output_lock(run_dir):
        log(f"greencode run: {config.source} -> {run_dir}/")
        new_dirs = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        if ownership.read_manifest(run_dir) is None:
            ownership.write_manifest(run_dir, "run", inputs)
        try:
            return _run_stages(run_dir, config, log, show_evaluation)
        except BaseException:
            if set(os.listdir(run_dir)) <= {"pipeline.yaml", "pipeline.json", ownership.MANIFEST}:
                for directory in new_dirs:  # failed before any stage made anything
                    shutil.rmtree(directory, ignore_errors=True)
            raise


@dataclasses.dataclass
class _Run:
    """What every stage of one `greencode run` reads: its directory, its config, the keys so far."""
    run_dir: Path
    config: Config
    stages: Stages
    log: object
    keys: dict = dataclasses.field(default_factory=dict)

    @property
    def finetune(self):
        return self.config.finetune

    @property
    def final(self) -> Path:
        return self.run_dir / "final"

    @property
    def data_dir(self) -> Path:
        return Path(self.finetune.data.path)


def _run_stages(run_dir: Path, config: Config, log, show_evaluation) -> PipelineResult:
    stages = Stages(run_dir, log)  # a corrupt pipeline.json is named before anything is written
    atomic_write_text(run_dir / "pipeline.yaml", yaml.safe_dump(config.mapping, sort_keys=False))
    run = _Run(run_dir, config, stages, log)
    _finetune_stage(run)
    if show_evaluation is not None:
        show_evaluation(read_stage_json(run_dir / "eval.json", "finetune"))
    cost = _calibrate_stage(run, config.energy)
    train_store, validation_store = _rollouts_stage(run, config.rollouts)
    policy_dir = _policy_stage(run, config.rl, cost, train_store, validation_store)
    certification = _certify_stage(run, config.certify, config.eval, policy_dir)
    eval_dir = _evaluate_stage(run, config.eval, policy_dir, cost, certification)
    return PipelineResult(run_dir=run_dir, eval_dir=eval_dir, policy_dir=policy_dir, seconds=dict(stages.seconds))


def _finetune_stage(run: _Run):
    run.keys["finetune"] = digest(run.finetune.to_dict())

    def build():
        result = train(run.finetune, source=run.config.source, resolved_yaml=run.config.finetune_yaml, progress=None)
        if result.stopped_by is not None:
            raise result.interruption()

    run.stages.run("finetune", run.keys["finetune"], [run.final, run.run_dir / "eval.json"], build,
                   f"data + exit fine-tune ({run.finetune.train.steps or 'epochs'} steps) -> {run.final}")


def _calibrate_stage(run: _Run, energy) -> Path:
    cost = run.run_dir / "cost_model.json"
    run.keys["calibrate"] = digest(run.keys["finetune"], dataclasses.asdict(energy))

    def build():
        if energy.cost_model:
            _use_given_cost_model(run, energy.cost_model, cost)
            return
        for attempt in range(3):  # a noisy machine can fit a non-positive slope: measure again, longer
            fit = calibrate(str(run.final), tokens=energy.tokens, new_tokens=energy.new_tokens, batch=energy.batch,
                            repeats=energy.repeats, min_seconds=energy.min_seconds * (attempt + 1), out=str(cost),
                            energy_overrides=list(energy.set), log=run.log)
            if fit.b_j_per_layer > 0:
                return
            run.log(f"  the fit's J per layer is {fit.b_j_per_layer:.3g}: calibrating again with longer windows")
        raise GreencodeError(f"{cost}: the cost per layer did not come out positive in 3 calibrations; the machine "
                             "is too noisy (raise energy.min_seconds)")

    what = ("joules per token = a + b x layers + c x head evaluations + d x decisions (energy calibrate)"
            if not energy.cost_model else f"the cost model {energy.cost_model}")
    run.stages.run("calibrate", run.keys["calibrate"], [cost], build, stale=[cost], what=what)
    return cost


def _use_given_cost_model(run: _Run, given: str, cost: Path):
    """`energy.cost_model`: a fit made elsewhere (e.g. on the target GPU), checked against this model
    and copied into the run."""
    fit = load_cost_model(given, architecture(load_model_config(run.final)), what="energy.cost_model")
    fit.pop("path")
    if fit["b_j_per_layer"] <= 0:
        raise GreencodeError(f"{given}: {fit['b_j_per_layer']:g} J per layer; expected a cost that grows with depth")
    write_json_output(cost, fit, "cost-model", inputs={"cost_model": given})
    run.log(f"  {given}: {describe(fit)} ({fit['method']}), used as given")


def _rollouts_stage(run: _Run, rollouts) -> tuple[Path, Path]:
    stores = {"train": run.run_dir / "rollouts" / "train", "validation": run.run_dir / "rollouts" / "validation"}
    run.keys["rollouts"] = digest(run.keys["finetune"], dataclasses.asdict(rollouts))

    def build():
        for split, path, n in (("train", stores["train"], rollouts.episodes),
                               (rollouts.validation_split, stores["validation"], rollouts.validation_episodes)):
            if path.exists():
                continue  # collected before an interruption of the other store
            collect_rollouts(run.final, run.data_dir, path, split=split, episodes=n, batch_size=rollouts.batch_size,
                             seed=rollouts.seed + (split != "train"), hidden_dtype=rollouts.hidden_dtype,
                             max_context=rollouts.max_context or None)

    run.stages.run("rollouts", run.keys["rollouts"], list(stores.values()), build,
                   f"{rollouts.episodes} training + {rollouts.validation_episodes} validation episodes",
                   stale=list(stores.values()))
    return stores["train"], stores["validation"]


def _policy_stage(run: _Run, rl, cost: Path, train_store: Path, validation_store: Path) -> Path:
    policy_dir = run.run_dir / "policy"
    rl_cfg = dataclasses.replace(rl, cost_model=str(cost)) if rl.reward == "energy" and not rl.cost_model else rl
    run.keys["policy"] = digest(run.keys["rollouts"], run.keys["calibrate"], dataclasses.asdict(rl_cfg))

    def build():
        train_policy(train_store, policy_dir, rl_cfg, validation_dir=validation_store, overwrite=True)

    run.stages.run("policy", run.keys["policy"], [policy_dir], build,
                   f"PPO, {rl_cfg.total_timesteps:,} timesteps, reward {rl_cfg.reward}", stale=[policy_dir])
    return policy_dir


def _certify_stage(run: _Run, certify, evaluate_cfg, policy_dir: Path) -> Path:
    certification = run.run_dir / "certify.json"
    protocol = {k: evaluate_cfg.evaluation_fields()[k] for k in ("context_fraction", "new_tokens", "max_context")}
    run.keys["certify"] = digest(run.keys["policy"], dataclasses.asdict(certify), protocol)

    def build():
        run_certify(run.final, run.data_dir, certification,
                    policy_dir=policy_dir if "learned" in certify.families else None, config=evaluate_cfg,
                    section=certify)

    run.stages.run("certify", run.keys["certify"], [certification], build,
                   f"Learn-then-Test on the {certify.split} split: {', '.join(certify.families)}, {certify.loss} "
                   f"loss, epsilon {certify.epsilon:g}", stale=[certification])
    return certification


def _evaluate_stage(run: _Run, evaluate_cfg, policy_dir: Path, cost: Path, certification: Path) -> Path:
    eval_dir = run.run_dir / "evaluate"
    base = None if run.finetune.model.init == "scratch" else run.finetune.model.init
    evaluate_cfg = dataclasses.replace(evaluate_cfg, certified=str(certification))
    run.keys["evaluate"] = digest(run.keys["policy"], run.keys["certify"], evaluate_cfg.evaluation_fields(),
                                  str(base))

    def build():
        evaluate(run.final, run.data_dir, eval_dir, policy_dir=policy_dir, base=base, cost_model=str(cost),
                 config=evaluate_cfg)

    run.stages.run("evaluate", run.keys["evaluate"], [eval_dir / "summary.json", eval_dir / "report.md"], build,
                   "every policy family on the test split", stale=[eval_dir])
    return eval_dir
