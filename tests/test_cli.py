"""The `greencode` command: conversions end to end, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from greencode_jax.cli.main import main


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("cli") / "hf"
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return path


def leftovers(parent: Path, name: str):
    """The output and any temporary sibling a failed command might leave."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def test_convert_then_export_round_trips_to_pytorch(hf_dir, tmp_path, capsys):
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert main(["convert-from-hf", str(hf_dir), str(ours), "--exit-layers", "0"]) == 0
    assert main(["export-hf", str(ours), str(back)]) == 0
    assert "wrote" in capsys.readouterr().out
    saved = json.loads((ours / "greencode_config.json").read_text())
    assert saved["model"]["exit_layers"] == [0, 1]
    assert (back / "tokenizer_config.json").exists()  # carried from the source through our checkpoint

    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor(np.random.default_rng(0).integers(0, 64, (1, 40)))
    with torch.inference_mode():
        np.testing.assert_allclose(exported.eval()(ids).logits.numpy(), original(ids).logits.numpy(), atol=1e-5)
    assert json.loads((back / "config.json").read_text())["greencode_exit_layers"] == [0, 1]


@pytest.mark.parametrize("case", ["missing_path", "not_json", "unknown_type", "truncated", "exists"])
def test_bad_input_is_one_line_and_leaves_nothing(hf_dir, tmp_path, case):
    src = tmp_path / "src"
    if case != "missing_path":
        src.mkdir()
        (src / "config.json").write_text((hf_dir / "config.json").read_text())
        data = (hf_dir / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2] if case == "truncated" else data)
    if case == "not_json":
        (src / "config.json").write_text("{ not json")
    if case == "unknown_type":
        config = json.loads((hf_dir / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    out = tmp_path / "out"
    if case == "exists":
        out.mkdir()
    expected = {"missing_path": "no such directory", "not_json": "not valid JSON",
                "unknown_type": "unsupported model_type 'gpt2'", "truncated": "truncated",
                "exists": "already exists"}[case]
    proc = subprocess.run([sys.executable, "-m", "greencode_jax.cli.main", "convert-from-hf", str(src), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("greencode:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert leftovers(tmp_path, "out") == (["out"] if case == "exists" else [])


@pytest.mark.parametrize("bench", ["forward", "decode", "train"])
def test_bench_refuses_cuda_where_torch_has_none(bench, capsys):
    assert main(["bench", bench, "--shape", "tiny-llama", "--torch-device", "cuda"]) == 2
    assert "--torch-device cuda: this torch build sees no CUDA device" in capsys.readouterr().err


def test_bench_decode_names_an_exit_layer_the_model_lacks(capsys):
    assert main(["bench", "decode", "--shape", "tiny-llama", "--exit-layers", "0,5"]) == 2
    assert "exit_layers" in capsys.readouterr().err


def test_bench_decode_ratios_are_per_round_with_their_quartiles():
    from greencode_jax.bench.decode import paired_ratio, paired_ratios, quartiles

    samples = {"policy": [2.0, 3.0, 4.0, 10.0], "base": [1.0, 1.0, 2.0, 2.0]}
    assert paired_ratios(samples, "policy", "base") == [2.0, 3.0, 2.0, 5.0]  # round by round, not medians' ratio
    assert paired_ratio(samples, "policy", "base") == 2.5
    # sorted 2, 2, 3, 5: quartiles at positions 0.75 and 2.25 -> 2 and 3 + 0.25 * (5 - 3)
    assert quartiles([2.0, 3.0, 2.0, 5.0]) == (2.0, 3.5)
    assert quartiles([1.2, 0.9]) == (0.9, 1.2)  # too few rounds for quartiles: the extremes


def test_bench_decode_verdicts_say_when_noise_decides_them():
    from greencode_jax.bench.decode import erratic_rounds
    from greencode_jax.bench.decode_report import bounded_verdict

    assert bounded_verdict(1.02, (1.00, 1.025), 1.03) == "meets"
    assert bounded_verdict(1.10, (1.05, 1.20), 1.15) == "meets, within noise: its rounds' quartiles straddle the bound"
    assert bounded_verdict(1.20, (1.10, 1.30), 1.15).startswith("MISSES, within noise")
    assert bounded_verdict(1.20, (1.16, 1.30), 1.15) == "MISSES"
    assert bounded_verdict(0.5, (-0.2, 1.0), 1.03).startswith("no verdict")
    # per-token samples by runner, round by round: rounds 0 and 2 have a runner at <= 0
    assert erratic_rounds({"a": [1e-3, 2e-3, 0.0], "b": [-1e-4, 1e-3, 1e-3]}) == 2
    assert erratic_rounds({"a": [1e-3, 2e-3]}) == 0


def test_bench_decode_times_each_pair_of_calls_without_garbage_collection():
    import gc

    from greencode_jax.bench.decode import interleaved_per_token

    calls = []

    def runner(n):
        calls.append((n, gc.isenabled()))
        return [n]

    def reading():
        calls.append("reading")
        return len(calls)

    per_token, whole, readings = interleaved_per_token({"a": runner, "b": runner}, new_tokens=5, repeats=3,
                                                       each_round=reading)
    # per round: one reading, then per runner an untimed 1-token call and the timed 1 and 5 tokens, collector off
    assert calls == ["reading", *[(1, True), (1, False), (5, False)] * 2] * 3 and gc.isenabled()
    assert readings == [1, 8, 15]
    assert [len(v) for v in per_token.values()] == [3, 3]
    for name, calls in whole.items():  # (1-token, 5-token) seconds; per token = their difference / 4
        assert per_token[name] == pytest.approx([(full - one) / 4 for one, full in calls])


def test_bench_decode_compares_each_round_with_its_own_floor():
    """A round at 20 GB/s and one at 40 GB/s: 1 GB per token takes 50 ms and 25 ms at their floors."""
    from greencode_jax.bench.decode import floor_ratios

    assert floor_ratios([0.060, 0.030], [20e9, 40e9], 10**9) == pytest.approx([1.2, 1.2])
    assert floor_ratios([0.050, 0.050], [20e9, 40e9], 10**9) == pytest.approx([1.0, 2.0])
    with pytest.raises(ValueError):
        floor_ratios([0.05], [20e9, 40e9], 10**9)


def test_bench_decode_device_time_per_token_leaves_out_the_prompt_and_op_lines():
    from greencode_jax.bench.decode_profile import device_per_token

    def summary(stream_us, copy_us, reads):  # two streams and XLA's op line, which repeats the kernels
        return {"/device:GPU:0 Stream #14(Compute)": {"busy_us": stream_us, "copies": {"MemcpyD2H": reads}},
                "/device:GPU:0 Stream #15(MemcpyH2D)": {"busy_us": copy_us, "copies": {"MemcpyH2D": 2}},
                "/device:GPU:0 XLA Ops": {"busy_us": stream_us + copy_us, "copies": {"MemcpyD2H": reads}}}

    # 1 token: a 500 us prompt pass + 100 us, 3 us of copies, 1 read (the loop's end);
    # 15 tokens: 14 more tokens of 100 us and 4 predicate reads each
    got = device_per_token(summary(500 + 15 * 100, 3, 1 + 14 * 4), summary(500 + 100, 3, 1), 15)
    assert got == {"busy_us": pytest.approx(100), "host_reads": pytest.approx(4)}


def test_bench_decode_names_an_unknown_learned_kernel(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--shape", "tiny-llama", "--learned-kernels", "xla,cuda"])
    assert "expected a comma-separated subset of xla,pallas, got 'xla,cuda'" in capsys.readouterr().err


def test_bench_forward_prints_ratio(capsys):
    assert main(["bench", "forward", "--shape", "tiny-llama", "--tokens", "16", "--repeats", "1",
                 "--skip-memory"]) == 0
    out = capsys.readouterr().out
    assert "ratio ours / PyTorch" in out and "tokens/s" in out


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_bench_decode_counts_the_bytes_each_depth_reads(tmp_path, capsys, dtype, itemsize):
    """tiny-llama (2 layers, hidden 64, MLP 128, 4 heads / 2 K/V heads of 16, vocab 512,
    untied head): the bytes a token reads, counted by hand from those dimensions."""
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--shape", "tiny-llama", "--prompt", "8", "--new", "3", "--repeats", "1",
                 "--dtype", dtype, "--json", str(out), "--profile", str(tmp_path / "traces"),
                 "--learned-kernels", "xla,pallas"]) == 0
    assert "FixedExit(0)" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert (r["dtype"], r["torch_device"], r["exit_layers"]) == (dtype, "cpu", [0, 1])  # default: every layer
    hidden, mlp, kv, vocab = 64, 128, 2 * 16, 512
    norm = hidden
    k_and_v = 2 * hidden * kv
    layer = 2 * norm + hidden * hidden * 2 + k_and_v + 3 * hidden * mlp  # norms, q and o, k and v, SwiGLU
    head = norm + hidden * vocab
    assert r["rows"]["Full()"]["bytes"] == itemsize * (2 * layer + head)
    assert r["rows"]["FixedExit(0)"]["bytes"] == itemsize * (layer + norm + k_and_v + head)  # layer 1: its K/V only
    # k ~ L/4, L/2, 3L/4 -> 0, 1 = last; FixedExit(last) is the skip path that Learned is measured against
    learned = ["Learned (never exits)", "Learned, fused kernel"]  # XLA's MLP and the Pallas kernel
    assert set(r["rows"]) == {"Full()", "FixedExit(0)", "Skip path (never exits)", *learned}
    assert r["rows"]["Skip path (never exits)"]["bytes"] == r["rows"]["Full()"]["bytes"]
    assert all("ratio_to_skip_path" in r["rows"][name] for name in learned)
    q1, q3 = r["rows"]["Learned (never exits)"]["ratio_to_skip_path_quartiles"]  # 1 round: its one ratio
    assert q1 == q3 == r["rows"]["Learned (never exits)"]["ratio_to_skip_path"]
    traces = sorted(p.name for p in (tmp_path / "traces").iterdir())
    assert traces == ["full.perfetto.json.gz", "learned-fused-kernel.perfetto.json.gz",
                      "learned-never-exits.perfetto.json.gz", "skip-path-never-exits.perfetto.json.gz"]
    assert r["profile"] == dict.fromkeys(["Full()", "Skip path (never exits)", *learned], {})  # CPU: no device
    assert r["device_per_token"] == {}
    no_graphs = {"initialize": 0, "update": 0, "execute": 0, "disabled_when_profiling": 0}  # a CPU has none
    assert r["command_buffers"] == dict.fromkeys(["Full()", "Skip path (never exits)", *learned], no_graphs)
    assert r["rows"]["FixedExit(0)"]["ratio_to_full_quartiles"] == [r["rows"]["FixedExit(0)"]["ratio_to_full"]] * 2
    assert r["memory_floor_ms"] == pytest.approx(r["rows"]["Full()"]["bytes"] / (r["read_bandwidth_gbs"] * 1e6))
    assert len(r["read_bandwidth_rounds_gbs"]) == 1 and r["read_bandwidth_gbs"] == r["read_bandwidth_rounds_gbs"][0]
    full = r["rows"]["Full()"]  # 1 round: its one ratio, against that round's floor
    assert r["floor_ratio"] == pytest.approx(full["seconds_per_token"] * 1e3 / r["memory_floor_ms"])
