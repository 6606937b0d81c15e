"""OPT and Llama in Flax NNX with an exit head after any decoder layer."""

from greencode_jax.models.config import ModelConfig, RopeScaling
from greencode_jax.models.model import (
    DecoderBlock, EarlyExitLM, ForwardOutput, Origin, abstract_model, init_model, resolve_dtype,
)

__all__ = ["DecoderBlock", "EarlyExitLM", "ForwardOutput", "ModelConfig", "Origin", "RopeScaling", "abstract_model",
           "init_model", "resolve_dtype"]
