"""`greencode run [CONFIG] [section.field=value ...]`: the main job, stage by stage.

    data (prepared by finetune if absent) -> finetune -> calibrate -> collect (train +
    validation rollouts) -> train policy -> evaluate -> report
Everything goes under runs/<name>/ as each stage's own command writes it. A stage is
skipped when its output exists for the same inputs: pipeline.json keeps, per stage, a hash
of the config fields it reads and of the stages before it. An interrupted run (Ctrl-C,
SIGTERM) stops inside a stage that resumes (finetune, collect, train-policy, evaluate)
or between stages; the same command continues.

One YAML file holds every stage's section: finetune's (run, model, data, train, parallel,
checkpoint, eval) plus `energy` (calibration), `rollouts` (collection) and `rl` (PPO). The
`eval` section serves both finetune (its held-out loss: split, batches, every) and the
evaluation (eval.config.EvalConfig: samples, policies, protocols, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import json
import shutil
import time
from pathlib import Path

import yaml

from greencode_jax import interrupts, ownership
from greencode_jax.atomic import atomic_write_text, partial_path, write_json_output
from greencode_jax.cli.config import _hint, read_yaml, typed_section
from greencode_jax.cli.train_cmd import PIPELINE_ONLY_SECTIONS
from greencode_jax.errors import GreencodeError
from greencode_jax.locks import output_lock
from greencode_jax.train.loop import check_run_directory

QUICKSTART = Path(__file__).with_name("quickstart.yaml")
FINETUNE_SECTIONS = ("run", "model", "data", "train", "parallel", "checkpoint", "eval")
PIPELINE_SECTIONS = PIPELINE_ONLY_SECTIONS  # the sections only `run` reads; one list, train_cmd's


@dataclasses.dataclass(frozen=True)
class EnergySection:
    """`greencode energy calibrate` on the fine-tuned checkpoint (decode workload)."""
    repeats: int = 2
    min_seconds: float = 1.0
    tokens: int = 16
    new_tokens: int = 32
    batch: int = 1
    set: tuple = ()  # EnergyConfig overrides, e.g. [cpu_backend=estimate]
    cost_model: str = ""  # use this fit (`energy calibrate --out` JSON, e.g. from the target GPU) instead of calibrating


@dataclasses.dataclass(frozen=True)
class RolloutsSection:
    """`greencode collect-rollouts`: a training and a validation store."""
    episodes: int = 512
    validation_episodes: int = 128
    validation_split: str = "dev"
    batch_size: int = 16
    hidden_dtype: str = "float32"
    max_context: int = 0  # 0: what the model's positions allow
    seed: int = 0


def split_config(data: dict, source: str) -> tuple[dict, dict]:
    unknown = [s for s in data if s not in FINETUNE_SECTIONS + PIPELINE_SECTIONS]
    if unknown:
        raise GreencodeError(f"{source}: unknown section '{unknown[0]}'"
                             f"{_hint(unknown[0], FINETUNE_SECTIONS + PIPELINE_SECTIONS)}; expected "
                             f"{list(FINETUNE_SECTIONS + PIPELINE_SECTIONS)}")
    return ({k: v for k, v in data.items() if k in FINETUNE_SECTIONS},
            {k: (data.get(k) or {}) for k in PIPELINE_SECTIONS})


def _section(cls, values, name, source):
    if not isinstance(values, dict):
        raise GreencodeError(f"{source}: section '{name}' must be a mapping of fields")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return typed_section(cls, values, name, source)


def load_pipeline_config(path, overrides):
    """(resolved mapping, FinetuneConfig, its resolved YAML, EnergySection, RolloutsSection,
    RLSection, EvalConfig, CertifySection): every section checked before anything runs."""
    from greencode_jax.cli.config import apply_overrides
    from greencode_jax.cli.rl_cmd import rl_section_from_dict
    from greencode_jax.cli.train_cmd import finetune_config_from_dict
    from greencode_jax.eval.config import EvalConfig

    source = str(path or QUICKSTART)
    data = read_yaml(path or QUICKSTART)
    for name in FINETUNE_SECTIONS + PIPELINE_SECTIONS:
        data.setdefault(name, {})
    data = apply_overrides(data, list(overrides), source)
    finetune_part, stage_part = split_config(data, source)
    evaluate = EvalConfig.from_dict(finetune_part.get("eval") or {}, source)
    finetune, resolved = finetune_config_from_dict(finetune_part, source)  # reads its own part of `eval`
    energy = _section(EnergySection, stage_part["energy"], "energy", source)
    rollouts = _section(RolloutsSection, stage_part["rollouts"], "rollouts", source)
    rl = rl_section_from_dict(stage_part["rl"], source)
    from greencode_jax.eval.certify_run import CertifySection

    certify = _section(CertifySection, stage_part["certify"], "certify", source)
    return data, finetune, resolved, energy, rollouts, rl, evaluate, certify


def read_stage_json(path: Path, stage: str) -> dict:
    """A stage's JSON output; a corrupt one (an interrupted write by another tool, a hand edit) is
    named with the stage that makes it."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise GreencodeError(f"[{stage}] {path}: unreadable ({error}); delete it and rerun to make the {stage} "
                             "stage again") from None


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stages:
    """pipeline.json: per stage, the key of the inputs its outputs were made from."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "pipeline.json"
        self.done = self._read() if self.path.exists() else {}
        self.seconds = {}

    def _read(self) -> dict:
        try:
            done = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            done = error
        if not isinstance(done, dict) or not all(isinstance(v, dict) for v in done.values()):
            reason = f" ({done})" if isinstance(done, Exception) else ""
            raise GreencodeError(f"{self.path}: unreadable{reason}; it records which stages are done: delete it and "
                                 "rerun, and every stage whose outputs it made runs again") from None
        return done

    def run(self, name: str, key: str, outputs, build, what: str, stale=()):
        """Runs `build` unless `outputs` exist for `key`. `stale`: paths (an interrupted run's
        DIR.partial among them) removed first when they were started for other inputs; kept,
        so that the stage resumes, when an interrupted run had the same inputs."""
        outputs = [Path(p) for p in outputs]
        entry = self.done.get(name, {})
        if entry.get("key") == key and all(p.exists() for p in outputs):
            print(f"[{name}] up to date ({what}), skipped", flush=True)
            self.seconds[name] = 0.0
            return
        if entry.get("started") != key:
            try:
                remove_stale_outputs(stale, name)
            except GreencodeError as error:
                raise GreencodeError(f"[{name}] {error}") from None
        self.done[name] = {"started": key}
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")
        print(f"[{name}] {what}", flush=True)
        start = time.perf_counter()
        try:
            with ownership.stage(name):
                build()
        except interrupts.Interrupted as stop:  # what the stage kept; `greencode run` again resumes it
            raise stop.prefixed(f"[{name}]") from None
        except BaseException as error:
            if isinstance(error, KeyboardInterrupt) or (isinstance(error, Exception) and interrupts.received()):
                raise interrupts.interrupted(f"[{name}] stopped; the same command continues from this stage") \
                    from None
            if isinstance(error, GreencodeError):  # the earlier stages' outputs stay as they are, for the rerun
                raise GreencodeError(f"[{name}] {error}") from None
            raise
        seconds = time.perf_counter() - start
        self.seconds[name] = seconds
        self.done[name] = {"key": key, "started": key, "seconds": round(seconds, 1)}
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")
        print(f"[{name}] done in {seconds:.1f} s", flush=True)


def remove_stale_outputs(paths, stage_name: str):
    """Removes what stage `stage_name` made for other inputs (each path and its DIR.partial), after
    checking that every one of them is its own: anything else is left, and named."""
    present = [p for path in map(Path, paths) for p in (path, partial_path(path)) if p.exists() or p.is_symlink()]
    for path in present:  # every check first: nothing is removed unless all of it may be
        ownership.check_stage_output(path, stage_name)
    for path in present:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def run_pipeline(config_path, overrides):
    data, finetune, resolved, energy, rollouts, rl, evaluate_cfg, certify = load_pipeline_config(config_path,
                                                                                                  overrides)
    run_dir = Path(finetune.run.out_dir) / finetune.run.name
    source = str(config_path or QUICKSTART)
    inputs = {"config": config_path, "data": finetune.data.path or None,
              "model": None if finetune.model.init == "scratch" else finetune.model.init}
    check_run_directory(run_dir, inputs)
    with output_lock(run_dir):
        print(f"greencode run: {source} -> {run_dir}/", flush=True)
        new_dirs = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
        run_dir.mkdir(parents=True, exist_ok=True)
        if ownership.read_manifest(run_dir) is None:
            ownership.write_manifest(run_dir, "run", inputs)
        try:
            _run_stages(run_dir, data, finetune, resolved, energy, rollouts, rl, evaluate_cfg, certify, source)
        except BaseException:
            if set(os.listdir(run_dir)) <= {"pipeline.yaml", "pipeline.json", ownership.MANIFEST}:
                for directory in new_dirs:  # failed before any stage made anything
                    shutil.rmtree(directory, ignore_errors=True)
            raise


def _run_stages(run_dir: Path, data, finetune, resolved, energy, rollouts, rl, evaluate_cfg, certify, source: str):
    from greencode_jax.cli.train_cmd import print_evaluation
    from greencode_jax.train import train

    data_dir = Path(finetune.data.path)
    stages = Stages(run_dir)  # a corrupt pipeline.json is named before anything is written
    atomic_write_text(run_dir / "pipeline.yaml", yaml.safe_dump(data, sort_keys=False))
    final = run_dir / "final"

    ft_key = _digest(finetune.to_dict())

    def do_finetune():
        r = train(finetune, source=source, resolved_yaml=resolved, progress=None)
        if r.stopped_by is not None:
            raise r.interruption()

    stages.run("finetune", ft_key, [final, run_dir / "eval.json"], do_finetune,
               f"data + exit fine-tune ({finetune.train.steps or 'epochs'} steps) -> {final}")
    print_evaluation(read_stage_json(run_dir / "eval.json", "finetune"))

    cost = run_dir / "cost_model.json"
    cal_key = _digest(ft_key, dataclasses.asdict(energy))

    def do_calibrate():
        from greencode_jax.energy.calibrate_run import calibrate

        if energy.cost_model:
            from greencode_jax.convert import load_model_config
            from greencode_jax.energy.cost_model import architecture, describe, load_cost_model

            fit = load_cost_model(energy.cost_model, architecture(load_model_config(final)), what="energy.cost_model")
            fit.pop("path")
            if fit["b_j_per_layer"] <= 0:
                raise GreencodeError(f"{energy.cost_model}: {fit['b_j_per_layer']:g} J per layer; expected a cost "
                                     "that grows with depth")
            write_json_output(cost, fit, "cost-model", inputs={"cost_model": energy.cost_model})
            print(f"  {energy.cost_model}: {describe(fit)} ({fit['method']}), used as given")
            return

        for attempt in range(3):  # a noisy machine can fit a non-positive slope: measure again, longer
            fit = calibrate(str(final), tokens=energy.tokens, new_tokens=energy.new_tokens, batch=energy.batch,
                            repeats=energy.repeats, min_seconds=energy.min_seconds * (attempt + 1), out=str(cost),
                            energy_overrides=list(energy.set))
            if fit.b_j_per_layer > 0:
                return
            print(f"  the fit's J per layer is {fit.b_j_per_layer:.3g}: calibrating again with longer windows")
        raise GreencodeError(f"{cost}: the cost per layer did not come out positive in 3 calibrations; the machine "
                             "is too noisy (raise energy.min_seconds)")

    stages.run("calibrate", cal_key, [cost], do_calibrate, stale=[cost],
               what="joules per token = a + b x layers + c x head evaluations + d x decisions (energy calibrate)"
               if not energy.cost_model
               else f"the cost model {energy.cost_model}")

    from greencode_jax.rl.collect import collect_rollouts

    stores = {"train": run_dir / "rollouts" / "train", "validation": run_dir / "rollouts" / "validation"}
    col_key = _digest(ft_key, dataclasses.asdict(rollouts))
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
    pol_key = _digest(col_key, cal_key, dataclasses.asdict(rl_cfg))

    def do_policy():
        from greencode_jax.rl.train import train_policy

        train_policy(stores["train"], policy_dir, rl_cfg, validation_dir=stores["validation"], overwrite=True)

    stages.run("policy", pol_key, [policy_dir], do_policy,
               f"PPO, {rl_cfg.total_timesteps:,} timesteps, reward {rl_cfg.reward}", stale=[policy_dir])

    certification = run_dir / "certify.json"
    protocol = {k: evaluate_cfg.to_dict()[k] for k in ("context_fraction", "new_tokens", "max_context")}
    cert_key = _digest(pol_key, dataclasses.asdict(certify), protocol)

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
    ev_key = _digest(pol_key, cert_key, evaluate_cfg.to_dict(), str(base))

    def do_evaluate():
        from greencode_jax.eval.run import evaluate

        evaluate(final, data_dir, eval_dir, policy_dir=policy_dir, base=base, cost_model=str(cost),
                 config=evaluate_cfg)

    stages.run("evaluate", ev_key, [eval_dir / "summary.json", eval_dir / "report.md"], do_evaluate,
               "every policy family on the test split", stale=[eval_dir])
    print_outcome(run_dir, eval_dir, policy_dir, stages)


def print_outcome(run_dir: Path, eval_dir: Path, policy_dir: Path, stages: Stages):
    from greencode_jax.eval.report import format_table, main_table

    summary = read_stage_json(eval_dir / "summary.json", "evaluate")
    for protocol in summary["protocols"]:
        print(f"\n{protocol} protocol:")
        print(format_table(main_table(summary, protocol)))
    report = (eval_dir / "report.md").read_text().splitlines()
    energy = [line[2:] for line in report if line.startswith(("- Energy method", "- **Only estimates", "- modelled"))]
    print("\n" + "\n".join(energy).replace("**", ""))
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in stages.seconds.items())
    print(f"stages: {timing}")
    print(f"report: {eval_dir / 'report.md'}\nplots:  {eval_dir / 'pareto.png'}, {eval_dir / 'exits.png'}\n"
          f"policy: {policy_dir}")
