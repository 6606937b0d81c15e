"""CodeXGLUE javaCorpus token-level preprocessing of one Java file.

The rules (docs/data.md, CodeXGLUE `dataset/javaCorpus/preprocess.py`): tokens from
`javalang`'s tokenizer (comments and whitespace are not tokens); string and character
literals go through the same prefix / quote / body split as Python's, and a body of one
character in single quotes becomes `<CHAR_LIT>` / `<CHAR_LIT:c>` (so `'\\n'`, two source
characters, is a `'<STR_LIT>'`, exactly as upstream); integer and floating-point literals
become `<NUM_LIT>` / `<NUM_LIT:v>`; no `<EOL>`; the file becomes `<s> … </s>`. A file
javalang cannot tokenise is reported as a failure and dropped, as upstream drops the line.

javalang 0.13 predates Java 15 text blocks: it reads `\"\"\" … \"\"\"` as three string literals,
which become three `"<STR_LIT>"` placeholders.
"""

from __future__ import annotations

from greencode_jax.data.codexglue_python import PreprocessError
from greencode_jax.data.literals import RawToken, num_lit, split_string_literal


def decode_java(source: bytes) -> str:
    try:
        text = source.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PreprocessError("undecodable", f"not valid UTF-8 ({error})") from None
    return text[1:] if text.startswith("\ufeff") else text


def java_raw_tokens_from_text(text: str) -> list[RawToken]:
    import javalang

    out: list[RawToken] = []
    try:
        for tok in javalang.tokenizer.tokenize(text):
            name = type(tok).__name__  # upstream tests the class name the same way
            if "String" in name or "Character" in name:
                out.append(split_string_literal(tok.value, java=True))
            elif "Integer" in name or "FloatingPoint" in name:
                out.append(num_lit(tok.value))
            else:
                out.append(tok.value)
    except Exception as error:  # javalang raises LexerError and, on some inputs, plain errors
        raise PreprocessError("tokenize", f"{type(error).__name__}: {error}") from None
    return out


def java_raw_tokens(source: bytes) -> list[RawToken]:
    """One Java file's bytes -> raw tokens; raises PreprocessError if it cannot be decoded or tokenised."""
    return java_raw_tokens_from_text(decode_java(source))

