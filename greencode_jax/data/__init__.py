"""Code corpora for training and evaluation (package `data`).

CodeXGLUE token-level preprocessing for Python and Java, corpora from local trees,
CodeXGLUE files, Hugging Face and TFDS, tokenizers, packed shardable batches with an
exact resume position, and evaluation samples. Imports nothing of ours but
`greencode_jax.errors` and `greencode_jax.atomic`; heavy libraries (tfds, tokenizers,
transformers, datasets, javalang) are imported where they are used.

    from greencode_jax.data import PreparedData, PrepareOptions, prepare_data
    prepare_data(PrepareOptions(lang="python", out="data/py"))   # the running Python's stdlib
    data = PreparedData("data/py")
    stream = data.stream("train", seq_len=256, global_batch=8, seed=42)
    batch = next(stream); saved = stream.state()                 # resume: data.stream(...).restore(saved)
    samples = data.completion_samples("test")                    # GREEN-CODE protocol
"""

from greencode_jax.data.prepare import PrepareOptions, prepare_data
from greencode_jax.data.prepared import PreparedData

__all__ = ["PrepareOptions", "PreparedData", "prepare_data"]
