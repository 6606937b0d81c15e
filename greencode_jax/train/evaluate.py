"""Per-exit loss and token accuracy on a held-out split, beside a unigram baseline.

The unigram baseline predicts the train split's most frequent token at every position;
its accuracy is measured on the same next-token targets as the exits'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from greencode_jax.parallel import logical_sharding
from greencode_jax.train.losses import exit_metrics
from greencode_jax.train.sharding import replicated
from greencode_jax.train.step import cast_tree, compute_graphdef


class Evaluator:
    def __init__(self, config, weights, compute_dtype, param_sharding, mesh, data, cfg):
        self.config, self.data, self.cfg = config, data, cfg
        self.batch_size = cfg.train.batch_size
        self.tokens_sharding = logical_sharding(("batch", "length"), (self.batch_size, cfg.data.seq_len), mesh)
        graphdef = compute_graphdef(config, compute_dtype)

        def evaluate(params, tokens, unigram_token):
            out = exit_metrics(nnx.merge(graphdef, cast_tree(params, compute_dtype)), tokens, weights)
            unigram = jnp.mean((tokens[:, 1:] == unigram_token).astype(jnp.float32))
            return out.loss, out.exit_loss, out.exit_accuracy, unigram

        self._evaluate = jax.jit(evaluate, in_shardings=(param_sharding, self.tokens_sharding, None),
                                 out_shardings=replicated(mesh))
        self._unigram_token = None

    def run(self, params, progress: bool = False) -> dict:
        """Means over `eval.batches` batches of `eval.split` (0: the whole split), in order; with
        `progress`, a bar over the batches (the first one includes compiling the evaluation)."""
        split, batches, _ = evaluation_plan(self.data, self.cfg)
        stream = self.data.eval_stream(split, self.batch_size)
        if self._unigram_token is None:
            self._unigram_token = self.data.most_frequent_token()
        sums = None
        with tqdm(total=batches, desc=f"evaluating {split}", unit="batch", disable=not progress,
                  dynamic_ncols=True) as bar:
            for b in range(batches):
                local = stream.batch(b)["tokens"]
                tokens = jax.make_array_from_process_local_data(self.tokens_sharding, local,
                                                                (self.batch_size, self.cfg.data.seq_len))
                out = self._evaluate(params, tokens, np.int32(self._unigram_token))
                sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
                if progress:
                    jax.block_until_ready(sums)  # so the bar moves with the work, not with its dispatch
                bar.update(1)
        loss, exit_loss, exit_acc, unigram = (np.asarray(x) / batches for x in jax.device_get(sums))
        layers = [str(layer) for layer in self.config.exit_layers]
        return {"split": split, "batches": batches,
                "tokens": batches * self.batch_size * (self.cfg.data.seq_len - 1),
                "loss": float(loss), "exit_loss": dict(zip(layers, map(float, exit_loss))),
                "exit_accuracy": dict(zip(layers, map(float, exit_acc))),
                "unigram_accuracy": float(unigram), "unigram_token": self._unigram_token}


def evaluation_plan(data, cfg) -> tuple[str, int, int]:
    """(split, batches, next-token predictions) the evaluation of this config covers; cheap (no model)."""
    split = cfg.eval.split
    per_epoch = data.eval_stream(split, cfg.train.batch_size).batches_per_epoch
    batches = per_epoch if cfg.eval.batches <= 0 else min(cfg.eval.batches, per_epoch)
    return split, batches, batches * cfg.train.batch_size * (cfg.data.seq_len - 1)
