"""greencode-jax: energy-aware early-exit code generation in JAX/Flax.

The public names are imported lazily (PEP 562), so `import greencode_jax.data` or
`greencode_jax.energy` in a worker process does not pay for JAX, Flax and the models.
Generation is `model.generate(...)` (or `greencode_jax.generate.generate(model, ...)`):
`greencode_jax.generate` is the subpackage.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "GreencodeError": "greencode_jax.errors",
    "EarlyExitLM": "greencode_jax.models",
    "ModelConfig": "greencode_jax.models",
    "load_pretrained": "greencode_jax.convert",
    "load_checkpoint": "greencode_jax.convert",
    "save_checkpoint": "greencode_jax.convert",
    "export_pretrained": "greencode_jax.convert",
    "GenerateOutput": "greencode_jax.generate",
    "Sampling": "greencode_jax.generate",
    "policies": "greencode_jax.generate",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'greencode_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
