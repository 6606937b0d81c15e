"""`greencode run CONFIG`: the main job, stage by stage, under `runs/<name>/`.

A stage is skipped when its output exists for the same inputs (a hash of the
resolved config is stored beside each output). Until the data, training, RL and
evaluation stages land, the job is the model-layer demonstration: random early-exit
model -> our checkpoint -> Hugging Face export -> re-import -> parity report.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import yaml

from greencode_jax.atomic import atomic_write_text
from greencode_jax.cli.config import DEMO_CONFIG, RunSection, apply_overrides, read_yaml, typed_section
from greencode_jax.errors import GreencodeError

KNOWN_SECTIONS = ("run", "model")


def load_run_config(path, overrides):
    source = str(path or DEMO_CONFIG)
    data = apply_overrides(read_yaml(path or DEMO_CONFIG), overrides or [], source)
    unknown = [s for s in data if s not in KNOWN_SECTIONS]
    if unknown:
        raise GreencodeError(f"{source}: unknown section '{unknown[0]}'; expected {list(KNOWN_SECTIONS)}")
    for section in KNOWN_SECTIONS:
        if not isinstance(data.get(section), dict):
            raise GreencodeError(f"{source}: section '{section}' is missing or not a mapping")
    run = typed_section(RunSection, data["run"], "run", source)
    from greencode_jax.models import ModelConfig

    hf_fields = dict(data["model"])
    exit_layers = hf_fields.pop("exit_layers", None)
    model_config = ModelConfig.from_hf(hf_fields, exit_layers=exit_layers, source=f"{source} (section 'model')")
    if run.prompt_tokens > model_config.max_position_embeddings:
        raise GreencodeError(f"{source}: run.prompt_tokens={run.prompt_tokens} exceeds "
                             f"model.max_position_embeddings={model_config.max_position_embeddings}")
    return data, run, model_config


def _stage(out: Path, name: str, key: str, build) -> bool:
    """Runs `build(path)` unless `out/name` exists for the same `key`. Returns True if it ran."""
    stamp = out / f".{name}.key"
    if (out / name).exists() and stamp.exists() and stamp.read_text() == key:
        print(f"[{name}] up to date, skipped")
        return False
    start = time.perf_counter()
    build(out / name)
    atomic_write_text(stamp, key)
    print(f"[{name}] done in {time.perf_counter() - start:.1f} s")
    return True


def run_pipeline(config_path, overrides):
    data, run, model_config = load_run_config(config_path, overrides)
    out = Path("runs") / run.name
    out.mkdir(parents=True, exist_ok=True)
    resolved = yaml.safe_dump(data, sort_keys=False)
    atomic_write_text(out / "config.yaml", resolved)
    key = hashlib.sha256(resolved.encode()).hexdigest()
    print(f"greencode run: {run.name} -> {out}/ ({model_config.family}, {model_config.num_layers} layers, "
          f"exits {list(model_config.exit_layers)}, {run.dtype})")

    import greencode_jax as gc
    from greencode_jax.models import init_model

    _stage(out, "checkpoint", key, lambda path: gc.save_checkpoint(
        init_model(model_config, run.dtype, seed=run.seed), path, overwrite=True))
    _stage(out, "hf_export", key, lambda path: gc.export_pretrained(
        gc.load_pretrained(out / "checkpoint"), path, overwrite=True))
    report = parity_report(out, run, model_config)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'report.json'}")


def parity_report(out: Path, run: RunSection, model_config) -> dict:
    """How closely every exit of the re-imported model matches the original (and PyTorch)."""
    import jax
    import numpy as np

    import greencode_jax as gc

    ours = gc.load_pretrained(out / "checkpoint")
    reimported = gc.load_pretrained(out / "hf_export")
    ids = np.random.default_rng(run.seed).integers(0, model_config.vocab_size, (1, run.prompt_tokens))
    report = {"prompt_tokens": run.prompt_tokens, "dtype": run.dtype, "exits": {}}
    reference = _torch_reference(out / "hf_export", ids)
    print(f"{'exit layer':>10}  {'JAX round trip':>15}  {'vs PyTorch':>12}   (max |logit difference|)")
    with jax.default_matmul_precision("highest"):
        for layer in model_config.exit_layers:
            mine = np.asarray(ours.logits(ids, layer=layer))
            row = {"jax_round_trip": float(np.abs(mine - np.asarray(reimported.logits(ids, layer=layer))).max())}
            if reference is not None:
                row["vs_pytorch"] = float(np.abs(mine - reference[layer]).max())
            report["exits"][str(layer)] = row
            torch_text = f"{row['vs_pytorch']:12.2e}" if "vs_pytorch" in row else f"{'skipped':>12}"
            print(f"{layer:>10}  {row['jax_round_trip']:15.2e}  {torch_text}")
    if reference is None:
        print("PyTorch comparison skipped: torch is not installed (scripts/setup --dev installs it)")
    report["pytorch_checked"] = reference is not None
    return report


def _torch_reference(hf_dir: Path, ids) -> dict | None:
    """transformers' logits at every layer through the model's own exit head, or None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model(torch.tensor(ids), output_hidden_states=True)
        head = _torch_exit_head(model)
        layers = {i: head(out.hidden_states[i + 1]).float().numpy() for i in range(len(out.hidden_states) - 2)}
        layers[len(out.hidden_states) - 2] = out.logits.float().numpy()  # hidden_states[-1] is already normed
    return layers


def _torch_exit_head(model):
    """HF's own modules in exit-head order: final norm, OPT's project_out, LM head."""
    base = model.model.decoder if model.config.model_type == "opt" else model.model
    norm = getattr(base, "final_layer_norm", None) if model.config.model_type == "opt" else base.norm
    project_out = getattr(base, "project_out", None)

    def head(h):
        if norm is not None:
            h = norm(h)
        if project_out is not None:
            h = project_out(h)
        return model.lm_head(h)

    return head
