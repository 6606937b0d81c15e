"""Evaluation samples: the GREEN-CODE completion protocol and CodeXGLUE line-level completion.

GREEN-CODE (its `Evaluator`): a test file's model ids (BOS included, as its tokenizer call
adds it; no EOS), context = the first int(n · fraction) ids (default fraction 0.2),
target = the next `new_tokens` ids (default 15; fewer when the file ends sooner). A
context longer than the model allows is capped so that context plus target fit in
`max_context` (GREEN-CODE caps at max_context − 1 − new_tokens only once the fraction
exceeds max_context, which can overflow the window just below it). Files whose context
or target would be empty are skipped, as there.

CodeXGLUE line-level: a file's CodeXGLUE tokens are cut at a random token (seeded); the
input is everything before the cut, the ground truth `gt` runs from the cut
* Python: up to the first `<EOL>` (excluded);
* Java: up to the first `;` or `}` (included) or `{` (excluded);
and never past `</s>`. Cuts whose gt would be empty are not drawn.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from greencode_jax.errors import GreencodeError


@dataclasses.dataclass(frozen=True)
class CompletionSample:
    doc: int  # index of the document in its split
    context: np.ndarray  # int32 model ids
    target: np.ndarray  # int32 model ids, at most new_tokens


def completion_sample(doc_ids: np.ndarray, eos_id: int | None, fraction: float = 0.2, max_context: int = 2048,
                      new_tokens: int = 15, doc: int = 0) -> CompletionSample | None:
    """One GREEN-CODE sample from a stored document (ids ending with the EOS separator), or None."""
    ids = np.asarray(doc_ids, dtype=np.int32)
    if eos_id is not None and len(ids) and ids[-1] == eos_id:
        ids = ids[:-1]  # the separator added for training; GREEN-CODE's tokenised files have none
    context = min(int(len(ids) * fraction), max_context - new_tokens)
    if context <= 0:
        return None
    target = ids[context:context + new_tokens]
    if not len(target):
        return None
    return CompletionSample(doc, ids[:context].copy(), target.copy())


def completion_samples(store, eos_id: int | None, fraction: float = 0.2, max_context: int = 2048,
                       new_tokens: int = 15, max_samples: int | None = 1000) -> list[CompletionSample]:
    """GREEN-CODE samples from the first documents of a split (a `packing.TokenStore`), in order."""
    if not 0.0 < fraction < 1.0:
        raise GreencodeError(f"context fraction {fraction}: expected a number between 0 and 1")
    if new_tokens <= 0 or max_context <= new_tokens:
        raise GreencodeError(f"new_tokens {new_tokens} and max_context {max_context}: expected 0 < new_tokens "
                             "< max_context")
    samples = []
    for doc in range(len(store)):
        if max_samples is not None and len(samples) >= max_samples:
            break
        sample = completion_sample(store.doc(doc), eos_id, fraction, max_context, new_tokens, doc)
        if sample is not None:
            samples.append(sample)
    return samples


def ground_truth(tokens: Sequence[str], lang: str) -> list[str]:
    """The line-level gt starting at tokens[0] under CodeXGLUE's rule for `lang`."""
    out = []
    for token in tokens:
        if token == "</s>":
            break
        if lang == "python":
            if token == "<EOL>":
                break
            out.append(token)
        else:
            if token == "{":
                break
            out.append(token)
            if token in (";", "}"):
                break
    return out


def _cut_allowed(token: str, lang: str) -> bool:
    """Whether a gt starting at `token` is non-empty."""
    return token != "</s>" and token != ("<EOL>" if lang == "python" else "{")


def line_sample(line: str, lang: str, rng: np.random.Generator, sample_id: int) -> dict | None:
    """A line-level sample from one CodeXGLUE line, or None if no cut gives a non-empty gt."""
    tokens = line.split()
    candidates = [i for i in range(1, len(tokens)) if _cut_allowed(tokens[i], lang)]
    if not candidates:
        return None
    cut = candidates[int(rng.integers(len(candidates)))]
    return {"id": sample_id, "input": " ".join(tokens[:cut]), "gt": " ".join(ground_truth(tokens[cut:], lang))}


def line_rng(seed: int) -> np.random.Generator:
    """The generator of the line-level cuts for `seed` (its own stream: other uses of the seed do not shift it)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0x11E]))


def line_samples(lines: Iterable[str], lang: str, seed: int, max_samples: int | None) -> list[dict]:
    """One sample per document, in order, from the first documents that allow one (ids = document index)."""
    if lang not in ("python", "java"):
        raise GreencodeError(f"lang {lang!r}: expected python or java")
    rng = line_rng(seed)
    out = []
    for index, line in enumerate(lines):
        if max_samples is not None and len(out) >= max_samples:
            break
        sample = line_sample(line, lang, rng, index)
        if sample is not None:
            out.append(sample)
    return out
