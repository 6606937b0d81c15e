"""Per-sample code metrics on decoded texts, each computed by the library its field uses.

Scales (what `score` returns, and what summary.json and report.md show):

=================== ======= ==========================================================
name                scale   computed by
=================== ======= ==========================================================
rouge_l             0-1     rouge-score ROUGE-L F1, whitespace tokens, case kept (ours)
rouge_l_default     0-1     rouge-score ROUGE-L F1, its default tokenizer (GREEN-CODE's)
bleu                0-100   sacrebleu sentence BLEU, tokenize="none", exp smoothing
chrf                0-100   sacrebleu sentence chrF, char_order 6, word_order 0, beta 2
codebleu            0-1     codebleu.calc_codebleu, weights (0.25,)*4; None if unavailable
exact_match         0 or 1  CodeXGLUE line-level EM after literal restoration
levenshtein         chars   rapidfuzz Levenshtein distance of the texts as given
edit_similarity     0-100   rapidfuzz fuzz.ratio after literal restoration (CodeXGLUE ES)
=================== ======= ==========================================================

Texts are CodeXGLUE token sequences joined by spaces, as the model's tokenizer decodes them
(`self . x = <NUM_LIT> <EOL>`). Which text each metric sees:

* ROUGE-L, BLEU, chrF, CodeBLEU and Levenshtein see the texts as given, as GREEN-CODE's
  evaluator does (literal placeholders included).
* exact_match and edit_similarity follow CodeXGLUE's line-level evaluator: the prediction is
  stripped, both texts get `restore_literals` (`<NUM_LIT>` -> 0, `<STR_LIT>`/`<CHAR_LIT>` ->
  empty, `<X_LIT:v>` -> v), EM is whitespace-token equality and ES is `fuzz.ratio` of the
  restored strings. GREEN-CODE's own "exact match" compared the raw strings; this one is
  CodeXGLUE's, so `<NUM_LIT>` and `<NUM_LIT:0>` match.

The ROUGE tokenizer pitfall: rouge-score's default tokenizer lower-cases and replaces every
non-alphanumeric character by a space, so `f ( x )` and `f [ x ]` score 1.0 against each
other. GREEN-CODE reported that variant (`rouge_l_default`); `rouge_l` splits on whitespace
only, so punctuation, which carries much of code, counts.

Sentence-level BLEU and per-sample CodeBLEU are means of per-sample scores in the summary;
GREEN-CODE computed BLEU, chrF and CodeBLEU over the whole corpus at once, which
`corpus_scores` gives for comparison. On 15-token snippets CodeBLEU's data-flow part is often
empty, and codebleu then counts it as 1 (its `dataflow_match_score or 1`): an empty
prediction scores 0.25, not 0. That is the library's definition, kept as it is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from importlib import metadata

from greencode_jax.data.literals import restore_literals
from greencode_jax.errors import GreencodeError

METRICS = ("rouge_l", "rouge_l_default", "bleu", "chrf", "codebleu", "exact_match", "levenshtein",
           "edit_similarity")

# Scale of each metric, as stated in the module docstring; summary.json carries it along.
SCALES = {"rouge_l": "0-1", "rouge_l_default": "0-1", "bleu": "0-100", "chrf": "0-100", "codebleu": "0-1",
          "exact_match": "0/1", "levenshtein": "characters", "edit_similarity": "0-100"}

LANGS = ("python", "java")  # the languages our data pipeline prepares, and whose grammars are pinned

CODEBLEU_WEIGHTS = (0.25, 0.25, 0.25, 0.25)
_GRAMMARS = {"python": "tree-sitter-python", "java": "tree-sitter-java"}


def _check_lang(lang: str):
    if lang not in LANGS:
        raise GreencodeError(f"lang {lang!r}: expected one of {', '.join(LANGS)}")


@functools.lru_cache(maxsize=None)
def _rouge():
    """(ours, default): the two ROUGE-L scorers, built once."""
    from rouge_score import rouge_scorer, tokenizers

    class Whitespace(tokenizers.Tokenizer):
        def tokenize(self, text):
            return text.split()

    with _logging_untouched():
        return (rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace()),
                rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False))  # evaluate's "rouge" default


@functools.lru_cache(maxsize=None)
def _sacrebleu():
    """(sentence BLEU, corpus BLEU, chrF): sacrebleu's metric objects as `sentence_bleu`,
    `corpus_bleu` and `sentence_chrf` build them, built once."""
    from sacrebleu.metrics import BLEU, CHRF

    sentence = BLEU(tokenize="none", smooth_method="exp", effective_order=True)
    corpus = BLEU(tokenize="none", smooth_method="exp", effective_order=False)
    chrf = CHRF(char_order=6, word_order=0, beta=2)
    return sentence, corpus, chrf


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=None)
def _codebleu_status(lang: str) -> tuple[bool, str]:
    try:
        from codebleu import calc_codebleu
    except Exception as error:  # an ImportError, or a tree-sitter binding that fails to load
        return False, (f"codebleu cannot be imported ({type(error).__name__}: {error}); install "
                       "codebleu==0.7.0 tree-sitter==0.22.3 tree-sitter-python==0.21.0 tree-sitter-java==0.21.0")
    versions = (f"codebleu {_version('codebleu')}, tree-sitter {_version('tree-sitter')}, "
                f"{_GRAMMARS[lang]} {_version(_GRAMMARS[lang])}")
    try:
        _quiet(calc_codebleu, ["x = 1"], ["x = 1"], lang=lang, weights=CODEBLEU_WEIGHTS)
    except Exception as error:  # codebleu asserts or raises when its grammar is missing or of another ABI
        return False, f"codebleu cannot parse {lang} ({type(error).__name__}: {error}; {versions})"
    return True, versions


def codebleu_status(lang: str | None = None) -> tuple[bool, str]:
    """(available, reason) for CodeBLEU: whether codebleu and the tree-sitter grammar of `lang`
    (None: both Python and Java) load and parse, and the versions in use or why not."""
    langs = LANGS if lang is None else (lang,)
    for one in langs:
        _check_lang(one)
    results = [_codebleu_status(one) for one in langs]
    available = all(ok for ok, _ in results)
    if lang is None and available:
        return True, (f"codebleu {_version('codebleu')}, tree-sitter {_version('tree-sitter')}, "
                      + ", ".join(f"{_GRAMMARS[one]} {_version(_GRAMMARS[one])}" for one in langs))
    reasons = [reason for ok, reason in results if ok == available]
    return available, "; ".join(dict.fromkeys(reasons))


@contextlib.contextmanager
def _logging_untouched():
    """Undoes the root-logger handlers a library installs while scoring.

    rouge-score's constructor logs through absl and codebleu calls `logging.warning`; both
    install a stderr handler on the root logger when it has none, which would change what
    the rest of the process prints."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)


def _quiet(calc, references, predictions, **kwargs) -> dict:
    """calc_codebleu without its warning for every snippet that has no data flow."""
    def drop(record):
        return not str(record.msg).startswith("WARNING: There is no reference data-flows")

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        with _logging_untouched():
            return calc(references, predictions, **kwargs)
    finally:
        root.removeFilter(drop)


def _codebleu(predictions: list[str], targets: list[str], lang: str) -> float | None:
    if not _codebleu_status(lang)[0]:
        return None
    from codebleu import calc_codebleu

    return float(_quiet(calc_codebleu, targets, predictions, lang=lang, weights=CODEBLEU_WEIGHTS)["codebleu"])


def score(prediction: str, target: str, lang: str = "python") -> dict[str, float | None]:
    """Every metric of METRICS for one decoded prediction against its target (scales: module docstring).

    `codebleu` is None when codebleu or the grammar of `lang` is unavailable (`codebleu_status`
    says why); every other value is a float."""
    _check_lang(lang)
    if not isinstance(prediction, str) or not isinstance(target, str):
        raise TypeError(f"score expects two str, got {type(prediction).__name__} and {type(target).__name__}")
    from rapidfuzz import fuzz
    from rapidfuzz.distance import Levenshtein

    ours, default = _rouge()
    bleu, _, chrf = _sacrebleu()
    # CodeXGLUE's evaluator: post_process(pred.strip()) and post_process(gt).
    pred_restored, target_restored = restore_literals(prediction.strip()), restore_literals(target)
    return {
        "rouge_l": float(ours.score(target, prediction)["rougeL"].fmeasure),
        "rouge_l_default": float(default.score(target, prediction)["rougeL"].fmeasure),
        "bleu": float(bleu.sentence_score(prediction, [target]).score),
        "chrf": float(chrf.sentence_score(prediction, [target]).score),
        "codebleu": _codebleu([prediction], [target], lang),
        "exact_match": float(pred_restored.split() == target_restored.split()),
        "levenshtein": float(Levenshtein.distance(prediction, target)),
        "edit_similarity": float(fuzz.ratio(pred_restored, target_restored)),
    }


def corpus_scores(predictions: list[str], targets: list[str], lang: str = "python") -> dict[str, float | None]:
    """Corpus-level BLEU, chrF (0-100) and CodeBLEU (0-1; None if unavailable) over all pairs at
    once, as GREEN-CODE aggregated those three; the summary's per-policy means are of per-sample scores."""
    _check_lang(lang)
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    if not predictions:
        return {"bleu": None, "chrf": None, "codebleu": None}
    _, bleu, chrf = _sacrebleu()
    return {"bleu": float(bleu.corpus_score(predictions, [targets]).score),
            "chrf": float(chrf.corpus_score(predictions, [targets]).score),
            "codebleu": _codebleu(list(predictions), list(targets), lang)}
