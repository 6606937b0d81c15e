"""`Full()` greedy generation against transformers' own `generate` on the same random weights.

Both sides run fp32 with no stop token (HF: eos_token_id=None; ours: stop_tokens=()), so
both produce exactly 15 tokens. The models are chosen so that greedy continuations are
varied (see generate_helpers): a wrong cache slot, position or RoPE angle changes tokens.
Prompts of a few dozen tokens and of a few hundred (the cache and RoPE must hold over
length, past llama3's original_max_position_embeddings=64), batch 1 and left-padded
batches compared with HF's generate on the same padded batch and attention mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import greencode_jax as gc
from generate_helpers import LLAMA, N_NEW, gen_models, left_pad, rows_of, run  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("highest_precision")

MODELS = ["opt_pre_untied", "opt_post_proj", LLAMA]  # pre-LN OPT; post-LN OPT with project_in/out; GQA llama3 Llama

# name -> prompt lengths of the batch's rows (one row: batch 1). The 2-row batches are left-padded.
SHAPES = {
    "short_b1": [41],
    "long_padded_b2": [300, 45],  # 255 pads in row 1; row 0 long
    "long_b1": [290],
    "short_padded_b2": [38, 29],
}
# Where the prompts start in the token rows: opt_post_proj continues row 0's first 41 tokens
# with only 3 distinct tokens (28, 33, 94), a degenerate comparison.
START = 50
SLOW_SHAPES = {"long_b1", "short_padded_b2"}  # one more compile each per model; the default two cover both axes


def hf_greedy(torch_model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = torch_model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                                   max_new_tokens=N_NEW, eos_token_id=None,
                                   pad_token_id=torch_model.config.pad_token_id)
    assert out.shape == (ids.shape[0], ids.shape[1] + N_NEW)  # no early stop: the comparison covers 15 tokens
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("shape", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_SHAPES else s
                                   for s in SHAPES])
@pytest.mark.parametrize("name", MODELS)
def test_full_greedy_equals_transformers_generate(gen_models, name, shape):
    m = gen_models[name]
    ids, mask = left_pad(rows_of(m, SHAPES[shape], start=START), m.pad_id)
    want = hf_greedy(m.torch_model, ids, mask)
    out = run(m.ours, ids, mask, policy=gc.policies.Full())
    np.testing.assert_array_equal(out.tokens, want)
    assert (out.exit_layers == m.last).all()  # Full never exits
    assert (out.lengths == N_NEW).all()
    assert len(np.unique(want)) >= 4, "degenerate reference continuation: the comparison would prove little"


def test_stacked_model_is_converted_and_generates_the_same(gen_models):
    """A model in the stacked (training) layout is converted in place to per-layer storage."""
    m = gen_models["opt_post_proj"]
    stacked = gc.load_pretrained(m.path)
    assert stacked.config.scan_layers
    ids = rows_of(m, SHAPES["short_b1"])[0][None]
    out = run(stacked, ids)
    assert not stacked.config.scan_layers
    np.testing.assert_array_equal(out.tokens, run(m.ours, ids).tokens)


def test_unbatched_prompt_and_mask(gen_models):
    """One prompt as a 1-D list, with or without its 1-D mask: the same tokens as the [1, T] array."""
    m = gen_models["opt_post_proj"]
    prompt = rows_of(m, SHAPES["short_b1"])[0]
    want = run(m.ours, prompt[None]).tokens
    np.testing.assert_array_equal(run(m.ours, prompt.tolist()).tokens, want)
    np.testing.assert_array_equal(run(m.ours, prompt.tolist(), [1] * len(prompt)).tokens, want)
