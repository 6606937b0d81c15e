"""The device mesh: a named `Mesh` with a `data` axis (pure data parallelism: parameters
replicated) and an `fsdp` axis (data parallelism with parameters and optimiser state
sharded, all-gathered layer by layer as XLA sees fit)."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

from greencode_jax.errors import GreencodeError

MESH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes with at most one -1 (meaning: the devices the other axis leaves)."""
    sizes = {"parallel.data": data, "parallel.fsdp": fsdp}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise GreencodeError(f"{name}={size!r}: expected a positive number of devices, or -1 for the rest")
    if data == -1 and fsdp == -1:
        raise GreencodeError("parallel.data and parallel.fsdp are both -1; at most one axis can take the rest")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if num_devices % known:
            raise GreencodeError(f"{num_devices} devices cannot be split into {'fsdp' if data == -1 else 'data'}="
                                 f"{known} groups")
        data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
    if data * fsdp != num_devices:
        raise GreencodeError(f"parallel.data={data} x parallel.fsdp={fsdp} = {data * fsdp} devices, but "
                             f"{num_devices} are available; make the product equal the device count (or use -1)")
    return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: every device of every process).

    The axes are `Auto`: XLA's partitioner propagates the shardings given at `jit`'s
    boundary (parameters along fsdp, the batch along both) through the model, whose code
    carries no sharding annotations of its own.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, fsdp, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
