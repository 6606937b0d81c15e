"""`greencode prepare-data` and `greencode bench data` through their argparse registration."""

from __future__ import annotations

import argparse
import json

import pytest

from conftest import assert_no_output
from greencode_jax.cli import data_cmd
from greencode_jax.data import PreparedData
from greencode_jax.errors import GreencodeError
from test_data_corpus import python_tree


def parser():
    p = argparse.ArgumentParser(prog="greencode")
    sub = p.add_subparsers(dest="command", required=True)
    data_cmd.register(sub)
    bench = sub.add_parser("bench")
    data_cmd.register_bench(bench.add_subparsers(dest="bench", required=True))
    return p


def run(argv):
    args = parser().parse_args(argv)
    return args.func(args)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["prepare-data", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--lang", "--source", "--out", "--tokenizer", "--view", "--split", "--literals", "--workers"):
        assert option in text


def test_prepare_data_command_writes_the_corpus_and_prints_a_summary(tmp_path, capsys):
    src = python_tree(tmp_path / "src", n=20)
    (src / "broken.py").write_text("x = (\n")
    out = tmp_path / "out"
    run(["prepare-data", "--lang", "python", "--source", str(src), "--out", str(out), "--tokenizer", "none",
         "--workers", "1", "--split", "0.7,0.15,0.15", "--quiet"])
    printed = capsys.readouterr().out
    assert f"prepared python from 22 .py files under {src}" in printed
    assert "22 found" in printed and "failed 1: 1 tokenize" in printed and "broken.py: tokenize:" in printed
    assert f"wrote {out} in" in printed
    data = PreparedData(out)
    assert data.manifest["split_ratios"] == [0.7, 0.15, 0.15]
    assert sum(json.loads((out / "stats.json").read_text())["documents"].values()) == 21


def test_user_mistakes_raise_one_greencode_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(GreencodeError, match="no such file or directory"):
        run(["prepare-data", "--source", str(tmp_path / "missing"), "--out", str(out), "--quiet"])
    assert_no_output(out)


def test_bad_split_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["prepare-data", "--out", "x", "--split", "0.5,0.5"])
    assert info.value.code == 2
    assert "three non-negative train,dev,test ratios" in capsys.readouterr().err


def test_bench_data_reports_time_rate_and_peak_memory(tmp_path, capsys):
    src = python_tree(tmp_path / "src", n=10)
    report = tmp_path / "bench.json"
    run(["bench", "data", "--source", str(src), "--workers", "1", "--tokenizer", "none", "--json", str(report)])
    printed = capsys.readouterr().out
    assert "files/s" in printed and "peak memory full / half corpus" in printed
    assert "the 60 s target is for the whole Python standard library" in printed  # not the stdlib: no verdict
    figures = json.loads(report.read_text())
    assert figures["full"]["files"] == 11 and figures["half"]["files"] == 5
    assert figures["full"]["peak_rss"] > 10 * 1024**2 and figures["full"]["seconds"] > 0
