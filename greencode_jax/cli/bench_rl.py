"""`greencode bench rl`: our PPO vs Stable-Baselines3's, and rollout collection vs generate.

Wiring (in main.py's build_parser): `register_bench(bench_sub)`. The work is in
greencode_jax.rl.bench; heavy imports happen inside the handler.
"""

from __future__ import annotations

from greencode_jax.errors import GreencodeError

def cmd_bench_rl(args):
    import json

    from greencode_jax.atomic import write_json_output
    from greencode_jax.rl import bench

    if args.collect is not None:
        if args.data is None:
            raise GreencodeError("--collect CHECKPOINT needs --data DIR (the prepared corpus to draw prompts from)")
        results = bench.run_bench_collect(args.collect, args.data, batch_size=args.batch_size, rounds=args.rounds,
                                          seed=args.seed, split=args.split)
        bench.print_bench_collect(results)
    else:
        overrides = list(args.overrides) + ([] if args.timesteps is None else [f"rl.total_timesteps={args.timesteps}"])
        overrides += [f"rl.seed={args.seed}"]
        from greencode_jax.cli.rl_cmd import rl_config

        cfg = rl_config(None, overrides, "bench rl")
        results = bench.run_bench_rl(cfg, hidden_size=args.hidden, episodes=args.episodes, held_out=args.held_out,
                                     sb3_timesteps=args.sb3_timesteps, seed=args.seed)
        bench.print_bench_rl(results)
    if args.json:
        write_json_output(args.json, json.loads(json.dumps(results, default=str)), "benchmark")
        print(f"wrote {args.json}")
    return results


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        "rl", help="our PPO vs stable-baselines3 PPO on the same episodes; --collect: collection vs generate",
        description="Trains our PPO (one compiled program) and stable-baselines3's PPO (MlpPolicy on a gymnasium "
                    "wrapper of the same environment) with the same rl hyperparameters on the same synthetic cached "
                    "episodes, and prints timesteps/s, their ratio, our compile time, the wall time and the held-out "
                    "reward and exit accuracy of both deterministic policies. With --collect, instead times rollout "
                    "collection against generate's Full() on a checkpoint.")
    p.add_argument("overrides", nargs="*", help="rl.field=value overrides for both sides, e.g. rl.num_envs=128")
    p.add_argument("--hidden", type=int, default=576, help="hidden size of the synthetic states (default 576)")
    p.add_argument("--timesteps", type=int, default=None, help="our PPO's timesteps (default rl.total_timesteps, 500k)")
    p.add_argument("--sb3-timesteps", type=int, default=50_000,
                   help="stable-baselines3's timesteps, rounded to whole updates; our PPO also runs this budget so "
                        "quality is compared at equal timesteps (default 50000; 0: no SB3)")
    p.add_argument("--episodes", type=int, default=512, help="training episodes (default 512)")
    p.add_argument("--held-out", type=int, default=None, help="held-out episodes judged (default episodes / 4)")
    p.add_argument("--seed", type=int, default=0, help="data, our PPO and SB3 seed (default 0)")
    p.add_argument("--collect", default=None, metavar="CHECKPOINT",
                   help="time rollout collection against generate Full() on this checkpoint instead")
    p.add_argument("--data", default=None, metavar="DIR", help="with --collect: the prepared corpus")
    p.add_argument("--split", default="train", help="with --collect: the split prompts come from (default train)")
    p.add_argument("--batch-size", type=int, default=16, help="with --collect: prompts per batch (default 16)")
    p.add_argument("--rounds", type=int, default=7, help="with --collect: interleaved timing rounds (default 7)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_rl)
    return p
