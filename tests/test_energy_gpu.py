"""On a real NVIDIA GPU (marker `gpu`): a >= 10 s JAX matmul load under the meter.

Checks: the counter reads > 0 J; idle power < average power <= the power limit; and
the energy counter and the integrated power agree within 15 % (issue 5's target),
metered over the same window. Run: `pytest -m gpu tests/test_energy_gpu.py -s`.
"""

from __future__ import annotations

import time

import pytest

from greencode_jax.energy import COUNTER, INTEGRATED_POWER, EnergyConfig, EnergyMeter
from greencode_jax.energy.nvml import load_nvml
from greencode_jax.energy.select import select_backends

pytestmark = pytest.mark.gpu

LOAD_SECONDS = 10.0


@pytest.fixture(scope="module")
def gpu():
    import jax

    nvml, reason = load_nvml()
    if nvml is None:
        pytest.skip(f"NVML does not work here: {reason}")
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU here")
    return jax.devices("gpu")[0], nvml


def test_matmul_load_reads_energy_and_counter_agrees_with_integrated_power(gpu):
    import jax
    import jax.numpy as jnp

    device, nvml = gpu
    no_host = dict(include_host_cpu=False, poll_interval_s=0.02)
    counter_sel = [s for s in select_backends(None, EnergyConfig(gpu_backend="counter", **no_host))
                   if s.spec.index == device.id]
    power_sel = [s for s in select_backends(None, EnergyConfig(gpu_backend="power", **no_host))
                 if s.spec.index == device.id]
    # One meter over both backends of the same GPU: they see the very same window.
    meter = EnergyMeter(selections=counter_sel + power_sel)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (8192, 8192), jnp.float32), device)
    step = jax.jit(lambda a: jnp.tanh(a @ a) * 0.5)
    y = step(x).block_until_ready()
    idle = meter.measure_idle(3.0)
    start = time.perf_counter()
    meter.begin("load", outputs=y)
    while time.perf_counter() - start < LOAD_SECONDS:
        y = step(y).block_until_ready()
    result = meter.end("load", outputs=y)
    meter.close()

    counter, power = result.devices
    limit_w = nvml.nvmlDeviceGetEnforcedPowerLimit(counter_sel[0].backend.handle) / 1000.0
    print(f"\n{counter.device['name']}: counter {counter.energy_j:.1f} J ({counter.avg_power_w:.1f} W), "
          f"integrated power {power.energy_j:.1f} J ({power.avg_power_w:.1f} W) over {counter.duration_s:.2f} s; "
          f"idle {idle.devices[0].avg_power_w:.1f} W; limit {limit_w:.0f} W")
    assert counter.method == COUNTER and power.method == INTEGRATED_POWER
    assert counter.duration_s >= LOAD_SECONDS and counter.energy_j > 0
    assert idle.devices[0].avg_power_w < counter.avg_power_w <= limit_w
    # Compare average powers: the two backends' windows differ by the sampled span.
    assert abs(power.avg_power_w - counter.avg_power_w) <= 0.15 * counter.avg_power_w
