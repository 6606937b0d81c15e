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

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

import yaml

from greencode_jax import ownership
from greencode_jax.atomic import atomic_write_text, write_json_output
from greencode_jax.config import load_config
from greencode_jax.errors import GreencodeError
from greencode_jax.locks import output_lock
from greencode_jax.pipeline.stages import Stages, digest, read_stage_json, say
from greencode_jax.train import train
from greencode_jax.train.loop import check_run_directory

QUICKSTART = Path(__file__).with_name("quickstart.yaml")


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    run_dir: Path
    eval_dir: Path  # summary.json, report.md, pareto.png, exits.png
    policy_dir: Path
    seconds: dict  # per stage, this call's (0 when up to date)


def load_pipeline_config(path, overrides):
    """(resolved mapping, FinetuneConfig, its resolved YAML, EnergySection, RolloutsSection,
    RLSection, EvalConfig, CertifySection): every section checked before anything runs."""
    config = load_config(path or QUICKSTART, list(overrides))
    return (config.mapping, config.finetune, config.finetune_yaml, config.energy, config.rollouts, config.rl,
            config.eval, config.certify)


def run_pipeline(config_path=None, overrides=(), *, log=say, show_evaluation=None) -> PipelineResult:
    """`greencode run`: every stage of the config at `config_path` (default: the embedded quickstart)
    with `overrides`, each skipped when its outputs exist for the same inputs. `log` receives the
    progress lines; `show_evaluation(eval_json)` is called after the fine-tune stage."""
    data, finetune, resolved, energy, rollouts, rl, evaluate_cfg, certify = load_pipeline_config(config_path,
                                                                                                  overrides)
    run_dir = Path(finetune.run.out_dir) / finetune.run.name
    source = str(config_path or QUICKSTART)
    inputs = {"config": config_path, "data": finetune.data.path or None,
              "model": None if finetune.model.init == "scratch" else finetune.model.init}
    check_run_directory(run_dir, inputs)
    with output_lock(run_dir):
        log(f"greencode run: {source} -> {run_dir}/")
        new_dirs = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        if ownership.read_manifest(run_dir) is None:
            ownership.write_manifest(run_dir, "run", inputs)
        try:
            return _run_stages(run_dir, data, finetune, resolved, energy, rollouts, rl, evaluate_cfg, certify, source,
                               log, show_evaluation)
        except BaseException:
            if set(os.listdir(run_dir)) <= {"pipeline.yaml", "pipeline.json", ownership.MANIFEST}:
                for directory in new_dirs:  # failed before any stage made anything
                    shutil.rmtree(directory, ignore_errors=True)
            raise


def _run_stages(run_dir: Path, data, finetune, resolved, energy, rollouts, rl, evaluate_cfg, certify, source: str,
                log, show_evaluation) -> PipelineResult:

    data_dir = Path(finetune.data.path)
    stages = Stages(run_dir, log)  # a corrupt pipeline.json is named before anything is written
    atomic_write_text(run_dir / "pipeline.yaml", yaml.safe_dump(data, sort_keys=False))
    final = run_dir / "final"

    ft_key = digest(finetune.to_dict())

    def do_finetune():
        r = train(finetune, source=source, resolved_yaml=resolved, progress=None)
        if r.stopped_by is not None:
            raise r.interruption()

    stages.run("finetune", ft_key, [final, run_dir / "eval.json"], do_finetune,
               f"data + exit fine-tune ({finetune.train.steps or 'epochs'} steps) -> {final}")
    if show_evaluation is not None:
        show_evaluation(read_stage_json(run_dir / "eval.json", "finetune"))

    cost = run_dir / "cost_model.json"
    cal_key = digest(ft_key, dataclasses.asdict(energy))

    def do_calibrate():
        from greencode_jax.cli.energy_cmd import cmd_energy_calibrate

        if energy.cost_model:
            from greencode_jax.convert import load_model_config
            from greencode_jax.energy.cost_model import architecture, describe, load_cost_model

            fit = load_cost_model(energy.cost_model, architecture(load_model_config(final)), what="energy.cost_model")
            fit.pop("path")
            if fit["b_j_per_layer"] <= 0:
                raise GreencodeError(f"{energy.cost_model}: {fit['b_j_per_layer']:g} J per layer; expected a cost "
                                     "that grows with depth")
            write_json_output(cost, fit, "cost-model", inputs={"cost_model": energy.cost_model})
            log(f"  {energy.cost_model}: {describe(fit)} ({fit['method']}), used as given")
            return

        for attempt in range(3):  # a noisy machine can fit a non-positive slope: measure again, longer
            args = argparse.Namespace(model=str(final), depths=None, workload="decode", tokens=energy.tokens,
                                      new_tokens=energy.new_tokens, batch=energy.batch, repeats=energy.repeats,
                                      min_seconds=energy.min_seconds * (attempt + 1), idle_seconds=0.0,
                                      dtype="float32", seed=0, out=str(cost), set=list(energy.set))
            fit = cmd_energy_calibrate(args)
            if fit.b_j_per_layer > 0:
                return
            log(f"  the fit's J per layer is {fit.b_j_per_layer:.3g}: calibrating again with longer windows")
        raise GreencodeError(f"{cost}: the cost per layer did not come out positive in 3 calibrations; the machine "
                             "is too noisy (raise energy.min_seconds)")

    stages.run("calibrate", cal_key, [cost], do_calibrate, stale=[cost],
               what="joules per token = a + b x layers + c x head evaluations + d x decisions (energy calibrate)"
               if not energy.cost_model
               else f"the cost model {energy.cost_model}")

    from greencode_jax.rl.collect import collect_rollouts

    stores = {"train": run_dir / "rollouts" / "train", "validation": run_dir / "rollouts" / "validation"}
    col_key = digest(ft_key, dataclasses.asdict(rollouts))
    max_context = rollouts.max_context or None

    def do_collect():
        for split, path, n in (("train", stores["train"], rollouts.episodes),
                               (rollouts.validation_split, stores["validation"], rollouts.validation_episodes)):
            if path.exists():
                continue  # collected before an interruption of the other store
            collect_rollouts(final, data_dir, path, split=split, episodes=n, batch_size=rollouts.batch_size,
                             seed=rollouts.seed + (split != "train"), hidden_dtype=rollouts.hidden_dtype,
                             max_context=max_context)

    stages.run("rollouts", col_key, list(stores.values()), do_collect,
               f"{rollouts.episodes} training + {rollouts.validation_episodes} validation episodes",
               stale=list(stores.values()))

    policy_dir = run_dir / "policy"
    rl_cfg = dataclasses.replace(rl, cost_model=str(cost)) if rl.reward == "energy" and not rl.cost_model else rl
    pol_key = digest(col_key, cal_key, dataclasses.asdict(rl_cfg))

    def do_policy():
        from greencode_jax.rl.train import train_policy

        train_policy(stores["train"], policy_dir, rl_cfg, validation_dir=stores["validation"], overwrite=True)

    stages.run("policy", pol_key, [policy_dir], do_policy,
               f"PPO, {rl_cfg.total_timesteps:,} timesteps, reward {rl_cfg.reward}", stale=[policy_dir])

    certification = run_dir / "certify.json"
    protocol = {k: evaluate_cfg.evaluation_fields()[k] for k in ("context_fraction", "new_tokens", "max_context")}
    cert_key = digest(pol_key, dataclasses.asdict(certify), protocol)

    def do_certify():
        from greencode_jax.eval.certify_run import certify as run_certify

        run_certify(final, data_dir, certification, policy_dir=policy_dir if "learned" in certify.families else None,
                    config=evaluate_cfg, section=certify)

    stages.run("certify", cert_key, [certification], do_certify,
               f"Learn-then-Test on the {certify.split} split: {', '.join(certify.families)}, {certify.loss} loss, "
               f"epsilon {certify.epsilon:g}", stale=[certification])

    eval_dir = run_dir / "evaluate"
    base = None if finetune.model.init == "scratch" else finetune.model.init
    evaluate_cfg = dataclasses.replace(evaluate_cfg, certified=str(certification))
    ev_key = digest(pol_key, cert_key, evaluate_cfg.evaluation_fields(), str(base))

    def do_evaluate():
        from greencode_jax.eval.run import evaluate

        evaluate(final, data_dir, eval_dir, policy_dir=policy_dir, base=base, cost_model=str(cost),
                 config=evaluate_cfg)

    stages.run("evaluate", ev_key, [eval_dir / "summary.json", eval_dir / "report.md"], do_evaluate,
               "every policy family on the test split", stale=[eval_dir])
    return PipelineResult(run_dir=run_dir, eval_dir=eval_dir, policy_dir=policy_dir, seconds=dict(stages.seconds))
