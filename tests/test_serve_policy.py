"""A request's `policy` and `threshold` -> the policy it runs, the serve config section, and
the FIM check: no model, no server."""

from __future__ import annotations

import json

import pytest

import greencode_jax as gc
from greencode_jax.config import load_config
from greencode_jax.data.tokenizer import train_bpe
from greencode_jax.errors import GreencodeError
from greencode_jax.serve.loading import Served, fim_tokens
from greencode_jax.serve.policy import NEVER, PolicyResolver, certified_thresholds, find_certification

P = gc.policies
EXITS = (1, 3, 5, 7)
LEARNED = P.Learned({"obs_mean": [0.0], "obs_std": [1.0], "layers": []}, 0.5)


def test_specs_and_thresholds_resolve_in_order():
    resolver = PolicyResolver(EXITS, LEARNED, {"learned": 0.8, "confidence": NEVER["confidence"]}, "learned")
    assert resolver.resolve(None, None)[0] == P.Learned(LEARNED.params, 0.8)  # the default: certified
    assert resolver.resolve(None, 0.3)[0].threshold == 0.3  # the request's threshold wins
    assert resolver.resolve("learned@0.6", 0.3)[0].threshold == 0.6  # the spec's own @T wins over it
    assert resolver.resolve("fixed:3", 0.3)[:2] == (P.FixedExit(3), "fixed")
    assert resolver.resolve("full", None)[:2] == (P.Full(), "full")
    confidence, family, label = resolver.resolve("confidence", None)  # certified: none, so it never exits
    assert family == "confidence" and confidence.threshold == float("inf") and confidence.measure == "softmax_max"
    assert resolver.resolve("confidence:top2_margin", 0.2)[2] == "confidence:top2_margin@0.2"
    with_default = PolicyResolver(EXITS, LEARNED, {"learned": 0.8}, "learned", default_threshold=0.7)
    assert with_default.resolve(None, None)[0].threshold == 0.7  # serve.threshold before the certified one
    assert PolicyResolver(EXITS).resolve("confidence", None)[0].threshold == 0.9


@pytest.mark.parametrize("spec, message", [
    ("greedy", "unknown policy family"), ("full; fixed:3", "name one policy"), ("fixed", "name one exit layer"),
    ("fixed:2", "not one of the model's exit layers"), ("fixed:1,3", "name one exit layer"),
    ("learned", "no learned policy"), ("confidence@0.5,0.6", "give one threshold"), ("base", "no base model"),
])
def test_bad_specs_are_one_clear_error(spec, message):
    with pytest.raises(GreencodeError, match=message):
        PolicyResolver(EXITS).resolve(spec, None)


def test_certification_is_found_in_or_next_to_the_policy(tmp_path):
    policy = tmp_path / "policy"
    policy.mkdir()
    assert find_certification(policy) is None
    (tmp_path / "certify.json").write_text(json.dumps({"families": {"learned": {"certified": None},
                                                                    "confidence": {"certified": 0.85}}}))
    found = find_certification(policy)
    assert found == tmp_path / "certify.json"
    assert certified_thresholds(found) == {"learned": NEVER["learned"], "confidence": 0.85}


def test_serve_section_through_the_one_loader(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("serve:\n  slots: 4\n  policy: confidence\n")
    config = load_config(path, ["serve.port=0", "serve.threshold=0.7"])
    assert (config.serve.slots, config.serve.port, config.serve.policy, config.serve.threshold) == (4, 0, "confidence",
                                                                                                   0.7)
    for override, message in (("serve.slots=0", "positive"), ("serve.threshold=1.5", r"\[0, 1\]"),
                              ("serve.sloths=2", "unknown field")):
        with pytest.raises(GreencodeError, match=message):
            load_config(path, [override])


def test_a_tokenizer_without_fim_tokens_refuses_suffix():
    with_fim = train_bpe(["def f(x):\n    return x\n"] * 4, 270, ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
    without = train_bpe(["def f(x):\n    return x\n"] * 4, 270)
    assert fim_tokens(with_fim) == ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    assert fim_tokens(without) is None
    served = Served("m", None, without, PolicyResolver(EXITS))
    with pytest.raises(GreencodeError, match="no fill-in-the-middle tokens"):
        served.fim_prompt("a", "b")
    prompt = Served("m", None, with_fim, PolicyResolver(EXITS), fim=fim_tokens(with_fim)).fim_prompt("a", "b")
    assert prompt == "<fim_prefix>a<fim_suffix>b<fim_middle>"
    ids = with_fim.encode(prompt)
    assert with_fim._backend.token_to_id("<fim_middle>") == ids[-1]  # one whole token, not split
