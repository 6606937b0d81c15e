"""The evaluation's two protocols, as prompts with their targets: GREEN-CODE's completion (the first
`context_fraction` of a test file as context, the next `new_tokens` tokens as the target) and
CodeXGLUE's line-level completion (a line's prefix, the rest of the line as the target, cut where
CodeXGLUE's ground truth ends). `greencode evaluate` and `greencode certify` read both from here."""

from __future__ import annotations

import dataclasses

import numpy as np

from greencode_jax.config import EvalConfig
from greencode_jax.data.samples import ground_truth
from greencode_jax.errors import GreencodeError

LINE_BREAKS = ("<EOL>", "</s>")  # CodeXGLUE markers a decoded line is cut at; spaced so split() sees them


@dataclasses.dataclass(frozen=True)
class Prompt:
    sample: int  # the document index (completion) or line-level sample id
    ids: np.ndarray  # int32 model ids, BOS included
    target: str


@dataclasses.dataclass
class Protocol:
    name: str
    prompts: list
    new_tokens: int
    stops: tuple  # always two ids, so both protocols share one program per policy kind


def _stops(tokenizer, model, extra: int | None) -> tuple:
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else model.config.eos_token_id
    if isinstance(eos, tuple):
        eos = eos[0] if eos else None
    if eos is None:
        return () if extra is None else (extra, extra)
    return (int(eos), int(eos) if extra is None else int(extra))


def _single_id(tokenizer, text: str) -> int | None:
    """The id of `text` if the tokenizer keeps it as one token (the BPE's `<EOL>`), else None."""
    ids = tokenizer.encode(text)
    if ids and tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    return int(ids[0]) if len(ids) == 1 else None


def cut_line(text: str, lang: str) -> str:
    """A decoded continuation cut where CodeXGLUE's line-level ground truth ends."""
    for mark in LINE_BREAKS:
        text = text.replace(mark, f" {mark} ")
    return " ".join(ground_truth(text.split(), lang))


def completion_protocol(data, tokenizer, model, cfg: EvalConfig, max_context: int) -> Protocol:
    if not data.manifest.get("documents", {}).get(cfg.split):
        raise GreencodeError(f"{data.root}: the {cfg.split} split is empty (prepared splits: "
                             f"{data.manifest.get('documents')}); the completion protocol evaluates on it")
    samples = data.completion_samples(cfg.split, cfg.context_fraction, max_context, cfg.new_tokens,
                                      cfg.samples or None)
    if not samples:
        raise GreencodeError(f"{data.root}: the {cfg.split} split gives no completion samples (no documents, or "
                             f"all too short for a {cfg.context_fraction:g} context and a target)")
    prompts = [Prompt(s.doc, np.asarray(s.context, np.int32), tokenizer.decode(s.target)) for s in samples]
    return Protocol("completion", prompts, cfg.new_tokens, _stops(tokenizer, model, None))


def line_protocol(data, tokenizer, model, cfg: EvalConfig, max_context: int) -> Protocol:
    if data.view != "codexglue":
        raise GreencodeError(f"{data.root}: prepared with --view {data.view}; the line protocol's samples are "
                             "CodeXGLUE token text, which the model only reads with --view codexglue")
    limit = max_context - cfg.line_new_tokens
    prompts = []
    for sample in data.line_samples()[: cfg.samples or None]:
        tokens = sample["input"].split()
        if tokens and tokens[0] == "<s>":  # the model sees a document's text without <s> (prepare.shown_text)
            tokens = tokens[1:]
        ids = tokenizer.encode(" ".join(tokens))
        if len(ids) > limit:  # keep BOS and the tokens nearest the cut
            head = ids[:1] if tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id else []
            ids = head + ids[len(ids) - (limit - len(head)):]
        if ids:
            prompts.append(Prompt(int(sample["id"]), np.asarray(ids, np.int32), sample["gt"]))
    if not prompts:
        raise GreencodeError(f"{data.root}: no line-level samples")
    eol = _single_id(tokenizer, "<EOL>") if data.lang == "python" else None
    return Protocol("line", prompts, cfg.line_new_tokens, _stops(tokenizer, model, eol))


def protocol_names(data, cfg: EvalConfig) -> tuple:
    if cfg.protocols:
        return cfg.protocols
    has_line = data.manifest.get("datasets", {}).get("line") is not None and data.view == "codexglue"
    return ("completion", "line") if has_line else ("completion",)
