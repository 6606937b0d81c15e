"""summary.json: per protocol and policy, every metric's mean with a 95 % bootstrap interval,
the two energy figures apart, energy saved and quality change against `Full()`, and the Pareto front.

A record is one (sample, policy) result as the runner writes it to samples.jsonl:

    {"sample": int, "protocol": "completion" | "line", "policy": "learned@0.9",
     "family": "base" | "full" | "fixed" | "confidence" | "learned", "setting": str | float | None,
     "batch_size": int, "prediction": str, "target": str, "metrics": {name: float | None},
     "exit_layers": [int, ...], "mean_exit_layer": float, "layers_computed": float,
     "tokens": int, "seconds": float,
     "energy": {"measured": {"joules": float | None, "method": str, "reason": str | None},
                "modelled": {"joules": float | None, "method": str}},
     "agreement_with_full": float | None}

Rules the summary keeps:

* Measured and modelled joules are never added, averaged or compared with each other: each
  has its own mean, interval, method label and "saved" figure. A missing figure is None with
  its reason, never 0. A policy whose samples carry two different measurement methods gets
  its mean with both labels named (`"counter+estimated"`), never silently one of them.
* "Saved" and the quality change compare with the row of family "full" of the same protocol
  and batch size: saved = 100 * (1 - J_policy / J_full) per figure, and quality change =
  100 * (ROUGE-L_policy / ROUGE-L_full - 1), ROUGE-L being our whitespace-token variant.
* The Pareto front is drawn per protocol over (cost, ROUGE-L), the cost being modelled joules
  when every policy of the protocol has them, else measured joules when every policy has
  them, else seconds per sample; `"pareto_cost"` says which. One figure for every row: the
  front never compares a modelled row with a measured one.
* A policy label seen at several batch sizes in one protocol is keyed `"label (batch B)"`
  for each of them (`policy_key`); otherwise the key is the label itself.
"""

from __future__ import annotations

import math
from collections import defaultdict

from greencode_jax.eval.metrics import METRICS, SCALES, codebleu_status, corpus_scores
from greencode_jax.eval.stats import bootstrap_ci, pareto_front

FAMILIES = ("base", "full", "fixed", "confidence", "learned")  # the order of the rows of a batch size
CONFIDENCE = 0.95
RESAMPLES = 2000


def _interval(values) -> dict | None:
    mean, low, high = bootstrap_ci(values, confidence=CONFIDENCE, resamples=RESAMPLES, seed=0)
    if math.isnan(mean):
        return None
    return {"mean": mean, "low": low, "high": high}


def ordered_keys(policies: dict) -> list[str]:
    """Keys by batch size, then family (base, full, fixed, confidence, learned), then as given."""
    keys = list(policies)
    rank = {f: i for i, f in enumerate(FAMILIES)}
    return sorted(keys, key=lambda k: (policies[k]["batch_size"], rank.get(policies[k]["family"], len(FAMILIES)),
                                       keys.index(k)))


def policy_keys(records: list[dict]) -> list[str]:
    """The summary key of each record: its policy label, or `"label (batch B)"` where the same
    label occurs at several batch sizes in the record's protocol."""
    sizes = defaultdict(set)
    for r in records:
        sizes[(r["protocol"], r["policy"])].add(int(r["batch_size"]))
    return [r["policy"] if len(sizes[(r["protocol"], r["policy"])]) == 1 else f"{r['policy']} (batch {r['batch_size']})"
            for r in records]


def _energy(rows: list[dict], figure: str) -> dict:
    """One figure's summary over one policy's records: never mixed with the other figure."""
    entries = [(r.get("energy") or {}).get(figure) or {"joules": None, "reason": f"no {figure} figure recorded"}
               for r in rows]
    values = [e.get("joules") for e in entries]
    present = [v for v in values if v is not None]
    methods = sorted({e.get("method") or "unknown" for e, v in zip(entries, values) if v is not None})
    if not present:
        reasons = [e.get("reason") or f"method {e.get('method') or 'unknown'}: no joules" for e in entries]
        return {"mean": None, "reason": "; ".join(dict.fromkeys(reasons)) if reasons else "no samples"}
    out = _interval(present)
    out["method"] = "+".join(methods)
    out["n"] = len(present)
    missing = len(values) - len(present)
    if missing:
        reasons = [e.get("reason") or "no joules" for e, v in zip(entries, values) if v is None]
        out["missing"] = missing
        out["reason"] = f"{missing} of {len(values)} samples without a figure: " + "; ".join(dict.fromkeys(reasons))
    return out


def _policy(rows: list[dict]) -> dict:
    first = rows[0]
    for field in ("family", "setting", "batch_size"):
        values = {repr(r.get(field)) for r in rows}
        if len(values) > 1:
            raise ValueError(f"policy {first['policy']!r} in protocol {first['protocol']!r}: records disagree on "
                             f"{field} ({', '.join(sorted(values))})")
    seconds = [r["seconds"] for r in rows]
    tokens = sum(int(r["tokens"]) for r in rows)
    total_seconds = sum(float(s) for s in seconds)
    return {
        "label": first["policy"],
        "family": first["family"],
        "setting": first.get("setting"),
        "batch_size": int(first["batch_size"]),
        "n": len(rows),
        "metrics": {name: _interval(r["metrics"].get(name) for r in rows) for name in METRICS},
        "seconds": _interval(seconds),
        "tokens_per_s": tokens / total_seconds if total_seconds > 0 else None,  # all tokens over all seconds
        "mean_exit_layer": _interval(r["mean_exit_layer"] for r in rows),
        "layers_computed": _interval(r["layers_computed"] for r in rows),
        "agreement_with_full": _interval(r.get("agreement_with_full") for r in rows),
        "energy": {"measured": _energy(rows, "measured"), "modelled": _energy(rows, "modelled")},
    }


def _mean(entry: dict | None) -> float | None:
    return None if entry is None else entry.get("mean")


def _saved(policy: float | None, full: float | None) -> float | None:
    if policy is None or full is None or full <= 0:
        return None
    return 100.0 * (1.0 - policy / full)


def _compare(policies: dict) -> None:
    """Adds saved_vs_full and quality_change_vs_full to every policy, in place."""
    fulls = {}
    for key, p in policies.items():
        if p["family"] == "full":
            fulls.setdefault(p["batch_size"], p)  # the first full row of each batch size is the reference
    for key, p in policies.items():
        full = fulls.get(p["batch_size"])
        if full is None:
            p["saved_vs_full"] = {"measured": None, "modelled": None}
            p["quality_change_vs_full"] = None
            continue
        p["full_reference"] = full["label"]
        p["saved_vs_full"] = {figure: _saved(_mean(p["energy"][figure]), _mean(full["energy"][figure]))
                              for figure in ("measured", "modelled")}
        ours, theirs = _mean(p["metrics"]["rouge_l"]), _mean(full["metrics"]["rouge_l"])
        p["quality_change_vs_full"] = (None if ours is None or not theirs else 100.0 * (ours / theirs - 1.0))


def _pareto(policies: dict) -> str | None:
    """Marks the Pareto-optimal policies in place; returns the cost figure used."""
    rows = list(policies.values())
    for figure in ("modelled", "measured"):
        costs = [_mean(p["energy"][figure]) for p in rows]
        if rows and all(c is not None for c in costs):
            cost_name = figure
            break
    else:
        costs = [_mean(p["seconds"]) for p in rows]
        cost_name = "seconds" if rows and all(c is not None for c in costs) else None
    if cost_name is None:
        for p in rows:
            p["pareto"] = False
        return None
    flags = pareto_front(costs, [_mean(p["metrics"]["rouge_l"]) for p in rows])
    for p, flag in zip(rows, flags):
        p["pareto"] = bool(flag)
    return cost_name


def summarize(records: list[dict], *, lang: str | None = None) -> dict:
    """summary.json's content from per-(sample, policy) records (shape: module docstring).

    Output: {"confidence": 0.95, "resamples": 2000, "scales": {metric: scale},
    "protocols": {protocol: {"pareto_cost": "modelled" | "measured" | "seconds" | None,
    "policies": {key: {"label", "family", "setting", "batch_size", "n",
    "metrics": {name: {"mean", "low", "high"} or None}, "seconds", "tokens_per_s",
    "mean_exit_layer", "layers_computed", "agreement_with_full",
    "energy": {"measured": ..., "modelled": ...}, "saved_vs_full": {"measured", "modelled"},
    "quality_change_vs_full", "pareto", ["full_reference"], ["corpus"]}}}}}.

    A metric with no value in any record (CodeBLEU where codebleu is unavailable) is None,
    and `"unavailable"` at the top says why. With `lang`, each policy also gets `"corpus"`:
    corpus-level BLEU, chrF and CodeBLEU as GREEN-CODE aggregated them (`metrics.corpus_scores`).
    Policies keep the order in which their first record appears.
    """
    grouped: dict[str, dict[str, list]] = {}
    for key, r in zip(policy_keys(records), records):
        grouped.setdefault(r["protocol"], {}).setdefault(key, []).append(r)
    protocols = {}
    for protocol, by_policy in grouped.items():
        policies = {key: _policy(rows) for key, rows in by_policy.items()}
        if lang is not None:
            for key, rows in by_policy.items():
                policies[key]["corpus"] = corpus_scores([r["prediction"] for r in rows],
                                                        [r["target"] for r in rows], lang)
        _compare(policies)
        cost = _pareto(policies)
        protocols[protocol] = {"pareto_cost": cost, "policies": policies}
    out = {"confidence": CONFIDENCE, "resamples": RESAMPLES, "scales": dict(SCALES), "protocols": protocols}
    unavailable = {}
    for name in METRICS:
        if records and all(p["metrics"][name] is None for proto in protocols.values()
                           for p in proto["policies"].values()):
            unavailable[name] = _why_unavailable(name, lang)
    if unavailable:
        out["unavailable"] = unavailable
    return out


def _why_unavailable(name: str, lang: str | None) -> str:
    if name == "codebleu":
        available, reason = codebleu_status(lang)
        if not available:
            return f"no sample has a CodeBLEU value: {reason}"
    return f"no sample has a {name} value"
