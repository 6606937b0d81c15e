"""`greencode run`: the main job, stage by stage, as a library function.

    data (prepared by finetune if absent) -> finetune -> calibrate -> collect (train +
    validation rollouts) -> train policy -> certify -> evaluate -> report
Each stage writes into its directory of the stage store, <run.out_dir>/.stages/<stage>-<key>/
(plan.py: the key hashes the config fields that change its result and its upstream keys), and is
skipped when that directory is done, whichever run or sweep made it. runs/<name>/ holds the run's
pipeline.yaml and pipeline.json and relative links to its stages' outputs under their usual names
(final, eval.json, cost_model.json, rollouts, policy, certify.json, evaluate). An interrupted run
(Ctrl-C, SIGTERM) stops inside a stage that resumes (finetune, collect, train-policy, evaluate)
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
from greencode_jax.pipeline.plan import FINETUNE_RUN, base_model, plan_stages, policy_rl
from greencode_jax.pipeline.stages import RunRecord, read_stage_json, say
from greencode_jax.pipeline.store import is_done, link_outputs, run_stage
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
    record = RunRecord(run_dir)  # a corrupt pipeline.json is named before anything is written
    atomic_write_text(run_dir / "pipeline.yaml", yaml.safe_dump(config.mapping, sort_keys=False))
    plan = plan_stages(config)
    for stage in plan.values():  # what stands in the way of a link is named before any stage runs
        link_outputs(run_dir, stage, check_only=True)
    seconds = {}
    for name, stage in plan.items():
        seconds[name] = run_planned_stage(config, plan, name, log)
        link_outputs(run_dir, stage)
        record.save(stage, seconds[name])
        if name == "finetune" and show_evaluation is not None:
            show_evaluation(read_stage_json(run_dir / "eval.json", "finetune"))
    return PipelineResult(run_dir=run_dir, eval_dir=run_dir / "evaluate", policy_dir=run_dir / "policy",
                          seconds=seconds)


def run_planned_stage(config: Config, plan: dict, name: str, log=say) -> float:
    """Stage `name` of `config` (planned by `plan_stages`) into its store directory, unless it is done
    there; the stages it reads must be done. Returns its seconds (0.0 when up to date)."""
    missing = [dep for dep in plan[name].deps if not is_done(plan[dep])]
    if missing:
        raise GreencodeError(f"[{name}] needs the {', '.join(missing)} stage first ({plan[missing[0]].dir} is not "
                             "done)")
    build, what = _BUILDERS[name](config, plan, log)
    return run_stage(plan[name], build, what, log)


def _finetune(config: Config, plan: dict, log):
    finetune = config.finetune
    into = dataclasses.replace(finetune, run=dataclasses.replace(finetune.run, out_dir=str(plan["finetune"].dir),
                                                                  name=FINETUNE_RUN))

    def build():
        result = train(into, source=config.source, resolved_yaml=yaml.safe_dump(into.to_dict(), sort_keys=False),
                       progress=None)
        if result.stopped_by is not None:
            raise result.interruption()

    return build, f"data + exit fine-tune ({finetune.train.steps or 'epochs'} steps) -> {plan['finetune'].dir}"


def _calibrate(config: Config, plan: dict, log):
    energy, final, cost = config.energy, plan["finetune"].links["final"], plan["calibrate"].links["cost_model.json"]

    def build():
        if energy.cost_model:
            _use_given_cost_model(final, energy.cost_model, cost, log)
            return
        for attempt in range(3):  # a noisy machine can fit a non-positive slope: measure again, longer
            fit = calibrate(str(final), tokens=energy.tokens, new_tokens=energy.new_tokens, batch=energy.batch,
                            repeats=energy.repeats, min_seconds=energy.min_seconds * (attempt + 1), out=str(cost),
                            energy_overrides=list(energy.set), log=log)
            if fit.b_j_per_layer > 0:
                return
            log(f"  the fit's J per layer is {fit.b_j_per_layer:.3g}: calibrating again with longer windows")
        raise GreencodeError(f"{cost}: the cost per layer did not come out positive in 3 calibrations; the machine "
                             "is too noisy (raise energy.min_seconds)")

    what = ("joules per token = a + b x layers + c x head evaluations + d x decisions (energy calibrate)"
            if not energy.cost_model else f"the cost model {energy.cost_model}")
    return build, what


def _use_given_cost_model(final: Path, given: str, cost: Path, log):
    """`energy.cost_model`: a fit made elsewhere (e.g. on the target GPU), checked against this model
    and copied into the run."""
    fit = load_cost_model(given, architecture(load_model_config(final)), what="energy.cost_model")
    fit.pop("path")
    if fit["b_j_per_layer"] <= 0:
        raise GreencodeError(f"{given}: {fit['b_j_per_layer']:g} J per layer; expected a cost that grows with depth")
    write_json_output(cost, fit, "cost-model", inputs={"cost_model": given})
    log(f"  {given}: {describe(fit)} ({fit['method']}), used as given")


def _rollouts(config: Config, plan: dict, log):
    rollouts, final = config.rollouts, plan["finetune"].links["final"]
    stores = rollout_stores(plan)

    def build():
        for split, path, n in (("train", stores[0], rollouts.episodes),
                               (rollouts.validation_split, stores[1], rollouts.validation_episodes)):
            if path.exists():
                continue  # collected before an interruption of the other store
            collect_rollouts(final, Path(config.finetune.data.path), path, split=split, episodes=n,
                             batch_size=rollouts.batch_size, seed=rollouts.seed + (split != "train"),
                             hidden_dtype=rollouts.hidden_dtype, max_context=rollouts.max_context or None)

    return build, f"{rollouts.episodes} training + {rollouts.validation_episodes} validation episodes"


def rollout_stores(plan: dict) -> tuple[Path, Path]:
    """The training and validation rollout stores of the rollouts stage."""
    root = plan["rollouts"].links["rollouts"]
    return root / "train", root / "validation"


def _policy(config: Config, plan: dict, log):
    policy_dir = plan["policy"].links["policy"]
    rl = policy_rl(config, plan["calibrate"].links["cost_model.json"])
    train_store, validation_store = rollout_stores(plan)

    def build():
        train_policy(train_store, policy_dir, rl, validation_dir=validation_store, overwrite=True)

    return build, f"PPO, {rl.total_timesteps:,} timesteps, reward {rl.reward}"


def _certify(config: Config, plan: dict, log):
    certify, evaluate_cfg = config.certify, config.eval
    certification, policy_dir = plan["certify"].links["certify.json"], plan["policy"].links["policy"]

    def build():
        run_certify(plan["finetune"].links["final"], Path(config.finetune.data.path), certification,
                    policy_dir=policy_dir if "learned" in certify.families else None, config=evaluate_cfg,
                    section=certify)

    return build, (f"Learn-then-Test on the {certify.split} split: {', '.join(certify.families)}, {certify.loss} "
                   f"loss, epsilon {certify.epsilon:g}")


def _evaluate(config: Config, plan: dict, log):
    eval_dir = plan["evaluate"].links["evaluate"]
    evaluate_cfg = dataclasses.replace(config.eval, certified=str(plan["certify"].links["certify.json"]))

    def build():
        evaluate(plan["finetune"].links["final"], Path(config.finetune.data.path), eval_dir,
                 policy_dir=plan["policy"].links["policy"], base=base_model(config),
                 cost_model=str(plan["calibrate"].links["cost_model.json"]), config=evaluate_cfg)

    return build, "every policy family on the test split"


_BUILDERS = {"finetune": _finetune, "calibrate": _calibrate, "rollouts": _rollouts, "policy": _policy,
             "certify": _certify, "evaluate": _evaluate}
