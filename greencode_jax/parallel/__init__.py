"""Device meshes, logical-axis sharding rules and multi-host start-up (package `parallel`).

    from greencode_jax.parallel import initialize_distributed, make_mesh, RULES, logical_sharding
    initialize_distributed()                      # before any other JAX call; a no-op on one host
    mesh = make_mesh(data=-1, fsdp=4)             # -1: whatever the other axes leave
    sharding = logical_sharding(("batch", None), (8, 256), mesh)
"""

from greencode_jax.parallel.distributed import DistributedInfo, initialize_distributed
from greencode_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from greencode_jax.parallel.rules import RULES, logical_sharding, logical_spec

__all__ = ["DistributedInfo", "MESH_AXES", "RULES", "initialize_distributed", "logical_sharding", "logical_spec",
           "make_mesh", "mesh_shape"]
