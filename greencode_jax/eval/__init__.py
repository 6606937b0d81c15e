"""Evaluation's pure parts (package `eval`): per-sample code metrics through their reference
libraries, bootstrap intervals and the Pareto front, the summary of per-(sample, policy)
records, and the report with its plots. Imports nothing of ours but `greencode_jax.errors`,
`greencode_jax.atomic` and `greencode_jax.data`; the generation loop that produces the
records lives beside it.

    from greencode_jax.eval.metrics import score
    from greencode_jax.eval.summary import summarize
    from greencode_jax.eval.report import write_report
"""
