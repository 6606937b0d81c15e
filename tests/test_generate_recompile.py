"""One compilation per (batch size, length bucket, policy kind).

Counted with the size of `generate_jit`'s compilation cache. Policy numbers (thresholds,
FixedExit layers, Learned weights) and `max_new_tokens` are traced, prompts are left-padded
to a bucket of 64 tokens and outputs sized to a bucket of 16 new tokens, so none of them may
recompile within their buckets; a new batch size, bucket or policy kind compiles exactly
once. The "exactly once" tests use a bucket of new tokens no other test uses (33..48), so
every compilation they count is their own whatever ran before; the "never again" test
reuses the compilations the other modules need (LLAMA, 15 tokens: the bucket of 16).
"""

from __future__ import annotations

import numpy as np
import pytest

import greencode_jax as gc
from generate_helpers import gen_models, learned_policy, llama, rows_of, run  # noqa: F401 (fixtures)
from greencode_jax.generate import PROMPT_BUCKET
from greencode_jax.generate.decode import generate_jit

# The same matmul precision as the other generate modules: it is part of the jit cache key,
# so their compilations are shared.
pytestmark = pytest.mark.usefixtures("highest_precision")

P = gc.policies
N_NEW = 40  # in a bucket of new tokens (33..48) no other test module uses
MODEL = "opt_pre_untied"  # the smallest model: 2 layers, exit layers (0, 1)
HIDDEN = 64  # LLAMA's


class Compiles:
    def __init__(self):
        self.seen = generate_jit._cache_size()

    def new(self) -> int:
        """Compilations since the last call."""
        now = generate_jit._cache_size()
        count, self.seen = now - self.seen, now
        return count


def record_compiled_programs(monkeypatch) -> list:
    """(optimized program text, static kwargs) of every generate call from here on; each call
    still runs the real program."""
    import greencode_jax.generate as generate_module

    programs = []

    def observed(*args, **kwargs):
        programs.append((generate_jit.lower(*args, **kwargs).compile().as_text(), kwargs))
        return generate_jit(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate_jit", observed)
    return programs


def test_policy_numbers_and_prompt_lengths_never_recompile(llama):
    """After one call per kind (which may compile, or reuse another test's compilation),
    other thresholds, layers, MLP weights, stop tokens and prompt lengths within the
    bucket reuse it: ints, floats and numpy scalars alike."""
    prompts = rows_of(llama, [40, 1, 64])  # one bucket of 64: its ends
    gen = lambda prompt, policy, **kw: run(llama.ours, np.asarray(prompt)[None], policy=policy, **kw)  # noqa: E731
    compiles = Compiles()
    for policy in (P.FixedExit(1), P.Confidence(0.5), learned_policy(HIDDEN, 0.5), P.Full()):
        gen(prompts[0], policy)
        assert compiles.new() <= 1
    for prompt in prompts[1:]:
        for layer in (0, 2, 3, np.int64(0), np.int32(1)):
            gen(prompt, P.FixedExit(layer))
        for threshold in (0, 1, 0.25, 2.0, np.float32(0.9), np.float64(0.1)):
            gen(prompt, P.Confidence(threshold))
        for seed, threshold in [(1, 0), (2, 0.3), (3, np.float32(1))]:
            gen(prompt, learned_policy(HIDDEN, threshold, seed=seed))
        gen(prompt, P.Full(), stop_tokens=(5,))
        gen(prompt, P.Full(), stop_tokens=None)  # the model's eos
    assert compiles.new() == 0


def test_new_kind_batch_size_or_bucket_compiles_exactly_once(gen_models):
    m = gen_models[MODEL]
    assert PROMPT_BUCKET == 64
    prompts = rows_of(m, [40, 1, 64])
    compiles = Compiles()
    for policy in (P.FixedExit(0), P.Confidence(0.5)):  # a kind: once, whatever the prompt length or numbers
        for prompt, number in zip(prompts, (0, 1, 0)):
            run(m.ours, prompt[None], policy=type(policy)(number), max_new_tokens=N_NEW)
        assert compiles.new() == 1
    batch = np.stack(rows_of(m, [30, 30, 30]))  # a batch size: once
    run(m.ours, batch, policy=P.FixedExit(1), max_new_tokens=N_NEW)
    run(m.ours, batch[::-1], policy=P.FixedExit(0), max_new_tokens=N_NEW)
    assert compiles.new() == 1
    for prompt in rows_of(m, [65, 128, 100]):  # a bucket (65..128 tokens): once
        run(m.ours, prompt[None], policy=P.FixedExit(0), max_new_tokens=N_NEW)
    assert compiles.new() == 1


def test_max_new_tokens_within_a_bucket_never_recompiles(gen_models):
    """33..48 new tokens share one compilation; each call still stops at its own count, with
    outputs of that length, and (greedy) a shorter run is a prefix of a longer one. 49 is
    the next bucket: one more compilation."""
    m = gen_models[MODEL]
    prompt = np.stack(rows_of(m, [30, 30]))  # batch 2: a program no other test here compiles
    compiles = Compiles()
    outs = {n: run(m.ours, prompt, policy=P.FixedExit(0), max_new_tokens=n) for n in (48, 33, N_NEW)}
    assert compiles.new() == 1
    longest = outs[48]
    for n, out in outs.items():
        assert out.tokens.shape == out.exit_layers.shape == (2, n)
        assert out.lengths.tolist() == [n, n]  # no stop tokens: exactly n, not the bucket's 48
        np.testing.assert_array_equal(out.tokens, longest.tokens[:, :n])
        np.testing.assert_array_equal(out.exit_layers, longest.exit_layers[:, :n])
    assert len(set(longest.tokens[0].tolist())) > 3  # tokens that vary: a prefix check that can fail
    run(m.ours, prompt, policy=P.FixedExit(0), max_new_tokens=49)
    assert compiles.new() == 1


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_loop_updates_the_kv_cache_in_place(llama, monkeypatch, batch):
    """The compiled program copies no layer's KV cache: the decode step reads the cache and
    then writes the token's K/V into it in place. (An update XLA could not order after the
    read made it copy every layer's cache on every token, 35 % of an OPT-125m step.)"""
    import re

    programs = record_compiled_programs(monkeypatch)
    ids = np.stack(rows_of(llama, [20] * batch))
    for policy in (P.Full(), P.FixedExit(1), learned_policy(HIDDEN, 0.5)):
        run(llama.ours, ids, policy=policy, max_new_tokens=N_NEW)
    c = llama.config
    for text, kwargs in programs:
        cache_len = kwargs["cache_len"]
        cache = batch * c.num_kv_heads * cache_len * c.head_dim
        copied = [shape for shape in re.findall(r"= f32\[([\d,]+)\]\S* copy\(", text)
                  if np.prod([int(d) for d in shape.split(",")]) == cache and str(cache_len) in shape.split(",")]
        assert copied == [], f"the decode loop copies KV caches of shapes {copied}"


def test_on_a_gpu_generation_runs_its_loop_and_conditionals_as_cuda_graphs(monkeypatch):
    """The GPU program's compiler options put while loops and conditionals in XLA command
    buffers (CUDA graphs that decide on the device), unless XLA_FLAGS sets that option itself.
    XLA accepts every kind named (it refuses an unknown one, as it did after renaming
    CONDITIONALS to CONDITIONAL and WHILE)."""
    import jax

    from greencode_jax.generate.decode import command_buffer_options

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = command_buffer_options()
    kinds = options["xla_gpu_enable_command_buffer"].split(",")
    assert {"CONDITIONAL", "WHILE", "FUSION"} <= set(kinds)
    assert jax.jit(lambda x: x + 1, compiler_options=options)(1) == 2
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_gpu_enable_command_buffer=")
    assert command_buffer_options() is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert command_buffer_options() == options


def test_copies_of_a_checkpoint_in_two_directories_share_their_compilations(llama, tmp_path):
    """Where the weights came from is not part of the program: an ablation's checkpoints of
    one architecture compile generate (and the logits) once, though each keeps its own path."""
    from greencode_jax.models.model import _jitted_logits

    copies = [gc.load_checkpoint(gc.save_checkpoint(llama.ours, tmp_path / name)) for name in ("a", "b")]
    assert [m.origin.path for m in copies] == [str(tmp_path / "a"), str(tmp_path / "b")]
    prompt = np.asarray(rows_of(llama, [20])[0])[None]
    compiles, logits_compiles = Compiles(), _jitted_logits._cache_size()
    first = run(copies[0], prompt, policy=P.FixedExit(1))
    assert compiles.new() <= 1  # the first copy may reuse the fixture model's compilation
    second = run(copies[1], prompt, policy=P.FixedExit(1))
    assert compiles.new() == 0
    for m in copies:
        m.logits(prompt, layer=1)
    assert _jitted_logits._cache_size() == logits_compiles + 1
    np.testing.assert_array_equal(first.tokens, second.tokens)


def test_the_decode_loop_reads_no_argument_but_weights_and_policy_and_writes_no_output(llama, monkeypatch):
    """On a GPU the decode loop is a CUDA graph that XLA records again, on the host, whenever a
    buffer it uses has moved since its last run, and arguments and outputs get new buffers on
    every call. So in the compiled program the loop's inputs are computed values, the model's
    weights and the policy's numbers only (not max_new_tokens, stop tokens or padding), and
    the outputs are computed after it, not taken from its state. (The same passes place
    buffers on CPU and GPU; this CPU's program stands for both.)"""
    import re

    programs = record_compiled_programs(monkeypatch)
    ids = np.stack(rows_of(llama, [20]))
    for policy in (P.Full(), P.FixedExit(1), learned_policy(HIDDEN, 0.5)):
        run(llama.ours, ids, policy=policy, max_new_tokens=N_NEW, stop_tokens=(5, 7))
    for text, _ in programs:
        entry = text[text.index("\nENTRY"):]
        entry = entry[:entry.index("\n}")]
        instructions = dict(re.findall(r"^\s*(?:ROOT )?%(\S+) = (.*)$", entry, re.M))
        arguments = {name: re.search(r'op_name="([^"]+)"', line).group(1)
                     for name, line in instructions.items() if " parameter(" in line}
        assert {"max_new_tokens", "stop_tokens", "pad_token"} <= set(arguments.values())

        def operands(name):
            return re.findall(r"%([\w.\-]+)", instructions[name].split("(", 1)[1].split("), ")[0])

        (loop,) = [name for name, line in instructions.items() if re.search(r"\bwhile\(", line)]
        (state,) = operands(loop)
        read = {arguments[x] for x in operands(state) if x in arguments}
        assert read and all(a.startswith(("model.", "policy.")) for a in read), sorted(read)
        root = re.search(r"ROOT %(\S+) =", entry).group(1)
        taken_from_the_loop = [out for out in operands(root)
                               if re.match(rf"\S+ get-tuple-element\(%{re.escape(loop)}\)", instructions[out])]
        assert taken_from_the_loop == []


def test_the_same_policy_number_is_the_same_device_buffer():
    from greencode_jax.generate import _traced

    assert _traced(P.Confidence(0.5)).threshold is _traced(P.Confidence(0.5)).threshold
    assert _traced(P.FixedExit(np.int64(1))).layer is _traced(P.FixedExit(1)).layer
    assert _traced(P.Confidence(0.25)).threshold is not _traced(P.Confidence(0.5)).threshold
    assert float(_traced(P.Confidence(np.float32(0.9))).threshold) == np.float32(0.9)
    params = learned_policy(HIDDEN, 0.5).params
    assert _traced(P.Learned(params, 0.5)).params["layers"][0]["w"] is params["layers"][0]["w"]  # arrays as they are
