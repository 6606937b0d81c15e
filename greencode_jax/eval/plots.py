"""The report's plots, rendered to PNG bytes: pareto.png (energy vs ROUGE-L, the Pareto front) and
exits.png (the exit-layer histograms). They use matplotlib's Agg canvas directly (no pyplot, no
global backend switch); eval/report.py writes them.
"""

from __future__ import annotations

import io
from collections import Counter

from greencode_jax.eval.summary import FAMILIES, ordered_keys, policy_keys

FAMILY_COLOURS = {"base": "tab:gray", "full": "black", "fixed": "tab:blue", "confidence": "tab:orange",
                  "learned": "tab:green"}


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _label(p: dict) -> str:
    """A point's label on the Pareto plot: the threshold or layer that tells a family's points apart."""
    setting = p.get("setting")
    if setting is None:
        return p["label"]
    if p["family"] == "fixed":
        return f"layer {setting}"
    if p["family"] == "learned" and isinstance(setting, (int, float)):
        return f"T={setting:g}"
    return f"{setting:g}" if isinstance(setting, float) else str(setting)


def pareto_png(summary: dict) -> bytes:
    """Energy (the protocol's Pareto cost) vs ROUGE-L, one panel per protocol, one colour per
    family, each point labelled with its setting (threshold, layer), the front as a step line."""
    protocols = list(summary["protocols"].items())
    fig = new_figure(6.5 * max(1, len(protocols)), 5.0)
    if not protocols:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no records", ha="center", va="center")
        return figure_png(fig)
    for index, (protocol, proto) in enumerate(protocols, start=1):
        ax = fig.add_subplot(1, len(protocols), index)
        cost = proto.get("pareto_cost")
        field = {"modelled": ("energy", "modelled"), "measured": ("energy", "measured"), "seconds": ("seconds",)}
        xlabel = {"modelled": "modelled J per sample", "measured": "measured J per sample",
                  "seconds": "seconds per sample (no energy figure for every policy)"}.get(cost, "no cost figure")

        def cost_of(p):
            if cost is None:
                return None
            entry = p
            for part in field[cost]:
                entry = entry[part]
            return entry if entry and entry.get("mean") is not None else None

        points = []
        for key, p in proto["policies"].items():
            x, y = cost_of(p), p["metrics"]["rouge_l"]
            if x is None or y is None:
                continue
            points.append((key, p, x, y))
        for family in FAMILIES + tuple(sorted({p["family"] for _, p, _, _ in points} - set(FAMILIES))):
            mine = [(k, p, x, y) for k, p, x, y in points if p["family"] == family]
            if not mine:
                continue
            xs = [x["mean"] for _, _, x, _ in mine]
            ys = [y["mean"] for _, _, _, y in mine]
            xerr = [[x["mean"] - x["low"] for _, _, x, _ in mine], [x["high"] - x["mean"] for _, _, x, _ in mine]]
            yerr = [[y["mean"] - y["low"] for _, _, _, y in mine], [y["high"] - y["mean"] for _, _, _, y in mine]]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o", color=FAMILY_COLOURS.get(family, "tab:purple"),
                        label=family, capsize=2, markersize=5, linewidth=0.8)
            for (k, p, x, y) in mine:
                # labels only where they say something: the front, the certified rows, Full() and the base;
                # a dozen labelled points overlap into one block (the table names every row)
                certified = str(p.get("setting", "")).startswith("certified")
                if certified:
                    ax.scatter([x["mean"]], [y["mean"]], marker="*", s=160, color=FAMILY_COLOURS.get(family, "k"),
                               edgecolors="black", linewidths=0.8, zorder=3)
                if p.get("pareto") or certified or family in ("full", "base"):
                    ax.annotate(k if certified or family in ("full", "base") else _label(p), (x["mean"], y["mean"]),
                                textcoords="offset points", xytext=(5, 5), fontsize=7,
                                fontweight="bold" if certified else "normal")
        front = sorted((x["mean"], y["mean"]) for k, p, x, y in points if p.get("pareto"))
        if front:
            ax.step([f[0] for f in front], [f[1] for f in front], where="post", color="tab:red", linewidth=1.2,
                    alpha=0.8, label="Pareto front", zorder=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ROUGE-L (whitespace tokens)")
        ax.set_title(protocol)
        ax.grid(True, alpha=0.3)
        if points:
            ax.legend(fontsize=8, title="labelled: the front, certified (*), full, base", title_fontsize=7)
        else:
            ax.text(0.5, 0.5, "no policy has both a cost and ROUGE-L", ha="center", va="center",
                    transform=ax.transAxes)
    fig.tight_layout()
    return figure_png(fig)


def exits_png(summary: dict, records: list[dict]) -> bytes:
    """Exit-layer histograms: one row per policy, one column per protocol, the share of
    generated tokens that exited at each decoder layer (0-based)."""
    keys = policy_keys(records)
    counts: dict[tuple[str, str], Counter] = {}
    for key, r in zip(keys, records):
        counts.setdefault((r["protocol"], key), Counter()).update(int(layer) for layer in r.get("exit_layers", ()))
    protocols = list(summary["protocols"]) or sorted({p for p, _ in counts})
    rows = list(dict.fromkeys(k for proto in protocols for k in ordered_keys(summary["protocols"][proto]["policies"])))
    if not rows:
        fig = new_figure(6.0, 3.0)
        fig.add_subplot(1, 1, 1).text(0.5, 0.5, "no records", ha="center", va="center")
        return figure_png(fig)
    top = max((layer for c in counts.values() for layer in c), default=0)
    fig = new_figure(4.5 * len(protocols), max(2.5, 1.3 * len(rows)))
    axes = fig.subplots(len(rows), len(protocols), squeeze=False, sharex=True)
    for i, key in enumerate(rows):
        for j, protocol in enumerate(protocols):
            ax = axes[i][j]
            c = counts.get((protocol, key), Counter())
            total = sum(c.values())
            policy = summary["protocols"][protocol]["policies"].get(key)
            colour = FAMILY_COLOURS.get(policy["family"], "tab:purple") if policy else "tab:gray"
            if total:
                layers = list(range(top + 1))
                ax.bar(layers, [c[layer] / total for layer in layers], color=colour, width=0.8)
            else:
                ax.text(0.5, 0.5, "no tokens", ha="center", va="center", transform=ax.transAxes, fontsize=7)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=7)
            ax.set_title(f"{protocol}: {key}", fontsize=8)
            if j == 0:
                ax.set_ylabel("share", fontsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("exit layer (0-based)", fontsize=7)
    fig.tight_layout()
    return figure_png(fig)
