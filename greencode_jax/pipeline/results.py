"""A sweep's results, from each run's evaluate/summary.json: sweeps/<name>/summary.csv (one row per arm x
protocol x policy, seeds aggregated), report.md (the table, each varied field's effect, the best arm
at each quality level) and pareto.png (every arm's policies on one energy-versus-quality plot).

Seeds: each figure is the mean over the arm's seeds, `*_sd` its standard deviation across them
(blank with one seed); the confidence interval columns are the mean of the seeds' 95 % bootstrap
bounds. "saved" and the quality change compare with the same run's Full() row (eval/summary.py).
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from greencode_jax.atomic import atomic_write_bytes, atomic_write_text
from greencode_jax.eval.metrics import METRICS
from greencode_jax.eval.plots import figure_png, new_figure  # the Agg canvas evaluate's plots draw on
from greencode_jax.eval.report import main_table
from greencode_jax.pipeline.stages import read_stage_json

FIGURES = ("saved_modelled_pct", "saved_measured_pct", "quality_change_pct", "modelled_j", "measured_j")
QUALITY_LEVELS = (-1.0, -5.0, -10.0)  # ROUGE-L change against Full(), in %: the report's "best arm" rows


def _policy_figures(p: dict) -> dict:
    saved = p.get("saved_vs_full") or {}
    energy = p["energy"]
    out = {"saved_modelled_pct": saved.get("modelled"), "saved_measured_pct": saved.get("measured"),
           "quality_change_pct": p.get("quality_change_vs_full"),
           "modelled_j": (energy["modelled"] or {}).get("mean"), "measured_j": (energy["measured"] or {}).get("mean")}
    for metric in METRICS:
        interval = p["metrics"].get(metric) or {}
        out[metric], out[f"{metric}_low"], out[f"{metric}_high"] = (interval.get(k) for k in ("mean", "low", "high"))
    return out


def collect_rows(plan, out: Path, failed: dict) -> list[dict]:
    """One row per arm x protocol x policy of the runs that finished, their seeds aggregated."""
    per_arm = {}
    for run in plan.sweep.runs:
        if run.name in failed:
            continue
        summary = read_stage_json(out / "runs" / run.name / "evaluate" / "summary.json", "evaluate")
        for protocol, proto in summary["protocols"].items():
            headline = {row["policy"] for row in main_table(summary, protocol)}
            for key, p in proto["policies"].items():
                entry = per_arm.setdefault((run.arm, protocol, key), {"family": p["family"], "seeds": [],
                                                                     "headline": key in headline})
                entry["seeds"].append(_policy_figures(p))
    rows = []
    for (arm, protocol, policy), entry in per_arm.items():
        row = {"arm": arm, **{field: plan.sweep.arms[arm].get(field, "") for field in plan.sweep.varied},
               "protocol": protocol, "policy": policy, "family": entry["family"], "headline": entry["headline"],
               "seeds": len(entry["seeds"])}
        for name in entry["seeds"][0]:
            values = [s[name] for s in entry["seeds"] if s[name] is not None]
            row[name] = statistics.fmean(values) if values else None
            if name in FIGURES or name in METRICS:
                row[f"{name}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def write_results(plan, out: Path, failed: dict):
    rows = collect_rows(plan, out, failed)
    atomic_write_text(out / "summary.csv", _csv(rows))
    atomic_write_text(out / "report.md", render_report(plan, rows, failed))
    atomic_write_bytes(out / "pareto.png", pareto_png(rows))


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                     for r in rows)
    return buffer.getvalue()


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def _with_sd(row: dict, name: str, digits: int = 3) -> str:
    value, sd = row.get(name), row.get(f"{name}_sd")
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def table_lines(rows: list[dict], protocol: str) -> list[str]:
    """The report's table of one protocol: per arm, the rows of its own report's main table (Full(), the
    best fixed exit and confidence setting, every learned threshold, the certified ones)."""
    lines = ["| arm | policy | saved % modelled | saved % measured | ROUGE-L [95 % CI] | ΔROUGE-L % |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["protocol"] != protocol or not r["headline"]:
            continue
        interval = "" if r["rouge_l_low"] is None else f" [{r['rouge_l_low']:.3f}, {r['rouge_l_high']:.3f}]"
        lines.append(f"| {r['arm']} | {r['policy']} | {_pct(r['saved_modelled_pct'])} | "
                     f"{_pct(r['saved_measured_pct'])} | {_with_sd(r, 'rouge_l')}{interval} | "
                     f"{_pct(r['quality_change_pct'])} |")
    return lines


def effect_lines(plan, rows: list[dict], protocol: str) -> list[str]:
    """Each varied field's effect: per value, the learned policies' mean saving and quality change,
    averaged over every other field's values."""
    lines = ["| field | value | arms | learned: saved % modelled | learned: ΔROUGE-L % |", "|---|---|---:|---:|---:|"]
    learned = [r for r in rows if r["protocol"] == protocol and r["family"] == "learned"]
    for field in plan.sweep.varied:
        for value in dict.fromkeys(arm[field] for arm in plan.sweep.arms.values() if field in arm):
            mine = [r for r in learned if r[field] == value]
            saved = [r["saved_modelled_pct"] for r in mine if r["saved_modelled_pct"] is not None]
            quality = [r["quality_change_pct"] for r in mine if r["quality_change_pct"] is not None]
            lines.append(f"| {field} | {value} | {len({r['arm'] for r in mine})} | "
                         f"{_pct(statistics.fmean(saved) if saved else None)} | "
                         f"{_pct(statistics.fmean(quality) if quality else None)} |")
    return lines


def best_lines(rows: list[dict], protocol: str) -> list[str]:
    lines = ["| ΔROUGE-L at least | best arm | policy | saved % modelled | ΔROUGE-L % |", "|---|---|---|---:|---:|"]
    candidates = [r for r in rows if r["protocol"] == protocol and r["family"] in ("learned", "confidence", "fixed")
                  and r["saved_modelled_pct"] is not None and r["quality_change_pct"] is not None]
    for level in QUALITY_LEVELS:
        good = [r for r in candidates if r["quality_change_pct"] >= level]
        if not good:
            lines.append(f"| {level:+.0f} % | none | | | |")
            continue
        best = max(good, key=lambda r: r["saved_modelled_pct"])
        lines.append(f"| {level:+.0f} % | {best['arm']} | {best['policy']} | {_pct(best['saved_modelled_pct'])} | "
                     f"{_pct(best['quality_change_pct'])} |")
    return lines


def render_report(plan, rows: list[dict], failed: dict) -> str:
    sweep = plan.sweep
    seeds = sorted({str(run.seed) for run in sweep.runs if run.seed is not None})
    lines = [f"# Sweep {sweep.name}", "", f"- base: `{sweep.base}`; varied: {', '.join(sweep.varied) or 'nothing'}",
             f"- {len(sweep.arms)} arms" + (f" x seeds {', '.join(seeds)} (mean ± sd across seeds)" if seeds else ""),
             f"- stage jobs: {len(plan.jobs)} for {len(sweep.runs)} runs (stages shared across arms)"]
    lines += [f"- **failed**: {name}: {error}" for name, error in failed.items()]
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        lines += ["", f"## {protocol} protocol", "", *table_lines(rows, protocol), "",
                  "### Effect of each varied field (averaged over the others)", "", *effect_lines(plan, rows, protocol),
                  "", "### Best arm at each quality level (the largest modelled saving)", "",
                  *best_lines(rows, protocol)]
    return "\n".join(lines) + "\n"


def pareto_png(rows: list[dict]) -> bytes:
    """Modelled J per sample vs ROUGE-L of every arm's policies, one colour per arm, one panel per protocol."""
    protocols = list(dict.fromkeys(r["protocol"] for r in rows)) or ["(no finished arm)"]
    fig = new_figure(6.5 * len(protocols), 5.0)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colours = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    for index, protocol in enumerate(protocols, start=1):
        ax = fig.add_subplot(1, len(protocols), index)
        for arm in arms:
            mine = [r for r in rows if r["arm"] == arm and r["protocol"] == protocol
                    and r["modelled_j"] is not None and r["rouge_l"] is not None]
            ax.scatter([r["modelled_j"] for r in mine], [r["rouge_l"] for r in mine], s=18, color=colours[arm],
                       label=arm, alpha=0.8)
            full = [r for r in mine if r["family"] == "full"]
            ax.scatter([r["modelled_j"] for r in full], [r["rouge_l"] for r in full], s=80, marker="s",
                       facecolors="none", edgecolors=colours[arm])
        ax.set_xlabel("modelled J per sample")
        ax.set_ylabel("ROUGE-L (whitespace tokens)")
        ax.set_title(f"{protocol} (squares: Full())")
        ax.grid(True, alpha=0.3)
        if arms:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)
