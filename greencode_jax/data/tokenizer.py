"""Model tokenizers: a model's own Hugging Face tokenizer, or a byte-level BPE trained here.

Either way a document becomes `tokenizer(text)` (which adds BOS when the tokenizer does:
OPT, Llama and the BPE trained here all do) followed by EOS as the document separator,
as GREEN-CODE's training data does. The tokenizer is saved with the corpus in
`OUT/tokenizer/` in Hugging Face layout (`tokenizer.json` + `tokenizer_config.json`), so
`transformers.AutoTokenizer.from_pretrained(OUT/tokenizer)` loads it too.

The BPE (for small models trained from scratch) is byte level, GPT-2 style, trained with
the `tokenizers` library on the train split. Its special tokens are `<pad>`, `<s>`, `</s>`
and, when code is shown as CodeXGLUE tokens, the placeholders `<EOL>`, `<STR_LIT>`,
`<NUM_LIT>`, `<CHAR_LIT>` and every whitelisted `<STR_LIT:v>` / `<NUM_LIT:v>` /
`<CHAR_LIT:v>` (as CodeGPT registers them), so each placeholder is one token. A model's
own tokenizer is used unchanged: adding tokens would need new embedding rows, so there
the placeholders are split into ordinary pieces, as in GREEN-CODE.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from greencode_jax.errors import GreencodeError

BPE_SPECIALS = ("<pad>", "<s>", "</s>")
GREENCODE_META = "greencode_tokenizer.json"
# Files that hold a vocabulary (tokenizer_config.json alone holds none).
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def vocabulary_fingerprint(vocab: dict, bos_id, eos_id, pad_id) -> str:
    """A short stable hash of a tokenizer's identity: its token -> id mapping (sorted) and its
    special ids; independent of how the files that hold them are formatted."""
    identity = {"vocab": sorted((str(t), int(i)) for t, i in vocab.items()),
                "special": [None if x is None else int(x) for x in (bos_id, eos_id, pad_id)]}
    return hashlib.sha256(json.dumps(identity, separators=(",", ":")).encode()).hexdigest()[:16]


class CodeTokenizer:
    """Encodes documents to model ids and decodes ids; wraps `tokenizers` (BPE) or transformers (HF)."""

    def __init__(self, kind: str, backend, bos_id, eos_id, pad_id, vocab_size: int, name: str):
        self.kind = kind  # "bpe" or "hf"
        self._backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.name = name

    def encode_docs(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text -> ids with the tokenizer's BOS (if any) and an EOS document separator (if any)."""
        if self.kind == "bpe":
            batches = [e.ids for e in self._backend.encode_batch_fast(list(texts))]  # no offsets: less memory
        else:
            # verbose=False: whole files exceed model_max_length by design (they are packed or cut later)
            batches = self._backend(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
        if self.eos_id is not None:
            batches = [ids if ids and ids[-1] == self.eos_id else [*ids, self.eos_id] for ids in batches]
        return batches

    def encode(self, text: str) -> list[int]:
        """One text as a prompt: BOS (if the tokenizer adds one) and no EOS."""
        if self.kind == "bpe":
            return self._backend.encode(text).ids
        return self._backend(text, add_special_tokens=True, verbose=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        """`vocabulary_fingerprint` of this tokenizer (added tokens included)."""
        if self.kind == "bpe":
            vocab = self._backend.get_vocab(with_added_tokens=True)
        else:
            vocab = self._backend.get_vocab()
        return vocabulary_fingerprint(vocab, self.bos_id, self.eos_id, self.pad_id)

    def save(self, directory: str | Path):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "bpe":
            self._backend.save(str(directory / "tokenizer.json"))
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                      "pad_token": "<pad>", "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000}
            (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        else:
            self._backend.save_pretrained(str(directory))
        meta = {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id}
        (directory / GREENCODE_META).write_text(json.dumps(meta, indent=2) + "\n")


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ()) -> CodeTokenizer:
    """A byte-level BPE trained on `texts`; `special_tokens` (placeholders) are kept whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys([*BPE_SPECIALS, *special_tokens]))
    minimum = len(specials) + 256
    if vocab_size < minimum:
        raise GreencodeError(f"--vocab-size {vocab_size}: too small; a byte-level BPE with {len(specials)} special "
                             f"tokens needs at least {minimum}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos, eos, pad = (tokenizer.token_to_id(t) for t in BPE_SPECIALS[1:] + BPE_SPECIALS[:1])
    # BOS in front of every encoding (like OPT and Llama); EOS is appended per document by encode_docs.
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return CodeTokenizer("bpe", tokenizer, bos, eos, pad, tokenizer.get_vocab_size(), f"byte-level BPE {vocab_size}")


def load_hf_tokenizer(model_dir: str | Path) -> CodeTokenizer:
    """The tokenizer of a Hugging Face model directory (never the network)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise GreencodeError(f"--tokenizer {model_dir}: no such directory; pass bpe, none, or a Hugging Face model "
                             "directory with tokenizer files")
    try:
        import transformers

        backend = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as error:
        raise GreencodeError(f"--tokenizer {model_dir}: cannot load a Hugging Face tokenizer from it ({error}); "
                             "expected tokenizer.json or vocabulary files with tokenizer_config.json") from None
    return CodeTokenizer("hf", backend, backend.bos_token_id, backend.eos_token_id, backend.pad_token_id,
                         len(backend), f"Hugging Face tokenizer from {model_dir}")


def load_tokenizer(directory: str | Path) -> CodeTokenizer:
    """A tokenizer saved with a prepared corpus (`OUT/tokenizer`)."""
    directory = Path(directory)
    meta_path = directory / GREENCODE_META
    if not meta_path.is_file():
        raise GreencodeError(f"{directory}: no tokenizer saved here ({GREENCODE_META} missing)")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == "bpe":
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        return CodeTokenizer("bpe", backend, meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["vocab_size"],
                             meta["name"])
    tokenizer = load_hf_tokenizer(directory)
    tokenizer.name = meta["name"]
    return tokenizer


def tokenizer_fingerprint(directory: str | Path) -> str | None:
    """The fingerprint of the tokenizer saved in `directory` (a corpus's `tokenizer/`, a model
    directory or a checkpoint); None when it holds no vocabulary."""
    directory = Path(directory)
    if (directory / GREENCODE_META).is_file():
        return load_tokenizer(directory).fingerprint()
    if not any((directory / name).is_file() for name in VOCABULARY_FILES):
        return None
    try:
        import transformers

        backend = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise GreencodeError(f"{directory}: cannot load its tokenizer files ({reason}); expected tokenizer.json or "
                             "vocabulary files with tokenizer_config.json") from None
    return vocabulary_fingerprint(backend.get_vocab(), backend.bos_token_id, backend.eos_token_id,
                                  backend.pad_token_id)
