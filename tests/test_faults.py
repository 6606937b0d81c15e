"""What a user can get wrong, on a copy of a finished run: nothing they own is deleted, no output
is replaced by one of another kind, NaN never becomes a result, every read is guarded, inputs are
checked before the work, and one command writes an output at a time.

Every failing command goes through the CLI and must exit 2 with exactly one stderr line and no
traceback, and leave every file of the test's tree (the run, the corpus, the user's files) as it
was: a hash manifest of the tree is taken before and after (`unchanged`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from greencode_jax.cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import chain_config, stdlib_corpus, write_chain_cost  # noqa: E402,F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, stdlib_corpus) -> Path:
    """A finished `greencode run` (under umask 022), never modified: each test works on a copy."""
    root = tmp_path_factory.mktemp("faults") / "w"
    root.mkdir()
    cost = write_chain_cost(stdlib_corpus, root / "cost.json")
    (root / "chain.yaml").write_text(yaml.safe_dump(chain_config(stdlib_corpus, cost, policies="full; fixed:0; learned@0.5")))
    cwd, umask = os.getcwd(), os.umask(0o022)
    try:
        os.chdir(root)
        assert main(["run", "chain.yaml"]) == 0
    finally:
        os.chdir(cwd)
        os.umask(umask)
    return root


@pytest.fixture
def world(finished, tmp_path, monkeypatch, capsys) -> Path:
    """A copy of the finished run, as the working directory (its config still names the original's
    cost model, which nothing writes)."""
    copy = tmp_path / "w"
    shutil.copytree(finished, copy, symlinks=True)
    monkeypatch.chdir(copy)
    capsys.readouterr()
    return copy


def tree(*roots: Path) -> dict:
    """path -> (sha256, mode) of every file, and path -> 'dir' of every directory, hidden ones too."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_symlink():  # a run directory's link into the stage store
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                out[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(path.lstat().st_mode))
            else:
                out[str(path)] = "dir"
    return out


def refused(args: list[str], capsys, *roots: Path) -> str:
    """Runs the command, which must fail with one line and change nothing under `roots`; returns the line."""
    before = tree(*roots)
    try:
        code = main(args)
    except SystemExit as exit:  # argparse's own errors: usage line + error line
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    if isinstance(code, int) and lines and lines[0].startswith("usage:"):  # argparse: its usage, then one error line
        lines = [line for line in lines if ": error: " in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert tree(*roots) == before, "the failed command changed files"
    return lines[0]


# ---- 1. --overwrite never deletes an input, a user's directory, or another kind of output ----------------------------

@pytest.mark.parametrize("args, expected", [
    (["collect-rollouts", "runs/chain/final", "--data", "{data}", "--out", "runs/chain/final", "--overwrite"],
     "runs/chain/final: is the command's own input (checkpoint)"),
    (["train-policy", "runs/chain/rollouts/train", "--out", "runs/chain/rollouts/train", "--overwrite"],
     "runs/chain/rollouts/train: is the command's own input (rollouts)"),
    (["export-hf", "runs/chain/final", "runs/chain/final", "--overwrite"],
     "runs/chain/final: is the command's own input (src)"),
    # (a run directory links its outputs from the stage store: runs/chain holds no input itself)
    (["export-hf", "runs/chain/final", "runs/chain", "--overwrite"], "runs/chain: made by `greencode run` as a run"),
    (["export-hf", "runs/chain/final", "runs/.stages/policy-{policy}/policy", "--overwrite"],
     "/policy: made by `greencode run` (stage policy) as a policy, not a hf-export"),
    (["export-hf", "runs/chain/final", "runs/chain/policy", "--overwrite"],
     "runs/chain/policy: exists and is not a directory a greencode-jax command made"),
    (["evaluate", "runs/chain/final", "--data", "{data}", "--out", "runs/chain/final/ev"],
     "runs/chain/final/ev: lies inside the command's input"),
])
def test_overwrite_never_replaces_an_input_or_another_kind(world, stdlib_corpus, capsys, args, expected):
    policy_key = json.loads((world / "runs/chain/pipeline.json").read_text())["policy"]["key"]
    args = [a.replace("{data}", str(stdlib_corpus)).replace("{policy}", policy_key) for a in args]
    line = refused(args, capsys, world, stdlib_corpus)
    assert expected in line, line


def test_prepare_data_never_replaces_what_it_did_not_make(world, capsys):
    source = world / "src"
    source.mkdir()
    (source / "a.py").write_text("x = 1\n")
    mine = world / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (world / "plain.txt").write_text("a file")
    common = ["prepare-data", "--source", str(source), "--tokenizer", "none", "--line-samples", "0", "--workers", "1",
              "--quiet", "--overwrite", "--out"]
    assert "mine: exists and was not made by greencode-jax" in refused(common + ["mine"], capsys, world)
    assert "plain.txt: exists and is not a directory" in refused(common + ["plain.txt"], capsys, world)
    line = refused(common + ["."], capsys, world)
    assert "contains the command's input" in line or "not made by greencode-jax" in line, line
    assert not list(world.parent.glob(".*old-*")) and not list(world.glob(".*old-*"))
    # its own corpus, though, is replaced when asked
    assert main(common + ["corpus"]) == 0
    assert main(common + ["corpus"]) == 0
    assert json.loads((world / "corpus" / ".greencode-output.json").read_text())["kind"] == "corpus"


def test_run_never_deletes_a_stage_output_it_did_not_make(world, capsys):
    """A stage whose pipeline.json entry is missing reruns, removing the outputs its own earlier run
    made; a user's directory (or file) in its place is left, and named."""
    done = json.loads((world / "runs/chain/pipeline.json").read_text())
    del done["policy"], done["evaluate"]
    (world / "runs/chain/pipeline.json").write_text(json.dumps(done))
    (world / "runs/chain/policy").unlink()  # the link into the stage store
    (world / "runs/chain/policy").mkdir()
    (world / "runs/chain/policy/my_policy.txt").write_text("hand-tuned")
    line = refused(["run", "chain.yaml"], capsys, world)
    assert line.startswith("greencode: error: [policy] runs/chain/policy: in the way of this run's policy stage, "
                           "and not made by greencode-jax"), line

    del done["calibrate"]
    (world / "runs/chain/pipeline.json").write_text(json.dumps(done))
    (world / "runs/chain/cost_model.json").unlink()
    (world / "runs/chain/cost_model.json").write_text('{"a_j": 1, "b_j_per_layer": 1}')  # the user's own fit
    line = refused(["run", "chain.yaml"], capsys, world)
    assert "[calibrate] runs/chain/cost_model.json: in the way" in line, line


def test_run_makes_a_stage_again_whose_status_record_is_missing(world, capsys):
    # (the evaluation's own resume checks its inputs' absolute paths, which this copy of the world changed:
    # tests/test_interrupts.py resumes stages in place)
    stage_dir = (world / "runs/chain/evaluate").resolve().parent  # its directory in the stage store
    (stage_dir / "status.json").unlink()  # as a worker killed before it recorded "done" leaves it
    shutil.rmtree(stage_dir / "evaluate")
    assert main(["run", "chain.yaml"]) == 0
    assert "[evaluate] done in" in capsys.readouterr().out
    rows = [json.loads(line) for line in (world / "runs/chain/evaluate/samples.jsonl").read_text().splitlines()]
    pairs = [(row["sample"], row["policy"]) for row in rows]
    policies = {policy for _, policy in pairs}
    assert {"full", "learned@certified"} <= policies  # the certify stage's row is evaluated too
    assert sorted(pairs) == sorted((s, p) for s in range(3) for p in policies)  # made again: once each, no duplicate


def test_finetune_never_writes_over_a_users_directory(world, capsys):
    config = yaml.safe_load((world / "chain.yaml").read_text())
    config["run"]["name"] = "mine"
    (world / "mine.yaml").write_text(yaml.safe_dump(config))
    (world / "runs/mine").mkdir()
    (world / "runs/mine/config.yaml").write_text("my: config\n")
    (world / "runs/mine/metrics.jsonl").write_text('{"my": 1}\n')
    line = refused(["finetune", "mine.yaml"], capsys, world)
    assert "runs/mine: exists and was not made by greencode-jax" in line, line
    line = refused(["run", "mine.yaml"], capsys, world)
    assert "runs/mine: exists and was not made by greencode-jax" in line, line
    # a `greencode run` directory holds links into the stage store, not a finetune's own outputs
    line = refused(["finetune", "chain.yaml"], capsys, world)
    assert "runs/chain: a `greencode run` directory (its final links to ../.stages/finetune-" in line, line


def test_run_never_replaces_a_users_own_link(world, capsys):
    """A link in a run directory is replaced only when it points into the stage store (a run made it)."""
    (world / "mine").mkdir()
    (world / "mine/cost_model.json").write_text("{}\n")
    link = world / "runs/chain/cost_model.json"
    link.unlink()
    link.symlink_to(world / "mine/cost_model.json")
    line = refused(["run", "chain.yaml"], capsys, world)
    assert "runs/chain/cost_model.json: a link to" in line and "not in the stage store" in line, line


def test_a_stale_partial_is_cleared_by_overwrite_only(world, capsys):
    from greencode_jax.atomic import resumable_directory

    # what an interrupted run with other settings leaves
    resumable_directory(world / "pol", {"another": "training"}, "training", kind="policy")
    line = refused(["train-policy", "runs/chain/rollouts/train", "--out", "pol", "rl.total_timesteps=128",
                    "rl.num_envs=8", "rl.num_steps=16", "rl.minibatch_size=64", "rl.hidden=[8,8]", "--no-progress"],
                   capsys, world)
    assert "pol.partial: an interrupted training with other settings" in line and "--overwrite" in line, line
    assert main(["train-policy", "runs/chain/rollouts/train", "--out", "pol", "rl.total_timesteps=128",
                 "rl.num_envs=8", "rl.num_steps=16", "rl.minibatch_size=64", "rl.hidden=[8,8]", "--no-progress",
                 "--overwrite"]) == 0
    assert (world / "pol/actor.safetensors").is_file() and not (world / "pol.partial").exists()


# ---- 2. finite or refused ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, field", [
    ("rl.beta=.nan", "rl.beta"), ("rl.learning_rate=1e400", "rl.learning_rate"), ("rl.alpha=-.inf", "rl.alpha"),
])
def test_train_policy_refuses_non_finite_fields(world, capsys, override, field):
    line = refused(["train-policy", "runs/chain/rollouts/train", "--out", "p2", override], capsys, world)
    assert f"'{field}'" in line and "finite" in line, line


def test_thresholds_lie_in_0_1_everywhere(world, capsys):
    line = refused(["train-policy", "runs/chain/rollouts/train", "--out", "p2", "rl.thresholds=[2]"], capsys, world)
    assert "rl.thresholds" in line and "0..1" in line, line
    line = refused(["run", "chain.yaml", "eval.thresholds=[2]"], capsys, world)
    assert "eval.thresholds" in line, line


@pytest.mark.parametrize("override, field", [
    ("train.learning_rate=.nan", "train.learning_rate"), ("train.exit_weights=[.inf, 1]", "train.exit_weights"),
    ("energy.min_seconds=.nan", "energy.min_seconds"), ("eval.context_fraction=.nan", "eval.context_fraction"),
])
def test_pipeline_refuses_non_finite_fields(world, capsys, override, field):
    line = refused(["run", "chain.yaml", override], capsys, world)
    assert field.split(".")[1] in line, line


def test_flags_refuse_nan(world, stdlib_corpus, capsys):
    line = refused(["prepare-data", "--split", "nan,0.5,0.5", "--out", "d"], capsys, world)
    assert "--split" in line and "finite" in line, line
    line = refused(["energy", "calibrate", "runs/chain/final", "--min-seconds", "nan"], capsys, world)
    assert "--min-seconds" in line and "finite" in line, line
    line = refused(["energy", "calibrate", "runs/chain/final", "--set", "watts_per_core=.nan"], capsys, world)
    assert "watts_per_core" in line, line


# ---- 6. every read is guarded --------------------------------------------------------------------------------------

def test_a_directory_or_binary_where_a_config_is_expected(world, capsys):
    (world / "binary.yaml").write_bytes(bytes(range(256)))
    assert "runs: is a directory; expected a YAML config file" in refused(["finetune", "runs"], capsys, world)
    assert "runs: is a directory" in refused(["run", "runs"], capsys, world)
    line = refused(["train-policy", "runs/chain/rollouts/train", "--out", "p2", "--config", "runs"], capsys, world)
    assert "runs: is a directory" in line, line
    assert "binary.yaml: not a text file" in refused(["run", "binary.yaml"], capsys, world)


def test_an_output_file_that_is_a_directory_is_refused_before_the_work(world, capsys):
    line = refused(["energy", "calibrate", "runs/chain/final", "--out", "runs/chain/rollouts"], capsys, world)
    assert "runs/chain/rollouts: is a directory; give a file path" in line, line
    assert "calibrate:" not in capsys.readouterr().out  # nothing was measured
    line = refused(["bench", "energy", "--windows", "1", "--json", "runs"], capsys, world)
    assert "runs: is a directory" in line, line
    line = refused(["energy", "probe", "--sample-seconds", "0", "--json", "chain.yaml"], capsys, world)
    assert "chain.yaml: exists and was not written by greencode-jax" in line, line


def test_a_corrupt_pipeline_json_is_one_line(world, capsys):
    (world / "runs/chain/pipeline.json").write_text('{"finetune": {"key": ')
    line = refused(["run", "chain.yaml"], capsys, world)
    assert "runs/chain/pipeline.json: unreadable" in line and "delete it" in line, line


# ---- 7. checks before the work -------------------------------------------------------------------------------------

def test_an_empty_eval_split_is_refused_before_training(world, capsys):
    source = world / "src"
    source.mkdir()
    for i in range(8):
        (source / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i}\n" * 20)
    assert main(["prepare-data", "--source", str(source), "--split", "1,0,0", "--out", "d100", "--vocab-size", "300",
                 "--line-samples", "0", "--workers", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: the dev split is empty" in err and "warning: the test split is empty" in err, err
    config = yaml.safe_load((world / "chain.yaml").read_text())
    config["run"]["name"], config["data"]["path"] = "empty-test", "d100"
    (world / "e.yaml").write_text(yaml.safe_dump(config))
    line = refused(["finetune", "e.yaml"], capsys, world)
    assert "eval.split='test'" in line, line
    assert not (world / "runs/empty-test").exists()


def test_calibrate_checks_its_depths_before_measuring(world, capsys):
    line = refused(["energy", "calibrate", "runs/chain/final", "--depths", "1,9"], capsys, world)
    assert "depth 9: expected a number of layers in 1..2" in line, line
    assert "calibrate:" not in capsys.readouterr().out


def test_a_failed_check_leaves_no_partial_directory(world, capsys):
    (world / "cost5.json").write_text(json.dumps({"a_j": 0.1, "b_j_per_layer": 0.01, "method": "estimated",
                                                  "num_layers": 5}))
    line = refused(["train-policy", "runs/chain/rollouts/train", "--out", "p3", "rl.reward=energy",
                    "rl.cost_model=cost5.json"], capsys, world)
    assert "a model of 5 layers" in line, line
    assert not (world / "p3.partial").exists() and not (world / "p3").exists()


# ---- 5. one writer per output --------------------------------------------------------------------------------------

def hold_lock(path: str, cwd: Path) -> subprocess.Popen:
    """Another process holding the lock of output `path` (as a second command would), until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom greencode_jax.locks import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n", path],
        stdout=subprocess.PIPE, text=True, cwd=cwd)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.parametrize("out, args", [
    ("ev", ["evaluate", "runs/chain/final", "--data", "{data}", "--out", "ev", "--samples", "2", "--policies", "full",
            "--protocols", "completion", "--no-progress", "--config", "chain.yaml"]),
    ("r2", ["collect-rollouts", "runs/chain/final", "--data", "{data}", "--out", "r2", "--episodes", "4",
            "--batch-size", "4", "--max-context", "40", "--no-progress"]),
    ("runs/ft", ["finetune", "chain.yaml", "run.name=ft"]),
])
def test_a_second_writer_is_refused_naming_the_holder(world, stdlib_corpus, capsys, out, args):
    args = [a.replace("{data}", str(stdlib_corpus)) for a in args]
    holder = hold_lock(out, world)
    try:
        line = refused(args, capsys, world, stdlib_corpus)
        assert f"{out}: another greencode command is writing it (PID {holder.pid}" in line, line
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert main(args) == 0  # the lock went with its holder, though its file stayed behind
    assert not (world / out).with_name(f".{Path(out).name}.lock").exists()  # removed by the next holder


# ---- 9. messages ---------------------------------------------------------------------------------------------------

def test_messages_name_the_real_problem(world, stdlib_corpus, capsys):
    line = refused(["collect-rollouts", "runs/chain/final", "--data", str(stdlib_corpus), "--out", "r2",
                    "--max-context", "0"], capsys, world)
    assert "max context 0: expected a positive number of tokens" in line, line
    common = ["evaluate", "runs/chain/final", "--data", str(stdlib_corpus), "--out", "ev", "--policies", "full",
              "--protocols", "completion", "--no-progress", "--config", "chain.yaml"]
    assert main(common + ["--samples", "2"]) == 0
    capsys.readouterr()
    line = refused(common + ["--samples", "3"], capsys, world)
    assert "config.samples 2 there, 3 here" in line, line


# ---- 8. every file we write has the same mode ----------------------------------------------------------------------

def test_every_file_of_a_run_has_the_usual_mode(finished):
    modes = {}
    for path in (finished / "runs").rglob("*"):
        if not path.is_symlink():
            modes.setdefault(stat.S_IMODE(path.stat().st_mode), []).append(str(path.relative_to(finished)))
    assert set(modes) <= {0o644, 0o755}, {oct(m): paths[:5] for m, paths in modes.items() if m not in (0o644, 0o755)}
