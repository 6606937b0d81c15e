"""What a new user hits on a fresh clone (issue 16): outputs under directories that do not exist
yet, a corrupt checkpoint, exported files' modes, prepare-data's header with --max-files, an empty
override value, transformers' own progress bars."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import transformers
from flax import nnx

import greencode_jax as gc
from greencode_jax.atomic import atomic_directory, atomic_write_text, resumable_directory
from greencode_jax.cli.main import main
from greencode_jax.models import ModelConfig
from greencode_jax.models.model import init_model

REPO = Path(__file__).resolve().parents[1]

TINY = ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                   head_dim=8, intermediate_size=32, max_position_embeddings=32, norm_eps=1e-5, activation="silu",
                   tie_word_embeddings=True, attention_bias=False, mlp_bias=False, exit_layers=(0, 1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random model saved as our checkpoint (never modified: tests corrupt copies)."""
    return gc.save_checkpoint(init_model(TINY), tmp_path_factory.mktemp("fresh") / "ckpt")


@pytest.fixture(scope="module")
def py_source(tmp_path_factory) -> Path:
    """Five small, distinct Python files."""
    src = tmp_path_factory.mktemp("fresh_src") / "src"
    src.mkdir()
    for i in range(5):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n\n\nprint(f{i}('a{i}'), {i}.5)\n")
    return src


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def corrupt_copy(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of `checkpoint` whose largest parameter file is cut to 50 bytes."""
    import shutil

    copy = tmp_path / "corrupt_ckpt"
    shutil.copytree(checkpoint, copy)
    largest = max((p for p in (copy / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, 50)
    return copy


# ---- outputs under parents that do not exist yet ------------------------------------------------------------------

def test_commands_create_their_outputs_missing_parents(checkpoint, zoo, py_source, tmp_path, capsys):
    nested, hf = tmp_path / "a" / "b", zoo["opt_pre_tied"]
    assert main(["convert-from-hf", str(hf.path), str(nested / "ckpt" / "x")]) == 0
    assert gc.load_pretrained(nested / "ckpt" / "x").config.num_layers == hf.num_layers
    assert main(["export-hf", str(checkpoint), str(nested / "hf" / "x")]) == 0
    assert (nested / "hf" / "x" / "model.safetensors").is_file()
    assert main(["prepare-data", "--source", str(py_source), "--out", str(nested / "data" / "py"),
                 "--tokenizer", "none", "--line-samples", "0", "--workers", "1", "--quiet"]) == 0
    assert json.loads((nested / "data" / "py" / "prepare.json").read_text())["lang"] == "python"
    assert main(["energy", "probe", "--sample-seconds", "0", "--json", str(nested / "energy" / "probe.json")]) == 0
    assert json.loads((nested / "energy" / "probe.json").read_text())["devices"]
    capsys.readouterr()
    # no temporary sibling left anywhere
    assert not [p for p in tmp_path.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def test_shared_writers_create_parents(tmp_path):
    """What every --json / --out file (benches, energy calibrate), every output directory and the
    resumable work directories of collect-rollouts / train-policy go through."""
    atomic_write_text(tmp_path / "x" / "y" / "bench.json", "{}\n")
    assert (tmp_path / "x" / "y" / "bench.json").read_text() == "{}\n"
    with atomic_directory(tmp_path / "d" / "e" / "out") as tmp:
        (tmp / "f.txt").write_text("1")
    assert (tmp_path / "d" / "e" / "out" / "f.txt").read_text() == "1"
    work, resumed = resumable_directory(tmp_path / "r" / "s" / "policy", {"k": 1}, "training", kind="policy")
    assert work == tmp_path / "r" / "s" / "policy.partial" and not resumed
    assert json.loads((work / "settings.json").read_text()) == {"k": 1}


def test_failure_removes_the_parents_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "kept" / "new" / "deeper" / "out") as tmp:
            (tmp / "partial.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]  # the existing parent stays, nothing else


def test_failed_command_leaves_no_parents(checkpoint, tmp_path, capsys):
    corrupt = corrupt_copy(checkpoint, tmp_path)
    assert main(["export-hf", str(corrupt), str(tmp_path / "new" / "hf" / "x")]) == 2
    assert "corrupt or incomplete" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_parent_that_is_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(gc.GreencodeError, match=rf"{tmp_path / 'file'}: not a directory"):
        atomic_write_text(tmp_path / "file" / "sub" / "out.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---- a corrupt checkpoint -----------------------------------------------------------------------------------------

def test_corrupt_checkpoint_is_one_line_through_the_cli(checkpoint, tmp_path):
    corrupt = corrupt_copy(checkpoint, tmp_path)
    out = tmp_path / "out" / "hf"
    proc = subprocess.run([sys.executable, "-m", "greencode_jax.cli.main", "export-hf", str(corrupt), str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no "Event loop is closed" tracebacks, no TensorStore spec
    assert lines[0].startswith(f"greencode: error: {corrupt}: checkpoint is corrupt or incomplete")
    assert "Traceback" not in proc.stderr and "pybind11" not in proc.stderr and "TensorStore(" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_through_load_pretrained(checkpoint, tmp_path):
    corrupt = corrupt_copy(checkpoint, tmp_path)
    with pytest.raises(gc.GreencodeError, match=rf"^{corrupt}: checkpoint is corrupt or incomplete") as info:
        gc.load_pretrained(corrupt)
    assert "\n" not in str(info.value) and "bound method" not in str(info.value)
    assert gc.load_pretrained(checkpoint).config == TINY  # the intact one still loads


def test_abandoned_orbax_task_logged_by_asyncio_is_filtered(caplog):
    """The third way an abandoned read reports itself (seen in about 1 run in 10 of the CLI test
    above): asyncio logs a garbage-collected task whose exception was never retrieved. Through
    asyncio's own handler, with the filter `restore_params` installs: an Orbax coroutine's task is
    dropped, any other task's still logged."""
    import asyncio
    import gc as garbage

    from greencode_jax.convert import checkpoint as ckpt

    def failing_coroutine(filename):  # a coroutine whose code lives in `filename`, as Orbax's do
        namespace = {}
        exec(compile("async def read():\n    raise ValueError('cut short')\n", filename, "exec"), namespace)
        return namespace["read"]()

    def abandon(filename):
        loop = asyncio.new_event_loop()
        task = loop.create_task(failing_coroutine(filename))
        loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody reads it
        loop.close()
        del task
        garbage.collect()

    previous_hook = sys.unraisablehook
    ckpt._quiet_abandoned_reads()
    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            abandon("/site-packages/orbax/checkpoint/serialization.py")
            assert not [r for r in caplog.records if r.name == "asyncio"]
            abandon("/site-packages/other/module.py")
            assert [r for r in caplog.records if "Task exception was never retrieved" in r.getMessage()]
    finally:
        sys.unraisablehook = previous_hook
        logging.getLogger("asyncio").removeFilter(ckpt._quiet_asyncio_log)



def test_abandoned_future_reading_a_failed_checkpoint_is_filtered(checkpoint, tmp_path, caplog):
    """A bare TensorStore future (no Orbax frame, no Orbax in its text) that read the directory whose
    restore failed, collected with its exception unread: dropped; one naming another path: logged."""
    import asyncio
    import gc as garbage

    from greencode_jax.convert import checkpoint as ckpt

    corrupt = corrupt_copy(checkpoint, tmp_path)
    previous_hook = sys.unraisablehook
    try:
        with pytest.raises(gc.GreencodeError, match="corrupt or incomplete"):
            gc.load_pretrained(corrupt)

        def abandon(text):
            loop = asyncio.new_event_loop()
            future = loop.create_future()
            future.set_exception(ValueError(text))
            loop.close()
            del future
            garbage.collect()

        with caplog.at_level("ERROR", logger="asyncio"):
            caplog.clear()
            abandon(f'OUT_OF_RANGE: Error reading "x" in OCDBT database at local file "{corrupt}/params/": '
                    "Requested byte range [1944, 5773) is not valid for value of size 50")
            assert not [r for r in caplog.records if r.name == "asyncio"]
            abandon(f'OUT_OF_RANGE: Error reading "x" at local file "{tmp_path}/elsewhere/"')
            assert [r for r in caplog.records if "Future exception was never retrieved" in r.getMessage()]
    finally:
        sys.unraisablehook = previous_hook
        logging.getLogger("asyncio").removeFilter(ckpt._quiet_asyncio_log)


# ---- exported files' modes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shards", [1, 3])
def test_exported_files_get_the_usual_mode(checkpoint, tmp_path, umask_022, shards):
    model = gc.load_pretrained(checkpoint)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out = gc.export_pretrained(model, tmp_path / "hf", max_shard_bytes=total // shards if shards > 1 else 10**12)
    files = sorted(out.iterdir())
    assert len([p for p in files if p.suffix == ".safetensors"]) >= shards
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}
    assert oct(stat.S_IMODE(out.stat().st_mode)) == "0o755"


# ---- prepare-data's header with --max-files ------------------------------------------------------------------------

def test_prepare_data_header_counts_the_files_it_uses(py_source, tmp_path, capsys):
    assert main(["prepare-data", "--source", str(py_source), "--max-files", "2", "--out", str(tmp_path / "py"),
                 "--tokenizer", "none", "--line-samples", "0", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    header = captured.err.splitlines()[0]
    assert header == f"prepare-data: python from 2 of 5 .py files under {py_source}", header
    assert f"prepared python from 2 of 5 .py files under {py_source}" in captured.out
    assert "files       2 found" in captured.out
    assert json.loads((tmp_path / "py" / "prepare.json").read_text())["source"] == f"2 of 5 .py files under {py_source}"


# ---- an empty override value ---------------------------------------------------------------------------------------

def test_empty_override_of_a_str_field_is_the_empty_string():
    from greencode_jax.cli.train_cmd import load_finetune_config

    config, resolved = load_finetune_config(REPO / "configs" / "stdlib-scratch.yaml", ["data.prepare_lang="])
    assert config.data.prepare_lang == ""
    assert config.data.path == "data/stdlib-python-bpe2k"  # the rest as the file says
    with pytest.raises(gc.GreencodeError, match=r"'train\.steps' is None, expected int"):
        load_finetune_config(REPO / "configs" / "stdlib-scratch.yaml", ["train.steps="])  # only str fields


# ---- transformers' own progress bars -------------------------------------------------------------------------------

def test_quiet_transformers_hides_its_progress_bars(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from greencode_jax.convert.hf_export import quiet_transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    capfd.readouterr()
    with quiet_transformers():
        model.save_pretrained(tmp_path / "m")
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    quiet = capfd.readouterr()
    assert "Writing model shards" not in quiet.err + quiet.out and "Loading weights" not in quiet.err + quiet.out
    if hf_logging.is_progress_bar_enabled():  # outside the block they are back (unless this environment hides them)
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        assert "Loading weights" in capfd.readouterr().err
