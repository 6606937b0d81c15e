"""Exit policies: pure-JAX decisions taken inside the jitted decode step.

A policy is a pytree: its numbers (threshold, target layer, MLP weights) are traced
leaves, so changing them never recompiles; its kind and options are static. At each
configured exit layer the decode step asks `decide(layer, hidden, logits)` for a
boolean per sequence. `logits` is only computed for policies with `needs_logits`
(the LM head over the vocabulary is the most expensive part of a shallow exit).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from greencode_jax.atomic import atomic_directory, usual_permissions
from greencode_jax.convert.fingerprint import model_fingerprint
from greencode_jax.errors import GreencodeError
from greencode_jax.generate.policy_kernel import fused_exit_probability

CONFIDENCE_MEASURES = ("softmax_max", "top2_margin")
LEARNED_KERNELS = ("xla", "pallas")


def _policy(cls):
    """A frozen dataclass registered as a pytree: fields marked static are part of the treedef."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")]
    meta = [f.name for f in dataclasses.fields(cls) if f.metadata.get("static")]
    return jax.tree_util.register_dataclass(cls, data, meta)


def _static(default):
    return dataclasses.field(default=default, metadata={"static": True})


@_policy
class Full:
    """Never exits early: every token runs every layer."""

    min_layer: int = _static(0)
    kind: ClassVar[str] = "full"
    needs_logits: ClassVar[bool] = False

    def decide(self, layer: int, hidden, logits):
        return jnp.zeros(hidden.shape[0], bool)


@_policy
class FixedExit:
    """Exits at `layer` (0-based), which must be one of the model's exit layers."""

    layer: Any = 0
    min_layer: int = _static(0)
    kind: ClassVar[str] = "fixed"
    needs_logits: ClassVar[bool] = False

    def decide(self, layer: int, hidden, logits):
        return jnp.broadcast_to(layer >= jnp.asarray(self.layer), (hidden.shape[0],))


@_policy
class Confidence:
    """CALM's confidence exits: exit once the exit head is confident enough.

    `softmax_max`: the top probability; `top2_margin`: top-1 minus top-2 probability.
    A threshold of 0 exits at the first allowed exit; above 1 it never exits.
    """

    threshold: Any = 0.9
    measure: str = _static("softmax_max")
    min_layer: int = _static(0)
    kind: ClassVar[str] = "confidence"
    needs_logits: ClassVar[bool] = True

    def __post_init__(self):
        if self.measure not in CONFIDENCE_MEASURES:
            raise GreencodeError(f"Confidence measure {self.measure!r}: expected one of {CONFIDENCE_MEASURES}")

    def decide(self, layer: int, hidden, logits):
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        if self.measure == "softmax_max":
            confidence = probs.max(-1)
        else:
            top2 = jax.lax.top_k(probs, 2)[0]
            confidence = top2[..., 0] - top2[..., 1]
        return confidence >= self.threshold


@_policy
class Learned:
    """An actor MLP over the exit layer's hidden state: exit iff P(exit) > threshold.

    `params` holds `obs_mean`/`obs_std` (the observation normalisation used in training,
    applied here too: GREEN-CODE normalised in training only) and the layers of an MLP
    with tanh activations whose last layer has two logits (continue, exit).
    `kernel`: "xla" lets XLA compile the MLP; "pallas" runs it as two fused kernels
    (generate.policy_kernel: fewer launches per decision on a GPU, interpreted elsewhere).
    """

    params: Any = None
    threshold: Any = 0.9
    min_layer: int = _static(0)
    kernel: str = _static("xla")
    # The exit layers the actor was trained on (None: unknown). generate refuses a model
    # with other exits: the observation at an exit it never saw is out of distribution.
    exit_layers: tuple | None = _static(None)
    kind: ClassVar[str] = "learned"
    needs_logits: ClassVar[bool] = False

    def __post_init__(self):
        if self.kernel not in LEARNED_KERNELS:
            raise GreencodeError(f"Learned kernel {self.kernel!r}: expected one of {LEARNED_KERNELS}")

    @staticmethod
    def init_params(key, hidden_size: int, widths=(64, 64)) -> dict:
        """Random actor parameters (the RL stage trains them)."""
        sizes = (hidden_size, *widths, 2)
        keys = jax.random.split(key, len(sizes) - 1)
        layers = [{"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
                  for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
        return {"obs_mean": jnp.zeros(hidden_size), "obs_std": jnp.ones(hidden_size), "layers": layers}

    def exit_probability(self, hidden):
        """P(exit) [B] for hidden states [B, E]."""
        if self.kernel == "pallas":
            return fused_exit_probability(self.params, hidden)
        p = self.params
        x = (hidden.astype(jnp.float32) - p["obs_mean"]) / p["obs_std"]
        *body, last = p["layers"]
        # Full float32 products: on a GPU XLA's default precision rounds float32 operands to
        # TF32, which moves P(exit) by ~1e-4 and so flips decisions near the threshold.
        dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
        for layer in body:
            x = jnp.tanh(dot(x, layer["w"]) + layer["b"])
        return jax.nn.softmax(dot(x, last["w"]) + last["b"], axis=-1)[..., 1]

    def decide(self, layer: int, hidden, logits):
        return self.exit_probability(hidden) > self.threshold

    def save(self, out_dir, metadata: dict | None = None, overwrite: bool = False,
             inputs: dict | None = None) -> Path:
        """Writes `out_dir/actor.safetensors` (the normalisation and MLP layers) and
        `out_dir/policy.json` (`metadata`, e.g. what it was trained on, plus the layout),
        atomically. `Learned.load` reads it back. An existing `out_dir` is replaced (with
        `overwrite`) only when it is a policy greencode-jax wrote and none of `inputs`."""
        from safetensors.numpy import save_file

        tensors = {"obs_mean": self.params["obs_mean"], "obs_std": self.params["obs_std"]}
        for i, layer in enumerate(self.params["layers"]):
            tensors[f"layers.{i}.w"], tensors[f"layers.{i}.b"] = layer["w"], layer["b"]
        tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
        info = {"format": POLICY_FORMAT, "version": 1, "num_layers": len(self.params["layers"]),
                "hidden_size": int(tensors["obs_mean"].shape[0]),
                "exit_layers": None if self.exit_layers is None else list(self.exit_layers), **(metadata or {})}
        with atomic_directory(out_dir, overwrite=overwrite, kind="policy", inputs=inputs) as tmp:
            save_file(tensors, str(tmp / POLICY_WEIGHTS), metadata={"format": "np"})
            usual_permissions(tmp / POLICY_WEIGHTS)  # safetensors writes through an owner-only (0600) temporary file
            (tmp / POLICY_INFO).write_text(json.dumps(info, indent=2) + "\n")
        return Path(out_dir)

    @classmethod
    def load(cls, policy_dir, threshold=0.9, *, min_layer: int = 0, kernel: str = "xla", model=None,
             allow_foreign: bool = False) -> "Learned":
        """The policy `train-policy` wrote to `policy_dir`. Generation refuses it for a model
        whose hidden size or exit layers differ from those it was trained on. With `model`, a
        policy trained on another checkpoint (its recorded weights fingerprint differs from
        the model's, or it records none) is refused unless `allow_foreign`."""
        info = read_policy_info(policy_dir)
        if model is not None and not allow_foreign:
            mismatch = foreign_policy(info, model)
            if mismatch is not None:
                raise GreencodeError(f"{Path(policy_dir) / POLICY_INFO}: {mismatch}; pass allow_foreign=True to use "
                                     "it anyway")
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(policy_dir) / POLICY_WEIGHTS
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise GreencodeError(f"{path}: unreadable policy weights ({e}); train the policy again") from None
        for name, value in tensors.items():
            if not np.isfinite(value).all():  # would make every P(exit) NaN: never exit, silently
                raise GreencodeError(f"{path}: tensor {name!r} holds NaN or inf; train the policy again")
        try:
            layers = [{"w": jnp.asarray(tensors[f"layers.{i}.w"]), "b": jnp.asarray(tensors[f"layers.{i}.b"])}
                      for i in range(info["num_layers"])]
            params = {"obs_mean": jnp.asarray(tensors["obs_mean"]), "obs_std": jnp.asarray(tensors["obs_std"]),
                      "layers": layers}
        except KeyError as e:
            raise GreencodeError(f"{path}: tensor {e.args[0]!r} is missing (policy.json says "
                                 f"{info['num_layers']} layers)") from None
        exits = info.get("exit_layers")
        return cls(params, threshold, min_layer=min_layer, kernel=kernel,
                   exit_layers=None if exits is None else tuple(int(e) for e in exits))


POLICY_FORMAT = "greencode-learned-policy"
POLICY_WEIGHTS, POLICY_INFO = "actor.safetensors", "policy.json"


def read_policy_info(policy_dir) -> dict:
    """policy.json of a policy directory, checked to be one."""
    path = Path(policy_dir) / POLICY_INFO
    if not Path(policy_dir).is_dir():
        raise GreencodeError(f"{policy_dir}: no such policy directory (train-policy writes one)")
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise GreencodeError(f"{policy_dir}: not a policy directory ({POLICY_INFO} is missing)") from None
    except (OSError, ValueError) as e:
        raise GreencodeError(f"{path}: unreadable ({e})") from None
    if not isinstance(info, dict) or info.get("format") != POLICY_FORMAT or not isinstance(info.get("num_layers"), int):
        raise GreencodeError(f"{path}: not a greencode policy (expected format {POLICY_FORMAT!r} and num_layers)")
    return info


def foreign_policy(info: dict, model) -> str | None:
    """Why the policy of `info` (its policy.json) was not trained on `model`'s weights, or None
    when its recorded fingerprint is the model's (`convert.fingerprint.model_fingerprint`)."""
    mine = model_fingerprint(model)
    name = model.origin.path or "the model"
    trained = info.get("trained_on") if isinstance(info.get("trained_on"), dict) else {}
    recorded = trained.get("model") if isinstance(trained.get("model"), dict) else {}
    theirs = recorded.get("fingerprint")
    if theirs is None:
        return (f"records no fingerprint of the checkpoint it was trained on, so it cannot be matched to {name} "
                f"(fingerprint {mine})")
    if theirs != mine:
        where = recorded.get("checkpoint", "an unnamed checkpoint")
        if trained.get("rollouts"):
            where += f", rollouts {trained['rollouts']}"
        return f"trained on another checkpoint ({where}; fingerprint {theirs}) than {name} (fingerprint {mine})"
    return None


POLICY_TYPES = (Full, FixedExit, Confidence, Learned)
