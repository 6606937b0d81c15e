"""`greencode train-policy`: PPO on a rollout store, written as a `Learned` policy directory.

    DIR/actor.safetensors, DIR/policy.json   what `gc.policies.Learned.load(DIR, threshold)` reads
    DIR/metrics.jsonl                        one line per update (reward, exit accuracy, ...)
    DIR/validation.json                      the validation table (learned vs Confidence)
While training, everything lives in DIR.partial/ with an Orbax checkpoint of the whole
training state after every block of `rl.checkpoint_every` updates. Ctrl-C or SIGTERM stops
after the block in progress and its checkpoint (a second Ctrl-C stops at once, but never inside
a save); the same command resumes from the last checkpoint, bit for bit. A NaN or inf in a
block's losses or parameters stops with an error, saving nothing of that block.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from greencode_jax.atomic import atomic_write_text
from greencode_jax.config import RLSection
from greencode_jax.energy.cost_model import joules_per_token, load_cost_model
from greencode_jax.errors import GreencodeError
from greencode_jax.generate.policies import Learned
from greencode_jax.interrupts import Interrupted, interrupted
from greencode_jax.metrics_log import append_metrics, read_metrics, trim_metrics
from greencode_jax.ownership import check_output_dir
from greencode_jax.parallel import make_mesh
from greencode_jax.rl import env as exit_env
from greencode_jax.rl import validate
from greencode_jax.rl.networks import learned_params
from greencode_jax.rl.ppo import Trainer
from greencode_jax.rl.processes import (
    check_together, holds_run_lock, is_primary, run_safe_points, shared_work_directory,
)
from greencode_jax.rl.store import RolloutStore
from greencode_jax.state_checkpoints import StateCheckpoints


def reward_parameters(cfg: RLSection, num_layers: int, architecture: dict | None = None,
                      decision_layers=()) -> tuple[dict, dict]:
    """(keyword arguments of env.reward_table, what policy.json records about the reward).
    The cost model must be for `num_layers` layers and, where given, this `architecture`
    (`energy.cost_model.architecture`, or the part of it a rollout store records). A learned
    token exiting after layer l pays l + 1 layers, one head and a decision at each of
    `decision_layers` up to l (generate/costs.py)."""
    kwargs = dict(alpha=cfg.alpha, beta=cfg.beta, gamma_r=cfg.gamma_r, epsilon=cfg.epsilon)
    record = {"reward": cfg.reward, **kwargs}
    if cfg.reward == "energy":
        if not cfg.cost_model:
            raise GreencodeError("rl.reward=energy needs a cost model: set rl.cost_model to the JSON of "
                                 "`greencode energy calibrate MODEL --out FILE`")
        fit = load_cost_model(cfg.cost_model, {**(architecture or {}), "num_layers": num_layers},
                              what="rl.cost_model")
        b = fit["b_j_per_layer"]
        if b <= 0:
            raise GreencodeError(f"{cfg.cost_model}: {b:g} J per layer; an energy reward needs a cost that grows "
                                 "with depth (calibrate again, with longer windows)")
        weight = cfg.energy_weight or 1.0 / b
        layers = np.arange(num_layers)
        decisions = np.array([sum(1 for d in decision_layers if d <= layer) for layer in layers])
        joules = joules_per_token(fit, layers + 1, 1.0, decisions)  # exiting after layer l computes l + 1 layers
        kwargs["cost"] = weight * joules
        record.update(cost_model=str(Path(cfg.cost_model).resolve()), cost_method=fit["method"],
                      joules_per_token=[float(j) for j in joules], energy_weight=weight)
    return kwargs, record


def _settings(store: RolloutStore, cfg: RLSection, validation: RolloutStore | None, devices: int) -> dict:
    return {"rollouts": str(store.root.resolve()), "model": store.model,
            "validation": None if validation is None else str(validation.root.resolve()),
            # hosts says where it runs (the devices are recorded), not what it trains
            "rl": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "hosts"}, "devices": devices}


def _kept(latest, total: int, work: Path) -> str:
    """What an interrupted training keeps, in one line: the update its checkpoint holds."""
    if not latest:
        return f"train-policy had saved no checkpoint yet in {work}; the same command starts again"
    then = "writes the policy" if latest >= total else f"resumes at update {latest + 1}"
    return f"train-policy kept its checkpoint after update {latest} of {total} in {work}; the same command {then}"


def _first_non_finite(metrics: dict, params) -> tuple | None:
    """(update in the block, seed index, what, value) of the first NaN or inf in a block's metrics
    [seeds, updates], else in the parameters after it (charged to its last update); None if none."""
    first = None
    for name, values in metrics.items():
        bad = np.argwhere(~np.isfinite(values))
        if len(bad):
            k, u = bad[np.argmin(bad[:, 1])]
            if first is None or u < first[0]:
                first = (int(u), int(k), name, float(values[k, u]))
    if first is not None:
        return first
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        leaf = np.asarray(leaf)
        bad = ~np.isfinite(leaf.reshape(len(leaf), -1)).all(axis=1)  # per seed
        if bad.any():
            k = int(np.argmax(bad))
            value = leaf[k][~np.isfinite(leaf[k])].flat[0]
            updates = next(iter(metrics.values())).shape[1]
            return updates - 1, k, f"parameter {jax.tree_util.keystr(path)}", float(value)
    return None


def _divergence(found, done: int, total: int, seeds, cfg: RLSection, work: Path, kept, resumed: bool) -> str:
    """The one line of a diverged training; removes the work directory when it holds nothing to keep."""
    u, k, what, value = found
    where = f"{what} is {value} at update {done + u + 1} of {total}" + (f" (seed {seeds[k]})" if len(seeds) > 1 else "")
    if kept:
        left = f"the last good checkpoint, after update {kept}, stays in {work} (other settings: pass --overwrite)"
    elif not resumed:
        if is_primary():
            shutil.rmtree(work, ignore_errors=True)
        left = f"nothing saved, {work} removed"
    else:
        left = f"nothing saved; {work} holds no checkpoint (pass --overwrite to start with other settings)"
    return (f"train-policy diverged: {where}; lower rl.learning_rate ({cfg.learning_rate:g}) or rl.max_grad_norm "
            f"({cfg.max_grad_norm:g}), or check the reward weights (rl.alpha, rl.beta, rl.gamma_r, rl.epsilon, "
            f"rl.energy_weight); {left}")


@holds_run_lock("out_dir")
def train_policy(rollouts_dir, out_dir, cfg: RLSection, *, validation_dir=None, overwrite: bool = False,
                 progress: bool = True, log=print) -> dict:
    out = Path(out_dir)
    inputs = {"rollouts": rollouts_dir, "validation": validation_dir, "cost_model": cfg.cost_model or None}
    check_output_dir(out, "policy", inputs=inputs, overwrite=overwrite)
    store, validation = _open_stores(rollouts_dir, validation_dir)
    if not is_primary():  # the primary speaks for the run
        log, progress = (lambda *a, **k: None), False
    layers = list(store.decision_layers) + [store.model["num_layers"] - 1]
    reward_kwargs, reward_record = reward_parameters(cfg, store.model["num_layers"], store.architecture,
                                                     store.decision_layers)
    mesh = make_mesh()  # (data, fsdp): every device on `data`
    settings = _settings(store, cfg, validation, jax.device_count())

    hidden, agree = store.array("hidden"), store.array("agree")
    trainer = Trainer(cfg, store.model["hidden_size"], store.obs_mean, store.obs_std, mesh)
    env = trainer.place_env(exit_env.make_env(hidden, agree, layers, reward_kwargs))
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    state = trainer.init(env, seeds)
    # everything checked: the work directory starts here
    work, resumed, checkpoints, done, state = _resume(out, settings, inputs, overwrite, trainer, state)
    total = cfg.num_updates
    log(f"train-policy: {store.episodes} episodes x {agree.shape[1]} tokens, decisions at layers "
        f"{list(store.decision_layers)}, reward {cfg.reward}; {total} updates of {cfg.steps_per_update} steps "
        f"({total * cfg.steps_per_update} timesteps), {cfg.seeds} seed(s), {jax.device_count()} device(s)"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
        + (f"; resuming after update {done}" if done else ""))
    bar = tqdm(total=total, initial=done, unit="upd", disable=not progress, dynamic_ncols=True, desc="PPO")
    start = time.perf_counter()
    state, metrics, done, diverged, compile_s, kept = _train_blocks(trainer, state, env, cfg, seeds, checkpoints,
                                                                    done, work, bar)
    if diverged is not None:
        raise GreencodeError(_divergence(diverged, done, total, seeds, cfg, work, kept, resumed))
    seconds = time.perf_counter() - start

    best, returns, table, actors = _choose_seed(state, cfg, store, validation, hidden, agree, layers, reward_kwargs)
    final = _final_metrics(metrics, best, seeds[best], total, work)
    result = {"seed": seeds[best], "validation_return": returns[best], "seed_returns": returns,
              "judged_on": "validation" if validation is not None else "training", "updates": total,
              "timesteps": total * cfg.steps_per_update, "seconds": seconds, "first_block_seconds": compile_s,
              "final_metrics": final}
    if is_primary():  # the policy directory is the primary's alone
        _write_policy(out, work, store, validation, actors[best], cfg, reward_record, result, table, inputs)
    log(validate.format_table(table))
    log(f"train-policy: seed {seeds[best]} kept (validation return {returns[best]:.3f} on the "
        f"{result['judged_on']} store); {total} updates in {seconds:.1f} s -> {out}")
    return {"policy": str(out), "validation": table, **result}


def _open_stores(rollouts_dir, validation_dir) -> tuple[RolloutStore, RolloutStore | None]:
    """The training store and the validation store (None without one), checked to come from the same model
    and the same checkpoint."""
    store = RolloutStore(rollouts_dir)
    validation = None if validation_dir is None else RolloutStore(validation_dir)
    if validation is not None:
        validation.check_model(store.model, f"the training store {store.root}")
        if validation.model.get("fingerprint") != store.model.get("fingerprint"):
            raise GreencodeError(f"{validation.root}: recorded from another checkpoint (fingerprint "
                                 f"{validation.model.get('fingerprint')}) than {store.root} "
                                 f"({store.model.get('fingerprint')})")
    return store, validation


def _resume(out: Path, settings: dict, inputs: dict, overwrite: bool, trainer: Trainer, state):
    """The work directory DIR.partial and its checkpoints: (work, resumed, checkpoints, updates done, state),
    the state and metrics.jsonl those of the last checkpoint where there is one, else `state` as given."""
    work, resumed = shared_work_directory(out, settings, "training", kind="policy", inputs=inputs,
                                          overwrite=overwrite)
    # cleanup_tmp: a save cut by SIGKILL leaves N.orbax-checkpoint-tmp, removed at the next open
    checkpoints = StateCheckpoints(work / "checkpoints", keep=1, async_save=False, cleanup_tmp=True)
    done = checkpoints.latest_step() or 0
    if done:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state,
                                trainer.state_shardings(state))
        state = checkpoints.restore(done, abstract)
    # lines of updates after the last checkpoint (all of them without one) go: they are trained again
    if is_primary():
        trim_metrics(work / "metrics.jsonl", "update", done or None)
    return work, resumed, checkpoints, done, state


def _train_blocks(trainer: Trainer, state, env, cfg: RLSection, seeds, checkpoints, done: int, work: Path, bar):
    """The updates left, in compiled blocks of rl.checkpoint_every, each followed by its metrics and its
    checkpoint; a signal stops after a block and its checkpoint, never inside either. Closes `bar` and
    `checkpoints`. Returns (state, the last block's metrics [seeds, updates], updates done, the first NaN or
    inf of a block or None, the first block's seconds or None, the update of the last checkpoint). The
    metrics are None when no block was left (a resume after the last update)."""
    total = cfg.num_updates
    metrics_path = work / "metrics.jsonl"
    compile_s = diverged = metrics = None
    try:
        with run_safe_points() as stop:  # a signal stops after a block and its checkpoint, never inside either
            while done < total:
                check_together(stop, lambda: _kept(checkpoints.latest_step(), total, work))
                n = min(cfg.checkpoint_every, total - done)
                t0 = time.perf_counter()
                state, metrics = trainer.block(state, env, n)
                metrics = jax.tree.map(np.asarray, metrics)  # blocks until the block is done
                seconds = time.perf_counter() - t0
                diverged = _first_non_finite(metrics, state.params)
                if diverged is not None:
                    break  # nothing of this block is written or saved
                if compile_s is None:
                    compile_s = seconds  # includes compiling; reported apart from the throughput
                rate = n * cfg.steps_per_update * cfg.seeds / seconds
                if is_primary():
                    _append_block_metrics(metrics_path, metrics, done, n, seeds, cfg.steps_per_update, rate)
                with stop.critical():  # even a second Ctrl-C waits: no half-written checkpoint
                    checkpoints.save(done + n, state)
                done += n
                bar.update(n)
                last = {name: float(np.mean(v[:, -1])) for name, v in metrics.items()}
                bar.set_postfix_str(f"reward {last['episode_reward']:.2f} exit acc {last['exit_accuracy']:.3f} "
                                    f"layer {last['mean_exit_layer']:.2f} {rate:,.0f} ts/s")
            if diverged is None:
                check_together(stop)  # a signal during the last block
        kept = checkpoints.latest_step()
    except KeyboardInterrupt as error:  # a second Ctrl-C, at once: still say what is kept
        if isinstance(error, Interrupted):
            raise
        raise interrupted(_kept(checkpoints.latest_step(), total, work)) from None
    finally:
        bar.close()
        checkpoints.close()
    return state, metrics, done, diverged, compile_s, kept


def _final_metrics(metrics: dict | None, best: int, seed: int, total: int, work: Path) -> dict:
    """The kept seed's metrics at the last update: from the last block, or, when this call ran none (it
    resumed after the last update, e.g. once validation or writing the policy had failed), from that
    update's record in metrics.jsonl."""
    if metrics is not None:
        return {name: float(np.asarray(v)[best, -1]) for name, v in metrics.items()}
    for record in read_metrics(work / "metrics.jsonl"):
        if record.get("update") == total and record.get("seed") == seed:
            return {k: v for k, v in record.items() if k not in ("update", "seed", "timesteps", "timesteps_per_s")}
    return {}


def _append_block_metrics(path: Path, metrics: dict, done: int, n: int, seeds, steps_per_update: int, rate: float):
    """One metrics.jsonl line per update of the block and seed."""
    append_metrics(path, ({"update": done + u + 1, "seed": seed,
                           "timesteps": (done + u + 1) * steps_per_update,
                           **{name: float(v[k, u]) for name, v in metrics.items()},
                           "timesteps_per_s": rate}
                          for u in range(n) for k, seed in enumerate(seeds)))


def _choose_seed(state, cfg: RLSection, store: RolloutStore, validation: RolloutStore | None, hidden, agree,
                 layers, reward_kwargs: dict):
    """The seed whose greedy policy earns the most on the validation store (the training store without one):
    (its index, every seed's return, its validation table, every seed's actor parameters)."""
    obs_mean, obs_std = store.obs_mean, store.obs_std
    actors = [jax.tree.map(lambda a: a[k], state.params["actor"]) for k in range(cfg.seeds)]
    judge = validation if validation is not None else store
    v_hidden = judge.array("hidden") if judge is not store else hidden
    v_agree = judge.array("agree") if judge is not store else agree
    v_conf = judge.array("confidence")
    v_rewards = exit_env.reward_table(v_agree, layers, **reward_kwargs)
    probs = [validate.exit_probabilities(a, obs_mean, obs_std, v_hidden) for a in actors]
    returns = [validate.deterministic_return(p, v_rewards) for p in probs]
    best = int(np.argmax(returns))
    table = validate.validation_table(probs[best], v_agree, v_conf, layers, cfg.thresholds)
    return best, returns, table, actors


def _write_policy(out: Path, work: Path, store: RolloutStore, validation: RolloutStore | None, actor,
                  cfg: RLSection, reward_record: dict, result: dict, table: dict, inputs: dict):
    """The policy directory, staged in the work directory, then renamed to `out`; the work directory goes."""
    policy = Learned(learned_params(actor, store.obs_mean, store.obs_std), exit_layers=tuple(store.exit_layers))
    metadata = {"trained_on": {"rollouts": str(store.root.resolve()), "model": store.model,
                               "validation": None if validation is None else str(validation.root.resolve())},
                "decision_layers": list(store.decision_layers), **reward_record, "rl": dataclasses.asdict(cfg),
                "result": result}
    staged = work / "policy"
    shutil.rmtree(staged, ignore_errors=True)
    policy.save(staged, metadata, inputs=inputs)
    shutil.copy(work / "metrics.jsonl", staged / "metrics.jsonl")
    atomic_write_text(staged / "validation.json", json.dumps(table, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staged, out)
    shutil.rmtree(work, ignore_errors=True)
