"""`train`: the fine-tuning run, from config to final checkpoint.

    run dir (<run.out_dir>/<run.name>/): config.yaml, metrics.jsonl, checkpoints/, eval.json, final/

Start or resume: with checkpoints in the run's checkpoint directory the run continues
from the latest (parameters, optimiser state, step, data position and PRNG key), so an
interrupted and resumed run computes exactly what an uninterrupted one would. SIGTERM
(preemption) or Ctrl-C saves a checkpoint at the next step and stops; every host stops at
the same step because the "stop" bit travels through the step as a sharded input. A
non-finite loss, gradient norm or parameter norm stops the run with an error; the step is
never saved, so the latest checkpoint is the last good one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import jax
from tqdm import tqdm

from greencode_jax.atomic import atomic_write_text
from greencode_jax.config import FinetuneConfig
from greencode_jax.errors import GreencodeError
from greencode_jax.interrupts import Interrupted, SafePoints
from greencode_jax.locks import output_lock
from greencode_jax.metrics_log import MetricsLog
from greencode_jax.ownership import check_not_an_input, check_replaceable_dir, read_manifest, write_manifest
from greencode_jax.parallel import initialize_distributed, make_mesh
from greencode_jax.train.checkpointing import (
    TrainCheckpoints, abstract_like, check_same_model, check_same_state, model_signature, state_signature,
)
from greencode_jax.train.data import TrainData
from greencode_jax.train.evaluate import Evaluator, evaluation_plan
from greencode_jax.train.export import save_final
from greencode_jax.train.feed import BatchFeeder
from greencode_jax.train.model_source import ModelSource, check_model_section
from greencode_jax.train.monitor import StepMonitor
from greencode_jax.train.optimizer import learning_rate_schedule, make_optimizer
from greencode_jax.train.methods import heads_config, make_method
from greencode_jax.train.weights import exit_weights

RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "eval.json", "final", "hidden_cache")
PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM: the run stopped early, a checkpoint holds its progress


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    stopped_by: str | None  # "SIGTERM" / "SIGINT" when interrupted, None when finished
    final_checkpoint: Path | None
    evaluation: dict | None
    seconds: float
    tokens_per_s: float | None  # after the first (compiling) step
    exit_layers: tuple
    weights: list
    start_step: int = 0  # where this call started: 0, or the checkpoint it resumed from
    finished_before: bool = False  # the run had already finished: nothing was trained
    evaluated: bool = True  # this call evaluated; False: `evaluation` is the finished run's eval.json

    def interruption(self) -> Interrupted:
        """What a stopped run raises (the CLI prints it as its one line, exit status 130 / 143)."""
        signal_name = self.stopped_by if self.stopped_by in ("SIGINT", "SIGTERM") else "SIGTERM"
        by = "" if self.stopped_by == signal_name else f" (stopped by {self.stopped_by})"
        return Interrupted(signal_name, f"finetune saved its checkpoint at step {self.step} of {self.total_steps} in "
                           f"{self.run_dir}{by}; the same command resumes at step {self.step + 1}",
                           at_safe_point=True)


class StopSignals(SafePoints):
    """SIGTERM and the first Ctrl-C set `received` (the loop saves and stops, every host at the same
    step); a second Ctrl-C interrupts at once."""

    def __init__(self):
        super().__init__(raise_pending=False)


def place_host_tree(host_tree, shardings):
    """Host arrays -> global arrays; each process places only the shards its devices hold."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
                        host_tree, shardings)


def _finished_evaluation(run_dir: Path, data, cfg: FinetuneConfig) -> tuple[dict | None, str]:
    """A finished run's evaluation (eval.json) if it is there, beside final/, and covers what this
    config asks for; else None and why not."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return None, f"{path} is missing"
    if not (run_dir / "final").is_dir():
        return None, f"{run_dir / 'final'} is missing"
    try:
        evaluation = json.loads(path.read_text())
        held = (evaluation["split"], evaluation["batches"], evaluation["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{path} is unreadable"
    split, batches, tokens = evaluation_plan(data, cfg)
    if held != (split, batches, tokens):
        return None, (f"{path} covers {held[1]} batches of the {held[0]} split ({held[2]:,} predictions), this config "
                      f"asks for {batches} of {split} ({tokens:,})")
    return evaluation, ""


def _may_hold_checkpoints(directory) -> bool:
    """False for a local directory that does not exist (opening it with Orbax would create it)."""
    return "://" in str(directory) or Path(directory).exists()


def train(cfg: FinetuneConfig, source: str = "config", resolved_yaml: str | None = None,
          progress: bool | None = None, re_evaluate: bool = False) -> TrainResult:
    """Trains (or resumes) the run `cfg` describes, evaluates it and writes `final/`.

    Everything the config names is checked before anything is written: a run that fails before
    training starts leaves no run directory. A run that had already finished is not evaluated
    again: its eval.json is returned (`finished_before`, `evaluated` False), unless
    `re_evaluate`, or unless eval.json is missing or covers another split or number of batches.
    """
    started = time.perf_counter()
    check_model_section(cfg.model, source)  # a bad model.init is named before any data is prepared
    info = initialize_distributed(cfg.parallel.distributed)  # before anything touches the devices
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    inputs = {"data": cfg.data.path or None, "model": None if cfg.model.init == "scratch" else cfg.model.init}
    if (run_dir / "final").is_symlink():  # greencode run's layout: its stages live in the stage store
        raise GreencodeError(f"{run_dir}: a `greencode run` directory (its final links to "
                             f"{os.readlink(run_dir / 'final')}); `greencode finetune` writes a run of its own: choose "
                             "another run.name or run.out_dir, or rerun `greencode run`")
    check_run_directory(run_dir, inputs)
    with output_lock(run_dir, enabled=info.is_primary):
        return _train(cfg, source, resolved_yaml, progress, re_evaluate, started, info, run_dir, inputs)


def check_run_directory(run_dir: Path, inputs: dict):
    """A run directory is new, empty, or one a greencode-jax run made (`finetune` or `run`): a
    finetune resumes in it, and never writes its config.yaml and metrics.jsonl over a user's files."""
    # A corpus may live inside the run directory (data.path: runs/x/data); the run's own outputs may not be inputs.
    for name, path in inputs.items():
        if path is not None and os.path.exists(path) and os.path.realpath(path) == os.path.realpath(run_dir):
            raise GreencodeError(f"{run_dir}: is the run's own input ({name}); choose another run.name or run.out_dir")
    for name in RUN_OUTPUTS:
        check_not_an_input(run_dir / name, inputs, replacing=False)
    if run_dir.exists() or run_dir.is_symlink():
        if not run_dir.is_dir():
            raise GreencodeError(f"{run_dir}: exists and is not a directory; choose another run.name or run.out_dir")
        if any(run_dir.iterdir()) and (read_manifest(run_dir) or {}).get("kind") != "run":
            check_replaceable_dir(run_dir, "run")  # raises, naming what it is


@dataclasses.dataclass
class _Plan:
    """What a run trains, on what, with what: everything checked before anything is written."""
    data: TrainData
    model_source: ModelSource
    config: object  # the ModelConfig trained (with heads for train.method=heads)
    weights: list
    mesh: object
    stream: object
    total_steps: int
    method: object


@dataclasses.dataclass
class _Start:
    """Where the run starts: its checkpoints, the state (initial or restored) and the step."""
    checkpoints: TrainCheckpoints | None
    state: object
    resumed_at: int | None  # the checkpoint's step, None when starting from scratch
    why_evaluate: str = ""  # a finished run evaluated again: why
    finished: TrainResult | None = None  # a finished run whose evaluation is reused as it is


def _train(cfg: FinetuneConfig, source, resolved_yaml, progress, re_evaluate, started, info, run_dir: Path,
           inputs: dict) -> TrainResult:
    show = (cfg.run.progress if progress is None else progress) and info.is_primary
    plan = _plan(cfg, source, info, show)
    checkpoint_location = cfg.checkpoint.dir or run_dir / "checkpoints"
    begin = _start(cfg, plan, run_dir, checkpoint_location, re_evaluate, started)
    if begin.finished is not None:
        return begin.finished
    # everything checked: the run's outputs start here
    if info.is_primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        if read_manifest(run_dir) is None:
            write_manifest(run_dir, "run", inputs)
        if resolved_yaml is not None:
            atomic_write_text(run_dir / "config.yaml", resolved_yaml)
    if begin.checkpoints is None:
        begin.checkpoints = TrainCheckpoints(checkpoint_location, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    return _run_steps(cfg, plan, begin, run_dir, info, show, started)


def _plan(cfg: FinetuneConfig, source, info, show: bool) -> _Plan:
    data = TrainData(cfg.data, cfg.run.seed, source, info.is_primary, progress=show, model_init=cfg.model.init)
    model_source = ModelSource(cfg.model, data.tokenizer, source, prepared=data.prepared)
    config = model_source.config
    if cfg.train.method == "heads":
        try:
            config = heads_config(config, cfg)
        except GreencodeError as error:
            raise GreencodeError(f"{source}: {error}") from None
    if cfg.data.seq_len > config.max_position_embeddings:
        raise GreencodeError(f"{source}: data.seq_len={cfg.data.seq_len} exceeds the model's "
                             f"max_position_embeddings={config.max_position_embeddings}")
    try:
        evaluation_plan(data, cfg)  # the final evaluation's split, checked before training, not after it
    except GreencodeError as error:
        raise GreencodeError(f"{source}: eval.split={cfg.eval.split!r}: {error}") from None
    weights = exit_weights(cfg.train.exit_weights, config.exit_layers, config.num_layers)
    mesh = make_mesh(cfg.parallel.data, cfg.parallel.fsdp)
    t = cfg.train
    if t.batch_size % mesh.size:
        raise GreencodeError(f"{source}: train.batch_size={t.batch_size} is not divisible by the {mesh.size} devices "
                             f"of the mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); every device "
                             "needs the same number of sequences")
    stream = data.train_stream(t.batch_size * t.grad_accum)
    total_steps = t.steps if t.steps > 0 else max(1, math.ceil(t.epochs * stream.batches_per_epoch))
    schedule = learning_rate_schedule(t.learning_rate, t.warmup_steps, total_steps, t.schedule, t.final_lr_ratio)
    optimizer = make_optimizer(schedule, t.weight_decay, t.clip_norm, t.adam_b1, t.adam_b2, t.adam_eps)
    method = make_method(t.method, config, weights, optimizer, schedule, cfg, mesh)
    return _Plan(data, model_source, config, weights, mesh, stream, total_steps, method)


def _start(cfg: FinetuneConfig, plan: _Plan, run_dir: Path, checkpoint_location, re_evaluate: bool,
           started: float) -> _Start:
    """Starts from scratch, resumes from the latest checkpoint, or reports a finished run."""
    method, config = plan.method, plan.config
    checkpoints, start, why_evaluate = None, None, ""
    if _may_hold_checkpoints(checkpoint_location):
        checkpoints = TrainCheckpoints(checkpoint_location, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        start = checkpoints.latest_step()
    try:
        if start is None:
            state = method.initial_state(plan.model_source.host_params(cfg.run.seed), place_host_tree)
            return _Start(checkpoints, state, None)
        checkpoint_dir = checkpoints.directory
        where = str(checkpoint_dir / str(start))
        if cfg.checkpoint.resume == "never":
            raise GreencodeError(f"{checkpoint_dir}: holds checkpoints (latest step {start}) and checkpoint.resume "
                                 "is never; choose another run.name or checkpoint.dir")
        meta = checkpoints.read_meta(start)
        check_same_model(meta.get("model", {}), config, where)
        check_same_state(meta.get("state"), state_signature(method.abstract_state, config), cfg, where)
        if start >= plan.total_steps:
            reused, why_evaluate = _finished_evaluation(run_dir, plan.data, cfg)
            if reused is not None and not re_evaluate:
                checkpoints.close()
                return _Start(None, None, start, finished=TrainResult(
                    run_dir, start, plan.total_steps, None, run_dir / "final", reused, time.perf_counter() - started,
                    None, config.exit_layers, plan.weights, start_step=start, finished_before=True, evaluated=False))
            why_evaluate = why_evaluate or "--re-evaluate"
        state = checkpoints.restore_state(start, abstract_like(method.abstract_state, method.shardings))
        plan.stream.restore(meta["data"])
        if method.name == "heads":  # the frozen backbone is never in a training checkpoint
            method.place_frozen(plan.model_source.host_params(cfg.run.seed), place_host_tree)
        return _Start(checkpoints, state, start, why_evaluate)
    except BaseException:
        if checkpoints is not None:
            checkpoints.close()
        raise


def _announce(cfg: FinetuneConfig, plan: _Plan, info, start: int, finished_before: bool, why_evaluate: str,
              cache_note):
    config, mesh, t = plan.config, plan.mesh, cfg.train
    where = (f"finished at step {start}, evaluating again ({why_evaluate})" if finished_before
             else f"resumed at step {start}" if start else "from the start")
    print(f"finetune {cfg.run.name}: {config.family}, {config.num_layers} layers, exits "
          f"{list(config.exit_layers)} weights {[round(w, 4) for w in plan.weights]}; {plan.total_steps} steps of "
          f"{t.batch_size}x{t.grad_accum}x{cfg.data.seq_len} tokens on {mesh.size} device(s) "
          f"(data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}, {info.process_count} process(es)); "
          + where, flush=True)
    if plan.method.name == "heads":
        print(f"  train.method=heads: {t.head} exit heads on the frozen backbone, distilled from the last layer "
              f"(temperature {t.kd_temperature:g}, cross-entropy weight {t.ce_weight:g}); {cache_note}", flush=True)


def _run_steps(cfg: FinetuneConfig, plan: _Plan, begin: _Start, run_dir: Path, info, show: bool,
               started: float) -> TrainResult:
    """The training loop from `begin` to the last step (or a stop), then the evaluation and final/."""
    t, method, stream, total_steps, config = cfg.train, plan.method, plan.stream, plan.total_steps, plan.config
    checkpoints, state, resumed_at = begin.checkpoints, begin.state, begin.resumed_at
    start = resumed_at or 0
    finished_before = resumed_at is not None and resumed_at >= total_steps
    feeder = BatchFeeder(plan.mesh, t.grad_accum, t.batch_size, cfg.data.seq_len)
    cache_note = None
    if method.name == "heads":
        cache_note = method.use_cache(run_dir / "hidden_cache", total_steps, stream, t.cache_gb * 1e9)
    train_step = method.make_any_step(feeder) if method.name == "heads" else method.make_step(feeder)
    evaluator = Evaluator(config, plan.weights, cfg.model.compute_dtype, method.param_shardings(), plan.mesh,
                          plan.data, cfg)
    meta_base = {"model": model_signature(config), "state": state_signature(method.abstract_state, config),
                 "config": cfg.to_dict(), "process_count": info.process_count, "exit_weights": plan.weights}
    if info.is_primary:
        _announce(cfg, plan, info, start, finished_before, begin.why_evaluate, cache_note)
    bar = tqdm(total=total_steps, initial=start, unit="step", disable=not show or finished_before,
               dynamic_ncols=True, desc=cfg.run.name)
    log = MetricsLog(run_dir / "metrics.jsonl", resumed_at, enabled=info.is_primary)
    monitor = StepMonitor(config.exit_layers, log, bar, start, total_steps, cfg.run.log_every,
                          t.batch_size * t.grad_accum * cfg.data.seq_len, checkpoints.directory, resumed_at)

    def save(step_no: int):
        checkpoints.save(step_no, state, {**meta_base, "step": step_no, "data": stream.state()})
        monitor.last_saved = step_no

    step, stopped_by, final_dir, evaluation = start, None, None, None
    try:
        with StopSignals() as signals:
            pending = None  # (step, metrics) not yet read
            while step < total_steps:
                inputs = method.inputs(step, stream, feeder)
                state, metrics = train_step(state, inputs, feeder.stop_flags(signals.received is not None))
                step += 1
                bar.update(1)
                if pending is not None:
                    monitor.observe(*pending)
                pending = (step, metrics)
                checkpoint_due = step % cfg.checkpoint.every == 0 or step == total_steps
                eval_due = cfg.eval.every > 0 and step % cfg.eval.every == 0 and step < total_steps
                if checkpoint_due or eval_due or monitor.stop_requested:
                    monitor.observe(*pending)  # never save a step not seen to be finite
                    pending = None
                if monitor.stop_requested:
                    save(step)
                    stopped_by = signals.received or "a signal to another process"
                    break
                if checkpoint_due:
                    save(step)
                if eval_due:
                    log.write({"step": step, "eval": evaluator.run(method.params(state))})
            if pending is not None:
                monitor.observe(*pending)
        bar.close()
        checkpoints.wait()
        if stopped_by is None:
            evaluation, final_dir = _finish(cfg, plan, state, step, checkpoints, evaluator, log, run_dir, info, show,
                                            finished_before)
    finally:
        bar.close()
        checkpoints.wait()  # a checkpoint being written in the background is finished, whatever happened
        checkpoints.close()
        log.close()
    return TrainResult(run_dir, step, total_steps, stopped_by, final_dir, evaluation, time.perf_counter() - started,
                       monitor.tokens_per_s, config.exit_layers, plan.weights, start_step=start,
                       finished_before=finished_before, evaluated=evaluation is not None)


def _finish(cfg: FinetuneConfig, plan: _Plan, state, step: int, checkpoints, evaluator, log, run_dir: Path, info,
            show: bool, finished_before: bool):
    """The final evaluation (eval.json, the metrics' last record) and final/: (evaluation, final dir)."""
    params = plan.method.params(state)
    evaluation = evaluator.run(params, progress=show)
    log.write({"step": step, "eval": evaluation, "final": True})
    if info.is_primary:
        atomic_write_text(run_dir / "eval.json", json.dumps(evaluation, indent=2) + "\n")
    if finished_before and (run_dir / "final").is_dir():
        return evaluation, run_dir / "final"  # the weights it holds are those just evaluated
    return evaluation, save_final(params, plan.config, cfg.model.dtype, run_dir / "final", checkpoints, step,
                                  plan.model_source.tokenizer_dir or plan.data.tokenizer_dir, info)
