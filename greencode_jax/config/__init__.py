"""Configuration (package `config`): every YAML section as a typed, frozen dataclass that checks
itself, and the one loader that reads a file (with `inherit:` overlays) and `section.field=value`
overrides into them. Imports nothing of ours but `errors` and `yamlfile`.

    from greencode_jax.config import load_config
    config = load_config("configs/quickstart.yaml", ["train.steps=10"])
    config.finetune        # FinetuneConfig: what `train.train` takes
    config.rl, config.eval, config.certify, config.energy, config.rollouts
"""

from greencode_jax.config.base import Section, build_section
from greencode_jax.config.fields import did_you_mean
from greencode_jax.config.loader import (PIPELINE_SECTIONS, SECTIONS, Config, apply_overrides, load_config,
                                         load_sections, overlay, read_config)
from greencode_jax.config.sections import (FINETUNE_SECTIONS, HEAD_KINDS, METHODS, PROTOCOLS, CheckpointSection,
                                           DataSection, EvalConfig, EvalSection, FinetuneConfig, ModelSection,
                                           ParallelSection, RunSection, TrainSection)
from greencode_jax.config.stages import (CPU_BACKENDS, DEFAULT_WATTS_PER_CORE, FAMILIES, GPU_BACKENDS, GRID, LOSSES,
                                         REWARDS, TPU_BACKENDS, CertifySection, EnergyConfig, EnergySection,
                                         RLSection, RolloutsSection, check_levels)

__all__ = ["CPU_BACKENDS", "CertifySection", "CheckpointSection", "Config", "DEFAULT_WATTS_PER_CORE", "DataSection",
           "EnergyConfig", "EnergySection", "EvalConfig", "EvalSection", "FAMILIES", "FINETUNE_SECTIONS",
           "FinetuneConfig", "GPU_BACKENDS", "GRID", "HEAD_KINDS", "LOSSES", "METHODS", "ModelSection",
           "PIPELINE_SECTIONS", "PROTOCOLS", "ParallelSection", "REWARDS", "RLSection", "RolloutsSection",
           "RunSection", "SECTIONS", "Section", "TPU_BACKENDS", "TrainSection", "apply_overrides", "build_section",
           "check_levels", "did_you_mean", "load_config", "load_sections", "overlay", "read_config"]
