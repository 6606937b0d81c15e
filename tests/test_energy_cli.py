"""`greencode energy probe | calibrate` and `greencode bench energy`, through the parsers they register."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import transformers

from greencode_jax.cli.energy_cmd import register, register_bench
from greencode_jax.bench.energy import TARGET_OVERHEAD_S
from greencode_jax.errors import GreencodeError


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="greencode")
    sub = root.add_subparsers(dest="command", required=True)
    register(sub)
    bench = sub.add_parser("bench").add_subparsers(dest="bench", required=True)
    register_bench(bench)
    return root


def run(argv):
    args = parser().parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("argv, text", [
    (["energy", "--help"], "probe"),
    (["energy", "probe", "--help"], "--sample-seconds"),
    (["energy", "calibrate", "--help"], "--depths"),
    (["bench", "energy", "--help"], "--windows"),
])
def test_help(argv, text, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(argv)
    assert exit_.value.code == 0 and text in capsys.readouterr().out


def test_help_names_the_default_depth_limit_calibrate_uses():
    """`--help` states the limit without importing the calibration (and JAX): the two must agree."""
    from greencode_jax.cli import energy_cmd
    from greencode_jax.energy import calibrate_run

    assert energy_cmd.MAX_DEFAULT_DEPTHS == calibrate_run.MAX_DEFAULT_DEPTHS


def test_probe_prints_each_device_and_why(tmp_path, capsys):
    out = tmp_path / "probe.json"
    run(["energy", "probe", "--sample-seconds", "0.05", "--json", str(out),
         "--set", f"powercap_root={tmp_path / 'no-powercap'}"])
    printed = capsys.readouterr().out
    assert "cpu:host" in printed and "method: estimated via cpu_time" in printed
    assert "no-powercap does not exist" in printed
    report = json.loads(out.read_text())
    host = report["devices"][-1]
    assert host["key"] == "cpu:host" and host["tried"][0]["backend"] == "rapl"
    assert host["sample"]["method"] == "estimated"
    if report["jax"]["backend"] == "cpu":
        assert report["gpu"].startswith("no GPU visible to JAX") and "tpumonitoring not consulted" in report["tpu"]


def test_bad_override_names_the_field():
    with pytest.raises(GreencodeError, match="unknown energy config field 'gpu_backnd'"):
        run(["energy", "probe", "--sample-seconds", "0", "--set", "gpu_backnd=power"])
    with pytest.raises(GreencodeError, match="cpu_backend='nvml'"):
        run(["energy", "probe", "--sample-seconds", "0", "--set", "cpu_backend=nvml"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("energy") / "opt"
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    return path


def test_calibrate_end_to_end_on_a_model_directory(tiny_model, tmp_path, capsys):
    out = tmp_path / "cost.json"
    fit = run(["energy", "calibrate", str(tiny_model), "--workload", "prefill", "--depths", "1,3", "--repeats", "2",
               "--tokens", "16", "--batch", "2", "--min-seconds", "0.1", "--out", str(out),
               "--set", "cpu_backend=estimate"])
    printed = capsys.readouterr().out
    assert "prefill of 2 x 16 random tokens" in printed and "R² =" in printed and "wrote" in printed
    record = json.loads(out.read_text())
    assert record["depths"] == [1, 3] and record["method"] == "estimated"
    # What readers check the fit against: the layers and architecture of the tiny OPT above.
    assert record["num_layers"] == 3 and record["architecture"] == {
        "family": "opt", "num_layers": 3, "hidden_size": 32, "vocab_size": 64, "num_heads": 4, "num_kv_heads": 4,
        "intermediate_size": 64, "head_dim": 8}
    assert len(record["weights_fingerprint"]) == 16
    assert record["energy_config"]["cpu_backend"] == "estimate"
    samples = record["samples"]
    assert [s["layers"] for s in samples] == [1, 3, 1, 3]
    for sample, residual in zip(samples, record["residuals"]):
        assert sample["tokens"] % 32 == 0 and sample["tokens"] >= 32  # whole steps of 2 x 16 tokens
        assert sample["joules_per_token"] == pytest.approx(sample["energy_j"] / sample["tokens"])
        # Each observation is the fitted line plus its residual.
        fitted = record["a_j"] + record["b_j_per_layer"] * sample["layers"]
        assert sample["joules_per_token"] == pytest.approx(fitted + residual, rel=1e-9, abs=1e-15)
    assert fit.predict(2) == pytest.approx(record["a_j"] + 2 * record["b_j_per_layer"])


def test_calibrate_refuses_depths_beyond_the_model(tiny_model):
    with pytest.raises(GreencodeError, match="depth 4: expected a number of layers in 1..3"):
        run(["energy", "calibrate", str(tiny_model), "--depths", "1,4", "--min-seconds", "0.05"])
    with pytest.raises(GreencodeError):
        run(["energy", "calibrate", str(tiny_model / "missing")])


def test_bench_energy_meets_the_overhead_bound(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = run(["bench", "energy", "--windows", "200", "--json", str(out)])
    assert results["rows"] and json.loads(out.read_text())["rows"] == results["rows"]
    for row in results["rows"]:
        assert row["per_window_us"] <= TARGET_OVERHEAD_S * 1e6, row
    assert "µs/window" in capsys.readouterr().out


def test_calibrate_decodes_at_each_exit_by_default(tiny_model, tmp_path, capsys):
    out = tmp_path / "cost.json"
    run(["energy", "calibrate", str(tiny_model), "--depths", "1,3", "--new-tokens", "4", "--batch", "2",
         "--min-seconds", "0.05", "--out", str(out), "--set", "cpu_backend=estimate"])
    assert "decoding 2 x 4 greedy tokens per step after a 16-token prompt" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["workload_kind"] == "decode" and "FixedExit" in record["workload"] and record["new_tokens"] == 4 and record["tokens"] == 16
    for sample in record["samples"]:
        assert sample["tokens"] % 8 == 0 and sample["tokens"] >= 8  # whole steps of 2 x 4 decoded tokens


def test_decode_depths_stop_only_at_exit_layers(tiny_model, capsys):
    """A depth that is not an exit layer + 1 (or the full depth) is refused before anything is
    measured, naming the depths this model's exits give."""
    import greencode_jax as gc
    from greencode_jax.energy.calibrate_run import check_depth

    config = gc.load_pretrained(tiny_model, exit_layers=[0], scan_layers=False).config  # exits after layers 0, 2
    for layers in (1, 3):
        check_depth(layers, config, decode=True)
    with pytest.raises(GreencodeError, match=r"depth 2: decoding stops only at an exit layer; this model's exits "
                                             r"give depths \[1, 3\]"):
        check_depth(2, config, decode=True)
