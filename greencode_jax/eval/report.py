"""report.md, pareto.png and exits.png from a summary and its records; the terminal's main table.

Everything is rendered in memory first and then each file is written atomically, so a
failure leaves no file half-written and no temporary file behind. The plots are drawn by
eval/plots.py.
"""

from __future__ import annotations

import math
from pathlib import Path

from greencode_jax.atomic import atomic_write_bytes, atomic_write_text
from greencode_jax.eval.plots import exits_png, pareto_png
from greencode_jax.eval.summary import FAMILIES, ordered_keys

# EnergyMeter's labels for joules that were measured rather than estimated.
MEASURED_METHODS = ("counter", "integrated_power")
PARETO_MARK = "★"

COLUMNS = ("policy", "J (modelled)", "J (measured)", "s", "ROUGE-L", "ROUGE-L (default tok.)", "BLEU", "chrF",
           "CodeBLEU", "EM", "ES", "mean exit layer", "saved % (modelled)", "saved % (measured)", "ΔROUGE-L %")

# (summary field, digits) of each metric column
_METRIC_COLUMNS = (("rouge_l", 3), ("rouge_l_default", 3), ("bleu", 1), ("chrf", 1), ("codebleu", 3),
                   ("exact_match", 3), ("edit_similarity", 1))


def _mean(entry):
    return None if entry is None else entry.get("mean")


def _ci(entry, digits: int) -> str:
    """`mean ± half-width` of a {"mean", "low", "high"} entry; "n/a" when there is none."""
    if entry is None or entry.get("mean") is None:
        return "n/a"
    half = (entry["high"] - entry["low"]) / 2.0
    return f"{entry['mean']:.{digits}f} ± {half:.{digits}f}"


def _joules_digits(entry) -> int:
    mean = _mean(entry)
    if mean is None or mean == 0:
        return 3
    return max(0, min(6, 2 - int(math.floor(math.log10(abs(mean))))))  # three significant figures


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def _only_estimates(summary: dict) -> bool:
    for proto in summary["protocols"].values():
        for p in proto["policies"].values():
            method = p["energy"]["measured"].get("method")
            if method and any(m in MEASURED_METHODS for m in method.split("+")):
                return False
    return True


def _modelled_methods(summary: dict) -> list[str]:
    methods = {p["energy"]["modelled"].get("method") for proto in summary["protocols"].values()
               for p in proto["policies"].values()}
    return sorted(m for m in methods if m)


def render_markdown(summary: dict, header: dict) -> str:
    """report.md's text (write_report writes it)."""
    lines = ["# Evaluation report", ""]
    lines.append(f"- Hardware: {header.get('device', 'not stated')}")
    lines.append(f"- Energy method: {header.get('energy_method', 'not stated')}")
    if _only_estimates(summary):
        modelled = _modelled_methods(summary)
        lines.append("- **Only estimates exist here**: no joules were measured by a counter or integrated power "
                     "reading (the measured column holds estimates or nothing)"
                     + (f"; the modelled joules' cost model is labelled {', '.join(modelled)}" if modelled else "")
                     + ".")
    if "model" in header:
        lines.append(f"- Model: {header['model']}")
    for key, value in header.items():
        if key not in ("device", "energy_method", "model"):
            lines.append(f"- {key}: {value}")
    lines.append("")
    lines.append("Per sample: J and s are means per sample; ± is half the "
                 f"{summary.get('confidence', 0.95):.0%} percentile-bootstrap interval (summary.json has its ends). "
                 "Scales: ROUGE-L, CodeBLEU and EM 0-1, BLEU, chrF and ES (edit similarity) 0-100. "
                 "ROUGE-L splits on whitespace (punctuation counts); ROUGE-L (default tok.) is rouge-score's default "
                 "tokenizer as GREEN-CODE reported it (punctuation dropped). Saved % and ΔROUGE-L % are relative to "
                 "the Full() row of the same protocol and batch size; modelled and measured joules are never mixed. "
                 f"{PARETO_MARK} marks the Pareto-optimal rows.")
    for name, reason in summary.get("unavailable", {}).items():
        lines.append("")
        lines.append(f"{name} unavailable: {reason}")
    if not summary["protocols"]:
        lines += ["", "No records were summarised."]
    for protocol, proto in summary["protocols"].items():
        lines += ["", *_protocol_section(protocol, proto)]
    if summary.get("certified"):
        lines += ["", *certified_lines(summary["certified"])]
    lines.append("")
    return "\n".join(lines)


def certified_lines(certified: dict) -> list[str]:
    """What each certified threshold promises and what the test split realised."""
    lines = ["## Certified thresholds (Learn-then-Test)", ""]
    for label, c in certified.items():
        threshold = "none (never exits)" if c["threshold"] is None else f"{c['threshold']:g}"
        realised = ", ".join(f"{k}: {v:.4g} ({'within' if c['within_delta'][k] else 'ABOVE'} delta)"
                             for k, v in c["test_loss"].items())
        lines.append(f"- {label}: threshold {threshold}; with probability >= {1 - c['epsilon']:g} its expected "
                     f"{c['loss']} loss against Full() is <= {c['delta']:.4g} (calibrated on {c['calibration_n']} "
                     f"{c['calibration_split']} samples); realised on test: {realised or 'not evaluated'}")
    return lines


def _protocol_section(protocol: str, proto: dict) -> list[str]:
    policies = proto["policies"]
    keys = ordered_keys(policies)
    several = len({p["batch_size"] for p in policies.values()}) > 1
    n = max((p["n"] for p in policies.values()), default=0)
    cost = proto.get("pareto_cost")
    front = {"modelled": "modelled J", "measured": "measured J", "seconds": "seconds per sample (no energy figure "
             "covers every policy)"}.get(cost, "nothing (no cost figure)")
    out = [f"## Protocol: {protocol} ({n} samples)", "", f"Pareto front: {front} vs ROUGE-L.", ""]
    columns = list(COLUMNS)
    if several:
        columns.insert(1, "batch")
    out.append("| " + " | ".join(columns) + " |")
    out.append("|" + "|".join("---" for _ in columns) + "|")
    notes = []
    for key in keys:
        p = policies[key]
        measured, modelled = p["energy"]["measured"], p["energy"]["modelled"]
        cells = [key + (f" {PARETO_MARK}" if p.get("pareto") else "")]
        if several:
            cells.append(str(p["batch_size"]))
        cells.append(_ci(modelled if modelled.get("mean") is not None else None, _joules_digits(modelled)))
        cells.append(_ci(measured if measured.get("mean") is not None else None, _joules_digits(measured)))
        cells.append(_ci(p["seconds"], 3))
        cells += [_ci(p["metrics"][name], digits) for name, digits in _METRIC_COLUMNS]
        cells.append(_ci(p["mean_exit_layer"], 1))
        cells += [_pct(p["saved_vs_full"]["modelled"]), _pct(p["saved_vs_full"]["measured"]),
                  _pct(p["quality_change_vs_full"])]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    for figure in ("modelled", "measured"):
        entries = [(key, policies[key]["energy"][figure]) for key in keys]
        methods = {e["method"] for _, e in entries if e.get("method")}
        if len(methods) == 1:  # the usual case: one label for the whole figure
            notes.append(f"- J ({figure}) method: {methods.pop()}")
        else:
            notes += [f"- {key}: J ({figure}) method {e['method']}" for key, e in entries if e.get("method")]
        notes += [f"- {key}: J ({figure}) {'n/a' if e.get('mean') is None else 'partial'}: {e['reason']}"
                  for key, e in entries if e.get("reason")]
    if notes:
        out += ["", *notes]
    return out


def _best(candidates: list[dict], full: dict | None, cost: str | None) -> tuple[dict | None, str | None]:
    """The highest-ROUGE-L candidate among those that save energy; else the highest overall, noted."""
    if not candidates:
        return None, None

    def saving(p):
        if cost in ("modelled", "measured"):
            return p["saved_vs_full"].get(cost)
        if cost == "seconds" and full is not None and _mean(full["seconds"]):
            return 100.0 * (1.0 - _mean(p["seconds"]) / _mean(full["seconds"]))
        return None

    def quality(p):
        value = _mean(p["metrics"]["rouge_l"])
        return -math.inf if value is None else value

    saving_ones = [p for p in candidates if (saving(p) or 0.0) > 0.0]
    if saving_ones:
        return max(saving_ones, key=lambda p: (quality(p), saving(p))), None
    return max(candidates, key=quality), "saves nothing"


def main_table(summary: dict, protocol: str) -> list[dict]:
    """The headline rows of one protocol, per batch size: every Base and Full row, the best
    fixed exit, the best confidence setting, the certified confidence threshold and every
    learned threshold (by threshold, the certified one among them).

    "Best" is the highest mean ROUGE-L (whitespace tokens) among the family's settings that
    save energy against Full() by the protocol's Pareto cost figure (modelled J when every
    policy has it, else measured J, else seconds), ties broken by the larger saving; when none
    saves anything, the highest ROUGE-L overall, with `note` "saves nothing".

    Each row: {"policy", "family", "setting", "batch_size", "modelled_j", "measured_j",
    "seconds", "rouge_l", "saved_modelled", "saved_measured", "quality_change", "pareto", "note"}.
    """
    if protocol not in summary["protocols"]:
        have = ", ".join(summary["protocols"]) or "none"
        raise ValueError(f"protocol {protocol!r} is not in the summary (it has {have})")
    proto = summary["protocols"][protocol]
    policies = proto["policies"]
    cost = proto.get("pareto_cost")
    rows = []
    for batch in sorted({p["batch_size"] for p in policies.values()}):
        keys = [k for k in ordered_keys(policies) if policies[k]["batch_size"] == batch]
        by_family = {f: [policies[k] for k in keys if policies[k]["family"] == f] for f in FAMILIES}
        full = by_family["full"][0] if by_family["full"] else None
        chosen = [(p, None) for p in by_family["base"] + by_family["full"]]
        for family in ("fixed", "confidence"):
            best, note = _best(by_family[family], full, cost)
            if best is not None:
                chosen.append((best, note or f"best {family}"))
        # a certified confidence threshold is a headline row whether or not it is the family's best
        chosen += [(policies[k], None) for k in keys if k.endswith("@certified")
                   and policies[k]["family"] == "confidence" and all(policies[k] is not p for p, _ in chosen)]
        learned = by_family["learned"]
        numeric = all(isinstance(p["setting"], (int, float)) for p in learned)
        chosen += [(p, None) for p in (sorted(learned, key=lambda p: p["setting"]) if numeric else learned)]
        key_of = {id(p): k for k, p in policies.items()}
        for p, note in chosen:
            rows.append({"policy": key_of[id(p)], "family": p["family"], "setting": p["setting"],
                         "batch_size": p["batch_size"], "modelled_j": _mean(p["energy"]["modelled"]),
                         "measured_j": _mean(p["energy"]["measured"]), "seconds": _mean(p["seconds"]),
                         "rouge_l": _mean(p["metrics"]["rouge_l"]), "saved_modelled": p["saved_vs_full"]["modelled"],
                         "saved_measured": p["saved_vs_full"]["measured"],
                         "quality_change": p["quality_change_vs_full"], "pareto": bool(p.get("pareto")),
                         "note": note})
    return rows


def format_table(rows: list[dict]) -> str:
    """main_table's rows as an aligned plain-text table for the terminal."""
    several = len({r["batch_size"] for r in rows}) > 1
    head = ["policy"] + (["B"] if several else []) + ["J modelled", "J measured", "s/sample", "ROUGE-L",
                                                      "saved% mod", "saved% meas", "dROUGE-L%", "pareto", "note"]

    def number(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    body = []
    for r in rows:
        body.append([r["policy"]] + ([str(r["batch_size"])] if several else []) + [
            number(r["modelled_j"], 4), number(r["measured_j"], 4), number(r["seconds"], 4), number(r["rouge_l"], 3),
            _pct(r["saved_modelled"]), _pct(r["saved_measured"]), _pct(r["quality_change"]),
            "*" if r["pareto"] else "", r.get("note") or ""])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i == 0 or i == len(head) - 1 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in [head] + body]
    return "\n".join(lines)


def write_report(out_dir, summary: dict, records: list[dict], *, header: dict) -> dict[str, Path]:
    """Writes report.md, pareto.png and exits.png into `out_dir` (created with its parents).

    `header` is what the runner knows about the run: {"model", "device", "energy_method", ...};
    every other key is listed under those. All three files are rendered before any is
    written, and each is written atomically. Returns {"report": path, "pareto": path, "exits": path}.
    """
    out = Path(out_dir)
    text = render_markdown(summary, header)
    pareto = pareto_png(summary)
    exits = exits_png(summary, records)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "report.md", "pareto": out / "pareto.png", "exits": out / "exits.png"}
    atomic_write_text(paths["report"], text)
    atomic_write_bytes(paths["pareto"], pareto)
    atomic_write_bytes(paths["exits"], exits)
    return paths
