"""`greencode sweep SWEEP.yaml [--backend local|ray|slurm] [--jobs N] [--cpus-per-stage N] [--gpus-per-stage N]
[--detach] [--dry-run]`: parses, calls greencode_jax.pipeline's sweep, prints the dry run or the results table.

Wiring (in main.py's build_parser): `sweep_cmd.register(sub)`.
"""

from __future__ import annotations

import argparse

from greencode_jax.errors import GreencodeError


def cmd_sweep(args):
    from greencode_jax.pipeline.stages import say

    if args.run_stage:  # one stage job, as a backend launches it
        from greencode_jax.pipeline.sweep import run_stage_job

        run_stage_job(args.run_stage, say)
        return
    if not args.sweep:
        raise GreencodeError("sweep: give the sweep file (SWEEP.yaml)")
    from greencode_jax.pipeline.sweep import dry_run_lines, plan_sweep
    from greencode_jax.pipeline.sweep_file import read_sweep

    plan = plan_sweep(read_sweep(args.sweep))
    if args.dry_run:
        print("\n".join(dry_run_lines(plan)))
        return
    from greencode_jax.pipeline.backends import open_backend
    from greencode_jax.pipeline.sweep import run_sweep

    backend = open_backend(args.backend, jobs=args.jobs, address=args.address, cpus=args.cpus_per_stage,
                           gpus=args.gpus_per_stage)
    if args.detach:
        from greencode_jax.pipeline.sweep import submit_sweep

        submitted = submit_sweep(plan, backend, say)
        print(f"{submitted} stage jobs submitted; run the same command without --detach to follow them and write "
              "the results")
        return
    failed = run_sweep(plan, backend, say)
    print("\n" + (plan.out / "report.md").read_text())
    print(f"results: {plan.out / 'summary.csv'}, {plan.out / 'report.md'}, {plan.out / 'pareto.png'}")
    if failed:
        raise GreencodeError(f"{len(failed)} of {len(plan.sweep.runs)} runs failed (the others are in the "
                             f"results): " + "; ".join(f"{name}: {error}" for name, error in failed.items()))


def register(sub):
    p = sub.add_parser("sweep", help="an ablation study: every arm of a sweep file through the pipeline, stages "
                       "shared across arms, one table and one plot")
    p.add_argument("sweep", nargs="?", default=None, help="the sweep file (YAML: base, grid, zip, arms, seeds)")
    p.add_argument("--backend", choices=["local", "ray", "slurm"], default="local",
                   help="where the stage jobs run: local subprocesses (default), a Ray cluster, SLURM via submitit")
    p.add_argument("--jobs", type=int, default=1, help="local: stage jobs at once (default 1); ray/slurm: ignored")
    p.add_argument("--address", default=None,
                   help="ray: the cluster's address (default: RAY_ADDRESS); slurm: the submitit folder")
    p.add_argument("--cpus-per-stage", type=int, default=None,
                   help="ray: CPUs each stage task asks for (default 1); local/slurm: ignored (slurm: "
                        "GREENCODE_SLURM_CPUS)")
    p.add_argument("--gpus-per-stage", type=int, default=None,
                   help="ray: GPUs each stage task asks for (default 1 where the cluster has GPUs, else 0); "
                        "local/slurm: ignored (slurm: GREENCODE_SLURM_GPUS)")
    p.add_argument("--detach", action="store_true",
                   help="slurm (on a cluster): submit every stage job, each waiting on its upstream jobs in SLURM, "
                        "and return; the same command without it follows them and writes the results")
    p.add_argument("--dry-run", action="store_true",
                   help="print every arm, its overrides and which stages the arms share, and run nothing")
    p.add_argument("--run-stage", default=None, metavar="SPEC.json", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sweep)
