"""The policy SPEC parser and the `eval` config section (pure: no model, no JAX compile)."""

from __future__ import annotations

import pytest

from greencode_jax.errors import GreencodeError
from greencode_jax.config import EvalConfig
from greencode_jax.eval.spec import parse_spec, policy_choices

EXITS = (1, 3, 5, 7)  # a model with 8 layers: exits after 1, 3, 5 and the last


def labels(spec, **kw):
    kw.setdefault("have_base", True)
    kw.setdefault("have_policy", True)
    return [c.label for c in policy_choices(spec, EXITS, **kw)]


def test_the_issue_example_gives_each_policy_and_full_first():
    choices = policy_choices("full; fixed:3,5; confidence:softmax_max@0.8,0.9; learned@0.6,0.9", EXITS,
                             have_base=False, have_policy=True)
    assert [c.label for c in choices] == ["full", "fixed:3", "fixed:5", "confidence:softmax_max@0.8",
                                          "confidence:softmax_max@0.9", "learned@0.6", "learned@0.9"]
    assert [(c.family, c.setting) for c in choices] == [
        ("full", None), ("fixed", 3), ("fixed", 5), ("confidence", "softmax_max@0.8"),
        ("confidence", "softmax_max@0.9"), ("learned", 0.6), ("learned", 0.9)]
    policies = [c.build(learned=None) for c in choices[:5]]
    assert type(policies[0]).__name__ == "Full" and policies[2].layer == 5
    assert policies[4].measure == "softmax_max" and policies[4].threshold == 0.9


def test_full_is_always_evaluated_first_even_when_not_named():
    assert labels("learned@0.9; fixed:1") == ["full", "learned@0.9", "fixed:1"]
    assert labels("fixed:1; full; fixed:1") == ["full", "fixed:1"]  # duplicates dropped


def test_bare_families_expand_to_their_grids():
    assert labels("fixed") == ["full", "fixed:1", "fixed:3", "fixed:5"]  # the last layer is Full()
    assert labels("confidence", have_policy=False) == ["full"] + [
        f"confidence:{m}@{t}" for m in ("softmax_max", "top2_margin") for t in (0.5, 0.7, 0.8, 0.9, 0.95)]
    assert labels("confidence:top2_margin") == ["full"] + [f"confidence:top2_margin@{t}"
                                                            for t in (0.5, 0.7, 0.8, 0.9, 0.95)]
    assert labels("confidence@0.9") == ["full", "confidence:softmax_max@0.9", "confidence:top2_margin@0.9"]
    # learned alone: its grid and 1.0, which P(exit) > T never reaches (the actor's own cost)
    assert labels("learned") == ["full"] + [f"learned@{t}" for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)]
    assert labels("learned", learned_grid=(0.3,)) == ["full", "learned@0.3", "learned@1.0"]


def test_the_default_set_follows_what_is_given():
    everything = labels(None)
    assert everything[:2] == ["full", "base"] and "fixed:5" in everything and "learned@1.0" in everything
    assert "confidence:top2_margin@0.95" in everything
    alone = labels("", have_base=False, have_policy=False)
    assert "base" not in alone and not any(label.startswith("learned") for label in alone)
    assert len(alone) == 1 + 3 + 10


@pytest.mark.parametrize("spec, match", [
    ("full; greedy", "unknown policy family 'greedy'"),
    ("fixed:3,x", "layers '3,x'"),
    ("fixed:2", r"layer 2 is not one of the model's exit layers \[1, 3, 5, 7\]"),
    ("confidence:entropy@0.9", "unknown confidence measure 'entropy'"),
    ("learned@1.5", "threshold 1.5 is outside 0..1"),
    ("learned@high", "threshold 'high' is not a number"),
    ("learned@", "no threshold after '@'"),
    ("full@0.9", "full takes no '@' thresholds"),
    ("fixed@0.9", "fixed takes no '@' thresholds"),
    ("learned:3", "learned takes no ':' arguments"),
    (" ; ", "names no policy"),
])
def test_bad_specs_raise_one_error_naming_the_item(spec, match):
    with pytest.raises(GreencodeError, match=match):
        labels(spec)


def test_base_and_learned_need_their_inputs():
    with pytest.raises(GreencodeError, match="no base model; pass --base"):
        labels("base", have_base=False)
    with pytest.raises(GreencodeError, match="no learned policy; pass --policy"):
        labels("learned@0.9", have_policy=False)


def test_parse_keeps_what_was_written():
    items = parse_spec(" Fixed : 3 , 5 ; confidence:top2_margin,softmax_max@0.5 ")
    assert items[0].family == "fixed" and items[0].args == (3, 5)
    assert items[1].args == ("top2_margin", "softmax_max") and items[1].thresholds == (0.5,)


def test_one_eval_section_serves_finetune_and_evaluate():
    from greencode_jax.config import EvalSection, build_section as typed_section

    section = {"split": "dev", "batches": 4, "every": 100, "samples": 50, "batch_size": [1, 8],
               "policies": "full; learned@0.9", "protocols": ["completion"], "context_fraction": "2e-1"}
    ours = EvalConfig.from_dict(section)
    assert ours.samples == 50 and ours.batch_size == (1, 8) and ours.split == "dev"
    assert ours.protocols == ("completion",) and ours.context_fraction == 0.2
    theirs = typed_section(EvalSection, section, "eval", "config")  # one class: fine-tuning reads its fields of it
    assert (theirs.split, theirs.batches, theirs.every) == ("dev", 4, 100)


@pytest.mark.parametrize("values, match", [
    ({"sampels": 5}, r"unknown field 'eval.sampels' \(did you mean 'samples'\?\)"),
    ({"batch_size": 0}, "eval.batch_size"),
    ({"protocols": ["token"]}, "eval.protocols"),
    ({"context_fraction": 1.5}, "eval.context_fraction"),
    ({"thresholds": [0.5, 2]}, "eval.thresholds"),
    ({"max_context": 10}, "eval.max_context"),
])
def test_bad_eval_fields_are_named(values, match):
    with pytest.raises(GreencodeError, match=match):
        EvalConfig.from_dict(values, source="run.yaml")
