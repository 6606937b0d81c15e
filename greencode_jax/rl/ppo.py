"""PPO in PureJaxRL's shape over the replayed exit environment (rl.env).

`make_trainer(config, env, obs_mean, obs_std, mesh)` returns `init(seed)` and `block(state,
env, updates)`: a block is one compiled program, `lax.scan` over updates; each update scans
`num_steps` steps of the vectorised environments, computes GAE with
`rlax.truncated_generalized_advantage_estimation`, then scans epochs x minibatches of
`rlax.clipped_surrogate_pg_loss` + value loss - entropy bonus under `optax` Adam with
global-norm clipping and a linear learning-rate decay (Stable-Baselines3's defaults as
GREEN-CODE used them). K seeds train side by side under `vmap`.

Per-device rollouts: the whole block runs under `jax.shard_map` over the mesh's `data`
axis. Each device steps its share of the environments and computes the gradient of its
share of every minibatch; `lax.pmean` averages the gradients, so every device applies the
same update and holds the same parameters. Minibatches are groups of time steps over all
environments (a permutation drawn from a key every device shares), so the minibatches of
one device and of eight are the same sets of transitions. Every random draw of an
environment is keyed by its global index, so the environments too are the same.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import rlax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from greencode_jax.errors import GreencodeError
from greencode_jax.rl import env as exit_env
from greencode_jax.rl.networks import actor_logits, critic_value, init_actor_critic


class TrainState(NamedTuple):
    params: dict
    opt_state: tuple
    env_state: exit_env.EnvState  # [envs]
    obs: jax.Array  # [envs, E]
    rng: jax.Array  # a raw uint32 key, the same on every device
    update: jax.Array  # updates done


class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    done: jax.Array
    info: exit_env.StepInfo


def optimizer(cfg) -> optax.GradientTransformation:
    per_update = cfg.epochs * cfg.num_minibatches

    def schedule(count):  # SB3's linear_schedule: constant within an update, 1 -> 1/num_updates
        return cfg.learning_rate * (1.0 - (count // per_update) / cfg.num_updates)

    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(schedule, eps=cfg.adam_eps))


def gae(rewards, values, dones, last_value, discount, lam):
    """Advantages [T, n] by rlax (rank-1, vmapped over environments)."""
    values_ext = jnp.concatenate([values, last_value[None]], axis=0)
    discounts = discount * (1.0 - dones.astype(jnp.float32))
    return jax.vmap(rlax.truncated_generalized_advantage_estimation, in_axes=(1, 1, None, 1), out_axes=1)(
        rewards, discounts, lam, values_ext)


def ppo_loss(params, batch, obs_mean, obs_std, cfg, axis):
    obs, action, old_log_prob, advantages, targets = batch
    logits = actor_logits(params["actor"], obs_mean, obs_std, obs)
    log_probs = jax.nn.log_softmax(logits)
    log_prob = jnp.take_along_axis(log_probs, action[:, None], axis=-1)[:, 0]
    if cfg.normalize_advantages:  # over the whole minibatch, across devices
        mean = jax.lax.pmean(advantages.mean(), axis)
        var = jax.lax.pmean((advantages ** 2).mean(), axis) - mean ** 2
        advantages = (advantages - mean) / (jnp.sqrt(jnp.maximum(var, 0.0)) + 1e-8)
    pg = rlax.clipped_surrogate_pg_loss(jnp.exp(log_prob - old_log_prob), advantages, cfg.clip)
    value = critic_value(params["critic"], obs_mean, obs_std, obs)
    value_loss = jnp.mean((targets - value) ** 2)
    entropy = -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))
    total = pg + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
    return total, (pg, value_loss, entropy)


class Trainer:
    def __init__(self, cfg, obs_size: int, obs_mean, obs_std, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.devices = mesh.shape["data"]
        if cfg.num_envs % self.devices:
            raise GreencodeError(f"rl.num_envs={cfg.num_envs}: expected a multiple of the {self.devices} devices "
                                 "(each steps the same number of environments)")
        self.local_envs = cfg.num_envs // self.devices
        self.obs_size = obs_size
        self.obs_mean, self.obs_std = jnp.asarray(obs_mean, jnp.float32), jnp.asarray(obs_std, jnp.float32)
        self.tx = optimizer(cfg)
        self._blocks = {}

    # ---- sharding of the state: environments split over `data`, the rest replicated (per seed)
    def state_specs(self):
        env = P(None, "data")
        return TrainState(params=P(), opt_state=P(), env_state=exit_env.EnvState(env, env, env, env), obs=env, rng=P(),
                          update=P())

    def state_shardings(self, state):
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self._spec_tree(state),
                            is_leaf=lambda x: isinstance(x, P))

    def _spec_tree(self, state):
        """A PartitionSpec per leaf of `state` (the params/opt_state subtrees take P())."""
        specs = self.state_specs()
        return TrainState(*(jax.tree.map(lambda _: s, sub) if isinstance(s, P) else s
                            for s, sub in zip(specs, state)))

    def place_env(self, env: exit_env.EnvArrays) -> exit_env.EnvArrays:
        """The environment's arrays replicated on every device of the mesh: in a multi-process run every
        process has read the whole store and places its copy on its own devices."""
        replicated = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(replicated, np.asarray(a)), env)

    def init(self, env: exit_env.EnvArrays, seeds) -> TrainState:
        """K training states [K, ...] for the seeds, placed on the mesh."""
        cfg = self.cfg

        def one(seed):
            key = jax.random.PRNGKey(seed)
            k_params, k_env, key = jax.random.split(key, 3)
            params = init_actor_critic(k_params, self.obs_size, cfg.hidden)
            keys = jax.vmap(lambda i: jax.random.fold_in(k_env, i))(jnp.arange(cfg.num_envs))
            env_state = jax.vmap(exit_env.reset, in_axes=(None, 0))(env, keys)
            obs = jax.vmap(exit_env.observe, in_axes=(None, 0))(env, env_state)
            return TrainState(params, self.tx.init(params), env_state, obs, key, jnp.int32(0))

        abstract = jax.eval_shape(lambda s: jax.vmap(one)(s), jnp.asarray(seeds, jnp.uint32))
        shardings = self.state_shardings(abstract)
        return jax.jit(lambda s: jax.vmap(one)(s), out_shardings=shardings)(jnp.asarray(seeds, jnp.uint32))

    def block(self, state: TrainState, env: exit_env.EnvArrays, updates: int):
        """`updates` (<= rl.checkpoint_every) PPO updates. One compiled program for every block:
        it scans `checkpoint_every` slots and skips those past `updates` (a scalar `lax.cond`),
        so a short last block does not compile again. Returns (state, metrics [K, updates])."""
        length = self.cfg.checkpoint_every
        if not 1 <= updates <= length:
            raise ValueError(f"block of {updates} updates: expected 1..{length}")
        if "block" not in self._blocks:
            self._blocks["block"] = self._compile_block(state, length)
        state, metrics = self._blocks["block"](state, env, jnp.int32(updates))
        return state, jax.tree.map(lambda m: m[:, :updates], metrics)

    def _compile_block(self, state, updates: int):
        cfg, axis = self.cfg, "data"
        local, mean_, std_ = self.local_envs, self.obs_mean, self.obs_std
        tx = self.tx

        def update(env, ts: TrainState):
            first = jax.lax.axis_index(axis) * local
            index = first + jnp.arange(local)  # global environment indices of this device

            def env_step(carry, _):
                env_state, obs, rng = carry
                rng, k_act, k_env = jax.random.split(rng, 3)
                logits = actor_logits(ts.params["actor"], mean_, std_, obs)
                value = critic_value(ts.params["critic"], mean_, std_, obs)
                act_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k_act, index)
                action = jax.vmap(jax.random.categorical)(act_keys, logits)
                log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
                env_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k_env, index)
                env_state, reward, done, info = jax.vmap(exit_env.step, in_axes=(None, 0, 0, 0))(env, env_state, action,
                                                                                          env_keys)
                next_obs = jax.vmap(exit_env.observe, in_axes=(None, 0))(env, env_state)
                return (env_state, next_obs, rng), Transition(obs, action, log_prob, value, reward, done, info)

            (env_state, obs, rng), traj = jax.lax.scan(env_step, (ts.env_state, ts.obs, ts.rng), None, cfg.num_steps)
            last_value = critic_value(ts.params["critic"], mean_, std_, obs)
            advantages = gae(traj.reward, traj.value, traj.done, last_value, cfg.discount, cfg.gae_lambda)
            targets = advantages + traj.value
            data = (traj.obs, traj.action, traj.log_prob, advantages, targets)

            def epoch(carry, _):
                params, opt_state, rng = carry
                rng, key = jax.random.split(rng)
                groups = jax.random.permutation(key, cfg.num_steps).reshape(cfg.num_minibatches, -1)

                def minibatch(carry, steps):
                    params, opt_state = carry
                    batch = jax.tree.map(lambda x: x[steps].reshape(-1, *x.shape[2:]), data)
                    grads, aux = jax.grad(ppo_loss, has_aux=True)(params, batch, mean_, std_, cfg, axis)
                    grads = jax.lax.pmean(grads, axis)
                    step, opt_state = tx.update(grads, opt_state, params)
                    return (optax.apply_updates(params, step), opt_state), jax.lax.pmean(aux, axis)

                (params, opt_state), aux = jax.lax.scan(minibatch, (params, opt_state), groups)
                return (params, opt_state, rng), aux

            (params, opt_state, rng), (pg, value_loss, entropy) = jax.lax.scan(
                epoch, (ts.params, ts.opt_state, rng), None, cfg.epochs)
            info = traj.info

            def ratio(num, den):
                return jax.lax.psum(num.sum(), axis) / jnp.maximum(jax.lax.psum(den.sum(), axis), 1)

            tok = info.token_done.astype(jnp.float32)
            metrics = {
                "episode_reward": ratio(info.episode_return * info.episode_done, info.episode_done.astype(jnp.float32)),
                "episodes": jax.lax.psum(info.episode_done.sum(), axis),
                "exit_accuracy": ratio(info.correct * tok, tok),
                "mean_exit_layer": ratio(info.exit_layer * tok, tok),
                "entropy": entropy.mean(), "value_loss": value_loss.mean(), "policy_loss": pg.mean(),
            }
            return TrainState(params, opt_state, env_state, obs, rng, ts.update + 1), metrics

        def run(state, env, active):
            def per_seed(ts):
                shapes = jax.eval_shape(lambda ts: update(env, ts)[1], ts)
                idle = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

                def slot(ts, i):
                    return jax.lax.cond(i < active, lambda ts: update(env, ts), lambda ts: (ts, idle), ts)
                return jax.lax.scan(slot, ts, jnp.arange(updates))
            return jax.vmap(per_seed)(state)

        specs = self._spec_tree(state)
        env_specs = jax.tree.map(lambda _: P(), exit_env.EnvArrays(*[0] * 4))
        mapped = jax.shard_map(run, mesh=self.mesh, in_specs=(specs, env_specs, P()), out_specs=(specs, P()),
                               check_vma=False)
        return jax.jit(mapped, donate_argnums=0)
