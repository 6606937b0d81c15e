"""`greencode collect-rollouts` and `greencode train-policy`: parse, call greencode_jax.rl, print."""

from __future__ import annotations

import argparse

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
