"""RAPL on a fake /sys/class/powercap tree: packages + DRAM, wraparound, errors, permission denied."""

from __future__ import annotations

import json
import os
import select
import signal
import tempfile
import warnings
from pathlib import Path

import pytest

from greencode_jax.energy import COUNTER, ESTIMATED, UNAVAILABLE, EnergyConfig, EnergyMeter
from greencode_jax.energy.devices import DeviceSpec
from greencode_jax.energy.rapl import counter_delta
from greencode_jax.energy.select import select_backends

HOST = DeviceSpec("cpu", 0, "test CPU")
BIG = 262_143_328_850  # a typical max_energy_range_uj


def zone(path: Path, name: str, energy_uj: int, max_range: int | None = BIG):
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    if max_range is not None:
        (path / "max_energy_range_uj").write_text(f"{max_range}\n")


def two_socket_tree(root: Path) -> Path:
    """Two packages, DRAM under package 0, and zones that must not be counted (core, mmio)."""
    zone(root / "intel-rapl:0", "package-0", 1_000_000)
    zone(root / "intel-rapl:0" / "intel-rapl:0:0", "core", 50_000)
    zone(root / "intel-rapl:0" / "intel-rapl:0:1", "dram", 10_000)
    zone(root / "intel-rapl:1", "package-1", 999_900_000, max_range=1_000_000_000)
    zone(root / "intel-rapl-mmio:0", "package-0", 7)
    return root


def set_uj(root: Path, zone_path: str, value: int):
    (root / zone_path / "energy_uj").write_text(f"{value}\n")


def rapl_meter(root: Path) -> EnergyMeter:
    return EnergyMeter(selections=select_backends([HOST], EnergyConfig(powercap_root=str(root))))


def test_packages_and_dram_summed_with_wraparound(tmp_path):
    root = two_socket_tree(tmp_path / "powercap")
    meter = rapl_meter(root)
    backend = meter.selections[0].backend
    assert backend.name == "rapl" and backend.device["rapl_zones"] == [
        "intel-rapl:0 (package-0)", "intel-rapl:0:1 (dram)", "intel-rapl:1 (package-1)"]
    meter.begin("w")
    set_uj(root, "intel-rapl:0", 3_500_000)  # +2.5 J
    set_uj(root, "intel-rapl:0/intel-rapl:0:0", 1_050_000)  # core: part of the package, not added
    set_uj(root, "intel-rapl:0/intel-rapl:0:1", 510_000)  # +0.5 J
    set_uj(root, "intel-rapl:1", 100_000)  # wrapped: 100_000 + 1e9 - 999_900_000 = 200_000 uJ
    reading = meter.end("w").devices[0]
    assert reading.method == COUNTER and reading.energy_j == pytest.approx(2.5 + 0.5 + 0.2)
    zones = reading.raw["zones"]
    assert zones["intel-rapl:1 (package-1)"]["delta_uj"] == 200_000
    assert zones["intel-rapl:0:1 (dram)"] == {"begin_uj": 10_000, "end_uj": 510_000, "delta_uj": 500_000,
                                              "max_energy_range_uj": BIG}
    assert reading.raw["unit"] == "uJ"
    assert any("intel-rapl:1 (package-1) wrapped" in w for w in reading.warnings)
    assert "kernel" in reading.versions


def test_counter_delta_by_hand():
    assert counter_delta(10, 25, 100) == 15
    assert counter_delta(90, 5, 100) == 15  # wrapped once at 100
    assert counter_delta(90, 5, None) is None  # went backwards and no range to explain it


def test_still_counters_and_vanished_zones_are_warnings_not_zero(tmp_path):
    root = two_socket_tree(tmp_path / "powercap")
    meter = rapl_meter(root)
    meter.begin("still")
    still = meter.end("still").devices[0]
    assert still.method == UNAVAILABLE and still.energy_j is None and "no RAPL counter advanced" in still.reason
    meter.begin("gone")
    (root / "intel-rapl:1" / "energy_uj").unlink()
    gone = meter.end("gone").devices[0]
    assert gone.method == UNAVAILABLE and "RAPL read failed at the window's end" in gone.reason
    assert any("FileNotFoundError" in w for w in gone.warnings)


def test_backwards_without_a_range_is_unavailable(tmp_path):
    zone(tmp_path / "intel-rapl:0", "package-0", 5_000, max_range=None)
    meter = rapl_meter(tmp_path)
    meter.begin("w")
    set_uj(tmp_path, "intel-rapl:0", 4_000)
    reading = meter.end("w").devices[0]
    assert reading.energy_j is None and "went backwards (5000 -> 4000 uJ)" in reading.reason


def test_no_powercap_falls_back_to_the_labelled_estimate(tmp_path):
    selection = select_backends([HOST], EnergyConfig(powercap_root=str(tmp_path / "absent")))[0]
    assert selection.backend.name == "cpu_time" and selection.backend.method == ESTIMATED
    assert selection.attempts[0][0] == "rapl" and "does not exist" in selection.attempts[0][1]
    assert "does not exist" in selection.backend.reason
    (tmp_path / "empty").mkdir()
    forced = select_backends([HOST], EnergyConfig(powercap_root=str(tmp_path / "empty"), cpu_backend="rapl"))[0]
    assert forced.backend.method == UNAVAILABLE and "no RAPL package zones" in forced.backend.reason


def _select_as_nobody(root: Path) -> dict:
    """Runs the CPU selection in a forked child whose uid is `nobody` (root reads any file)."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # JAX warns that fork and threads mix badly
        pid = os.fork()
    if pid == 0:  # child: only this thread exists; it reads files and exits without cleanup
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = select_backends([HOST], EnergyConfig(powercap_root=str(root)))[0]
            os.write(write_end, json.dumps({"backend": s.backend.name, "reason": s.backend.reason}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 30)
    data = os.read(read_end, 65536) if ready else b""
    os.close(read_end)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert data, "the child process gave no answer"
    return json.loads(data)


def test_permission_denied_falls_back_to_the_estimate_with_the_reason():
    # energy_uj is root-only on recent kernels. Root reads anything, so as root the
    # selection runs in a child process as `nobody`, on a tree it may traverse.
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        root = two_socket_tree(Path(directory) / "powercap")
        os.chmod(root / "intel-rapl:0" / "energy_uj", 0o000)
        if os.geteuid() == 0:
            chosen = _select_as_nobody(root)
        else:
            selection = select_backends([HOST], EnergyConfig(powercap_root=str(root)))[0]
            chosen = {"backend": selection.backend.name, "reason": selection.backend.reason}
    assert chosen["backend"] == "cpu_time"
    assert "intel-rapl:0/energy_uj: permission denied" in chosen["reason"]
