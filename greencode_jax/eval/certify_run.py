"""`greencode certify`: the most aggressive exit threshold whose expected loss against the full
model is at most δ with probability at least 1 − ε (Learn-then-Test, eval/certify.py), for the
learned policy and for confidence exits alike.

On a calibration split disjoint from the test split (`dev` by default), each sample is GREEN-CODE's
completion prompt. The full model generates its 15 greedy tokens once, recording every exit's
prediction and the state the policies decide on (generate.record). A policy at threshold T
reproduces the full model's output exactly when, along that output, every token it would exit on
agrees with the last layer: which samples it changes is known for every T from that one recording.
Only those are generated again, at T, to score them. Per-sample losses in [0, 1]:

    risk      max(0, ROUGE-L(full output) − ROUGE-L(output at T)) against the reference;
              δ defaults to `delta_relative` (2 %) of the full model's mean ROUGE-L here
    textual   1 if the output at T differs from the full model's, else 0 (needs no reference)

Candidates are walked from the most conservative threshold; the last one whose Hoeffding–Bentkus
p-value is ≤ ε is certified. A decision whose probability lies within float rounding of T may
come out otherwise in generation than in the recording; that is the only approximation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import greencode_jax as gc
from greencode_jax.atomic import write_json_output
from greencode_jax.config import CertifySection, EvalConfig
from greencode_jax.convert.fingerprint import check_corpus_tokenizer
from greencode_jax.data import PreparedData
from greencode_jax.errors import GreencodeError
from greencode_jax.eval.certify import PVALUES, fixed_sequence, min_samples
from greencode_jax.eval.metrics import score
from greencode_jax.eval.protocols import completion_protocol
from greencode_jax.generate import generate
from greencode_jax.generate.policies import Confidence, Learned
from greencode_jax.generate.record import record_jit
from greencode_jax.ownership import check_output_file
from greencode_jax.yamlfile import read_json_mapping

def _decide(family: str, threshold: float, scores):
    """[n, tokens, exits] bool: whether the policy at `threshold` exits at each decision exit, from
    its scores there (the Learned actor's P(exit), or the exit head's top probability), decided as
    generation decides (Learned: P > T; Confidence: max >= T)."""
    return scores >= threshold if family == "confidence" else scores > threshold


def exit_probabilities(policy, hidden) -> np.ndarray:
    """P(exit) [n, tokens, exits] of a Learned policy on recorded states [n, tokens, exits, E], by
    the policy's own `exit_probability` (what generation computes)."""
    fn = jax.jit(policy.exit_probability)
    flat = hidden.reshape(-1, hidden.shape[-1])
    parts = [np.asarray(fn(jnp.asarray(flat[i:i + 8192]))) for i in range(0, len(flat), 8192)]
    return np.concatenate(parts).reshape(hidden.shape[:-1])


def changed_samples(decide, agree, lengths) -> np.ndarray:
    """[n] bool: the policy changes the output of sample i when, at some token it decides on
    (token 0 comes from the prompt's full-depth pass) before the full model stops, its first
    exit's prediction differs from the last layer's."""
    n, tokens, exits = decide.shape
    chosen = decide.any(-1)
    first = np.argmax(decide, -1)
    agrees = np.take_along_axis(agree, first[..., None], -1)[..., 0]
    wrong = chosen & ~agrees
    wrong[:, 0] = False
    within = np.arange(tokens)[None, :] < lengths[:, None]
    return (wrong & within).any(-1)


def certify(checkpoint, data_dir, out_file, *, policy_dir=None, config: EvalConfig | None = None,
            section: CertifySection | None = None, progress: bool = True, log=print) -> dict:
    """Certifies each family's threshold on the calibration split; writes `out_file` (JSON)."""

    section = section or CertifySection()
    cfg = dataclasses.replace(config or EvalConfig(), split=section.split, samples=section.samples)
    inputs = {"checkpoint": checkpoint, "data": data_dir, "policy": policy_dir}
    check_output_file(out_file, "certification", inputs=inputs)
    if "learned" in section.families and policy_dir is None:
        raise GreencodeError("certify: the learned family needs --policy DIR (or certify.families: [confidence])")
    data = PreparedData(data_dir)
    tokenizer = data.tokenizer()
    model = gc.load_pretrained(checkpoint, scan_layers=False)
    check_corpus_tokenizer(data, checkpoint, model, "checkpoint")
    learned = Learned.load(policy_dir, 1.0, model=model) if policy_dir is not None else None
    max_context = min(cfg.max_context, model.config.max_position_embeddings)
    protocol = completion_protocol(data, tokenizer, model, cfg, max_context)
    prompts = protocol.prompts
    if section.delta:  # a relative delta is known only once the full model's ROUGE-L is
        needed = min_samples(section.delta, section.epsilon, section.bound)
        if len(prompts) < needed:
            raise GreencodeError(f"{len(prompts)} calibration samples in the {section.split} split cannot certify any "
                                 f"threshold at delta={section.delta:g}, epsilon={section.epsilon:g}: the "
                                 f"{section.bound.replace('_', '-')} bound needs at least {needed} (a larger "
                                 "calibration split, or a larger delta)")
    log(f"certify: {len(prompts)} samples of the {section.split} split, families {list(section.families)}, "
        f"{section.loss} loss, epsilon {section.epsilon:g}")
    recording = _record(model, prompts, cfg.new_tokens, section.batch_size, need_hidden=learned is not None,
                        pad_id=tokenizer.pad_id, progress=progress)
    stops = set(protocol.stops)
    lengths = np.array([_length(row, stops) for row in recording["tokens"]])
    full_texts = [tokenizer.decode(_text_ids(row[:k], stops)) for row, k in zip(recording["tokens"], lengths)]
    full_rouge = np.array([score(text, p.target, data.lang)["rouge_l"] for text, p in zip(full_texts, prompts)])
    delta = section.delta or section.delta_relative * float(full_rouge.mean())
    result = {"split": section.split, "n": len(prompts), "loss": section.loss, "delta": delta,
              "delta_rule": "given" if section.delta else f"{section.delta_relative:g} x the full model's mean "
                                                            f"ROUGE-L ({full_rouge.mean():.4f})",
              "epsilon": section.epsilon, "bound": section.bound, "full_rouge_l": float(full_rouge.mean()),
              "checkpoint": str(checkpoint), "policy": None if policy_dir is None else str(policy_dir),
              "families": {}}
    for family in section.families:
        scores = (exit_probabilities(learned, recording["hidden"]) if family == "learned"
                  else recording["confidence"])

        def losses_at(threshold):
            decide = _decide(family, threshold, scores)
            changed = changed_samples(decide, recording["agree"], lengths)
            loss = np.zeros(len(prompts))
            if section.loss == "textual":
                return changed.astype(float), changed
            if changed.any():
                texts = _generate_texts(model, [prompts[i] for i in np.flatnonzero(changed)], family, threshold,
                                        learned, protocol, section.batch_size, tokenizer)
                rouge = np.array([score(text, prompts[i].target, data.lang)["rouge_l"]
                                  for text, i in zip(texts, np.flatnonzero(changed))])
                loss[changed] = np.maximum(0.0, full_rouge[changed] - rouge)
            return loss, changed

        certification, detail = _walk(section, delta, losses_at)
        result["families"][family] = {**certification.to_dict(), "changed_fraction": detail}
        chosen = certification.certified
        log(f"  {family}: certified threshold {chosen if chosen is not None else 'none (never exit)'} "
            f"(delta {delta:.4g}, epsilon {section.epsilon:g}, n {len(prompts)})")
    write_json_output(out_file, result, "certification", inputs=inputs)
    return result


def _walk(section: CertifySection, delta: float, losses_at):
    """Fixed-sequence testing, computing each candidate's losses only when it is reached."""
    thresholds, rows, changed = list(section.thresholds), [], []
    n_needed = min_samples(delta, section.epsilon, section.bound)
    for threshold in thresholds:
        loss, moved = losses_at(threshold)
        if len(loss) < n_needed:
            break  # fixed_sequence names the n needed
        rows.append(loss)
        changed.append(float(moved.mean()))
        if PVALUES[section.bound](float(loss.mean()), len(loss), delta) > section.epsilon:
            break
    tested = thresholds[:max(len(rows), 1)]
    if not rows:
        rows = [losses_at(thresholds[0])[0]]
    return fixed_sequence(tested, np.stack(rows), delta, section.epsilon, section.bound), changed


def _length(row, stops) -> int:
    """Tokens up to and including the first stop token (all when there is none)."""
    for i, token in enumerate(row):
        if int(token) in stops:
            return i + 1
    return len(row)


def _text_ids(ids, stops):
    ids = [int(t) for t in ids]
    return ids[:-1] if ids and ids[-1] in stops else ids


def _batches(prompts, size, pad_id, bucket=64):
    for start in range(0, len(prompts), size):
        batch = prompts[start:start + size]
        rows = batch + [batch[0]] * (size - len(batch))
        width = -(-max(len(p.ids) for p in rows) // bucket) * bucket
        ids = np.full((size, width), pad_id, np.int32)
        valid = np.zeros((size, width), bool)
        for i, p in enumerate(rows):
            ids[i, width - len(p.ids):], valid[i, width - len(p.ids):] = p.ids, True
        yield batch, ids, valid


def _record(model, prompts, new_tokens, batch_size, need_hidden, pad_id, progress):
    parts = {"tokens": [], "agree": [], "confidence": [], "hidden": []}
    pad = int(pad_id) if pad_id is not None else 0
    with tqdm(total=len(prompts), unit="sample", desc="recording", disable=not progress, dynamic_ncols=True) as bar:
        for batch, ids, valid in _batches(prompts, batch_size, pad):
            rec = record_jit(model, jnp.asarray(ids), jnp.asarray(valid), new_tokens=new_tokens)
            n = len(batch)
            parts["tokens"].append(np.asarray(rec.tokens)[:n])
            parts["agree"].append(np.asarray(rec.agree)[:n])
            parts["confidence"].append(np.asarray(rec.confidence)[:n])
            if need_hidden:
                parts["hidden"].append(np.asarray(rec.hidden, np.float32)[:n])
            bar.update(n)
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def _generate_texts(model, prompts, family, threshold, learned, protocol, batch_size, tokenizer) -> list[str]:
    policy = Confidence(threshold) if family == "confidence" else dataclasses.replace(learned, threshold=threshold)
    pad = int(tokenizer.pad_id) if tokenizer.pad_id is not None else 0
    texts = []
    for batch, ids, valid in _batches(prompts, batch_size, pad):
        out = generate(model, ids, valid, max_new_tokens=protocol.new_tokens, policy=policy,
                       stop_tokens=protocol.stops)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for i in range(len(batch)):
            texts.append(tokenizer.decode(_text_ids(tokens[i, :int(lengths[i])], set(protocol.stops))))
    return texts


def load_certification(path) -> dict:
    """The JSON `certify` wrote, checked to be one."""
    data = read_json_mapping(path, "certification", "write one with `greencode certify`")
    if not isinstance(data.get("families"), dict):
        raise GreencodeError(f"{path}: not a certification (expected the JSON `greencode certify` writes)")
    return data
