"""What a server serves: the model and its tokenizer, the learned policy and its certified
thresholds, the cost model, and the tokenizer's fill-in-the-middle tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from greencode_jax.convert import load_pretrained
from greencode_jax.data.tokenizer import GREENCODE_META, load_hf_tokenizer, load_tokenizer
from greencode_jax.energy.cost_model import architecture, load_cost_model
from greencode_jax.errors import GreencodeError
from greencode_jax.generate import _check_policy
from greencode_jax.generate.policies import Learned
from greencode_jax.serve.policy import PolicyResolver, certified_thresholds, find_certification

# Fill-in-the-middle token triples (prefix, suffix, middle) as tokenizers spell them.
FIM_STYLES = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM2, DeepSeek-style
              ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))  # Qwen2.5-Coder, CodeGemma


@dataclasses.dataclass
class Served:
    name: str
    model: object
    tokenizer: object
    policies: PolicyResolver
    learned: Learned | None = None
    certification: Path | None = None
    cost: dict | None = None
    fim: tuple | None = None  # the tokenizer's (prefix, suffix, middle) FIM tokens, or None

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        """The prefix-suffix-middle prompt (its special tokens are whole tokens to the tokenizer)."""
        if self.fim is None:
            raise GreencodeError(f"model {self.name} has no fill-in-the-middle tokens (looked for "
                                 f"{' or '.join(s[0] for s in FIM_STYLES)}): `suffix` cannot be served")
        pre, suf, mid = self.fim
        return f"{pre}{prefix}{suf}{suffix}{mid}"


def tokenizer_of(model, checkpoint):
    directory = Path(model.origin.path) if model.origin.path else Path(checkpoint)
    if (directory / GREENCODE_META).is_file():
        return load_tokenizer(directory)
    return load_hf_tokenizer(directory)


def fim_tokens(tokenizer) -> tuple | None:
    backend = tokenizer._backend
    vocab = backend.get_vocab(with_added_tokens=True) if tokenizer.kind == "bpe" else backend.get_vocab()
    for style in FIM_STYLES:
        if all(token in vocab for token in style):
            return style
    return None


def load_served(checkpoint, *, policy_dir=None, cost_model: str = "", default_policy: str = "",
                default_threshold: float | None = None, allow_foreign_policy: bool = False) -> Served:
    model = load_pretrained(checkpoint, scan_layers=False)
    tokenizer = tokenizer_of(model, checkpoint)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GreencodeError(f"{checkpoint}: its tokenizer has {tokenizer.vocab_size} tokens, the model "
                             f"{model.config.vocab_size}: not the model's tokenizer")
    learned = certification = None
    if policy_dir is not None:
        learned = Learned.load(policy_dir, model=model, allow_foreign=allow_foreign_policy)
        try:
            _check_policy(learned, model.config)
        except GreencodeError as error:
            raise GreencodeError(f"--policy {policy_dir}: {error}") from None
        certification = find_certification(policy_dir)
    cost = load_cost_model(cost_model, architecture(model.config), what="serve.cost_model") if cost_model else None
    spec = default_policy or ("learned" if learned is not None else "full")
    resolver = PolicyResolver(tuple(model.config.exit_layers), learned, certified_thresholds(certification), spec,
                              default_threshold)
    resolver.resolve(None, None)  # the default policy must be one this server can serve
    name = Path(str(checkpoint).rstrip("/")).name or str(checkpoint)
    return Served(name, model, tokenizer, resolver, learned, certification, cost, fim_tokens(tokenizer))
