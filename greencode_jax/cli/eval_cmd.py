"""`greencode evaluate CHECKPOINT --data DIR --out DIR [...]`: parses, runs eval.run.evaluate, prints.

Wiring (in main.py's build_parser): `eval_cmd.register(sub)` and `eval_cmd.register_bench(bench_sub)`. Heavy imports happen inside
the handler, so `--help` answers at once.
"""

from __future__ import annotations

from greencode_jax.cli.args import comma_list
from greencode_jax.errors import GreencodeError


def _sizes(text: str) -> list[int]:
    return comma_list(text, int, expected="a batch size or a comma-separated list such as 1,8", nonempty=True,
                      valid=lambda sizes: all(s >= 1 for s in sizes))


def _protocols(text: str) -> list[str]:
    from greencode_jax.config import PROTOCOLS

    return comma_list(text, expected="completion, line or completion,line", nonempty=True,
                      valid=lambda names: set(names) <= set(PROTOCOLS))


def cmd_evaluate(args):
    from greencode_jax.cli.energy_cmd import _energy_config
    from greencode_jax.config import EvalConfig, load_sections
    from greencode_jax.eval.report import format_table, main_table
    from greencode_jax.eval.run import evaluate

    config = load_sections(args.config, [], ("eval",), "evaluate").eval if args.config is not None else EvalConfig()
    if args.samples is not None and args.samples < 0:
        raise GreencodeError(f"--samples {args.samples}: expected 0 (all) or more")
    summary = evaluate(args.checkpoint, args.data, args.out, policy_dir=args.policy, base=args.base,
                       policies=args.policies, samples=args.samples, batch_size=args.batch_size,
                       protocols=args.protocols, cost_model=args.cost_model, energy_config=_energy_config(args.set),
                       config=config, progress=not args.no_progress,
                       allow_foreign_policy=True if args.allow_foreign_policy else None, certified=args.certified)
    for protocol, proto in summary["protocols"].items():
        n = max((p["n"] for p in proto["policies"].values()), default=0)
        print(f"\n{protocol} ({n} samples; Pareto cost: {proto['pareto_cost'] or 'none'})")
        print(format_table(main_table(summary, protocol)))
    for name, reason in summary.get("unavailable", {}).items():
        print(f"{name} unavailable: {reason}")
    if summary.get("certified"):
        from greencode_jax.eval.report import certified_lines

        print("\n".join(["", *certified_lines(summary["certified"])[2:]]))
    print()
    for name in ("samples.jsonl", "summary.json", "report.md", "pareto.png", "exits.png"):
        print(f"wrote {args.out}/{name}")


def register(subparsers):
    p = subparsers.add_parser(
        "evaluate", help="every exit policy against Full() and the base model: code metrics, joules, report",
        description="Evaluates CHECKPOINT on a prepared corpus with GREEN-CODE's completion protocol and CodeXGLUE "
                    "line-level completion: Full(), the base model, fixed exits, confidence exits and the learned "
                    "policy over their thresholds. Writes OUT/samples.jsonl (one record per sample and policy, as "
                    "finished), summary.json, report.md, pareto.png and exits.png. Rerunning the same command "
                    "resumes. See docs/evaluate.md.")
    p.add_argument("checkpoint", help="greencode checkpoint (or Hugging Face model directory) to evaluate")
    p.add_argument("--data", required=True, help="directory written by `greencode prepare-data`")
    p.add_argument("--out", required=True, help="output directory (an earlier run's with the same settings resumes)")
    p.add_argument("--policy", default=None, metavar="DIR", help="learned policy directory (what train-policy wrote)")
    p.add_argument("--base", default=None, metavar="CHECKPOINT", help="the base model, evaluated at full depth")
    p.add_argument("--samples", type=int, default=None, help="samples per protocol (default 1000; 0: all)")
    p.add_argument("--batch-size", type=_sizes, default=None, metavar="B[,B]",
                   help="batch size(s), e.g. 8 or 1,8 to report both (default 1)")
    p.add_argument("--policies", default=None, metavar="SPEC",
                   help="e.g. 'full; fixed:3,7; confidence:softmax_max@0.8,0.9; learned@0.6,0.9' (default: base, "
                        "full, every fixed exit, both confidence measures and learned over their grids)")
    p.add_argument("--protocols", type=_protocols, default=None, metavar="P[,P]",
                   help="completion and/or line (default: both where the corpus has line-level samples)")
    p.add_argument("--cost-model", default=None, metavar="FILE",
                   help="`greencode energy calibrate --out` JSON for the modelled joules (without it: unavailable)")
    p.add_argument("--allow-foreign-policy", action="store_true",
                   help="evaluate a --policy trained on another checkpoint than CHECKPOINT (refused otherwise); the "
                        "report says so")
    p.add_argument("--config", default=None, metavar="YAML", help="a config whose `eval` section gives the settings; "
                   "the options above override it")
    p.add_argument("--certified", default=None, metavar="FILE", help="`greencode certify` JSON: adds the rows "
                   "learned@certified and confidence@certified and their realised loss on the test split")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="EnergyConfig field override for the measured joules, repeatable: e.g. cpu_backend=off")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)


def cmd_certify(args):
    import dataclasses

    from greencode_jax.config import load_sections
    from greencode_jax.eval.certify_run import certify

    loaded = load_sections(args.config, args.overrides, ("certify", "eval"), "certify")
    section, config = loaded.certify, loaded.eval
    result = certify(args.checkpoint, args.data, args.out, policy_dir=args.policy,
                     config=dataclasses.replace(config, certified=""), section=section, progress=not args.no_progress)
    print(f"wrote {args.out}: delta {result['delta']:.4g} ({result['delta_rule']}), epsilon {result['epsilon']:g}, "
          f"{result['n']} {result['split']} samples")
    for family, entry in result["families"].items():
        threshold = entry["certified"]
        print(f"  {family}: {'none (never exit)' if threshold is None else threshold}")


def register_certify(subparsers):
    p = subparsers.add_parser(
        "certify", help="the most aggressive exit threshold whose loss against Full() is <= delta with probability "
                        ">= 1 - epsilon (Learn-then-Test), for the learned policy and confidence exits",
        description="Certifies exit thresholds on a calibration split disjoint from the test split (dev by "
                    "default): per-sample losses against the full model's own output (risk: ROUGE-L below the "
                    "full model's; textual: any token differs), Hoeffding-Bentkus p-values, fixed-sequence testing "
                    "from the most conservative threshold. Writes a JSON that `greencode evaluate --config` "
                    "(eval.certified) turns into the rows learned@certified and confidence@certified. Every field of "
                    "the certify section can be set as certify.field=value. See docs/evaluate.md.")
    p.add_argument("checkpoint", help="greencode checkpoint (or Hugging Face model directory)")
    p.add_argument("--data", required=True, help="directory written by `greencode prepare-data`")
    p.add_argument("--out", required=True, help="the certification JSON to write")
    p.add_argument("--policy", default=None, metavar="DIR", help="learned policy directory (the learned family)")
    p.add_argument("--config", default=None, metavar="YAML", help="a config whose certify and eval sections are read")
    p.add_argument("overrides", nargs="*", help="certify.field=value overrides, e.g. certify.epsilon=0.05")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_certify)


def cmd_bench_eval(args):
    from greencode_jax.bench.eval import format_bench_eval, run_bench_eval
    from greencode_jax.cli.bench_cmd import write_figures

    result = run_bench_eval(args.checkpoint, args.data, samples=args.samples, policy=args.policies,
                            policy_dir=args.policy, repeats=args.repeats)
    print(format_bench_eval(result))
    write_figures(args.json, result)


def register_bench(bench_subparsers):
    p = bench_subparsers.add_parser(
        "eval", help="evaluation-loop overhead per sample vs bare generate (target <= 1.2x)",
        description="Times the evaluation loop (energy window, decoding, every metric, the record written) against "
                    "bare generate on the same completion samples at batch 1, interleaved, medians reported.")
    p.add_argument("checkpoint", help="greencode checkpoint (or Hugging Face model directory)")
    p.add_argument("--data", required=True, help="directory written by `greencode prepare-data`")
    p.add_argument("--samples", type=int, default=20, help="completion samples (default 20)")
    p.add_argument("--policies", default="full", metavar="SPEC", help="policy SPEC item (default full; Full() is "
                   "also run for another, as the loop's agreement needs it)")
    p.add_argument("--policy", default=None, metavar="DIR", help="learned policy directory, for learned@T")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench_eval)
