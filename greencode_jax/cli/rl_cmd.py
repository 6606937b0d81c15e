"""`greencode collect-rollouts`, `greencode train-policy` and `greencode bench rl`: parse, call
greencode_jax.rl (or greencode_jax.bench), print.

Wiring (in main.py's build_parser): `rl_cmd.register(sub)` and `rl_cmd.register_bench(bench_sub)`.
"""

from __future__ import annotations

import argparse
import json

from greencode_jax.atomic import write_json_output
from greencode_jax.cli.bench_cmd import echo
from greencode_jax.errors import GreencodeError


def rl_config(config_path, overrides, source_name="train-policy"):
    """The `rl` section of a YAML file (other sections not read) with `rl.field=value` overrides."""
    from greencode_jax.config import load_sections

    return load_sections(config_path, list(overrides), ("rl",), source_name).rl


def cmd_collect_rollouts(args):
    from greencode_jax.rl.collect import collect_rollouts

    collect_rollouts(args.checkpoint, args.data, args.out, split=args.split, episodes=args.episodes,
                     batch_size=args.batch_size, seed=args.seed, hidden_dtype=args.hidden_dtype,
                     new_tokens=args.new_tokens, max_context=args.max_context, chunk_episodes=args.chunk_episodes,
                     overwrite=args.overwrite, progress=not args.no_progress)


def cmd_train_policy(args):
    from greencode_jax.rl.train import train_policy

    cfg = rl_config(args.config, args.overrides)
    train_policy(args.rollouts, args.out, cfg, validation_dir=args.validation, overwrite=args.overwrite,
                 progress=not args.no_progress)


def register(sub):
    p = sub.add_parser("collect-rollouts", help="record the episodes the exit policy trains on (the model at full "
                       "depth: each exit's hidden state and whether it agrees with the last layer)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="greencode checkpoint or Hugging Face model directory (its exit layers)")
    p.add_argument("--data", required=True, help="a corpus written by prepare-data (or finetune)")
    p.add_argument("--out", required=True, help="the rollout store to write (DIR.partial while recording)")
    p.add_argument("--split", default="train", help="split of the corpus; a validation store: --split dev")
    p.add_argument("--episodes", type=int, default=512, help="episodes (a document, a U(0.2, 0.5) context, "
                   "--new-tokens greedy tokens)")
    p.add_argument("--batch-size", type=int, default=16, help="episodes per compiled batch (split over devices)")
    p.add_argument("--seed", type=int, default=0, help="seed of the episode draws")
    p.add_argument("--hidden-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage of the hidden states (bfloat16 halves the store)")
    p.add_argument("--new-tokens", type=int, default=15, help="tokens per episode (GREEN-CODE: 15)")
    p.add_argument("--max-context", type=int, default=None,
                   help="cap on the context tokens (default: what the model's positions allow)")
    p.add_argument("--chunk-episodes", type=int, default=None,
                   help="episodes per chunk, the unit an interrupted collection keeps (default: about 64 MB of "
                        "hidden states)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_collect_rollouts)

    p = sub.add_parser("train-policy", help="PPO on a rollout store -> a Learned exit policy directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       epilog="Every field of the rl section (see docs/rl.md) can be set as rl.field=value, e.g. "
                              "rl.total_timesteps=100000 rl.beta=4 rl.seeds=4 rl.reward=energy "
                              "rl.cost_model=runs/x/cost.json")
    p.add_argument("rollouts", help="the store collect-rollouts wrote")
    p.add_argument("--out", required=True, help="the policy directory to write (DIR.partial while training)")
    p.add_argument("--validation", default=None, help="a store of another split: picks the best seed, and the "
                   "validation table is computed on it (default: the training store)")
    p.add_argument("--config", default=None, help="YAML file whose 'rl' section sets the fields")
    p.add_argument("overrides", nargs="*", help="rl.field=value overrides")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_policy)


def cmd_bench_rl(args):
    if args.collect is not None:
        from greencode_jax.bench.rl_collect import format_bench_collect, run_bench_collect

        if args.data is None:
            raise GreencodeError("--collect CHECKPOINT needs --data DIR (the prepared corpus to draw prompts from)")
        results = run_bench_collect(args.collect, args.data, batch_size=args.batch_size, rounds=args.rounds,
                                    seed=args.seed, split=args.split)
        text = format_bench_collect(results)
    else:
        from greencode_jax.bench.rl import format_bench_rl, run_bench_rl

        overrides = list(args.overrides) + ([] if args.timesteps is None else [f"rl.total_timesteps={args.timesteps}"])
        overrides += [f"rl.seed={args.seed}"]
        cfg = rl_config(None, overrides, "bench rl")
        results = run_bench_rl(cfg, hidden_size=args.hidden, episodes=args.episodes, held_out=args.held_out,
                               sb3_timesteps=args.sb3_timesteps, seed=args.seed, progress=echo)
        text = format_bench_rl(results)
    print(text)
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
