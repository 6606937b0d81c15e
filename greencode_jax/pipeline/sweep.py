"""`greencode sweep`: the unique stage jobs of every arm of a sweep, run once each on a backend.

Every run (arm x seed) is planned with `plan_stages`; runs whose stage has the same key share one
job, so sweeping `rl.beta` over 3 values makes one fine-tune, calibration and rollout job and 3
policy, certification and evaluation jobs. A job is a command (`greencode sweep --run-stage
SPEC.json`) that loads its run's config and runs that one stage into the store; a backend only
launches commands. A job whose stage is done in the store (made by an earlier sweep or run) is
not launched at all. Outputs: sweeps/<name>/ (runs/<arm>/ linking each run's stage outputs,
jobs/<job>.json and logs/<job>.log, and the results: results.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from greencode_jax import ownership
from greencode_jax.atomic import atomic_write_text
from greencode_jax.config import load_config
from greencode_jax.errors import GreencodeError
from greencode_jax.locks import output_lock
from greencode_jax.pipeline.plan import STAGES, plan_stages, store_dir
from greencode_jax.pipeline.results import write_results
from greencode_jax.pipeline.scheduler import run_jobs
from greencode_jax.pipeline.store import is_done, link_outputs
from greencode_jax.pipeline.sweep_file import Sweep

SWEEPS = "sweeps"


@dataclasses.dataclass
class Job:
    """One stage of the store that one or more runs need: run once, by whichever backend."""
    id: str  # <stage>-<key>, the name of its store directory
    stage: str
    plan: object  # the StagePlan of its first run
    deps: tuple  # job ids
    spec: dict  # what `--run-stage` reads: the base, the first run's overrides, the stage, its key
    runs: list = dataclasses.field(default_factory=list)  # run names that need it

    @property
    def done(self) -> bool:
        return is_done(self.plan)


@dataclasses.dataclass
class SweepPlan:
    sweep: Sweep
    jobs: dict  # job id -> Job, in dependency order
    stages: dict  # run name -> {stage: StagePlan}

    @property
    def out(self) -> Path:
        return Path(SWEEPS) / self.sweep.name


def plan_sweep(sweep: Sweep) -> SweepPlan:
    jobs, stages = {}, {}
    for stage_name in STAGES:  # stage by stage: a job's dependencies are planned before it
        for run in sweep.runs:
            plan = stages.setdefault(run.name, plan_stages(run.config))
            stage = plan[stage_name]
            job = jobs.get(stage.job)
            if job is None:
                spec = {"base": str(sweep.base), "overrides": list(run.overrides), "stage": stage_name,
                        "key": stage.key}
                job = jobs[stage.job] = Job(stage.job, stage_name, stage, tuple(plan[d].job for d in stage.deps),
                                            spec)
            job.runs.append(run.name)
    return SweepPlan(sweep, jobs, stages)


def dry_run_lines(plan: SweepPlan) -> list[str]:
    """Every arm with its overrides, then every job: the runs that share it, and whether it is done."""
    sweep = plan.sweep
    seeds = sorted({run.seed for run in sweep.runs}, key=str)
    lines = [f"sweep {sweep.name}: {len(sweep.arms)} arms x {len(seeds)} seed(s) = {len(sweep.runs)} runs of "
             f"{sweep.base}", "arms:"]
    width = max(len(run.name) for run in sweep.runs)
    lines += [f"  {run.name:<{width}}  {' '.join(run.overrides) or '(the base as it is)'}" for run in sweep.runs]
    done = sum(job.done for job in plan.jobs.values())
    store = store_dir(sweep.runs[0].config)
    lines.append(f"stage jobs: {len(plan.jobs)} ({done} done in {store}), instead of "
                 f"{len(sweep.runs) * len(STAGES)} without sharing")
    for job in plan.jobs.values():
        shared = "all runs" if len(job.runs) == len(sweep.runs) else ", ".join(job.runs)
        lines.append(f"  {job.id}  {'done ' if job.done else 'to run'}  {shared}")
    return lines


def run_sweep(plan: SweepPlan, backend, log) -> dict:
    """Runs every job not done on `backend`, links each finished run under sweeps/<name>/runs/, writes
    the results; returns {run name: its one-line error} of the runs that failed."""
    out = plan.out
    with output_lock(out):
        _prepare(plan)
        errors = run_jobs(plan.jobs, backend, out, lambda job: job_command(out, job), log)
        failed = {}
        for run in plan.sweep.runs:
            broken = [errors[plan.stages[run.name][s].job] for s in STAGES if plan.stages[run.name][s].job in errors]
            if broken:
                failed[run.name] = broken[0]
                continue
            run_dir = out / "runs" / run.name
            run_dir.mkdir(parents=True, exist_ok=True)
            for stage in plan.stages[run.name].values():
                link_outputs(run_dir, stage)
        write_results(plan, out, failed)
    return failed


def submit_sweep(plan: SweepPlan, backend, log) -> int:
    """`--detach`: submits every job not done to `backend` (one that follows dependencies: SLURM) and
    returns how many, without waiting; the same command without `--detach` then follows the jobs still
    queued (the backend finds them) and writes the results."""
    if not getattr(backend, "follows_dependencies", False):
        raise GreencodeError("--detach: only --backend slurm on a SLURM cluster runs the stage jobs without this "
                             "process (its jobs wait on each other in SLURM)")
    with output_lock(plan.out):
        _prepare(plan)
        errors = run_jobs(plan.jobs, backend, plan.out, lambda job: job_command(plan.out, job), log, detach=True)
    return sum(not job.done and job.id not in errors for job in plan.jobs.values())


def _prepare(plan: SweepPlan):
    """sweeps/<name>/ with its manifest (or one that is a sweep's already) and every job's spec."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    if ownership.read_manifest(out) is None:
        ownership.write_manifest(out, "sweep", {"sweep": plan.sweep.path})
    elif ownership.read_manifest(out).get("kind") != "sweep":
        ownership.check_replaceable_dir(out, "sweep")  # raises, naming what it is
    write_job_specs(out, plan.jobs.values())


def write_job_specs(out: Path, jobs):
    """sweeps/<name>/jobs/<job>.json of each job: what its command (`job_command`) reads."""
    for job in jobs:
        atomic_write_text(_spec_path(out, job), json.dumps(job.spec, indent=2) + "\n")


def _spec_path(out: Path, job: Job) -> Path:
    (out / "jobs").mkdir(exist_ok=True)
    return out / "jobs" / f"{job.id}.json"


def job_command(out: Path, job: Job) -> list[str]:
    """The command a backend runs for `job` (with this Python, from the sweep's working directory)."""
    return [sys.executable, "-m", "greencode_jax.cli.main", "sweep", "--run-stage", str(_spec_path(out, job))]


def run_stage_job(spec_path: str | Path, log) -> float:
    """`greencode sweep --run-stage SPEC.json`: one stage of one run's config into the store."""
    from greencode_jax.pipeline.runner import run_planned_stage  # lazy: JAX, which only the job itself needs

    try:
        spec = json.loads(Path(spec_path).read_text())
        base, overrides, stage, key = spec["base"], spec["overrides"], spec["stage"], spec["key"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise GreencodeError(f"{spec_path}: not a stage job ({error})") from None
    config = load_config(base, overrides)
    plan = plan_stages(config)
    if plan[stage].key != key:
        raise GreencodeError(f"{spec_path}: the {stage} stage of {base} with {overrides} now has key "
                             f"{plan[stage].key}, not {key}: the base changed since the sweep planned it; rerun the "
                             "sweep")
    return run_planned_stage(config, plan, stage, log)
