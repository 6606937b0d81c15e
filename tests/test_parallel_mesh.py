"""Training sharded over 8 (fake) CPU devices as (data=2, fsdp=4) computes what one device does."""

from __future__ import annotations

import orbax.checkpoint as ocp

from test_train_support import (  # noqa: F401 (fixtures)
    EQUIVALENCE_STEPS, assert_equivalent_runs, compile_cache, equivalence_config, one_device_run, run_cli,
    stdlib_corpus, subprocess_env, write_config,
)


def test_data2_fsdp4_on_8_devices_matches_one_device(one_device_run, stdlib_corpus, compile_cache, tmp_path):
    config = equivalence_config(stdlib_corpus, tmp_path, "eight", parallel={"data": 2, "fsdp": 4})
    env = subprocess_env(compile_cache, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = run_cli(["finetune", write_config(tmp_path / "eight.yaml", config)], env)
    assert done.returncode == 0, done.stderr
    assert "on 8 device(s) (data=2, fsdp=4, 1 process(es))" in done.stdout
    assert_equivalent_runs(one_device_run, tmp_path / "eight")

    # the state really was sharded: parameters and Adam moments along fsdp on their model-width axis
    metadata = ocp.StandardCheckpointer().metadata(
        (tmp_path / "eight" / "checkpoints" / str(EQUIVALENCE_STEPS) / "state").absolute()).item_metadata
    specs = {
        "q_proj kernel": metadata["params"]["layers"]["attn"]["q_proj"]["kernel"],  # [layers, heads, embed]
        "down_proj kernel": metadata["params"]["layers"]["mlp"]["down_proj"]["kernel"],  # [layers, embed, mlp]
        "embedding": metadata["params"]["embed_tokens"]["embedding"],  # [vocab, embed]
        "Adam mu of q_proj": metadata["opt_state"][1][0]["mu"]["layers"]["attn"]["q_proj"]["kernel"],
    }
    expected = {"q_proj kernel": (None, None, "fsdp"), "down_proj kernel": (None, "fsdp"),
                "embedding": (None, "fsdp"), "Adam mu of q_proj": (None, None, "fsdp")}
    for name, array in specs.items():
        assert tuple(array.sharding.partition_spec) == expected[name], name
        assert list(array.sharding.shape) == [2, 4] and array.sharding.axis_names == ["data", "fsdp"]
