"""The run's final model as a greencode checkpoint (`gc.save_checkpoint`), which
`gc.load_pretrained` and `greencode export-hf` read.

One process writes it directly. Several processes first save the (sharded) parameters
together with Orbax into the shared checkpoint directory; then the primary process
writes the checkpoint from them in a single-process CPU subprocess
(`python -m greencode_jax.train.export`): `save_checkpoint`'s own Orbax call would
otherwise wait for the other processes at its barriers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
from flax import nnx
from jax.experimental import multihost_utils

from greencode_jax.convert import save_checkpoint
from greencode_jax.convert.checkpoint import restore_params
from greencode_jax.errors import GreencodeError
from greencode_jax.models import ModelConfig, Origin, abstract_model

DISTRIBUTED_ENV = ("GREENCODE_COORDINATOR", "GREENCODE_NUM_PROCESSES", "GREENCODE_PROCESS_ID")


def write_checkpoint(params, config, dtype, out: Path, tokenizer_dir) -> Path:
    # One device's arrays (the host CPU's): the checkpoint then records no mesh at all
    # (`load_checkpoint` restores onto one device whatever was recorded, see `restore_params`).
    cpu = jax.local_devices(backend="cpu")[0]
    params = jax.device_put(jax.device_get(params), cpu)
    model = nnx.merge(nnx.graphdef(abstract_model(config, dtype)), params)
    model.origin = Origin(str(tokenizer_dir) if tokenizer_dir is not None else None)
    return save_checkpoint(model, out, overwrite=True)


def save_final(params, config, dtype, out: Path, checkpoints, step: int, tokenizer_dir, info) -> Path:
    config = config.replace(remat=False)
    if info.process_count == 1:
        return write_checkpoint(params, config, dtype, out, tokenizer_dir)
    import orbax.checkpoint as ocp

    staged = checkpoints.directory / f"final-params-{step}"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staged, params, force=True)
    checkpointer.wait_until_finished()
    multihost_utils.sync_global_devices("greencode-final-params")
    if info.is_primary:
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        env.update(JAX_PLATFORMS="cpu", GREENCODE_DISTRIBUTED="off")
        spec = {"params": str(staged), "model": config.to_dict(), "dtype": dtype, "out": str(out),
                "tokenizer_dir": None if tokenizer_dir is None else str(tokenizer_dir)}
        proc = subprocess.run([sys.executable, "-m", "greencode_jax.train.export", json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise GreencodeError(f"{out}: writing the final checkpoint from {staged} failed ({tail})")
        staged.rmtree()  # final/ holds these parameters now; the staged copy is only kept on failure
    multihost_utils.sync_global_devices("greencode-final-checkpoint")
    return out


def _main(spec: dict):
    from etils import epath

    config = ModelConfig.from_dict(spec["model"])
    params = restore_params(epath.Path(spec["params"]),
                            nnx.state(abstract_model(config, spec["dtype"]), nnx.Param))
    write_checkpoint(params, config, spec["dtype"], Path(spec["out"]), spec["tokenizer_dir"])


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
