"""Early-exit fine-tuning (package `train`): exit-loss weights, the sharded train step,
Orbax checkpoints with exact resume, and the run loop.

    from greencode_jax.train import FinetuneConfig, train, exit_weights
    exit_weights("greencode", exit_layers=(3, 5, 7, 9, 11, 13, 17, 21, 25, 27), num_layers=28)
    result = train(config)          # what `greencode finetune CONFIG` runs
"""

from greencode_jax.config import FinetuneConfig
from greencode_jax.train.loop import PREEMPTED_EXIT_STATUS, TrainResult, train
from greencode_jax.train.weights import SCHEMES, exit_weights, greencode_weights

__all__ = ["FinetuneConfig", "PREEMPTED_EXIT_STATUS", "SCHEMES", "TrainResult", "exit_weights", "greencode_weights",
           "train"]
