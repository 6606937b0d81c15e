"""What a new user hits with `greencode finetune`: a bad input is named and leaves nothing behind;
the data preparation and the final evaluation show progress; a finished run, rerun, says so and
prints its eval.json instead of evaluating again (unless --re-evaluate)."""

from __future__ import annotations

import json

import pytest

from greencode_jax.cli.train_cmd import load_finetune_config
from greencode_jax.cli.train_cmd import main as greencode_main
from greencode_jax.errors import GreencodeError
from greencode_jax.train import train
from greencode_jax.train.data import _new_parents
from test_train_support import (  # noqa: F401 (fixtures)
    compile_cache, run_cli, stdlib_corpus, subprocess_env, tiny_config, write_config,
)


def _only_entries(directory):
    return sorted(p.name for p in directory.iterdir())


def test_bad_model_init_is_named_by_the_cli_and_leaves_no_run_directory(tmp_path, stdlib_corpus, compile_cache):
    missing = tmp_path / "no" / "such-model"
    config = tiny_config(stdlib_corpus, tmp_path / "runs", "bad-init", model={"init": str(missing), "config": None})
    path = write_config(tmp_path / "bad-init.yaml", config)
    done = run_cli(["finetune", path], subprocess_env(compile_cache), timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"greencode: error: {path}: model.init: {missing}: no such directory")
    assert not (tmp_path / "runs").exists()  # not even run.out_dir
    assert _only_entries(tmp_path) == ["bad-init.yaml"]


@pytest.mark.parametrize("case", ["not-a-model", "missing-data", "unprepared-data", "prepare-lang", "vocab-size",
                                  "seq-len"])
def test_bad_inputs_are_named_and_leave_no_run_directory(tmp_path, stdlib_corpus, case):
    runs = tmp_path / "runs"
    sections = {}
    if case == "not-a-model":
        (tmp_path / "empty").mkdir()
        sections["model"] = {"init": str(tmp_path / "empty"), "config": None}
        expected = (f"model.init={tmp_path / 'empty'}: neither a greencode checkpoint nor a Hugging Face model "
                    "directory (no config.json)")
    elif case == "missing-data":
        sections["data"] = {"path": str(tmp_path / "data" / "nowhere")}
        expected = (f"data.path={tmp_path / 'data' / 'nowhere'}: no such directory; prepare it with `greencode "
                    "prepare-data")
    elif case == "unprepared-data":
        (tmp_path / "empty").mkdir()
        sections["data"] = {"path": str(tmp_path / "empty")}
        expected = f"data.path: {tmp_path / 'empty'}: not a prepared corpus (prepare.json missing)"
    elif case == "prepare-lang":
        sections["data"] = {"path": str(tmp_path / "data" / "corpus"), "prepare_lang": "rust"}
        expected = "data.prepare_lang='rust'; expected one of ['python', 'java']"
    elif case == "vocab-size":
        sections["data"] = {"path": str(tmp_path / "data" / "corpus"), "prepare_lang": "python",
                            "prepare_vocab_size": 0}
        expected = "data.prepare_vocab_size=0; expected a positive integer"
    else:  # found once the data and the model's config are read, still before anything is written
        sections["data"] = {"seq_len": 65}
        expected = "data.seq_len=65 exceeds the model's max_position_embeddings=64"
    path = write_config(tmp_path / "bad.yaml", tiny_config(stdlib_corpus, runs, "bad", **sections))
    config, resolved = load_finetune_config(path, [])
    with pytest.raises(GreencodeError) as error:
        train(config, source=str(path), resolved_yaml=resolved, progress=False)
    assert str(error.value).startswith(f"{path}: {expected}"), str(error.value)
    assert not runs.exists()
    assert not (tmp_path / "data").exists()  # nor a data directory it created
    assert "bad.yaml" in _only_entries(tmp_path)


def test_a_failed_preparation_removes_the_directories_it_created(tmp_path):
    target = tmp_path / "a" / "b" / "corpus"
    with pytest.raises(RuntimeError):
        with _new_parents(target):
            assert target.parent.is_dir()
            (target.parent / "partial").write_text("x")
            raise RuntimeError("preparation failed")
    assert _only_entries(tmp_path) == []
    (tmp_path / "kept").mkdir()  # a parent that existed before stays
    with pytest.raises(RuntimeError):
        with _new_parents(tmp_path / "kept" / "new" / "corpus"):
            raise RuntimeError("preparation failed")
    assert _only_entries(tmp_path) == ["kept"] and _only_entries(tmp_path / "kept") == []


def test_data_preparation_inside_finetune_shows_progress(tmp_path, capsys):
    """data.prepare_lang with no data directory prepares it with prepare-data's progress bars;
    the run then fails on its sequence length, which leaves the (complete) corpus and no run."""
    from test_train_support import TINY_LLAMA

    corpus = tmp_path / "data" / "stdlib"
    config = tiny_config(corpus, tmp_path / "runs", "prep", data={"prepare_lang": "python", "prepare_max_files": 20,
                                                                   "prepare_vocab_size": 512, "seq_len": 65},
                         model={"config": dict(TINY_LLAMA)})
    path = write_config(tmp_path / "prep.yaml", config)
    assert greencode_main(["finetune", str(path), "run.progress=true"]) == 2
    out, err = capsys.readouterr()
    assert f"preparing python corpus at {corpus} (data.prepare_lang)" in out
    assert "prepare-data: python from" in err and "files" in err  # the bars prepare-data shows
    assert err.strip().splitlines()[-1] == (f"greencode: error: {path}: data.seq_len=65 exceeds the model's "
                                            "max_position_embeddings=64")
    assert (corpus / "prepare.json").is_file()
    assert not (tmp_path / "runs").exists()


def test_a_finished_run_reuses_its_evaluation_unless_asked(tmp_path, stdlib_corpus, capsys):
    config = tiny_config(stdlib_corpus, tmp_path, "done", train={"steps": 3, "warmup_steps": 0},
                         checkpoint={"every": 3}, eval={"batches": 1})
    path = write_config(tmp_path / "done.yaml", config)
    assert greencode_main(["finetune", str(path)]) == 0
    first = capsys.readouterr().out
    assert "finetune: 3 steps and the evaluation in" in first
    eval_file = tmp_path / "done" / "eval.json"
    written, stat = eval_file.read_text(), eval_file.stat()
    table = first[first.index("  test split"):]

    # rerun: nothing trained, nothing evaluated, nothing rewritten; the same table again
    assert greencode_main(["finetune", str(path)]) == 0
    again = capsys.readouterr()
    assert again.out.startswith(f"finetune done: already finished (step 3/3); final checkpoint "
                                f"{tmp_path / 'done' / 'final'}; its evaluation, from {eval_file} "
                                "(--re-evaluate evaluates again):\n")
    assert again.out.endswith(table)
    assert "steps and the evaluation" not in again.out and "evaluating" not in again.err
    assert eval_file.read_text() == written and eval_file.stat().st_mtime_ns == stat.st_mtime_ns

    # --re-evaluate: evaluated again (with its progress bar), eval.json rewritten, final/ kept
    final_stamp = (tmp_path / "done" / "final").stat().st_mtime_ns
    assert greencode_main(["finetune", str(path), "--re-evaluate", "run.progress=true"]) == 0
    fresh = capsys.readouterr()
    assert "finished at step 3, evaluating again (--re-evaluate)" in fresh.out
    assert "finetune done: already finished (step 3/3); evaluated again in" in fresh.out
    assert "evaluating test" in fresh.err  # the evaluation's progress bar
    assert eval_file.stat().st_mtime_ns != stat.st_mtime_ns
    assert json.loads(eval_file.read_text())["exit_loss"] == pytest.approx(json.loads(written)["exit_loss"], rel=1e-5)
    assert fresh.out.endswith(table)
    assert (tmp_path / "done" / "final").stat().st_mtime_ns == final_stamp

    # an evaluation of another size is not reused: the rerun evaluates by itself
    assert greencode_main(["finetune", str(path), "eval.batches=2"]) == 0
    other = capsys.readouterr().out
    assert "evaluating again" in other and "covers 1 batches of the test split" in other
    assert json.loads(eval_file.read_text())["batches"] == 2
