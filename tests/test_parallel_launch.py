"""The launchers' dry runs print exactly what they would execute."""

from __future__ import annotations

import shlex
import subprocess

from test_train_support import REPO


def dry_run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "launch" / script), "--dry-run", *args], capture_output=True, text=True,
                          timeout=30)


def test_local_single_process():
    out = dry_run("local.sh", "finetune", "configs/stdlib-scratch.yaml", "train.steps=5")
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == [str(REPO / ".venv/bin/greencode"), "finetune", "configs/stdlib-scratch.yaml",
                                       "train.steps=5"]


def test_local_processes_get_coordinates_and_fake_devices():
    out = dry_run("local.sh", "--processes", "3", "--cpu-devices", "4", "finetune", "my config.yaml")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        words = shlex.split(line)
        assert words[0] == "env" and words[-2:] == ["finetune", "my config.yaml"]
        assert {"JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
                "GREENCODE_COORDINATOR=localhost:12355", "GREENCODE_NUM_PROCESSES=3",
                f"GREENCODE_PROCESS_ID={i}"} <= set(words)
    bad = dry_run("local.sh", "--processes", "0", "finetune", "x.yaml")
    assert bad.returncode == 2 and "--processes must be a positive integer" in bad.stderr


def test_tpu_pod_runs_the_command_on_every_worker():
    out = dry_run("tpu_pod.sh", "--tpu", "pod-1", "--zone", "us-central2-b", "--project", "proj",
                  "finetune", "configs/llama3.2-3b-python.yaml", "train.learning_rate=2.0e-5")
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    assert words[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone", "us-central2-b", "--project"]
    assert "--worker=all" in words
    remote = words[words.index("--command") + 1]
    assert remote == ("cd ~/greencode-jax && GREENCODE_DISTRIBUTED=on .venv/bin/greencode finetune "
                      "configs/llama3.2-3b-python.yaml train.learning_rate=2.0e-5")
    assert dry_run("tpu_pod.sh", "finetune", "x.yaml").returncode == 2  # --tpu and --zone are required


def test_slurm_batch_script_has_one_task_per_gpu_and_requeues_on_preemption():
    out = dry_run("slurm.sh", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "12:00:00",
                  "finetune", "configs/opt-2.7b-java.yaml")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8",
                 "#SBATCH --time=12:00:00", "#SBATCH --signal=TERM@120", "#SBATCH --partition=gpu",
                 "srun --kill-on-bad-exit=1 .venv/bin/greencode finetune configs/opt-2.7b-java.yaml",
                 'if [ $status = 143 ]; then scontrol requeue "$SLURM_JOB_ID"; fi'):
        assert line in script.splitlines(), line
    assert "would run: sbatch" in script
    # the batch script itself is valid bash
    syntax = subprocess.run(["bash", "-n"], input="\n".join(l for l in script.splitlines() if not l.startswith("# would")),
                            capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
