"""Training checkpoints: an Orbax `CheckpointManager` (state_checkpoints.py) holding the whole train state.

Each step directory holds two items: `state` (parameters, optimiser state, step and PRNG
key, as sharded arrays: every host writes its own shards) and `meta` (JSON: the data
stream's position, the model's architecture, the resolved config). Saves are
asynchronous: the arrays are copied off the device, then written while training goes on;
only the K most recent are kept. A checkpoint is written only after the step's loss,
gradient norm and parameter norm were seen to be finite, so the latest one is always good.
"""

from __future__ import annotations

from pathlib import Path

import jax

from greencode_jax.errors import GreencodeError
from greencode_jax.models import ModelConfig
from greencode_jax.state_checkpoints import STATE, StateCheckpoints

# fields that say how the model is executed, not what its parameters are
EXECUTION_FIELDS = ("scan_layers", "remat")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


class TrainCheckpoints(StateCheckpoints):
    """finetune's checkpoints: the train state and its `meta` (JSON), the `keep` most recent."""

    def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
        if keep < 1:
            raise GreencodeError(f"checkpoint.keep={keep}: keep at least one checkpoint")
        super().__init__(directory, keep=keep, async_save=async_save, items=(STATE, "meta"))

    def save(self, step: int, state, meta: dict):
        if step in self.manager.all_steps():
            return
        super().save(step, state, meta=meta)

    def read_meta(self, step: int) -> dict:
        try:
            return self.read_json(step, "meta")
        except Exception as error:
            raise GreencodeError(f"{self.directory / str(step)}: cannot read the checkpoint's meta "
                                 f"({_first_line(error)})") from None

    def restore_state(self, step: int, abstract_state):
        """The train state at `step`, placed with the shardings of `abstract_state` (ShapeDtypeStructs)."""
        try:
            return self.restore(step, abstract_state)
        except Exception as error:
            raise GreencodeError(f"{self.directory / str(step)}: cannot restore the train state; was it written for "
                                 f"another model or optimiser? ({_first_line(error)})") from None


def model_signature(config: ModelConfig) -> dict:
    """The architecture fields a checkpoint must agree with (all but how the forward runs)."""
    data = config.to_dict()
    for field in EXECUTION_FIELDS:
        data.pop(field, None)
    data["exit_layers"] = list(data["exit_layers"])
    if isinstance(data.get("eos_token_id"), tuple):
        data["eos_token_id"] = list(data["eos_token_id"])
    return data


def check_same_model(saved: dict, config: ModelConfig, where: str):
    """A clear error when a checkpoint was written for a model of another shape."""
    current = model_signature(config)
    fields = list(current) + [f for f in saved if f not in current]  # ModelConfig's order: the big ones first
    differing = [f for f in fields if saved.get(f) != current.get(f)]
    if differing:
        field = differing[0]
        more = f" (and {', '.join(differing[1:])})" if len(differing) > 1 else ""
        raise GreencodeError(
            f"{where}: the checkpoint is of a different model: {field}={saved.get(field)!r} there, "
            f"{current.get(field)!r} in this config{more}; resume with the model it was trained with, or choose "
            "another run.name (or checkpoint.dir) to start afresh")


KERNEL_LAYOUT = "out_in"  # Linear kernels [out, in]; checkpoints without this field hold [in, out]


def state_signature(abstract_state, config: ModelConfig) -> dict:
    """What the train state's tree structure depends on besides the architecture."""
    return {"scan_layers": config.scan_layers, "optimizer": str(jax.tree.structure(abstract_state["opt_state"])),
            "kernel_layout": KERNEL_LAYOUT}


def check_same_state(saved: dict | None, current: dict, cfg, where: str):
    saved = saved or {}
    if saved.get("kernel_layout", "in_out") != current["kernel_layout"]:
        # A square kernel would restore without a shape error, transposed.
        raise GreencodeError(f"{where}: the checkpoint stores Linear kernels [in, out], as greencode-jax did before "
                             "format version 2, and this version cannot resume it; resume with the release that wrote it, or "
                             "choose another run.name (or checkpoint.dir) to start afresh")
    if "scan_layers" in saved and saved["scan_layers"] != current["scan_layers"]:
        raise GreencodeError(f"{where}: the checkpoint was trained with model.scan_layers={saved['scan_layers']}; "
                             "resume with the same layer layout")
    if "optimizer" in saved and saved["optimizer"] != current["optimizer"]:
        raise GreencodeError(
            f"{where}: the checkpoint's optimiser state has another structure than this config's (was "
            f"train.clip_norm switched between 0 and a positive value? it is {cfg.train.clip_norm} now); resume "
            "with the optimiser settings it was trained with")


def abstract_like(state, shardings):
    """ShapeDtypeStructs (with shardings) of a state tree: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
