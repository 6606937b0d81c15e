"""Where the model to train comes from: a config from scratch, a Hugging Face model, or a
greencode checkpoint. The config is read first (cheap: a resumed run needs only shapes);
the weights are loaded, onto the host, only when training starts fresh."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from greencode_jax.convert import load_pretrained, resolve_model_dir
from greencode_jax.convert.checkpoint import CONFIG_NAME, is_checkpoint
from greencode_jax.convert.fingerprint import model_tokenizer_fingerprint
from greencode_jax.data.tokenizer import VOCABULARY_FILES
from greencode_jax.errors import GreencodeError
from greencode_jax.models import ModelConfig, init_model
from greencode_jax.models.config import load_json
from greencode_jax.config import ModelSection

HOST_DTYPES = ("float32", "bfloat16")


def check_model_section(section: ModelSection, source: str = "config") -> Path | None:
    """Checks what can be checked before the data exists: the dtypes, and that model.init is
    `scratch` with a model.config, or a model directory (a hub id is downloaded here) with a
    config. Returns that directory (None from scratch)."""
    if section.dtype not in HOST_DTYPES:
        raise GreencodeError(f"{source}: model.dtype={section.dtype!r}; expected one of {list(HOST_DTYPES)} "
                             "(the master weights the optimiser updates)")
    if section.compute_dtype not in HOST_DTYPES:
        raise GreencodeError(f"{source}: model.compute_dtype={section.compute_dtype!r}; expected one of "
                             f"{list(HOST_DTYPES)}")
    if section.init == "scratch":
        if not isinstance(section.config, dict) or "model_type" not in section.config:
            raise GreencodeError(f"{source}: model.init is 'scratch', so model.config must be a mapping of "
                                 "Hugging Face config.json fields with at least model_type")
        return None
    if section.config is not None:
        raise GreencodeError(f"{source}: model.config is only for model.init: scratch; the architecture of "
                             f"{section.init} comes from its own config")
    try:
        model_dir = resolve_model_dir(section.init)
    except GreencodeError as error:
        raise GreencodeError(f"{source}: model.init: {error}") from None
    if not is_checkpoint(model_dir) and not (model_dir / "config.json").is_file():
        raise GreencodeError(f"{source}: model.init={section.init}: neither a greencode checkpoint nor a Hugging "
                             "Face model directory (no config.json); expected 'scratch', a model directory or a hub id")
    return model_dir


class ModelSource:
    """The training model's config (in the layer layout it trains in) and how to get its initial weights."""

    def __init__(self, section: ModelSection, tokenizer: dict | None, source: str = "config", prepared=None):
        """`tokenizer`: the corpus's (prepare.json's entry); `prepared` (its `PreparedData`), when
        given, is refused for a pretrained model whose tokenizer files are another tokenizer."""
        model_dir = check_model_section(section, source)
        self.section = section
        exits = list(section.exit_layers) or None
        if model_dir is None:
            fields = dict(section.config)
            if tokenizer is not None:
                fields.setdefault("vocab_size", tokenizer["vocab_size"])
                for key in ("bos", "eos", "pad"):
                    fields.setdefault(f"{key}_token_id", tokenizer[f"{key}_id"])
            config = ModelConfig.from_hf(fields, exit_layers=exits, source=f"{source} (model.config)")
            self.model_dir = None
        else:
            self.model_dir = model_dir
            if is_checkpoint(self.model_dir):
                meta = load_json(self.model_dir / CONFIG_NAME, "greencode checkpoint config")
                config = ModelConfig.from_dict(meta.get("model", {}), source=str(self.model_dir / CONFIG_NAME))
                if exits is not None:
                    config = config.replace(exit_layers=exits)
            else:
                config = ModelConfig.from_hf(load_json(self.model_dir / "config.json", "Hugging Face config"),
                                             exit_layers=exits, source=str(self.model_dir / "config.json"))
        if prepared is not None and model_dir is not None:
            fingerprint = model_tokenizer_fingerprint(model_dir)
            if fingerprint is not None:
                try:
                    prepared.check_model_tokenizer(f"model.init {section.init}", fingerprint, config.vocab_size,
                                                   model_dir)
                except GreencodeError as error:
                    raise GreencodeError(f"{source}: data.path: {error}") from None
        if tokenizer is not None and tokenizer["vocab_size"] > config.vocab_size:
            raise GreencodeError(f"{source}: the data's tokenizer has {tokenizer['vocab_size']} tokens but the model's "
                                 f"vocab_size is {config.vocab_size}; prepare the data with this model's tokenizer "
                                 "(prepare-data --tokenizer MODEL_DIR)")
        self.config = config.replace(scan_layers=section.scan_layers, remat=section.remat)

    def host_params(self, seed: int) -> dict:
        """The initial master weights as a pure dict of host (CPU) arrays."""
        cpu = jax.local_devices(backend="cpu")[0]
        with jax.default_device(cpu):
            if self.model_dir is None:  # one compiled program instead of one per parameter
                init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(init_model(self.config, self.section.dtype, seed),
                                                                  nnx.Param)))
                return jax.tree.map(np.asarray, init())
            else:
                model = load_pretrained(self.model_dir, self.section.dtype, list(self.config.exit_layers),
                                        scan_layers=self.config.scan_layers)
                loaded = model.config.replace(exit_layers=self.config.exit_layers, remat=self.config.remat)
                if loaded != self.config:
                    raise GreencodeError(f"{self.model_dir}: its weights do not match its config")
            return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    @property
    def tokenizer_dir(self) -> Path | None:
        """The model's directory when it holds a tokenizer (None: the corpus's goes into final/)."""
        if self.model_dir is None or not any((self.model_dir / name).is_file() for name in VOCABULARY_FILES):
            return None
        return self.model_dir
