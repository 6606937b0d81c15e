"""eval.metrics against each reference library called directly and against hand-computed values."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import sacrebleu
from codebleu import calc_codebleu
from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein
from rouge_score import rouge_scorer, tokenizers

from greencode_jax.errors import GreencodeError
from greencode_jax.eval import metrics
from greencode_jax.eval.metrics import METRICS, codebleu_status, corpus_scores, score

PAIRS = [  # (prediction, target): CodeXGLUE-tokenised snippets, as decoded
    ("self . assertEqual ( response . status_code , <NUM_LIT> ) <EOL> data",
     "self . assertEqual ( resp . status_code , <NUM_LIT:200> ) <EOL> self"),
    ("def f ( x ) : <EOL> return x + <NUM_LIT>", "def f ( x ) : <EOL> return x + <NUM_LIT:1>"),
    ("import os", "from os import path"),
    ("print ( \"<STR_LIT>\" )", "print ( \"<STR_LIT:hello>\" )"),
    ("", "x = 1"),
    ("Foo . Bar ( )", "foo . bar ( )"),
]
JAVA_PAIRS = [
    ("public int f ( int x ) { return x + <NUM_LIT> ; }", "public int f ( int x ) { return x ; }"),
    ("String s = \"<STR_LIT>\" ;", "String s = \"<STR_LIT:a>\" ;"),
]


class Whitespace(tokenizers.Tokenizer):
    def tokenize(self, text):
        return text.split()


def lcs(a, b) -> int:
    """Longest common subsequence length, by the textbook dynamic programme."""
    table = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
    return int(table[-1, -1])


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance by the textbook dynamic programme (unit costs)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def test_score_returns_every_metric_as_float():
    result = score(*PAIRS[0])
    assert tuple(result) == METRICS
    assert all(isinstance(v, float) for v in result.values())


# ROUGE-L


def test_rouge_l_by_hand():
    # whitespace tokens: pred x = f ( a , b ) (8), target x = g ( a ) (6); LCS x = ( a ) = 5
    # F1 of the LCS = 2 * 5 / (8 + 6) = 5/7
    result = score("x = f ( a , b )", "x = g ( a )")
    assert result["rouge_l"] == pytest.approx(5 / 7, abs=1e-12)
    # default tokenizer: "x f a b" vs "x g a", LCS x a = 2 -> 2 * 2 / (4 + 3) = 4/7
    assert result["rouge_l_default"] == pytest.approx(4 / 7, abs=1e-12)


def test_default_tokenizer_drops_punctuation_and_case_ours_does_not():
    brackets = score("f ( x )", "f [ x ]")
    assert brackets["rouge_l_default"] == 1.0  # only "f x" is left of either side
    assert brackets["rouge_l"] == pytest.approx(2 * 2 / (4 + 4))  # f and x of four tokens each
    case = score("Foo", "foo")
    assert case["rouge_l_default"] == 1.0 and case["rouge_l"] == 0.0
    only_punctuation = score("( ) :", ". , ;")
    assert only_punctuation["rouge_l_default"] == 0.0  # nothing left to compare: rouge-score says 0
    assert only_punctuation["rouge_l"] == 0.0


@pytest.mark.parametrize("prediction, target", PAIRS)
def test_rouge_l_matches_rouge_score_and_the_lcs(prediction, target):
    result = score(prediction, target)
    ours = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace()).score(target, prediction)["rougeL"]
    default = rouge_scorer.RougeScorer(["rougeL"]).score(target, prediction)["rougeL"]
    assert result["rouge_l"] == ours.fmeasure
    assert result["rouge_l_default"] == default.fmeasure
    p, t = prediction.split(), target.split()
    expected = 2 * lcs(p, t) / (len(p) + len(t)) if p and t else 0.0
    assert result["rouge_l"] == pytest.approx(expected, abs=1e-12)


# BLEU and chrF


@pytest.mark.parametrize("prediction, target", PAIRS + JAVA_PAIRS)
def test_bleu_and_chrf_match_sacrebleu(prediction, target):
    result = score(prediction, target)
    assert result["bleu"] == sacrebleu.sentence_bleu(prediction, [target], tokenize="none").score
    assert result["chrf"] == sacrebleu.sentence_chrf(prediction, [target], char_order=6, beta=2).score


def test_bleu_by_hand():
    # same length (BP = 1); clipped n-gram precisions 4/5, 3/4, 2/3, 1/2; no zero count, so no smoothing
    expected = 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert score("a b c d e", "a b c d f")["bleu"] == pytest.approx(expected, abs=1e-9)
    assert score("a b c d", "a b c d")["bleu"] == pytest.approx(100.0)


def test_bleu_does_not_retokenise_code():
    # "foo(x)" is one whitespace token: with tokenize="none" it matches nothing of "foo ( x )";
    # sacrebleu's default 13a tokenizer would split it and call the two equal.
    assert score("foo(x)", "foo ( x )")["bleu"] == 0.0
    assert sacrebleu.sentence_bleu("foo(x)", ["foo ( x )"]).score == pytest.approx(100.0)


def test_chrf_by_hand():
    assert score("abc def", "abc def")["chrf"] == pytest.approx(100.0)
    assert score("abc", "xyz")["chrf"] == 0.0
    # chrF ignores whitespace: the same characters split differently score 100
    assert score("ab c", "a bc")["chrf"] == pytest.approx(100.0)


# CodeBLEU


@pytest.mark.parametrize("lang, pairs", [("python", PAIRS), ("java", JAVA_PAIRS)])
def test_codebleu_matches_calc_codebleu(lang, pairs):
    for prediction, target in pairs:
        expected = calc_codebleu([target], [prediction], lang=lang, weights=(0.25, 0.25, 0.25, 0.25))["codebleu"]
        assert score(prediction, target, lang)["codebleu"] == pytest.approx(expected, abs=1e-12)


def test_codebleu_of_identical_code_is_one():
    # n-gram, weighted n-gram, syntax and data-flow matches are all 1
    assert score("def f ( x ) : <EOL> return x + 1", "def f ( x ) : <EOL> return x + 1")["codebleu"] == 1.0
    assert score("int f ( int x ) { return x ; }", "int f ( int x ) { return x ; }", "java")["codebleu"] == 1.0


def test_codebleu_status_names_the_pinned_versions():
    available, reason = codebleu_status()
    assert available, reason
    assert "codebleu 0.7.0" in reason and "tree-sitter 0.22.3" in reason
    assert "tree-sitter-python 0.21.0" in reason and "tree-sitter-java 0.21.0" in reason


def test_codebleu_unavailable_is_none_with_a_reason(monkeypatch):
    """Where codebleu cannot be imported (a vendor boundary, faked here) the value is None, never 0."""
    metrics._codebleu_status.cache_clear()
    monkeypatch.setitem(sys.modules, "codebleu", None)  # makes `import codebleu` raise ImportError
    try:
        available, reason = codebleu_status("python")
        assert not available and "codebleu cannot be imported" in reason
        assert "codebleu==0.7.0" in reason  # says what to install
        result = score("x = 1", "x = 1")
        assert result["codebleu"] is None
        assert result["rouge_l"] == 1.0  # the other metrics are unaffected
    finally:
        monkeypatch.undo()
        metrics._codebleu_status.cache_clear()
    assert codebleu_status("python")[0]


# exact match, edit similarity, Levenshtein


@pytest.mark.parametrize("prediction, target, expected", [
    ("x = <NUM_LIT>", "x = 0", 1.0),                      # <NUM_LIT> -> 0
    ("x = <NUM_LIT>", "x = <NUM_LIT:0>", 1.0),            # both restore to 0
    ("x = <NUM_LIT>", "x = <NUM_LIT:1>", 0.0),
    ('s = "<STR_LIT>"', 's = ""', 1.0),                   # <STR_LIT> -> empty
    ('s = "<STR_LIT:utf-8>"', 's = "utf-8"', 1.0),        # <STR_LIT:v> -> v
    ("c = '<CHAR_LIT>'", "c = ''", 1.0),
    ("  x  =   1 ", "x = 1", 1.0),                        # whitespace-token equality
    ("x = 1", "x = 2", 0.0),
    ("x=1", "x = 1", 0.0),                                # tokens differ
])
def test_exact_match_after_literal_restoration(prediction, target, expected):
    assert score(prediction, target)["exact_match"] == expected


def test_edit_similarity_by_hand_and_against_rapidfuzz():
    # fuzz.ratio = 200 * LCS(chars) / (len1 + len2): "abcd" vs "abce" -> 200 * 3 / 8
    assert score("abcd", "abce")["edit_similarity"] == pytest.approx(75.0)
    # after restoration "x = 0" vs "x = 1": LCS "x = " (4 chars) of 5 + 5 -> 80
    assert score("x = <NUM_LIT>", "x = 1")["edit_similarity"] == pytest.approx(80.0)
    for prediction, target in PAIRS + JAVA_PAIRS:
        result = score(prediction, target)
        p = metrics.restore_literals(prediction.strip())
        t = metrics.restore_literals(target)
        assert result["edit_similarity"] == fuzz.ratio(p, t)
        if p or t:
            assert result["edit_similarity"] == pytest.approx(200 * lcs(p, t) / (len(p) + len(t)), abs=1e-9)


def test_levenshtein_by_hand_and_against_rapidfuzz():
    assert score("kitten", "sitting")["levenshtein"] == 3.0
    assert score("<NUM_LIT>", "0")["levenshtein"] == 9.0  # on the texts as given, placeholders included
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = "".join(rng.choice(list("ab( )x"), size=rng.integers(0, 12)))
        b = "".join(rng.choice(list("ab( )x"), size=rng.integers(0, 12)))
        assert score(a, b)["levenshtein"] == edit_distance(a, b) == Levenshtein.distance(a, b)


# corpus level, errors, side effects


def test_corpus_scores_match_the_libraries():
    predictions = [p for p, _ in PAIRS]
    targets = [t for _, t in PAIRS]
    result = corpus_scores(predictions, targets)
    assert result["bleu"] == sacrebleu.corpus_bleu(predictions, [targets], tokenize="none").score
    assert result["chrf"] == sacrebleu.corpus_chrf(predictions, [targets]).score
    assert result["codebleu"] == pytest.approx(
        calc_codebleu(targets, predictions, lang="python", weights=(0.25,) * 4)["codebleu"], abs=1e-12)
    assert corpus_scores([], []) == {"bleu": None, "chrf": None, "codebleu": None}


def test_an_unknown_language_is_one_clear_error():
    with pytest.raises(GreencodeError, match="lang 'rust'"):
        score("a", "b", "rust")


def test_scoring_leaves_the_root_logger_as_it_was():
    root = logging.getLogger()
    before = (list(root.handlers), list(root.filters))
    metrics._rouge.cache_clear()  # the scorers' construction is what logs through absl
    score("x", "y")
    score("", "x = 1")  # a target without data flow: codebleu's warning path
    assert (list(root.handlers), list(root.filters)) == before
