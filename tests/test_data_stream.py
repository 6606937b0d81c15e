"""Token storage, the packed training stream (shuffling, sharding, resume) and evaluation samples."""

from __future__ import annotations

import numpy as np
import pytest

from greencode_jax.data.packing import PackedStream, TokenStore, TokenWriter, write_meta
from greencode_jax.data.samples import completion_sample, completion_samples, ground_truth, line_sample, line_samples
from greencode_jax.errors import GreencodeError

SEQ = 16


def make_store(tmp_path, lengths, split="train"):
    """Document d holds ids d*1000 + 0, 1, 2, ...: every id names its document and position."""
    writer = TokenWriter(tmp_path, split, "uint32")
    for d, n in enumerate(lengths):
        writer.add(d * 1000 + np.arange(n))
    write_meta(tmp_path, "uint32", {split: writer.close()})
    return TokenStore(tmp_path, split)


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 40, size=50)
    lengths[-1] += (-lengths.sum()) % (SEQ * 8)  # total divisible by seq_len x global batch: a whole epoch
    return make_store(tmp_path, lengths)


def stream(store, **kw):
    args = dict(seq_len=SEQ, global_batch=8, seed=3, process_index=0, process_count=1)
    args.update(kw)
    return PackedStream(store, args.pop("seq_len"), args.pop("global_batch"), args.pop("seed"), **args)


def test_store_is_memory_mapped_and_round_trips(tmp_path):
    store = make_store(tmp_path, [3, 0, 5])
    assert isinstance(store.tokens, np.memmap) and isinstance(store.offsets, np.memmap)
    assert len(store) == 3 and store.num_tokens == 8
    assert store.doc(0).tolist() == [0, 1, 2] and store.doc(1).tolist() == [] and store.doc(2).tolist()[-1] == 2004


def test_rows_are_contiguous_document_pieces_with_segments_and_positions(store):
    s = stream(store)
    for step in range(2 * s.batches_per_epoch):
        batch = s.batch(step)
        assert batch["tokens"].shape == (8, SEQ) and batch["tokens"].dtype == np.int32
        for tokens, segments, positions in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
            assert segments[0] == 1 and np.all(np.diff(segments) >= 0) and np.all(np.diff(segments) <= 1)
            for seg in np.unique(segments):
                piece = tokens[segments == seg]
                assert len(set(piece // 1000)) == 1  # one document per segment
                assert np.all(np.diff(piece) == 1)  # consecutive ids of that document, in order
                assert positions[segments == seg].tolist() == list(range(len(piece)))
            changes = np.flatnonzero(np.diff(segments))  # a new segment starts exactly where the document changes
            assert np.array_equal(changes, np.flatnonzero(np.diff(tokens // 1000)))


def test_one_epoch_covers_every_token_exactly_once(store):
    s = stream(store)
    assert s.batches_per_epoch * 8 * SEQ == store.num_tokens
    seen = np.concatenate([s.batch(step)["tokens"].ravel() for step in range(s.batches_per_epoch)])
    assert np.array_equal(np.sort(seen), np.sort(np.asarray(store.tokens, dtype=np.int64)))


def test_seeded_shuffle_is_deterministic_and_differs_by_seed_and_epoch(store):
    a, b, c = stream(store, seed=3), stream(store, seed=3), stream(store, seed=4)
    assert np.array_equal(a.batch(0)["tokens"], b.batch(0)["tokens"])
    assert not np.array_equal(a.batch(0)["tokens"], c.batch(0)["tokens"])
    epoch = a.batches_per_epoch
    assert not np.array_equal(a.batch(0)["tokens"], a.batch(epoch)["tokens"])


def test_unshuffled_stream_reads_documents_in_order(store):
    s = stream(store, shuffle=False, global_batch=1)
    first = np.concatenate([s.batch(i)["tokens"][0] for i in range(3)])
    assert np.array_equal(first, np.asarray(store.tokens[:3 * SEQ], dtype=np.int32))


def test_resume_from_saved_state_sees_exactly_the_same_batches(store):
    original = stream(store)
    steps = original.batches_per_epoch + 3  # crosses an epoch boundary
    for _ in range(4):
        next(original)
    saved = dict(original.state())
    expected = [next(original) for _ in range(steps)]
    resumed = stream(store).restore(saved)
    assert resumed.step == 4
    for want in expected:
        got = next(resumed)
        for key in want:
            assert np.array_equal(got[key], want[key])


def test_restore_refuses_a_state_from_other_settings(store):
    saved = stream(store).state()
    with pytest.raises(GreencodeError, match="seq_len was 16 when saved, now 32"):
        stream(store, seq_len=32).restore(saved)


@pytest.mark.parametrize("count", [2, 4, 8])
def test_process_shards_are_disjoint_and_cover_the_global_batch(store, count):
    single = stream(store)
    hosts = [stream(store, process_index=p, process_count=count) for p in range(count)]
    for step in (0, 1, single.batches_per_epoch + 1):
        parts = [h.batch(step)["tokens"] for h in hosts]
        assert all(p.shape == (8 // count, SEQ) for p in parts)
        assert np.array_equal(np.concatenate(parts), single.batch(step)["tokens"])
        flat = np.concatenate([p.ravel() for p in parts])
        assert len(np.unique(flat)) == flat.size  # every id is unique in the corpus: disjoint rows


def test_stream_errors(store):
    with pytest.raises(GreencodeError, match="not divisible by the 3 processes"):
        stream(store, process_count=3)
    with pytest.raises(GreencodeError, match="fewer than one global batch"):
        stream(store, global_batch=10_000)


# --------------------------------------------------------------------------------- GREEN-CODE samples

def test_completion_sample_context_fraction_target_and_cap():
    eos = 99
    doc = np.array([1, *range(10, 59), eos])  # BOS + 49 ids + EOS separator: n = 50 without the EOS
    s = completion_sample(doc, eos, fraction=0.2, max_context=2048, new_tokens=15)
    assert s.context.tolist() == [1, *range(10, 19)]  # int(50 * 0.2) = 10 ids
    assert s.target.tolist() == list(range(19, 34))
    capped = completion_sample(doc, eos, fraction=0.8, max_context=20, new_tokens=15)
    assert len(capped.context) == 5 and capped.target.tolist() == list(range(14, 29))  # 5 + 15 = max_context
    tail = completion_sample(doc, eos, fraction=0.9, new_tokens=15)
    assert len(tail.context) == 45 and tail.target.tolist() == list(range(54, 59))  # fewer left: shorter target
    assert completion_sample(np.array([1, 2, eos]), eos, fraction=0.2) is None  # int(2 * 0.2) = 0: skipped


def test_completion_samples_take_the_first_documents(tmp_path):
    store = make_store(tmp_path, [3, 60, 80, 100])
    samples = completion_samples(store, eos_id=None, fraction=0.5, new_tokens=4, max_samples=2)
    assert [s.doc for s in samples] == [0, 1]
    assert samples[1].context.tolist() == list(range(1000, 1030)) and samples[1].target.tolist() == [1030, 1031,
                                                                                                    1032, 1033]
    with pytest.raises(GreencodeError):
        completion_samples(store, None, fraction=1.5)


# --------------------------------------------------------------------------------------- line level

PY_LINE = "<s> import os <EOL> x = foo ( a , <NUM_LIT:1> ) <EOL> return x </s>"
JAVA_LINE = "<s> if ( a ) { b = c ( ) ; } else { d ++ ; } </s>"


def test_python_ground_truth_runs_to_the_first_eol():
    tokens = PY_LINE.split()
    assert ground_truth(tokens[4:], "python") == "x = foo ( a , <NUM_LIT:1> )".split()
    assert ground_truth(tokens[7:], "python") == "( a , <NUM_LIT:1> )".split()
    assert ground_truth(tokens[-2:], "python") == ["x"]  # stops at </s>
    assert ground_truth(tokens[3:], "python") == []  # starts on <EOL>


def test_java_ground_truth_stops_at_semicolon_or_brace():
    tokens = JAVA_LINE.split()
    assert ground_truth(tokens[1:], "java") == "if ( a )".split()  # '{' excluded
    assert ground_truth(tokens[6:], "java") == "b = c ( ) ;".split()  # ';' included
    assert ground_truth(tokens[12:], "java") == ["}"]  # '}' included
    assert ground_truth(tokens[5:], "java") == []  # starts on '{'


@pytest.mark.parametrize("line, lang", [(PY_LINE, "python"), (JAVA_LINE, "java")])
def test_line_samples_cut_anywhere_allowed_and_stay_consistent(line, lang):
    tokens = line.split()
    forbidden = {"python": {"<EOL>", "</s>"}, "java": {"{", "</s>"}}[lang]
    allowed = {i for i in range(1, len(tokens)) if tokens[i] not in forbidden}
    cuts = set()
    rng = np.random.default_rng(0)
    for _ in range(400):
        sample = line_sample(line, lang, rng, 0)
        cut = len(sample["input"].split())
        cuts.add(cut)
        assert sample["input"].split() == tokens[:cut]
        assert sample["gt"].split() == ground_truth(tokens[cut:], lang) and sample["gt"]
    assert cuts == allowed


def test_line_samples_are_seeded_and_skip_documents_without_a_cut():
    lines = [PY_LINE, "<s> </s>", PY_LINE.replace("os", "sys")]
    a = line_samples(lines, "python", seed=5, max_samples=None)
    assert a == line_samples(lines, "python", seed=5, max_samples=None)
    assert [s["id"] for s in a] == [0, 2]
    assert len(line_samples(lines, "python", seed=5, max_samples=1)) == 1
