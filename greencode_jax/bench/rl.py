"""`greencode bench rl`: our PPO against Stable-Baselines3's on the same cached episodes
(`--collect`, rollout collection against `generate`, is in rl_collect.py).

One synthetic set of episodes (`synthetic_episodes`: hidden states from a random
projection of a per-token margin, so a linear-ish rule decides where l* is) is split into
training and held-out episodes. Our PPO (rl.ppo.Trainer: one compiled program, vectorised
environments) and SB3's PPO (`MlpPolicy` on rl.gym_env.ExitEnv, the same environment as a
gymnasium env over NumPy lookups) train with the same RLSection hyperparameters on the
training episodes; both deterministic policies are then judged by the same code on the
held-out episodes: mean episode reward and exit accuracy (tokens that exit at l*).
SB3 is slow, so it runs a smaller budget (--sb3-timesteps); our PPO runs that budget too,
as its own run with the same learning-rate schedule, so quality is compared at equal
timesteps, and its full budget (--timesteps) for throughput and the 60 s target.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from greencode_jax.bench.report import Progress, printer, verdict
from greencode_jax.errors import GreencodeError
from greencode_jax.parallel import make_mesh
from greencode_jax.rl import env as exit_env
from greencode_jax.rl import validate
from greencode_jax.config import RLSection
from greencode_jax.rl.networks import actor_logits
from greencode_jax.rl.ppo import Trainer
from greencode_jax.rl.train import reward_parameters

TARGET_SPEEDUP = 20.0  # >= 20x SB3's timesteps/s in the same run
TARGET_SECONDS, TARGET_SECONDS_HIDDEN = 60.0, 576  # 500k timesteps, compile included, for hidden <= 576
# Llama-3.2-3B's exits in GREEN-CODE's paper: 9 decision exits, the last layer 27
GREENCODE_LAYERS = (3, 5, 7, 9, 11, 13, 17, 21, 25, 27)


def synthetic_episodes(episodes: int, hidden_size: int, *, layers=GREENCODE_LAYERS, tokens: int = 15,
                       seed: int = 0, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(hidden [N, T, X, E] float32, agree [N, T, X] bool) with l* a function of the state.

    Each token has a difficulty d ~ N(0, 1); exit x agrees iff its margin m = thr_x - d +
    0.35 n > 0, thresholds rising with depth (so l* spreads over the exits and agreement is
    not always monotone in depth). The state at exit x is a per-layer mean, plus the margin
    as seen with noise (m + 0.15 n') along one direction, plus 16 nuisance latents, all
    through an orthonormal random projection, plus noise, then per-feature scales and
    offsets (log-normal, and a few large "outlier" features as LLM states have): a rule
    linear in the normalised state decides, up to the observation noise.
    """
    if episodes < 1 or hidden_size < 2 or tokens < 1:
        raise GreencodeError(f"synthetic episodes: {episodes} episodes of {tokens} tokens, hidden {hidden_size}: "
                             "expected at least 1 episode, 1 token and hidden size 2")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE417]))
    x = len(layers) - 1
    k = min(16, hidden_size - 1)
    basis, _ = np.linalg.qr(rng.normal(size=(hidden_size, k + 1)))  # orthonormal columns
    signal, nuisance = basis[:, 0], basis[:, 1:]
    layer_mean = rng.normal(size=(x, hidden_size))
    scale = np.exp(rng.normal(0.0, 0.5, hidden_size))
    outliers = rng.choice(hidden_size, size=max(1, hidden_size // 200), replace=False)
    scale[outliers] *= 20.0
    offset = rng.normal(0.0, 2.0, hidden_size)
    thresholds = np.linspace(-1.5, 1.5, x)
    root = np.sqrt(hidden_size)
    hidden = np.empty((episodes, tokens, x, hidden_size), np.float32)
    agree = np.empty((episodes, tokens, x), bool)
    for start in range(0, episodes, chunk):  # in slices: a 2560-wide store is ~1 GB
        n = min(chunk, episodes - start)
        difficulty = rng.normal(size=(n, tokens, 1))
        margin = thresholds - difficulty + 0.35 * rng.normal(size=(n, tokens, x))
        seen = (margin + 0.15 * rng.normal(size=margin.shape)) / 1.2
        latents = rng.normal(size=(n, tokens, x, k)) / np.sqrt(k)
        h = layer_mean + 0.6 * root * (seen[..., None] * signal + latents @ nuisance.T)
        h += 0.5 * rng.normal(size=h.shape)
        hidden[start:start + n] = h * scale + offset
        agree[start:start + n] = margin > 0
    return hidden, agree


def observation_stats(hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mean, std per feature as rl.store.obs_stats computes them (float64 sums, floored std)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    total, sq = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
    for i in range(0, len(flat), 65536):
        part = flat[i:i + 65536].astype(np.float64)
        total += part.sum(0)
        sq += (part * part).sum(0)
    mean = total / len(flat)
    std = np.sqrt(np.maximum(np.maximum(sq / len(flat) - mean * mean, 0.0), 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)


def evaluate(decide, hidden, agree, layers, rewards, batch: int = 8192) -> dict:
    """A deterministic policy on every (episode, token, decision) of a set of episodes, the
    same code for both sides. `decide(raw states [M, E]) -> exit? [M]`; a token exits at its
    first decision that says exit, else runs to the last layer."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    exits = np.concatenate([np.asarray(decide(flat[i:i + batch]), bool) for i in range(0, len(flat), batch)])
    exits = exits.reshape(hidden.shape[:-1])
    row = validate.table_row(validate.exits_at(exits), agree, layers)
    return {"episode_reward": validate.deterministic_return(exits.astype(np.float32), rewards),
            "exit_accuracy": row["exit_accuracy"], "mean_exit_layer": row["mean_exit_layer"],
            "agreement": row["agreement"]}


def oracle_decide(agree, layers):
    """The exit-at-l* decisions, for the oracle row (not a policy of observations)."""
    lstar = exit_env.first_agreeing(agree, layers)
    return np.asarray(layers)[:-1] == lstar[..., None]


def sb3_kwargs(cfg) -> dict:
    """Stable-Baselines3 PPO's arguments for an RLSection: the same hyperparameters, one
    environment taking all of an update's steps (as GREEN-CODE ran it)."""
    import torch

    updates = cfg.num_updates

    def learning_rate(progress_remaining: float) -> float:
        # SB3 reads its schedule after each rollout (progress 1 - k/U at update k), ours before
        # (1 - (k-1)/U): shifted by one update, both take the same rate at every update.
        return cfg.learning_rate * min(1.0, progress_remaining + 1.0 / updates)

    return dict(learning_rate=learning_rate, n_steps=cfg.steps_per_update, batch_size=cfg.minibatch_size,
                n_epochs=cfg.epochs, gamma=cfg.discount, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip,
                normalize_advantage=cfg.normalize_advantages, ent_coef=cfg.entropy_coef, vf_coef=cfg.value_coef,
                max_grad_norm=cfg.max_grad_norm, device="cpu",
                policy_kwargs=dict(net_arch=dict(pi=list(cfg.hidden), vf=list(cfg.hidden)), activation_fn=torch.nn.Tanh,
                                   optimizer_kwargs=dict(eps=cfg.adam_eps)))


def run_ours(cfg, train, stats, layers, reward_kwargs, held_out, held_rewards) -> dict:
    """Our PPO for cfg.total_timesteps in one compiled block; compile timed apart (AOT)."""
    start = time.perf_counter()
    env = exit_env.make_env(train[0], train[1], layers, reward_kwargs)
    mesh = make_mesh()  # (data, fsdp): every device on `data`, as train-policy builds it
    trainer = Trainer(cfg, train[0].shape[-1], stats[0], stats[1], mesh)
    state = trainer.init(env, [cfg.seed])
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    updates = cfg.num_updates
    t0 = time.perf_counter()
    active = jnp.int32(updates)
    compiled = trainer._compile_block(state, updates).lower(state, env, active).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, env, active)
    metrics = jax.tree.map(np.asarray, metrics)  # waits for the program
    run_s = time.perf_counter() - t0
    wall_s = time.perf_counter() - start
    actor = jax.tree.map(lambda a: a[0], state.params["actor"])
    mean, std = jnp.asarray(stats[0]), jnp.asarray(stats[1])
    decide = jax.jit(lambda h: jnp.argmax(actor_logits(actor, mean, std, h), -1) == exit_env.EXIT)
    timesteps = updates * cfg.steps_per_update
    return {"timesteps": timesteps, "updates": updates, "init_s": init_s, "compile_s": compile_s, "run_s": run_s,
            "wall_s": wall_s, "timesteps_per_s": timesteps / run_s,
            "last_update": {name: float(v[0, -1]) for name, v in metrics.items()},
            "held_out": evaluate(lambda h: decide(jnp.asarray(h)), *held_out, layers, held_rewards)}


def run_sb3(cfg, train, stats, layers, reward_kwargs, held_out, held_rewards) -> dict:
    """Stable-baselines3's PPO (MlpPolicy) on the gymnasium wrapper of the same environment."""
    import torch
    from stable_baselines3 import PPO

    from greencode_jax.rl.gym_env import ExitEnv  # lazy: it imports gymnasium, an optional dependency

    start = time.perf_counter()
    env = ExitEnv(train[0], train[1], layers, reward_kwargs, stats[0], stats[1])
    model = PPO("MlpPolicy", env, seed=cfg.seed, verbose=0, **sb3_kwargs(cfg))
    setup_s = time.perf_counter() - start
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.num_updates * cfg.steps_per_update)
    learn_s = time.perf_counter() - t0

    def decide(h):
        action, _ = model.predict(env.normalise(h), deterministic=True)
        return action == 1

    return {"timesteps": int(model.num_timesteps), "updates": cfg.num_updates, "setup_s": setup_s, "run_s": learn_s,
            "wall_s": setup_s + learn_s, "timesteps_per_s": model.num_timesteps / learn_s,
            "torch_threads": torch.get_num_threads(),
            "held_out": evaluate(decide, *held_out, layers, held_rewards)}


def run_bench_rl(cfg: RLSection, *, hidden_size: int = 576, episodes: int = 512, held_out: int | None = None,
                 sb3_timesteps: int = 50_000, seed: int = 0, progress: Progress | None = None) -> dict:
    """Ours at cfg.total_timesteps and at SB3's budget, SB3 at its budget (0: no SB3), on `episodes`
    synthetic training episodes of `hidden_size`, judged on `held_out` more (default
    max(16, episodes / 4)).
    A line per training run goes to `progress`."""
    log = printer(progress)
    held_out = max(16, episodes // 4) if held_out is None else held_out
    if episodes < 1 or held_out < 1:
        raise GreencodeError(f"--episodes {episodes} / --held-out {held_out}: expected positive numbers")
    if sb3_timesteps < 0:
        raise GreencodeError(f"--sb3-timesteps {sb3_timesteps}: expected 0 (no SB3) or more")
    layers = list(GREENCODE_LAYERS)
    reward_kwargs, reward_record = reward_parameters(cfg, layers[-1] + 1)
    t0 = time.perf_counter()
    hidden, agree = synthetic_episodes(episodes + held_out, hidden_size, layers=layers, seed=seed)
    data_s = time.perf_counter() - t0
    train = (hidden[:episodes], agree[:episodes])
    held = (hidden[episodes:], agree[episodes:])
    stats = observation_stats(train[0])
    held_rewards = exit_env.reward_table(held[1], layers, **reward_kwargs)
    step = cfg.steps_per_update
    sb3_updates = 0 if sb3_timesteps == 0 else min(max(1, round(sb3_timesteps / step)), cfg.num_updates)
    results = {"hidden": hidden_size, "episodes": episodes, "held_out_episodes": held_out, "tokens": hidden.shape[1],
               "layers": layers, "reward": reward_record, "seed": seed, "rl": dataclasses.asdict(cfg),
               "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "synthetic_data_s": data_s,
               "targets": {"speedup": TARGET_SPEEDUP, "seconds": TARGET_SECONDS, "seconds_hidden": TARGET_SECONDS_HIDDEN}}
    results["oracle"] = _oracle(held, layers, held_rewards)
    log(f"bench rl: our PPO, {cfg.num_updates * step} timesteps ...")
    results["ours"] = run_ours(cfg, train, stats, layers, reward_kwargs, held, held_rewards)
    if sb3_updates:
        small = dataclasses.replace(cfg, total_timesteps=sb3_updates * step)
        if sb3_updates < cfg.num_updates:
            log(f"bench rl: our PPO, {sb3_updates * step} timesteps (SB3's budget) ...")
            results["ours_equal"] = run_ours(small, train, stats, layers, reward_kwargs, held, held_rewards)
        else:
            results["ours_equal"] = results["ours"]
        log(f"bench rl: stable-baselines3 PPO, {sb3_updates * step} timesteps ...")
        results["sb3"] = run_sb3(small, train, stats, layers, reward_kwargs, held, held_rewards)
        results["speedup"] = results["ours"]["timesteps_per_s"] / results["sb3"]["timesteps_per_s"]
    return results


def _oracle(held, layers, rewards) -> dict:
    exits = oracle_decide(held[1], layers)
    row = validate.table_row(validate.exits_at(exits), held[1], layers)
    return {"episode_reward": validate.deterministic_return(exits.astype(np.float32), rewards),
            "exit_accuracy": row["exit_accuracy"], "mean_exit_layer": row["mean_exit_layer"],
            "agreement": row["agreement"]}


def format_bench_rl(r: dict) -> str:
    """The settings of both sides, a row per training run and the oracle's, and the targets. A run at
    SB3's budget that is the full run itself (`results["ours_equal"] is results["ours"]`) is shown once."""
    cfg = r["rl"]
    step = cfg["num_envs"] * cfg["num_steps"]
    lines = [f"bench rl: synthetic episodes, hidden {r['hidden']}, {r['episodes']} training + {r['held_out_episodes']} "
             f"held-out episodes x {r['tokens']} tokens, decisions at layers {r['layers'][:-1]} (last "
             f"{r['layers'][-1]}), reward {r['reward']['reward']}; {r['device']} x {r['devices']}"
             + (f", torch {r['sb3']['torch_threads']} threads" if "sb3" in r else ""),
             f"  PPO, both sides: {step} steps per update (ours {cfg['num_envs']} envs x {cfg['num_steps']} steps, SB3 1 "
             f"env x {step}), minibatch {cfg['minibatch_size']}, {cfg['epochs']} epochs, lr {cfg['learning_rate']:g} "
             f"linear, gamma {cfg['discount']}, lambda {cfg['gae_lambda']}, clip {cfg['clip']}, vf {cfg['value_coef']}, "
             f"ent {cfg['entropy_coef']}, grad norm {cfg['max_grad_norm']}, MLPs {list(cfg['hidden'])} tanh",
             "  held-out figures: deterministic policies (argmax), the same episodes, the same code",
             f"  {'':34s}{'timesteps':>10s} {'timesteps/s':>12s} {'compile s':>10s} {'wall s':>8s} | "
             f"{'reward':>8s} {'exit acc':>9s} {'exit layer':>10s}"]

    def row(name, x, compile_s="-"):
        h = x["held_out"]
        lines.append(f"  {name:34s}{x['timesteps']:10d} {x['timesteps_per_s']:12,.0f} {compile_s:>10s} "
                     f"{x['wall_s']:8.1f} | {h['episode_reward']:8.2f} {h['exit_accuracy']:9.3f} "
                     f"{h['mean_exit_layer']:10.2f}")

    ours = r["ours"]
    row("greencode-jax PPO", ours, f"{ours['compile_s']:.1f}")
    if "sb3" in r:
        eq, sb3 = r["ours_equal"], r["sb3"]
        if eq is not ours:
            row("greencode-jax PPO, SB3's budget", eq, f"{eq['compile_s']:.1f}")
        row("stable-baselines3 PPO", sb3)
    o = r["oracle"]
    lines.append(f"  {'oracle (exit at l*)':34s}{'':10s} {'':12s} {'':10s} {'':8s} | {o['episode_reward']:8.2f} "
                 f"{o['exit_accuracy']:9.3f} {o['mean_exit_layer']:10.2f}")
    lines.append(f"  ours: {ours['updates']} updates, compile {ours['compile_s']:.1f} s + run {ours['run_s']:.1f} s + "
                 f"setup {ours['init_s']:.1f} s = {ours['wall_s']:.1f} s wall")
    return "\n".join(lines + _target_lines(r))


def _target_lines(r: dict) -> list[str]:
    """Our wall time against the 60 s target, the speed ratio and the exit accuracies against SB3's."""
    lines, ours = [], r["ours"]
    if r["hidden"] <= TARGET_SECONDS_HIDDEN and r["rl"]["total_timesteps"] >= 500_000:
        lines.append(f"  {ours['timesteps']} timesteps in {ours['wall_s']:.1f} s incl. compile (target <= "
                     f"{TARGET_SECONDS:.0f} s for hidden <= {TARGET_SECONDS_HIDDEN}: "
                     f"{verdict(ours['wall_s'] <= TARGET_SECONDS)})")
    if "sb3" not in r:
        return lines
    eq, sb3 = r["ours_equal"], r["sb3"]
    lines.append(f"  speed ratio ours / SB3: {ours['timesteps_per_s']:,.0f} / {sb3['timesteps_per_s']:,.0f} timesteps/s "
                 f"= {r['speedup']:.1f} x (target >= {TARGET_SPEEDUP:.0f} x: {verdict(r['speedup'] >= TARGET_SPEEDUP)}; "
                 f"ours without compile, SB3 over its learn())")
    lines.append(f"  exit accuracy at equal timesteps ({sb3['timesteps']}): ours {eq['held_out']['exit_accuracy']:.3f} "
                 f"vs SB3 {sb3['held_out']['exit_accuracy']:.3f}; reward {eq['held_out']['episode_reward']:.2f} vs "
                 f"{sb3['held_out']['episode_reward']:.2f}")
    if eq is not ours:
        ok = ours["held_out"]["exit_accuracy"] >= sb3["held_out"]["exit_accuracy"]
        lines.append(f"  exit accuracy, ours at {ours['timesteps']} vs SB3 at {sb3['timesteps']}: "
                     f"{ours['held_out']['exit_accuracy']:.3f} vs {sb3['held_out']['exit_accuracy']:.3f} "
                     f"(target: at least SB3's: {verdict(ok)})")
    return lines
