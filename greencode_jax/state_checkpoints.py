"""Orbax checkpoints of a training state: the one `CheckpointManager` wrapper that `finetune`
(train/checkpointing.py) and `train-policy` (rl/train.py) resume from.

Each step directory holds the state (a pytree of sharded arrays: every host writes its own
shards) and, where `items` names more than "state", JSON items beside it (finetune's `meta`).
Without `items` the state is the step's one unnamed item, as train-policy has always written it.
Our model checkpoint format (`final/`, `greencode_config.json`) is another thing:
convert/checkpoint.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import orbax.checkpoint as ocp
from etils import epath  # Orbax's paths: local, or gs:// (every host of a TPU pod sees a bucket)

logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's INFO lines would drown the progress bars

STATE = "state"


class StateCheckpoints:
    """The `keep` most recent training states in `directory`, saved asynchronously or not.

    `items`: the names of each step's items, "state" first and the others JSON; None: the state
    alone, as the step's one unnamed item. `cleanup_tmp`: remove at opening what a save cut
    by SIGKILL left (N.orbax-checkpoint-tmp).
    """

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool, items: tuple[str, ...] | None = None,
                 cleanup_tmp: bool = False):
        self.directory = epath.Path(directory)
        if "://" not in str(directory):
            self.directory = self.directory.absolute()
        self.items = items
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=cleanup_tmp)
        named = {} if items is None else {"item_names": items}
        self.manager = ocp.CheckpointManager(self.directory, options=options, **named)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, **json_items):
        """Saves `state` (and, with named items, each of `json_items`) as step `step`, replacing it."""
        if self.items is None:
            args = ocp.args.StandardSave(state)
        else:
            args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state)},
                                      **{name: ocp.args.JsonSave(value) for name, value in json_items.items()})
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state):
        """The state at `step`, placed with the shardings of `abstract_state` (ShapeDtypeStructs)."""
        if self.items is None:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]

    def read_json(self, step: int, name: str):
        """The JSON item `name` of step `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
