"""Sources -> the prepared corpus (TFDS ArrayRecord, stats, tokenizer, token files), and bad input.

Hugging Face and TFDS sources are local copies the tests create; nothing touches the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_no_output
from greencode_jax.data import PreparedData, PrepareOptions, prepare_data
from greencode_jax.data import sources as sources_lib
from greencode_jax.data.corpus import decode_record
from greencode_jax.data.samples import line_samples
from greencode_jax.data.split import split_of, unit_hash
from greencode_jax.errors import GreencodeError
from test_data_preprocess import JAVA_SNIPPET, PYTHON_SNIPPET

ROOT = Path(__file__).resolve().parent.parent


def prepare(source, out, lang="python", **kw):
    kw.setdefault("tokenizer", "none")
    kw.setdefault("workers", 1)
    return prepare_data(PrepareOptions(lang=lang, source=str(source), out=str(out), progress=False, **kw))


def records(out, split):
    data = PreparedData(out)
    source = data.records(split)
    return [decode_record(source[i]) for i in range(len(source))]


def all_records(out):
    return {split: records(out, split) for split in ("train", "dev", "test")}


def python_tree(root: Path, n: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pkg").mkdir(exist_ok=True)
    for i in range(n):
        (root / "pkg" / f"mod{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}  # c\n")
    (root / "snippet.py").write_text(PYTHON_SNIPPET)
    return root


# -------------------------------------------------------------------------------------- file sources

def test_directory_of_python_files(tmp_path):
    src = python_tree(tmp_path / "src")
    (src / "notes.txt").write_text("not python")
    out = tmp_path / "out"
    summary = prepare(src, out, split=(1.0, 0.0, 0.0), literals=str(_write_literals(tmp_path)))
    recs = records(out, "train")
    assert [r["path"] for r in recs] == sorted(r["path"] for r in recs) and len(recs) == 13
    by_path = {r["path"]: r for r in recs}
    from test_data_preprocess import PYTHON_EXPECTED

    assert by_path["snippet.py"]["code"] == PYTHON_EXPECTED
    assert by_path["snippet.py"]["source"] == PYTHON_SNIPPET
    assert by_path["pkg/mod03.py"]["code"] == "<s> def f3 ( x ) : <EOL> return x + <NUM_LIT> </s>"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["files_found"] == 13 and stats["documents"] == {"train": 13}
    assert stats["codexglue_tokens"]["train"] == sum(len(r["code"].split()) - 2 for r in recs)
    assert summary["datasets"] == {"token": "codexglue_token_python"}  # no test split, so no line samples
    assert json.loads((out / "literals.json").read_text())["str"] == ["U+002CU+0020", "aU+0020b", "x"]


def _write_literals(tmp_path) -> Path:
    from test_data_preprocess import PYTHON_LITERALS

    path = tmp_path / "literals.json"
    path.write_text(PYTHON_LITERALS.to_json())
    return path


def test_zip_of_java_files_and_built_whitelist(tmp_path):
    archive = tmp_path / "code.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a/A.java", JAVA_SNIPPET)
        for i in range(5):
            z.writestr(f"b/B{i}.java", f'class B{i} {{ String s = "hi"; char c = \'x\'; int n = {i}; }}')
        z.writestr("readme.md", "no")
    out = tmp_path / "out"
    prepare(archive, out, lang="java", split=(1.0, 0.0, 0.0))
    recs = {r["path"]: r["code"] for r in records(out, "train")}
    assert set(recs) == {"a/A.java", *(f"b/B{i}.java" for i in range(5))}
    literals = json.loads((out / "literals.json").read_text())
    # Counted by hand over the train split (everything): strings "hi" 5x, then "\\n" ('\\n' is a two-character
    # STR_LIT) and "a, b" once each, ties in value order, "" never kept; chars x 6x, ' ' once; every number
    # once, so all ten in value order.
    assert literals["str"] == ["hi", "\\n", "aU+002CU+0020b"]
    assert literals["char"] == ["x", "U+0020"]
    assert literals["num"] == [".5f", "0", "0x1FL", "1", "1.5e3", "10", "1_000", "2", "3", "4"]
    assert recs["b/B2.java"] == ("<s> class B2 { String s = \"<STR_LIT:hi>\" ; char c = '<CHAR_LIT:x>' ; "
                                 "int n = <NUM_LIT:2> ; } </s>")


def test_split_is_by_path_hash_and_independent_of_other_files(tmp_path):
    small = python_tree(tmp_path / "small", n=10)
    big = python_tree(tmp_path / "big", n=40)
    prepare(small, tmp_path / "o1")
    prepare(big, tmp_path / "o2")
    split_small = {r["path"]: s for s, recs in all_records(tmp_path / "o1").items() for r in recs}
    split_big = {r["path"]: s for s, recs in all_records(tmp_path / "o2").items() for r in recs}
    assert all(split_big[p] == s for p, s in split_small.items())
    assert all(s == split_of(p) for p, s in split_big.items())
    assert len(set(split_big.values())) == 3  # 41 files at 0.8/0.1/0.1 reach every split here


def test_split_hash_is_stable_across_processes_and_matches_ratios():
    paths = [f"dir{i % 7}/file{i}.py" for i in range(20000)]
    here = [split_of(p, (0.7, 0.2, 0.1)) for p in paths[:50]]
    script = ("import sys; from greencode_jax.data.split import split_of; "
              "print(','.join(split_of(f'dir{i % 7}/file{i}.py', (0.7, 0.2, 0.1)) for i in range(50)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                           check=True).stdout.strip().split(",")
    assert here == other
    fractions = np.bincount([["train", "dev", "test"].index(split_of(p, (0.7, 0.2, 0.1))) for p in paths]) / 20000
    sigma = np.sqrt(np.array([0.7 * 0.3, 0.2 * 0.8, 0.1 * 0.9]) / 20000)
    assert np.all(np.abs(fractions - [0.7, 0.2, 0.1]) < 5 * sigma)
    assert 0.0 <= min(map(unit_hash, paths)) and max(map(unit_hash, paths)) < 1.0


def test_exact_duplicates_removed_keeping_the_first_path(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "b.py").write_text("x = 1\n")
    (src / "a.py").write_text("x = 1\n")
    (src / "c.py").write_text("y = 2\n")
    (src / "empty.py").write_text("# nothing\n")
    out = tmp_path / "out"
    prepare(src, out, split=(1.0, 0.0, 0.0))
    assert [r["path"] for r in records(out, "train")] == ["a.py", "c.py"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["duplicates_removed"] == 1 and stats["empty_removed"] == 1


def test_failed_and_unreadable_files_are_counted_not_fatal(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.py").write_text("ok = True\n")
    (src / "broken.py").write_text('x = """never closed\n')
    (src / "latin.py").write_bytes(b"s = '\xe9t\xe9'\n")
    (src / "gone.py").symlink_to(src / "does-not-exist.py")
    out = tmp_path / "out"
    prepare(src, out, split=(1.0, 0.0, 0.0))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == {"train": 1}
    assert stats["failures"]["by_reason"] == {"tokenize": 1, "undecodable": 1, "unreadable": 1}
    assert sorted(f["path"] for f in stats["failures"]["first"]) == ["broken.py", "gone.py", "latin.py"]


def test_parallel_workers_give_the_same_corpus(tmp_path):
    src = python_tree(tmp_path / "src", n=30)
    prepare(src, tmp_path / "one", workers=1)
    prepare(src, tmp_path / "two", workers=2)
    assert all_records(tmp_path / "one") == all_records(tmp_path / "two")
    assert (tmp_path / "one" / "literals.json").read_text() == (tmp_path / "two" / "literals.json").read_text()


# -------------------------------------------------------------------------------- CodeXGLUE sources

def codexglue_dir(root: Path) -> Path:
    root.mkdir()
    (root / "train.txt").write_text("<s> import os <EOL> os . sep </s>\n<s> x = <NUM_LIT:0> + '<STR_LIT:->>' </s>\n"
                                    "<s> dup = '<STR_LIT:a>' </s>\n<s> </s>\n")
    (root / "dev.txt").write_text("<s> y = <NUM_LIT> </s>\n")
    (root / "test.txt").write_text("<s> dup = '<STR_LIT:a>' </s>\n<s> def f ( ) : <EOL> return <NUM_LIT:1> </s>\n\n")
    return root


def test_codexglue_directory_keeps_given_splits_and_test_over_train_duplicates(tmp_path):
    out = tmp_path / "out"
    prepare(codexglue_dir(tmp_path / "cxg"), out)
    recs = all_records(out)
    assert [r["code"] for r in recs["train"]] == ["<s> import os <EOL> os . sep </s>",
                                                  "<s> x = <NUM_LIT:0> + '<STR_LIT:->>' </s>"]
    assert [r["code"] for r in recs["dev"]] == ["<s> y = <NUM_LIT> </s>"]
    assert [r["code"] for r in recs["test"]] == ["<s> dup = '<STR_LIT:a>' </s>",
                                                 "<s> def f ( ) : <EOL> return <NUM_LIT:1> </s>"]
    assert recs["test"][1]["path"] == "test.txt:2" and recs["test"][1]["source"] == ""
    stats = json.loads((out / "stats.json").read_text())
    assert stats["duplicates_removed"] == 1 and stats["empty_removed"] == 1
    assert stats["literals"]["num"] == {"kept": 2, "normalised": 1}
    assert stats["literals"]["str"] == {"kept": 2}
    # the whitelist a CodeXGLUE corpus was made with, as observed in its train split
    assert json.loads((out / "literals.json").read_text())["num"] == ["0"]
    assert json.loads((out / "literals.json").read_text())["str"] == ["->"]
    samples = PreparedData(out).line_samples()
    assert [s["id"] for s in samples] == [0, 1]
    assert samples == line_samples([r["code"] for r in recs["test"]], "python", seed=0, max_samples=None)
    for sample, rec in zip(samples, recs["test"]):
        assert (sample["input"] + " " + sample["gt"]).split() == rec["code"].split()[:len(
            (sample["input"] + " " + sample["gt"]).split())]


def test_missing_splits_are_carved_from_train(tmp_path):
    src = tmp_path / "cxg"
    src.mkdir()
    lines = [f"<s> v{i} = <NUM_LIT> </s>" for i in range(60)]
    (src / "train.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    prepare(src, out)
    recs = all_records(out)
    assert sum(len(v) for v in recs.values()) == 60 and recs["dev"] and recs["test"]
    for split, items in recs.items():
        assert all(split_of(r["code"]) == split for r in items)


def test_line_level_json(tmp_path):
    path = tmp_path / "test.json"
    rows = [{"id": 7, "input": "<s> x =", "gt": "<NUM_LIT:0>"}, {"input": "<s> a  (", "gt": "b )"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    summary = prepare(path, out)
    assert summary["datasets"] == {"line": "codexglue_line_python"}
    assert PreparedData(out).line_samples() == [{"id": 7, "input": "<s> x =", "gt": "<NUM_LIT:0>"},
                                                {"id": 1, "input": "<s> a (", "gt": "b )"}]


# ---------------------------------------------------------------------------------- HF and TFDS copies

def test_hugging_face_saved_dataset_dict(tmp_path):
    import datasets

    def part(lines, offset):
        return datasets.Dataset.from_dict({"id": list(range(offset, offset + len(lines))),
                                           "code": [line.split() for line in lines]})

    train = [f"<s> t{i} = <NUM_LIT> </s>" for i in range(30)]
    test = ["<s> print ( '<STR_LIT>' ) </s>", "<s> z = <NUM_LIT:1> </s>"]
    datasets.DatasetDict({"train": part(train, 0), "test": part(test, 100)}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"
    prepare(tmp_path / "hf", out)
    recs = all_records(out)
    assert [r["code"] for r in recs["test"]] == test
    assert sorted(r["code"] for r in recs["train"] + recs["dev"]) == sorted(train)  # dev carved from train
    assert recs["dev"] and all(r["path"].startswith("train:") for r in recs["dev"])


def test_hugging_face_saved_line_level_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"id": [3, 4], "input": ["<s> a =", "<s> b ("],
                                "gt": ["<NUM_LIT:0>", ")"]}).save_to_disk(str(tmp_path / "line"))
    out = tmp_path / "out"
    prepare(tmp_path / "line", out)
    assert PreparedData(out).line_samples() == [{"id": 3, "input": "<s> a =", "gt": "<NUM_LIT:0>"},
                                                {"id": 4, "input": "<s> b (", "gt": ")"}]


def test_tfds_directory_source_without_tensorflow(tmp_path):
    """A TFDS ArrayRecord dataset shaped like TFDS's wrapper of the hub copy (`code`: a sequence of tokens)."""
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict({"id": np.int32, "code": tfds.features.Sequence(tfds.features.Text())})
    directory = tmp_path / "tfds" / "cxg_copy" / "1.0.0"
    directory.mkdir(parents=True)
    identity = tfds.core.dataset_info.DatasetIdentity(name="cxg_copy", version=tfds.core.Version("1.0.0"),
                                                      data_dir=str(directory), module_name="tests")
    info = tfds.core.DatasetInfo(builder=identity, features=features, description="test copy")
    writer = tfds.core.SequentialWriter(ds_info=info, max_examples_per_shard=10, file_format="array_record")
    lines = {"train": [f"<s> a{i} = <NUM_LIT> </s>" for i in range(12)], "validation": ["<s> v ( ) </s>"],
             "test": ["<s> t . u </s>"]}
    for split, split_lines in lines.items():
        writer.initialize_splits([split])
        writer.add_examples({split: [{"id": i, "code": ln.split()} for i, ln in enumerate(split_lines)]})
    writer.close_splits(list(lines))
    out = tmp_path / "out"
    prepare(tmp_path / "tfds" / "cxg_copy", out)
    recs = all_records(out)
    assert [r["code"] for r in recs["train"]] == lines["train"]
    assert [r["code"] for r in recs["dev"]] == lines["validation"]
    assert [r["code"] for r in recs["test"]] == lines["test"]


def test_prepared_corpus_reads_through_tfds_data_source_without_tensorflow(tmp_path):
    src = python_tree(tmp_path / "src", n=20)
    out = tmp_path / "out"
    prepare(src, out)
    expected = records(out, "train")
    script = ("import json, sys, tensorflow_datasets as tfds\n"
              "src = tfds.data_source('codexglue_token_python', data_dir=sys.argv[1], split='train')\n"
              "rows = [{k: v.decode() for k, v in src[i].items()} for i in range(len(src))]\n"
              "b = tfds.builder_from_directory(sys.argv[1] + '/codexglue_token_python/1.0.0')\n"
              "assert b.info.file_format.value == 'array_record'\n"
              "print(json.dumps({'tf': 'tensorflow' in sys.modules, 'rows': rows}))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out / "tfds")], capture_output=True, text=True,
                          check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tf"] is False
    assert result["rows"] == expected


# ------------------------------------------------------------------------------ tokenizers and tokens

def test_bpe_tokenizer_placeholders_are_whole_and_tokens_match_records(tmp_path):
    src = python_tree(tmp_path / "src", n=30)
    out = tmp_path / "out"
    prepare(src, out, tokenizer="bpe", vocab_size=600, split=(0.9, 0.0, 0.1))
    data = PreparedData(out)
    tok = data.tokenizer()
    kept_number = json.loads((out / "literals.json").read_text())["num"][0]
    for placeholder in ("<EOL>", "<STR_LIT>", "<NUM_LIT>", f"<NUM_LIT:{kept_number}>", "<s>", "</s>"):
        ids = tok.encode(placeholder)
        assert ids[0] == tok.bos_id and len(ids) == 2 and tok.decode(ids[1:]) == placeholder
    for split in ("train", "test"):
        store, recs = data.tokens(split), records(out, split)
        assert len(store) == len(recs)
        for i, rec in enumerate(recs):
            ids = store.doc(i).tolist()
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            assert tok.decode(ids[1:-1]) == rec["code"][4:-5]  # the space-joined tokens between <s> and </s>
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert hf(records(out, "train")[0]["code"][4:-5])["input_ids"] == data.tokens("train").doc(0).tolist()[:-1]


def test_model_tokenizer_from_a_hugging_face_directory_and_raw_view(tmp_path):
    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{chr(c): c for c in range(32, 127)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # one token per character

    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                              unk_token="<unk>")
    hf.save_pretrained(tmp_path / "model")
    src = python_tree(tmp_path / "src", n=5)
    out = tmp_path / "out"
    prepare(src, out, tokenizer=str(tmp_path / "model"), view="raw", split=(1.0, 0.0, 0.0))
    data = PreparedData(out)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    for i, rec in enumerate(records(out, "train")):
        assert data.tokens("train").doc(i).tolist() == reference(rec["source"])["input_ids"] + [2]
    assert data.manifest["tokenizer"]["kind"] == "hf" and data.manifest["view"] == "raw"
    from greencode_jax.data.tokenizer import tokenizer_fingerprint

    # The corpus records the model directory's tokenizer identity: a checkpoint of it matches.
    assert data.manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tmp_path / "model") is not None


def test_stream_and_samples_from_a_prepared_corpus(tmp_path):
    src = python_tree(tmp_path / "src", n=30)
    out = tmp_path / "out"
    prepare(src, out, tokenizer="bpe", vocab_size=600)
    data = PreparedData(out)
    batch = next(data.stream("train", seq_len=8, global_batch=2, seed=0, process_index=0, process_count=1))
    assert batch["tokens"].shape == (2, 8)
    import jax

    default = data.stream("train", seq_len=8, global_batch=2, seed=0)  # jax.process_index() / process_count()
    assert (default.process_index, default.process_count) == (jax.process_index(), jax.process_count())
    assert np.array_equal(next(default)["tokens"], batch["tokens"])
    samples = data.completion_samples("test", fraction=0.5, new_tokens=3)
    store = data.tokens("test")
    assert samples and all(np.array_equal(np.concatenate([s.context, s.target]),
                                          store.doc(s.doc)[:len(s.context) + len(s.target)]) for s in samples)


# --------------------------------------------------------------------------------------- bad input

def bad(tmp_path, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(GreencodeError, match=match):
        prepare(out=out, **kw)
    assert_no_output(out)


def test_missing_path(tmp_path):
    bad(tmp_path, r"--source .*nowhere: no such file or directory; --source takes stdlib", source=tmp_path / "nowhere")


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    bad(tmp_path, r"empty: no \.py files found", source=tmp_path / "empty")


def test_all_files_unusable(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_bytes(b"x = '\xff'\n")
    (src / "b.py").write_text('"""open\n')
    bad(tmp_path, r"no usable documents \(2 found, 1 undecodable, 1 tokenize\); first: a\.py \(undecodable",
        source=src)


def test_malformed_codexglue_line(tmp_path):
    src = tmp_path / "cxg"
    src.mkdir()
    (src / "train.txt").write_text("<s> ok </s>\nimport os <EOL> </s>\n")
    bad(tmp_path, r"train\.txt:2: expected a CodeXGLUE token-level line '<s> … </s>', got 'import os", source=src)


def test_undecodable_codexglue_file(tmp_path):
    src = tmp_path / "cxg"
    src.mkdir()
    (src / "test.txt").write_bytes(b"<s> x = '\xff' </s>\n")
    bad(tmp_path, r"test\.txt: not valid UTF-8", source=src)


def test_malformed_line_level_json(tmp_path):
    path = tmp_path / "test.json"
    path.write_text('{"input": "<s> a", "gt": "b"}\n{"input": "<s> c"}\n')
    bad(tmp_path, r"test\.json:2: expected a JSON object with string fields 'input' and 'gt'", source=path)
    path.write_text('{"input": "<s> a", "gt": "b"}\nnot json\n')
    bad(tmp_path, r"test\.json:2: not JSON", source=path)


def test_no_java_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `java` on PATH
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    (tmp_path / "jdk" / "lib").mkdir(parents=True)
    (tmp_path / "jdk" / "lib" / "src.zip").symlink_to(tmp_path / "missing.zip")  # a JDK without its sources
    monkeypatch.setattr(sources_lib, "JVM_DIRS", [str(tmp_path / "jvm")])
    bad(tmp_path, r"no Java sources found: looked for a JDK src\.zip in .*jdk/lib/src\.zip.*openjdk-17-source",
        lang="java", source="jdk")


def test_jdk_src_zip_discovery_and_modules(tmp_path, monkeypatch):
    home = tmp_path / "jvm" / "some-jdk"
    (home / "lib").mkdir(parents=True)
    with zipfile.ZipFile(home / "lib" / "src.zip", "w") as z:
        z.writestr("java.base/java/lang/Thing.java", "package java.lang; class Thing { int x = 1; }")
        z.writestr("java.sql/java/sql/Other.java", "package java.sql; class Other { }")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(sources_lib, "JVM_DIRS", [str(tmp_path / "jvm")])
    assert sources_lib.find_jdk_src_zip() == home / "lib" / "src.zip"
    source = sources_lib.resolve_source("jdk:java.base", "java")
    assert [p for p, _ in source.refs] == ["java.base/java/lang/Thing.java"]
    with pytest.raises(GreencodeError, match="no .java files in module\\(s\\) java.nope; modules in the archive: "
                                             "java.base, java.sql"):
        sources_lib.resolve_source("jdk:java.nope", "java")


def test_other_user_mistakes(tmp_path):
    src = python_tree(tmp_path / "src", n=2)
    bad(tmp_path, "--view raw needs source files", source=codexglue_dir(tmp_path / "cxg"), view="raw")
    bad(tmp_path, "--tokenizer .*nodir: no such directory", source=src, tokenizer=str(tmp_path / "nodir"))
    bad(tmp_path, "--source stdlib is Python's standard library", source="stdlib", lang="java")
    bad(tmp_path, "the train split is empty, nothing to train a BPE on", source=src, tokenizer="bpe",
        split=(0.0, 0.0, 1.0))
    (tmp_path / "lits.json").write_text("[]")
    bad(tmp_path, "lits.json: expected a JSON object", source=src, literals=str(tmp_path / "lits.json"))
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(GreencodeError, match="already exists"):
        prepare(src, out)
