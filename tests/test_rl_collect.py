"""Rollout collection: the recording mode of generation, the store, resume; the trained
policy decides inside `generate` as the actor does on the cached observations."""

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import greencode_jax as gc
from greencode_jax.generate.record import record_jit
from greencode_jax.models import ModelConfig, init_model
from greencode_jax.rl import store as st
from greencode_jax.rl.collect import collect_rollouts
from greencode_jax.config import RLSection
from greencode_jax.rl.networks import actor_logits
from greencode_jax.rl.store import RolloutStore
from greencode_jax.rl.train import train_policy

sys.path.insert(0, str(Path(__file__).parent))
from test_train_support import _once, stdlib_corpus  # noqa: E402,F401 (fixture)

EXITS = [0, 1, 2]  # a 4-layer model: decisions after layers 0, 1, 2


@pytest.fixture(scope="module")
def setup(stdlib_corpus, tmp_path_factory):
    """The session's stdlib corpus and a tiny random checkpoint over its vocabulary."""
    def build():
        from greencode_jax.data.prepared import PreparedData

        root = tmp_path_factory.mktemp("rl_collect")
        tok = PreparedData(stdlib_corpus).tokenizer()
        config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32,
                                          intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=128,
                                          eos_token_id=tok.eos_id), exit_layers=EXITS)
        gc.save_checkpoint(init_model(config, seed=3), root / "ckpt")
        return root, stdlib_corpus, root / "ckpt"
    return _once("rl_collect_setup", build)


def test_a_batch_records_what_one_by_one_runs_record(setup):
    _, _, ckpt = setup
    model = gc.load_pretrained(ckpt, scan_layers=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, model.config.vocab_size, n).astype(np.int32) for n in (5, 17, 9)]
    width = 64
    ids = np.zeros((3, width), np.int32)
    valid = np.zeros((3, width), bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], valid[r, width - len(p):] = p, True
    batch = record_jit(model, jnp.asarray(ids), jnp.asarray(valid), new_tokens=6)
    for r, p in enumerate(prompts):
        one = record_jit(model, jnp.asarray(ids[r:r + 1]), jnp.asarray(valid[r:r + 1]), new_tokens=6)
        np.testing.assert_array_equal(batch.tokens[r], one.tokens[0])
        np.testing.assert_array_equal(batch.agree[r], one.agree[0])
        # Batch 3 and batch 1 are two compiled programs: float32 rounding, ~1e-7 relative, of O(1) states.
        np.testing.assert_allclose(batch.hidden[r], one.hidden[0], rtol=1e-5, atol=1e-5)
    # The tokens are generate's Full() tokens; agreement is each exit head's argmax vs the final one.
    out = model.generate(ids[1:2, width - 17:], max_new_tokens=6, stop_tokens=())
    np.testing.assert_array_equal(batch.tokens[1], out.tokens[0])
    full = np.concatenate([prompts[1], np.asarray(batch.tokens[1])])[None]
    for x, layer in enumerate(EXITS):
        logits = np.asarray(model.logits(full, layer=layer))[0, len(prompts[1]) - 1:-1]
        np.testing.assert_array_equal(logits.argmax(-1) == np.asarray(batch.tokens[1]), batch.agree[1, :, x])


def test_collection_writes_the_store_resumes_and_refuses_other_settings(setup, tmp_path):
    _, data, ckpt = setup
    kw = dict(episodes=10, batch_size=4, chunk_episodes=4, max_context=40, progress=False, log=lambda *a: None)
    whole = collect_rollouts(ckpt, data, tmp_path / "whole", **kw)
    store = RolloutStore(whole)
    assert store.episodes == 10 and store.decision_layers == (0, 1, 2) and store.meta["chunks"] == 3
    hidden, agree = store.array("hidden"), store.array("agree")
    assert hidden.shape == (10, 15, 3, 32) and agree.shape == (10, 15, 3)
    np.testing.assert_allclose(store.obs_mean, hidden.reshape(-1, 32).mean(0), rtol=1e-4, atol=1e-5)
    # Resume: a collection interrupted after its first chunk finishes with the same arrays.
    shutil.copytree(whole, tmp_path / "cut.partial")
    for name in ("00001", "00002"):
        shutil.rmtree(tmp_path / "cut.partial" / st.CHUNKS / name)
    for name in (st.META, st.STATS):
        (tmp_path / "cut.partial" / name).unlink()
    settings = {k: v for k, v in store.meta.items() if k not in ("format", "version", "decision_layers", "chunks",
                                                                 "arrays")}
    (tmp_path / "cut.partial" / "settings.json").write_text(json.dumps(settings))
    resumed = RolloutStore(collect_rollouts(ckpt, data, tmp_path / "cut", **kw))
    for name in st.ARRAYS:
        np.testing.assert_array_equal(resumed.array(name), store.array(name))
    # Other settings over an interrupted one: refused, nothing touched.
    shutil.copytree(whole, tmp_path / "other.partial")
    (tmp_path / "other.partial" / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(gc.GreencodeError, match="other settings"):
        collect_rollouts(ckpt, data, tmp_path / "other", **{**kw, "seed": 5})
    with pytest.raises(gc.GreencodeError, match="already exists"):
        collect_rollouts(ckpt, data, tmp_path / "whole", **kw)
    with pytest.raises(gc.GreencodeError, match="not a prepared corpus"):
        collect_rollouts(ckpt, tmp_path, tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_generate_with_the_loaded_policy_decides_as_the_actor_on_the_cached_states(setup, tmp_path):
    _, data, ckpt = setup
    store_dir = collect_rollouts(ckpt, data, tmp_path / "rollouts", episodes=16, batch_size=8, max_context=40,
                                 progress=False, log=lambda *a: None)
    cfg = RLSection(num_envs=16, num_steps=16, minibatch_size=64, hidden=(8, 8), learning_rate=1e-2,
                    total_timesteps=16 * 16 * 4, checkpoint_every=4)
    train_policy(store_dir, tmp_path / "policy", cfg, progress=False, log=lambda *a: None)
    store = RolloutStore(store_dir)
    model = gc.load_pretrained(ckpt, scan_layers=False)
    hidden, episodes, tokens = store.array("hidden"), store.array("episodes"), store.array("tokens")
    from greencode_jax.data.prepared import PreparedData

    docs = PreparedData(data).tokens("train")
    threshold = 0.5
    policy = gc.policies.Learned.load(tmp_path / "policy", threshold=threshold)
    p_exit = np.asarray(jax.nn.softmax(actor_logits(policy.params["layers"], policy.params["obs_mean"],
                                                    policy.params["obs_std"], jnp.asarray(hidden)), -1)[..., 1])
    compared = exits = 0
    for e in range(len(hidden)):
        prompt = np.asarray(docs.doc(int(episodes[e, 0])))[:int(episodes[e, 1])]
        out = model.generate(prompt[None], max_new_tokens=15, policy=policy, stop_tokens=())
        got = np.asarray(out.exit_layers[0])
        # Token n (n >= 1) is decided on the state recorded for it, while every earlier token
        # ran to the last layer (after an early exit the cache differs from the recording).
        for n in range(1, 15):
            decide = p_exit[e, n] > threshold
            expected = EXITS[int(np.argmax(decide))] if decide.any() else 3
            assert got[n] == expected, (e, n)
            compared += 1
            if expected != 3:
                exits += 1
                break
            assert out.tokens[0, n] == tokens[e, n]
    assert compared >= 16 and 0 < exits, (compared, exits)


def test_a_batch_split_over_eight_devices_records_what_one_device_records():
    """The recorder's data mesh (parallel.make_mesh over the local devices) splits the batch; the
    model's forward then runs per device without collectives: the same record, to float rounding."""
    import subprocess
    import textwrap

    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, numpy as np
        from greencode_jax.models import ModelConfig, init_model
        from greencode_jax.rl.collect import _Recorder
        config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128), exit_layers=[0, 1, 2])
        model = init_model(config, seed=3)
        model.set_scan_layers(False)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 64, n).astype(np.int32) for n in (5, 17, 9, 30, 2, 11)]
        eight = _Recorder(model, 4, "float32")
        one = _Recorder(model, 4, "float32")
        one.devices, one.batch_sharding = 1, None
        a, b = eight(prompts, 8), one(prompts, 8)
        same = all(np.array_equal(a[k], b[k]) for k in ("tokens", "agree"))
        close = all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-5) for k in ("hidden", "confidence"))
        print("DEVICES", eight.devices, "SAME", same, "CLOSE", close)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert "DEVICES 8 SAME True CLOSE True" in proc.stdout, proc.stdout
