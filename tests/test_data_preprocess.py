"""CodeXGLUE token-level preprocessing of hand-written Python and Java snippets.

Every expected line below was written by hand from CodeXGLUE's preprocessing rules (and
CodeXGLUE's preprocess.py, which they summarise), token by token, not by running the code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from greencode_jax.data.codexglue_java import java_raw_tokens
from greencode_jax.data.codexglue_python import (PreprocessError, python_raw_tokens,
                                                 python_raw_tokens_from_stream)
from greencode_jax.data.literals import (LiteralCounter, Literals, load_literals, render_line, restore_literals,
                                         split_string_literal)
from greencode_jax.errors import GreencodeError

DATA = Path(__file__).parent / "data"

PYTHON_SNIPPET = '''# leading comment
import os


def greet(name, sep=", "):
    """Say hello.

    Twice."""
    msg = f"Hello, {name}!" + rb'\\x00 raw' + 'a b' + ''
    n = 0x1F + 3.5e-2 + 10 + 1_000 + 2j
    if n > 1:  # trailing comment
        return msg.split(sep)
    return [u"x", R"y", b"\\n"]
'''
PYTHON_LITERALS = Literals.from_lists(["U+002CU+0020", "aU+0020b", "x"], ["0", "10"])
PYTHON_EXPECTED = (
    "<s> import os <EOL> "
    'def greet ( name , sep = "<STR_LIT:U+002CU+0020>" ) : <EOL> '
    '"""<STR_LIT>""" <EOL> '
    "msg = f\"<STR_LIT>\" + rb'<STR_LIT>' + '<STR_LIT:aU+0020b>' + '<STR_LIT>' <EOL> "
    "n = <NUM_LIT> + <NUM_LIT> + <NUM_LIT:10> + <NUM_LIT> + <NUM_LIT> <EOL> "
    "if n > <NUM_LIT> : <EOL> "
    "return msg . split ( sep ) <EOL> "
    'return [ u"<STR_LIT:x>" , R"<STR_LIT>" , b"<STR_LIT>" ] </s>')


def python_line(source: str | bytes, literals=PYTHON_LITERALS) -> str:
    data = source.encode("utf-8") if isinstance(source, str) else source
    return render_line(python_raw_tokens(data), literals)


def test_python_snippet_matches_hand_derived_line():
    assert python_line(PYTHON_SNIPPET) == PYTHON_EXPECTED


def test_python_crlf_and_cr_newlines_give_the_same_line():
    assert python_line(PYTHON_SNIPPET.replace("\n", "\r\n")) == PYTHON_EXPECTED
    assert python_line(PYTHON_SNIPPET.replace("\n", "\r")) == PYTHON_EXPECTED


def test_python_eol_runs_collapse_and_ends_are_trimmed():
    source = "\n\n# only a comment\n\nx = 1\n\n\n\ny = 2\n\n# bye\n"
    assert python_line(source, Literals()) == "<s> x = <NUM_LIT> <EOL> y = <NUM_LIT> </s>"
    # no trailing newline: NEWLINE with an empty value still ends the line
    assert python_line("x = 0", PYTHON_LITERALS) == "<s> x = <NUM_LIT:0> </s>"


def test_python_file_without_tokens_is_empty():
    assert python_raw_tokens(b"# just a comment\n\n") == []
    assert python_raw_tokens(b"") == []


@pytest.mark.parametrize("source, reason", [
    (b'x = """never closed\n', "tokenize"),  # EOF in multi-line string
    (b"call(1,\n", "tokenize"),  # EOF in multi-line statement
    (b"if x:\n        a = 1\n    b = 2\n", "tokenize"),  # unindent does not match
    (b"x = '\xff\xfe'\n", "undecodable"),  # not UTF-8 and no coding declaration
    (b"# -*- coding: no-such-codec -*-\nx = 1\n", "undecodable"),
])
def test_python_failures_are_reported_not_raised_as_other_errors(source, reason):
    with pytest.raises(PreprocessError) as info:
        python_raw_tokens(source)
    assert info.value.reason == reason


def test_python_coding_declaration_is_honoured():
    source = "# -*- coding: latin-1 -*-\nx = 'é'\n".encode("latin-1")
    assert b"\xe9" in source
    assert python_line(source, Literals.from_lists(["é"])) == "<s> x = '<STR_LIT:é>' </s>"
    # a UTF-8 byte order mark is not a token
    assert python_line(b"\xef\xbb\xbfx = 'a b'\n") == "<s> x = '<STR_LIT:aU+0020b>' </s>"


# ------------------------------------------------------------------------------ Python >= 3.12 f-strings

FSTRING_LITERALS = Literals.from_lists(["x", "{{}}", "helloU+0020{name}!",
                                        "multiU+0020lineU+0020{aU+0020+U+0020b}U+0020end"])
FSTRING_EXPECTED = (
    '<s> name = "<STR_LIT:x>" <EOL> '
    'a = f"<STR_LIT:helloU+0020{name}!>" <EOL> '
    "b = rf'<STR_LIT>' <EOL> "
    'c = f"""<STR_LIT:multiU+0020lineU+0020{aU+0020+U+0020b}U+0020end>""" <EOL> '
    'd = f"<STR_LIT>" + F"<STR_LIT>" <EOL> '
    'e = f"<STR_LIT:{{}}>" </s>')


def _stream_312():
    """The token stream Python 3.12.1's tokenize produced for tests/data/fstrings.py (FSTRING_START/
    MIDDLE/END), saved as JSON by:  python3.12 -c 'import tokenize…' (see tests/data/README.md)."""
    recorded = json.loads((DATA / "fstrings_py312_tokens.json").read_text())
    kinds = {t[0] for t in recorded["tokens"]}
    assert {"FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"} <= kinds
    return [tuple(t) for t in recorded["tokens"]]


def test_fstring_merge_of_a_python312_token_stream():
    text = (DATA / "fstrings.py").read_text(encoding="utf-8")
    merged = render_line(python_raw_tokens_from_stream(_stream_312(), text), FSTRING_LITERALS)
    assert merged == FSTRING_EXPECTED


def test_fstring_merge_agrees_with_this_pythons_tokenizer():
    # On Python <= 3.11 the f-strings are single STRING tokens already: an independent reference.
    data = (DATA / "fstrings.py").read_bytes()
    assert render_line(python_raw_tokens(data), FSTRING_LITERALS) == FSTRING_EXPECTED


def _python_at_least_312():
    for name in ("python3.13", "python3.12", "python3.14"):
        found = shutil.which(name)
        candidates = [found] if found else []
        candidates += sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob(f"{name[6:]}*/bin/python"))
        for candidate in candidates:
            try:
                out = subprocess.run([str(candidate), "-c", "import sys; print(sys.version_info >= (3, 12))"],
                                     capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out.returncode == 0 and out.stdout.strip() == "True":
                return str(candidate)
    return None


def test_fstring_merge_of_a_live_newer_python_stream():
    python = _python_at_least_312()
    if python is None:
        pytest.skip("no Python >= 3.12 interpreter on this machine")
    script = ("import io, json, sys, tokenize; text = open(sys.argv[1], encoding='utf-8').read(); "
              "print(json.dumps([[tokenize.tok_name[t.type], t.string, t.start, t.end] "
              "for t in tokenize.generate_tokens(io.StringIO(text).readline)]))")
    out = subprocess.run([python, "-c", script, str(DATA / "fstrings.py")], capture_output=True, text=True,
                         timeout=60, check=True)
    stream = [tuple(t) for t in json.loads(out.stdout)]
    assert any(t[0] == "FSTRING_START" for t in stream)
    text = (DATA / "fstrings.py").read_text(encoding="utf-8")
    assert render_line(python_raw_tokens_from_stream(stream, text), FSTRING_LITERALS) == FSTRING_EXPECTED


def test_unterminated_fstring_stream_fails():
    stream = [("NAME", "a", (1, 0), (1, 1)), ("OP", "=", (1, 2), (1, 3)),
              ("FSTRING_START", 'f"', (1, 4), (1, 6)), ("FSTRING_MIDDLE", "x", (1, 6), (1, 7))]
    with pytest.raises(PreprocessError):
        python_raw_tokens_from_stream(stream, 'a = f"x\n')


# ----------------------------------------------------------------------------------------------- Java

JAVA_SNIPPET = """package demo; // comment
/* block */
public class A {
    /** doc */
    char c = 'x', sp = ' ', nl = '\\n';
    String s = "a, b", e = "";
    long n = 0x1FL + 10 + 1_000;
    double d = 1.5e3 + .5f;
    boolean t = true; Object o = null;
}
"""
JAVA_LITERALS = Literals.from_lists(["aU+002CU+0020b"], ["10"], ["x", "U+0020"])
JAVA_EXPECTED = (
    "<s> package demo ; public class A { "
    "char c = '<CHAR_LIT:x>' , sp = '<CHAR_LIT:U+0020>' , nl = '<STR_LIT>' ; "
    'String s = "<STR_LIT:aU+002CU+0020b>" , e = "<STR_LIT>" ; '
    "long n = <NUM_LIT> + <NUM_LIT:10> + <NUM_LIT> ; "
    "double d = <NUM_LIT> + <NUM_LIT> ; "
    "boolean t = true ; Object o = null ; } </s>")


def test_java_snippet_matches_hand_derived_line():
    assert render_line(java_raw_tokens(JAVA_SNIPPET.encode()), JAVA_LITERALS) == JAVA_EXPECTED


def test_java_escaped_char_is_a_string_literal_as_upstream():
    # '\n' is two characters between the quotes: upstream's one-character rule makes it a STR_LIT
    line = render_line(java_raw_tokens(b"char a = '\\n', b = 'q';"), Literals.from_lists(["\\n"], [], ["q"]))
    assert line == "<s> char a = '<STR_LIT:\\n>' , b = '<CHAR_LIT:q>' ; </s>"


@pytest.mark.parametrize("source, reason", [
    (b'String s = "never closed;\n', "tokenize"),
    (b"int x = #;", "tokenize"),
    (b"String s = \"caf\xe9\";", "undecodable"),
])
def test_java_failures(source, reason):
    with pytest.raises(PreprocessError) as info:
        java_raw_tokens(source)
    assert info.value.reason == reason


# -------------------------------------------------------------------------------------------- literals

def test_string_literal_parts():
    assert split_string_literal("rb'a b'") == ("s", "rb", "'", "aU+0020b", "'")
    assert split_string_literal('"""x,y"""') == ("s", "", '"""', "xU+002Cy", '"""')
    assert split_string_literal("''") == ("s", "", "'", "", "'")
    assert split_string_literal("' '", java=True) == ("c", "", "'", "U+0020", "'")
    assert split_string_literal('"a"', java=True)[0] == "s"  # double quotes are never a char


def test_whitelist_counts_train_literals_in_frequency_order():
    counter = LiteralCounter()
    tokens = (python_raw_tokens(b"a = 'x' + 'x' + 'y' + '' + 7 + 7 + 7 + 8\n")
              + python_raw_tokens(b"b = 'y' + 'y' + 'z'\n"))
    counter.add(tokens)
    whitelist = counter.whitelist(java=False)
    assert whitelist.str_list == ("y", "x", "z")  # '' is left out; ties would sort by value
    assert whitelist.num_list == ("7", "8")
    assert whitelist.char_list == ()


def test_lossy_counter_keeps_heavy_hitters_within_capacity():
    counter = LiteralCounter(capacity=50)
    for i in range(2000):
        counter.update({"str": {f"rare{i}": 1, "common": 3}})
    assert len(counter.counts["str"]) <= 51
    assert counter.whitelist(False).str_list[0] == "common"
    assert counter.counts["str"]["common"] >= 6000 - counter.prunes["str"]


def test_literals_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "literals.json"
    PYTHON_LITERALS.save(path)
    loaded = load_literals(path)
    assert loaded.str_list == PYTHON_LITERALS.str_list and loaded.num == PYTHON_LITERALS.num
    assert json.loads(path.read_text())["char"] == []
    (tmp_path / "bad.json").write_text('{"str": ["a"], "num": [1]}')
    with pytest.raises(GreencodeError, match=r"bad.json: field 'num' must be a list of strings"):
        load_literals(tmp_path / "bad.json")
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(GreencodeError, match="notjson.json: cannot read as a CodeXGLUE literals.json"):
        load_literals(tmp_path / "notjson.json")
    with pytest.raises(GreencodeError, match="missing.json: literals file not found"):
        load_literals(tmp_path / "missing.json")


def test_restore_literals_as_the_line_level_evaluator():
    code = "x = <NUM_LIT> + <STR_LIT> + '<STR_LIT:aU+0020b>' + <CHAR_LIT> + <NUM_LIT:10> + <CHAR_LIT:c>"
    assert restore_literals(code) == "x = 0 +  + 'aU+0020b' +  + 10 + c"
