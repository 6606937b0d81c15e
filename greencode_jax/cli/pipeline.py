"""`greencode run [CONFIG] [section.field=value ...]`: parses, runs greencode_jax.pipeline, prints
its outcome (the main table per protocol, the energy lines, where the report and plots are)."""

from __future__ import annotations


from greencode_jax.cli.train_cmd import print_evaluation
from greencode_jax.eval.report import format_table, main_table
from greencode_jax.pipeline import PipelineResult, read_stage_json, run_pipeline


def cmd_run(config_path, overrides):
    result = run_pipeline(config_path, overrides, show_evaluation=print_evaluation)
    print_outcome(result)


def print_outcome(result: PipelineResult):
    summary = read_stage_json(result.eval_dir / "summary.json", "evaluate")
    for protocol in summary["protocols"]:
        print(f"\n{protocol} protocol:")
        print(format_table(main_table(summary, protocol)))
    report = (result.eval_dir / "report.md").read_text().splitlines()
    energy = [line[2:] for line in report if line.startswith(("- Energy method", "- **Only estimates", "- modelled"))]
    print("\n" + "\n".join(energy).replace("**", ""))
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    print(f"stages: {timing}")
    print(f"report: {result.eval_dir / 'report.md'}\nplots:  {result.eval_dir / 'pareto.png'}, "
          f"{result.eval_dir / 'exits.png'}\npolicy: {result.policy_dir}")
