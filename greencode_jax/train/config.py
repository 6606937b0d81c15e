"""The fine-tuning config: one frozen dataclass per YAML section.

`greencode finetune CONFIG [section.field=value ...]` reads the YAML into these (the CLI
names a misspelt field and its closest valid one); `train.loop.train` takes them.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RunSection:
    name: str = "finetune"  # outputs go to <out_dir>/<name>/
    out_dir: str = "runs"
    seed: int = 42  # model init (from scratch) and the data order
    progress: bool = True  # a progress bar on the primary process
    log_every: int = 10  # steps between metrics records (and progress-bar updates)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    init: str = "scratch"  # "scratch", a Hugging Face model directory or hub id, or a greencode checkpoint
    exit_layers: tuple = ()  # 0-based decoder layers with an exit (the final layer is added); () = the source's
    dtype: str = "float32"  # master weights (what the optimiser updates and the final checkpoint stores)
    compute_dtype: str = "float32"  # forward/backward: float32, or bfloat16 with float32 master weights
    remat: bool = False  # recompute each layer's activations in the backward pass (less memory)
    scan_layers: bool = True  # stacked layers under lax.scan: one layer compiled whatever the depth; false:
    #                           per-layer parameters, a longer compile, faster steps for shallow models on CPU
    config: dict | None = None  # from scratch: Hugging Face config.json fields (vocab_size defaults to the data's)


@dataclasses.dataclass(frozen=True)
class DataSection:
    path: str = ""  # a directory written by `greencode prepare-data`
    seq_len: int = 256  # tokens per packed sequence
    prepare_lang: str = ""  # "python"/"java": prepare `path` from the stdlib / JDK first if it does not exist
    prepare_tokenizer: str = "bpe"  # that preparation's tokenizer: "bpe" (trained on the corpus, from scratch) or
    #                                 "model" (model.init's own: what a pretrained model needs)
    prepare_vocab_size: int = 8192  # BPE vocabulary of that automatic preparation
    prepare_view: str = "codexglue"  # what the model reads: CodeXGLUE's space-joined tokens, or "raw" source text
    prepare_max_files: int = 0  # 0: every file
    prepare_split: tuple = (0.8, 0.1, 0.1)  # train, dev, test ratios by path hash (dev: calibration and validation)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 0  # optimiser updates; 0: epochs x updates per epoch
    epochs: float = 1.0
    batch_size: int = 8  # sequences per micro-batch (all processes together)
    grad_accum: int = 1  # micro-batches per update
    learning_rate: float = 1e-5
    schedule: str = "constant"  # after warm-up: constant | cosine
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0  # cosine: the last learning rate as a fraction of the peak
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 = off
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    exit_weights: str | tuple = "greencode"  # greencode | uniform | linear | a list, one weight per exit
    # how the exits are trained: "full" (GREEN-CODE: every parameter, aggregated exit cross-entropy) or "heads"
    # (a small head per exit on a frozen backbone, distilled from the last layer: docs/finetune.md)
    method: str = "full"
    head: str = "affine"  # heads: "affine" (h + hA + b) or "lowrank" (h + hDU + b)
    head_rank: int = 64  # heads: the rank of a lowrank head
    kd_temperature: float = 1.0  # heads: the distillation temperature
    ce_weight: float = 0.0  # heads: weight of the next-token cross-entropy mixed into the distillation loss
    cache_gb: float = 8.0  # heads, several epochs: cache the first epoch's hidden states if they fit in this many GB


@dataclasses.dataclass(frozen=True)
class ParallelSection:
    data: int = -1  # devices along the data axis (-1: the devices fsdp leaves)
    fsdp: int = 1  # devices along the fsdp axis (parameters and optimiser state sharded)
    distributed: str = "auto"  # auto | on | off (see greencode_jax.parallel.distributed)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 500  # steps between checkpoints (also saved at the end and on SIGTERM)
    keep: int = 3  # most recent checkpoints kept
    async_save: bool = True  # write in the background while training goes on
    dir: str = ""  # default <run dir>/checkpoints; must be reachable by every host (GCS, shared FS)
    resume: str = "auto"  # auto: continue from the latest checkpoint if any; never: refuse to reuse a run dir


@dataclasses.dataclass(frozen=True)
class EvalSection:
    split: str = "test"  # per-exit loss and token accuracy on this split at the end
    batches: int = 16  # batches of train.batch_size sequences; 0 = the whole split
    every: int = 0  # also evaluate every N steps (0: only at the end)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    parallel: ParallelSection = ParallelSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model"]["exit_layers"] = list(self.model.exit_layers)
        out["data"]["prepare_split"] = list(self.data.prepare_split)
        if isinstance(self.train.exit_weights, tuple):
            out["train"]["exit_weights"] = list(self.train.exit_weights)
        return out


SECTION_CLASSES = {"run": RunSection, "model": ModelSection, "data": DataSection, "train": TrainSection,
                   "parallel": ParallelSection, "checkpoint": CheckpointSection, "eval": EvalSection}
