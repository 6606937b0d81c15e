"""greencode-jax: energy-aware early-exit code generation in JAX/Flax."""

from greencode_jax.errors import GreencodeError
from greencode_jax.models import EarlyExitLM, ModelConfig
from greencode_jax.convert import export_pretrained, load_pretrained

__all__ = ["EarlyExitLM", "GreencodeError", "ModelConfig", "export_pretrained", "load_pretrained"]
__version__ = "0.1.0"
from greencode_jax.convert import load_checkpoint, save_checkpoint
from greencode_jax.generate import GenerateOutput, Sampling, generate, policies

__all__ += ["GenerateOutput", "Sampling", "generate", "load_checkpoint", "policies", "save_checkpoint"]
