"""Synthetic per-(sample, policy) records in the runner's shape, for the summary and report tests."""

from __future__ import annotations

NUM_LAYERS = 8


def record(sample, policy, family, setting, *, rouge_l, measured=1.0, modelled=1.0, seconds=0.1, exits=None,
           protocol="completion", batch_size=1, tokens=15, measured_method="counter", measured_reason=None,
           modelled_method="measured", codebleu=0.5, agreement=1.0):
    """One record; metric values other than rouge_l are fixed offsets of it so means are easy to check."""
    exits = [NUM_LAYERS - 1] * tokens if exits is None else exits
    return {
        "sample": sample, "protocol": protocol, "policy": policy, "family": family, "setting": setting,
        "batch_size": batch_size, "prediction": "x = 1", "target": "x = 2",
        "metrics": {"rouge_l": rouge_l, "rouge_l_default": rouge_l, "bleu": 100 * rouge_l, "chrf": 50.0,
                    "codebleu": codebleu, "exact_match": float(rouge_l == 1.0), "levenshtein": 1.0,
                    "edit_similarity": 80.0},
        "exit_layers": exits, "mean_exit_layer": sum(exits) / len(exits),
        "layers_computed": sum(e + 1 for e in exits) / len(exits), "tokens": tokens, "seconds": seconds,
        "energy": {"measured": {"joules": measured, "method": measured_method, "reason": measured_reason},
                   "modelled": {"joules": modelled, "method": modelled_method}},
        "agreement_with_full": agreement,
    }


def family_records(n=6, protocol="completion", measured_method="counter"):
    """Full, two fixed exits, one confidence setting and two learned thresholds over n samples.

    Per-sample values vary a little around each policy's level so intervals are not degenerate."""
    policies = [  # label, family, setting, rouge level, modelled J, measured J, exit layer
        ("full", "full", None, 0.60, 8.0, 10.0, 7),
        ("fixed:3", "fixed", 3, 0.30, 4.0, 5.0, 3),
        ("fixed:5", "fixed", 5, 0.50, 6.0, 7.5, 5),
        ("confidence:softmax_max@0.9", "confidence", "softmax_max@0.9", 0.55, 6.5, 8.0, 6),
        ("learned@0.6", "learned", 0.6, 0.40, 5.0, 6.0, 4),
        ("learned@0.9", "learned", 0.9, 0.58, 7.0, 9.0, 6),
    ]
    out = []
    for label, family, setting, level, modelled, measured, layer in policies:
        for s in range(n):
            wiggle = (s - (n - 1) / 2) * 0.01
            out.append(record(s, label, family, setting, rouge_l=level + wiggle, modelled=modelled + wiggle,
                              measured=measured + 2 * wiggle, seconds=0.1 + wiggle / 10,
                              exits=[layer] * 15, protocol=protocol, measured_method=measured_method))
    return out
