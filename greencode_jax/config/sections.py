"""The sections `finetune` reads (run, model, data, train, parallel, checkpoint, eval) and
`FinetuneConfig`, the seven together. Each checks the fields it can check alone in
`__post_init__`; what needs the data or the model (a sequence length against the model's
positions, a corpus that must exist) is checked by `train` before it writes anything."""

from __future__ import annotations

import dataclasses
import math

from greencode_jax.config.base import Section, check_hosts
from greencode_jax.errors import GreencodeError

METHODS = ("full", "heads")  # train.method
HEAD_KINDS = ("affine", "lowrank")  # train.head
PROTOCOLS = ("completion", "line")  # eval.protocols


def _positive(field: str, value):
    if value <= 0:
        raise GreencodeError(f"{field}={value}; expected a positive integer")


def _bad_eval(name, value, expected):
    raise GreencodeError(f"field 'eval.{name}' is {value!r}, expected {expected}")


def _integer_eval(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _bad_eval(name, value, f"an integer >= {minimum}")


@dataclasses.dataclass(frozen=True)
class RunSection(Section):
    NAME = "run"
    name: str = "finetune"  # outputs go to <out_dir>/<name>/
    out_dir: str = "runs"
    seed: int = 42  # model init (from scratch) and the data order
    progress: bool = True  # a progress bar on the primary process
    log_every: int = 10  # steps between metrics records (and progress-bar updates)

    def __post_init__(self):
        _positive("run.log_every", self.log_every)


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
    NAME = "model"
    init: str = "scratch"  # "scratch", a Hugging Face model directory or hub id, or a greencode checkpoint
    # 0-based decoder layers with an exit (the final layer is added); () = the source's
    exit_layers: tuple[int, ...] = dataclasses.field(default=(), metadata={
        "expected": "a list of 0-based layer indices"})
    dtype: str = "float32"  # master weights (what the optimiser updates and the final checkpoint stores)
    compute_dtype: str = "float32"  # forward/backward: float32, or bfloat16 with float32 master weights
    remat: bool = False  # recompute each layer's activations in the backward pass (less memory)
    scan_layers: bool = True  # stacked layers under lax.scan: one layer compiled whatever the depth; false:
    #                           per-layer parameters, a longer compile, faster steps for shallow models on CPU
    # from scratch: Hugging Face config.json fields (vocab_size defaults to the data's)
    config: dict | None = dataclasses.field(default=None, metadata={
        "expected": "a mapping of Hugging Face config.json fields"})


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
    NAME = "data"
    path: str = ""  # a directory written by `greencode prepare-data`
    seq_len: int = 256  # tokens per packed sequence
    prepare_lang: str = ""  # "python"/"java": prepare `path` from the stdlib / JDK first if it does not exist
    prepare_tokenizer: str = "bpe"  # that preparation's tokenizer: "bpe" (trained on the corpus, from scratch) or
    #                                 "model" (model.init's own: what a pretrained model needs)
    prepare_vocab_size: int = 8192  # BPE vocabulary of that automatic preparation
    prepare_view: str = "codexglue"  # what the model reads: CodeXGLUE's space-joined tokens, or "raw" source text
    prepare_max_files: int = 0  # 0: every file
    # train, dev, test ratios by path hash (dev: calibration and validation)
    prepare_split: tuple[float, ...] = dataclasses.field(default=(0.8, 0.1, 0.1), metadata={
        "expected": "three train, dev, test ratios"})

    def __post_init__(self):
        if len(self.prepare_split) != 3:
            raise GreencodeError(f"field 'data.prepare_split' is {list(self.prepare_split)!r}, expected three train, "
                                 "dev, test ratios")


@dataclasses.dataclass(frozen=True)
class TrainSection(Section):
    NAME = "train"
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
    # greencode | uniform | linear | a list, one weight per exit
    exit_weights: str | tuple = dataclasses.field(default="greencode", metadata={
        "expected": "a scheme name (greencode, uniform, linear) or a list of weights"})
    # how the exits are trained: "full" (GREEN-CODE: every parameter, aggregated exit cross-entropy) or "heads"
    # (a small head per exit on a frozen backbone, distilled from the last layer: docs/finetune.md)
    method: str = "full"
    head: str = "affine"  # heads: "affine" (h + hA + b) or "lowrank" (h + hDU + b)
    head_rank: int = 64  # heads: the rank of a lowrank head
    kd_temperature: float = 1.0  # heads: the distillation temperature
    ce_weight: float = 0.0  # heads: weight of the next-token cross-entropy mixed into the distillation loss
    cache_gb: float = 8.0  # heads, several epochs: cache the first epoch's hidden states if they fit in this many GB

    def __post_init__(self):
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        if self.method not in METHODS:
            raise GreencodeError(f"train.method={self.method!r}; expected one of {list(METHODS)}")
        if self.head not in HEAD_KINDS or self.head_rank < 1 or self.kd_temperature <= 0 or self.ce_weight < 0:
            raise GreencodeError(f"train.head={self.head!r} (expected one of {list(HEAD_KINDS)}), "
                                 f"train.head_rank={self.head_rank} (>= 1), train.kd_temperature={self.kd_temperature} "
                                 f"(> 0), train.ce_weight={self.ce_weight} (>= 0): one of them is out of range")
        if self.steps < 0 or (self.steps == 0 and self.epochs <= 0):
            raise GreencodeError(f"train.steps={self.steps}, train.epochs={self.epochs}; give a positive number of "
                                 "steps, or steps: 0 and a positive number of epochs")


@dataclasses.dataclass(frozen=True)
class ParallelSection(Section):
    NAME = "parallel"
    data: int = -1  # devices along the data axis (-1: the devices fsdp leaves)
    fsdp: int = 1  # devices along the fsdp axis (parameters and optimiser state sharded)
    distributed: str = "auto"  # auto | on | off (see greencode_jax.parallel.distributed)
    hosts: int = 1  # `greencode sweep`: the fine-tune as this many processes, one per host (in no stage key)

    def __post_init__(self):
        check_hosts(self)


@dataclasses.dataclass(frozen=True)
class CheckpointSection(Section):
    NAME = "checkpoint"
    every: int = 500  # steps between checkpoints (also saved at the end and on SIGTERM)
    keep: int = 3  # most recent checkpoints kept
    async_save: bool = True  # write in the background while training goes on
    dir: str = ""  # default <run dir>/checkpoints; must be reachable by every host (GCS, shared FS)
    resume: str = "auto"  # auto: continue from the latest checkpoint if any; never: refuse to reuse a run dir

    def __post_init__(self):
        _positive("checkpoint.every", self.every)
        if self.resume not in ("auto", "never"):
            raise GreencodeError(f"checkpoint.resume={self.resume!r}; expected auto or never")


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
    """The `eval` section. Fine-tuning reads `split`, `batches` and `every` (per-exit loss and accuracy
    at the end of training); `greencode evaluate` and the pipeline read the rest and `split`, the
    held-out split in both."""
    NAME = "eval"
    split: str = "test"  # the held-out split (evaluate: of the completion protocol; line samples come from test)
    batches: int = 16  # finetune: batches of train.batch_size sequences; 0 = the whole split
    every: int = 0  # finetune: also evaluate every N steps (0: only at the end)
    samples: int = 1000  # per protocol: the first N test documents that give a sample (0: all)
    batch_size: int | tuple = dataclasses.field(default=(1,), metadata={  # each batch size evaluated, e.g. (1, 8)
        "expected": "a positive integer or a list of them"})
    policies: str = ""  # the policy SPEC (eval/spec.py); "": the default set
    # "completion" and/or "line"; (): completion, plus line where the corpus has it
    protocols: str | tuple = dataclasses.field(default=(), metadata={"expected": "a list of completion and line"})
    context_fraction: float = 0.2  # completion: the first 20 % of a file's tokens as context (GREEN-CODE)
    new_tokens: int = 15  # completion: tokens generated and compared (GREEN-CODE)
    line_new_tokens: int = 32  # line: at most this many tokens, cut at the line's end as CodeXGLUE does
    max_context: int = 2048  # longest prompt plus new tokens (also capped by the model's positions)
    pad_prompts: int = 0  # left-pad each batch to a multiple of this many tokens (0: generate's 64-token buckets)
    confidence_thresholds: float | tuple = dataclasses.field(default=(0.5, 0.7, 0.8, 0.9, 0.95), metadata={
        "expected": "a non-empty list of thresholds in 0..1"})  # grid of a bare `confidence` item
    thresholds: float | tuple = dataclasses.field(default=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95), metadata={
        "expected": "a non-empty list of thresholds in 0..1"})  # grid of a bare `learned` item (1.0 is added)
    cost_model: str = ""  # `greencode energy calibrate --out` JSON for the modelled joules ("": none)
    # evaluate a policy trained on another checkpoint (the report says so)
    allow_foreign_policy: bool = dataclasses.field(default=False, metadata={"expected": "true or false"})
    certified: str = ""  # `greencode certify` JSON: adds the rows learned@certified, confidence@certified ("": none)

    def __post_init__(self):
        sizes = (self.batch_size,) if isinstance(self.batch_size, int) else tuple(self.batch_size)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            _bad_eval("batch_size", self.batch_size, "a positive integer or a list of them")
        object.__setattr__(self, "batch_size", tuple(dict.fromkeys(sizes)))
        protocols = (self.protocols,) if isinstance(self.protocols, str) else tuple(self.protocols)
        if any(p not in PROTOCOLS for p in protocols):
            _bad_eval("protocols", self.protocols, f"a list of {' and '.join(PROTOCOLS)}")
        object.__setattr__(self, "protocols", tuple(dict.fromkeys(protocols)))
        for name in ("samples", "pad_prompts", "batches", "every"):
            _integer_eval(name, getattr(self, name), minimum=0)
        for name in ("new_tokens", "line_new_tokens", "max_context"):
            _integer_eval(name, getattr(self, name), minimum=1)
        if self.max_context <= max(self.new_tokens, self.line_new_tokens):
            _bad_eval("max_context", self.max_context, "more than new_tokens and line_new_tokens")
        if isinstance(self.context_fraction, bool) or not isinstance(self.context_fraction, (int, float)) \
                or not 0.0 < self.context_fraction < 1.0:
            _bad_eval("context_fraction", self.context_fraction, "a number between 0 and 1")
        for name in ("confidence_thresholds", "thresholds"):
            values = getattr(self, name)
            values = (values,) if isinstance(values, (int, float)) else values
            if not isinstance(values, (list, tuple)) or not values or any(
                    isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                    or not 0.0 <= t <= 1.0 for t in values):
                _bad_eval(name, getattr(self, name), "a non-empty list of thresholds in 0..1")
            object.__setattr__(self, name, tuple(float(t) for t in values))
        for name in ("policies", "split", "cost_model", "certified"):
            if not isinstance(getattr(self, name), str):
                _bad_eval(name, getattr(self, name), "a string")
        if not isinstance(self.allow_foreign_policy, bool):
            _bad_eval("allow_foreign_policy", self.allow_foreign_policy, "true or false")

    def evaluation_fields(self) -> dict:
        """What the evaluation reads of this section (a pipeline stage's key: fine-tuning's own fields
        do not change the evaluation)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("batches", "every")}

    def finetune_fields(self) -> dict:
        """What fine-tuning reads of this section (and writes into its resolved config.yaml)."""
        return {"split": self.split, "batches": self.batches, "every": self.every}


EvalConfig = EvalSection  # the name the evaluation API takes it by


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything `greencode finetune` reads; `train.train` takes it."""
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    parallel: ParallelSection = ParallelSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()

    def __post_init__(self):
        if self.train.method == "heads" and self.model.init == "scratch":
            raise GreencodeError("train.method=heads trains exit heads on a frozen, pretrained backbone; model.init "
                                 "must be a model directory, GGUF file or checkpoint, not scratch")

    def to_dict(self) -> dict:
        """The resolved config as finetune writes it (config.yaml): of `eval`, fine-tuning's fields."""
        out = {name: getattr(self, name).to_dict() for name in FINETUNE_SECTIONS}
        out["eval"] = self.eval.finetune_fields()
        return out


FINETUNE_SECTIONS = ("run", "model", "data", "train", "parallel", "checkpoint", "eval")

