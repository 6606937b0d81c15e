"""`greencode certify` end to end on a small trained model: the losses it takes from one recording
equal those of generating every calibration sample at every tested threshold (a second code path),
the certified threshold is the one fixed-sequence testing gives on those losses, and bad input is
one line."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import greencode_jax as gc
from greencode_jax.cli.main import main
from greencode_jax.eval.certify import fixed_sequence
from greencode_jax.eval.certify_run import CertifySection, certify, changed_samples
from greencode_jax.config import EvalConfig
from greencode_jax.generate.policies import Learned

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import compile_cache, finished_tiny_run, stdlib_corpus  # noqa: E402,F401 (fixtures)

EVAL = EvalConfig(max_context=48, new_tokens=6)
THRESHOLDS = (1.0, 0.9, 0.7, 0.5, 0.3)


def test_changed_samples_by_hand():
    # 2 samples, 4 tokens, 2 decision exits
    decide = np.zeros((2, 4, 2), bool)
    agree = np.ones((2, 4, 2), bool)
    decide[0, 0, 0], agree[0, 0, 0] = True, False  # token 0 comes from the prompt pass: never a change
    decide[0, 2, 1], agree[0, 2, 1] = True, False  # a wrong exit, within the output
    decide[1, 3, 0], agree[1, 3, 0] = True, False  # a wrong exit after the full model stopped (length 3)
    decide[1, 1, :], agree[1, 1, 1] = True, False  # exits at its first choice (0), which agrees
    assert changed_samples(decide, agree, np.array([4, 3])).tolist() == [True, False]


@pytest.fixture(scope="module")
def setup(finished_tiny_run, stdlib_corpus, tmp_path_factory):
    checkpoint = finished_tiny_run / "final"
    model = gc.load_pretrained(checkpoint, scan_layers=False)
    actor = Learned.init_params(jax.random.key(3), model.config.hidden_size, (8,))
    policy = tmp_path_factory.mktemp("policy") / "p"
    from greencode_jax.convert.fingerprint import model_fingerprint

    Learned(actor, 0.5, exit_layers=model.config.exit_layers).save(
        policy, {"trained_on": {"model": {"fingerprint": model_fingerprint(model)}}})
    return checkpoint, stdlib_corpus, policy, model


def _generated_losses(model, prompts, policy, stops, full_tokens, loss):
    """Per sample: the textual loss of generating at `policy`, against Full()'s output (second path)."""
    from greencode_jax.generate import generate

    out = []
    for p, reference in zip(prompts, full_tokens):
        ids = np.asarray(p.ids)[None]
        tokens = generate(model, ids, max_new_tokens=EVAL.new_tokens, policy=policy, stop_tokens=stops)
        got = [int(t) for t in np.asarray(tokens.tokens)[0, :int(tokens.lengths[0])]]
        out.append(float(got != reference))
    return np.array(out)


def test_recorded_losses_equal_generating_every_sample(setup, tmp_path):
    checkpoint, corpus, policy_dir, model = setup
    section = CertifySection(loss="textual", delta=0.5, epsilon=0.2, thresholds=THRESHOLDS, batch_size=4)
    result = certify(checkpoint, corpus, tmp_path / "c.json", policy_dir=policy_dir, config=EVAL, section=section,
                     progress=False, log=lambda *_: None)
    assert json.loads((tmp_path / "c.json").read_text())["families"].keys() == {"learned", "confidence"}

    from greencode_jax.data import PreparedData
    from greencode_jax.eval.protocols import completion_protocol
    from greencode_jax.generate import Confidence, Full, generate

    data = PreparedData(corpus)
    cfg = dataclasses.replace(EVAL, split="dev", samples=0)
    protocol = completion_protocol(data, data.tokenizer(), model, cfg, 48)
    full = []
    for p in protocol.prompts:
        out = generate(model, np.asarray(p.ids)[None], max_new_tokens=EVAL.new_tokens, policy=Full(),
                       stop_tokens=protocol.stops)
        full.append([int(t) for t in np.asarray(out.tokens)[0, :int(out.lengths[0])]])
    learned = Learned.load(policy_dir, 0.5)
    for family, entry in result["families"].items():
        tested = [c for c in entry["candidates"] if c["p_value"] is not None]
        rows = []
        for candidate in tested:
            t = candidate["threshold"]
            policy = Confidence(t) if family == "confidence" else dataclasses.replace(learned, threshold=t)
            rows.append(_generated_losses(model, protocol.prompts, policy, protocol.stops, full, "textual"))
            assert candidate["risk"] == pytest.approx(rows[-1].mean()), (family, t)
        again = fixed_sequence([c["threshold"] for c in tested], np.stack(rows), entry["delta"], entry["epsilon"])
        assert again.certified == entry["certified"], family


def test_too_few_samples_and_bad_levels_are_one_line(setup, tmp_path, capsys):
    checkpoint, corpus, policy_dir, _ = setup
    args = ["certify", str(checkpoint), "--data", str(corpus), "--policy", str(policy_dir), "--out",
            str(tmp_path / "c.json"), "--no-progress"]
    assert main(args + ["certify.delta=0.001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration samples in the dev split cannot certify any threshold" in err[0]
    assert "needs at least 2302" in err[0]  # ln 0.1 / ln 0.999
    assert not (tmp_path / "c.json").exists()
    for bad in ("certify.delta=1.5", "certify.epsilon=0", "certify.delta=.nan"):
        assert main(args + [bad]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and "certify." in line, line
    assert main(["certify", str(checkpoint), "--data", str(corpus), "--out", str(tmp_path / "c.json")]) == 2
    assert "needs --policy" in capsys.readouterr().err
