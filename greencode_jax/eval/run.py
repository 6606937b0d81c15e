"""`evaluate`: every policy over the evaluation samples, one record per (sample, policy), then
summary.json and the report (`greencode evaluate`).

Order of work: for each protocol, for each batch size, `Full()` of the checkpoint first (its
tokens are what every other policy's agreement is measured against), then the other
policies in SPEC order, each over the samples in batches of B in sample order (the last
batch is filled up to B with copies of its first prompt, so it needs no program of its own;
the copies' outputs are dropped). Prompts of a batch are left-padded to the longest.

Each compiled program (model, policy kind, batch shape) runs once untimed before it is
timed. The timed window is `EnergyMeter`'s, synchronised on the outputs; a record's seconds
and measured joules are the window's divided by the real samples in the batch.

Everything a user can get wrong is checked before the output directory is created, so a
refused evaluation writes nothing. Ctrl-C or SIGTERM stops between two batches (the records
written stay in samples.jsonl; the same command resumes after them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

import greencode_jax as gc
from greencode_jax.atomic import atomic_write_text
from greencode_jax.config import EvalConfig
from greencode_jax.convert.fingerprint import check_corpus_tokenizer
from greencode_jax.data import PreparedData
from greencode_jax.energy import EnergyConfig, EnergyMeter
from greencode_jax.energy.cost_model import architecture, describe, load_cost_model
from greencode_jax.energy.devices import host_cpu
from greencode_jax.errors import GreencodeError
from greencode_jax.eval.certify_run import load_certification
from greencode_jax.eval.joules import measured_entry, metered_devices, modelled_entry
from greencode_jax.eval.metrics import score
from greencode_jax.eval.protocols import completion_protocol, cut_line, line_protocol, protocol_names
from greencode_jax.eval.records import RecordFile, check_resumable, record_key
from greencode_jax.eval.report import write_report
from greencode_jax.eval.spec import NEVER_EXITS, PolicyChoice, policy_choices
from greencode_jax.eval.summary import summarize
from greencode_jax.generate import NEW_TOKENS_BUCKET, PROMPT_BUCKET, _check_policy, generate
from greencode_jax.generate.policies import Learned, foreign_policy, read_policy_info
from greencode_jax.interrupts import Interrupted, SafePoints, interrupted
from greencode_jax.locks import holds_output_lock
from greencode_jax.ownership import check_not_an_input

@dataclasses.dataclass
class Plan:
    """Everything loaded and checked, before anything is written."""

    config: EvalConfig
    data: object
    tokenizer: object
    model: object
    base_model: object | None
    learned: object | None
    choices: list
    policies: dict  # label -> policy object
    protocols: list
    cost: dict | None
    settings: dict
    header: dict


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _device_description() -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    text = f"{len(devices)} x {', '.join(kinds)} ({jax.default_backend()})"
    return text if jax.default_backend() != "cpu" else f"{text}: {host_cpu().kind}"


def plan_evaluation(checkpoint, data_dir, *, policy_dir=None, base=None, config: EvalConfig,
                    energy_config=None) -> Plan:
    """Loads and checks everything; raises a GreencodeError for any bad input, writing nothing."""
    cfg = config
    data = PreparedData(data_dir)
    tokenizer = data.tokenizer()
    if data.lang not in ("python", "java"):
        raise GreencodeError(f"{data_dir}: corpus language {data.lang!r}; the metrics know python and java")
    model = gc.load_pretrained(checkpoint, scan_layers=False)
    check_corpus_tokenizer(data, checkpoint, model, "checkpoint")
    base_model = gc.load_pretrained(base, scan_layers=False) if base is not None else None
    if base_model is not None:
        check_corpus_tokenizer(data, base, base_model, "--base")
    # Its own identity is checked below, after the shape checks (which no flag can waive).
    learned = Learned.load(policy_dir) if policy_dir is not None else None
    choices = policy_choices(cfg.policies or None, model.config.exit_layers, have_base=base_model is not None,
                             have_policy=learned is not None, confidence_grid=cfg.confidence_thresholds,
                             learned_grid=cfg.thresholds)
    certification = load_certification(cfg.certified) if cfg.certified else None
    if certification is not None:
        choices += certified_choices(certification, have_policy=learned is not None, source=cfg.certified)
    policies = {}
    for choice in choices:
        policy = choice.build(learned)
        try:
            _check_policy(policy, (base_model if choice.model == "base" else model).config)
        except GreencodeError as error:
            where = f"--policy {policy_dir}" if choice.family == "learned" else f"policy {choice.label}"
            raise GreencodeError(f"{where}: {error}") from None
        policies[choice.label] = policy
    foreign = foreign_policy(read_policy_info(policy_dir), model) if policy_dir is not None else None
    if foreign is not None and not cfg.allow_foreign_policy:
        raise GreencodeError(f"--policy {policy_dir}: {foreign}; pass --allow-foreign-policy "
                             "(eval.allow_foreign_policy: true) to evaluate it on this checkpoint anyway")
    cost = load_cost_model(cfg.cost_model, architecture(model.config), what="--cost-model") if cfg.cost_model \
        else None
    positions = min(m.config.max_position_embeddings for m in (model, base_model) if m is not None)
    max_context = min(cfg.max_context, positions)
    if max_context <= max(cfg.new_tokens, cfg.line_new_tokens):
        raise GreencodeError(f"the model has {positions} positions: too few for the new tokens asked")
    builders = {"completion": completion_protocol, "line": line_protocol}
    protocols = [builders[name](data, tokenizer, model, cfg, max_context) for name in protocol_names(data, cfg)]

    energy = energy_config or EnergyConfig()
    settings = {
        "checkpoint": str(Path(checkpoint).resolve()), "data": str(Path(data_dir).resolve()),
        "policy_dir": None if policy_dir is None else str(Path(policy_dir).resolve()),
        "base": None if base is None else str(Path(base).resolve()),
        "config": cfg.to_dict(), "policies": [c.label for c in choices],
        "protocols": {p.name: [pr.sample for pr in p.prompts] for p in protocols},
        "cost_model": None if cost is None else {k: cost[k] for k in ("a_j", "b_j_per_layer", "c_j_per_head",
                                                                      "d_j_per_decision", "method")},
        "energy_config": dataclasses.asdict(energy),
    }
    settings = json.loads(json.dumps(settings))  # as read back from settings.json (lists, not tuples)
    header = {"model": str(checkpoint), "device": _device_description(), "data": f"{data_dir} ({data.lang})"}
    if base is not None:
        header["base"] = str(base)
    if policy_dir is not None:
        header["learned policy"] = str(policy_dir) + (
            "" if foreign is None else f": **trained on another checkpoint than the one evaluated** ({foreign}; "
                                       "evaluated with --allow-foreign-policy)")
    header["modelled energy"] = (
        f"{cost['path']}: {describe(cost)}, labelled {cost['method']}" if cost is not None else
        "unavailable: no cost model given (--cost-model FILE from `greencode energy calibrate --out FILE`)")
    header["per-sample figures"] = ("seconds and measured joules of a batch's window divided by its samples "
                                    "(at batch B: window / B); modelled joules per sample")
    return Plan(cfg, data, tokenizer, model, base_model, learned, choices, policies, protocols, cost, settings,
                header)


def certified_choices(certification: dict, *, have_policy: bool, source) -> list:
    """The rows `learned@certified` and `confidence@certified` (softmax_max) at the thresholds a
    certification holds; a family with none certified never exits (its row then equals Full())."""
    choices = []
    for family, entry in certification["families"].items():
        if family == "learned" and not have_policy:
            raise GreencodeError(f"{source}: certifies a learned threshold, but no --policy is given")
        threshold = entry.get("certified")
        never = NEVER_EXITS if family == "learned" else 2.0  # P(exit) > 1 and a top probability >= 2: never
        setting = "certified: none (never exits)" if threshold is None else f"certified: {threshold:g}"
        choices.append(PolicyChoice(f"{family}@certified", family, setting, "checkpoint",
                                    measure="softmax_max" if family == "confidence" else None,
                                    threshold=never if threshold is None else float(threshold)))
    return choices


def _batch(prompts: list, size: int, multiple: int, pad_id: int):
    """Left-padded ids and mask [size, width] of `prompts`, filled up to `size` with copies of the first."""
    rows = list(prompts) + [prompts[0]] * (size - len(prompts))
    width = max(len(p.ids) for p in rows)
    if multiple:
        width = _round_up(width, multiple)
    ids = np.full((size, width), pad_id, np.int32)
    mask = np.zeros((size, width), bool)
    for i, p in enumerate(rows):
        ids[i, width - len(p.ids):] = p.ids
        mask[i, width - len(p.ids):] = True
    return ids, mask


def _agreement(tokens: list, full: list) -> float:
    """Fraction of positions where both generated the same token (a position only one reached counts as unequal)."""
    n = max(len(tokens), len(full))
    return sum(a == b for a, b in zip(tokens, full)) / n if n else 1.0


class _Runner:
    def __init__(self, plan: Plan, meter, store: RecordFile, bar):
        self.plan, self.meter, self.store, self.bar = plan, meter, store, bar
        self.devices, self.no_device = metered_devices(meter)
        self.warmed = set()
        pad = plan.tokenizer.pad_id
        self.pad_id = int(pad) if pad is not None else 0

    def run(self, stop=None) -> list[dict]:
        """Every planned record, in plan order (so the summary does not depend on file order).
        `stop`: an `interrupts.SafePoints`, checked between batches (nothing of JAX in flight)."""
        ordered = []
        for protocol in self.plan.protocols:
            for size in self.plan.config.batch_size:
                full_tokens = {}
                for choice in self.plan.choices:  # full is first
                    for start in range(0, len(protocol.prompts), size):
                        if stop is not None:
                            stop.check(self.kept)
                        batch = protocol.prompts[start:start + size]
                        records = self._batch_records(protocol, size, choice, batch, full_tokens)
                        if choice.family == "full":
                            full_tokens.update((r["sample"], r["token_ids"]) for r in records)
                        ordered += records
        return ordered

    def kept(self) -> str:
        """What an interrupted evaluation keeps, in one line."""
        plan = self.plan
        total = sum(len(p.prompts) for p in plan.protocols) * len(plan.config.batch_size) * len(plan.choices)
        done = min(total, sum(1 for k in self.store.done if k[0] in plan.settings["protocols"]))
        return f"evaluate kept {done} of {total} records in {self.store.path}; the same command resumes"

    def _batch_records(self, protocol, size, choice, batch, full_tokens) -> list[dict]:
        keys = [(protocol.name, size, choice.label, p.sample) for p in batch]
        if all(k in self.store.done for k in keys):
            return [self.store.done[k] for k in keys]
        records = self._generate(protocol, size, choice, batch, full_tokens)
        missing = [r for r in records if record_key(r) not in self.store.done]
        self.store.append(missing)
        self.bar.update(len(missing))
        return [self.store.done[k] for k in keys]

    def _generate(self, protocol, size, choice, batch, full_tokens) -> list[dict]:
        plan = self.plan
        model = plan.base_model if choice.model == "base" else plan.model
        policy = plan.policies[choice.label]
        ids, mask = _batch(batch, size, plan.config.pad_prompts, self.pad_id)

        def run():
            return generate(model, ids, mask, max_new_tokens=protocol.new_tokens, policy=policy,
                            stop_tokens=protocol.stops)

        program = (id(model), type(policy).__name__, getattr(policy, "measure", None), size,
                   _round_up(ids.shape[1], PROMPT_BUCKET), _round_up(protocol.new_tokens, NEW_TOKENS_BUCKET),
                   len(protocol.stops))
        if program not in self.warmed:  # compile (and first-run costs) outside the timed window
            jax.block_until_ready(run())
            self.warmed.add(program)
        name = f"evaluate:{protocol.name}:{choice.label}"
        self.meter.begin(name)
        out = run()
        window = self.meter.end(name, out)
        tokens, exits, lengths = (np.asarray(x) for x in jax.device_get(tuple(out)))
        share = len(batch)
        measured = measured_entry(window, self.devices, share, self.no_device)
        records = []
        for i, prompt in enumerate(batch):
            n = int(lengths[i])
            generated = [int(t) for t in tokens[i, :n]]
            exit_layers = [int(e) for e in exits[i, :n]]
            text_ids = generated[:-1] if generated and generated[-1] in protocol.stops else generated
            prediction = plan.tokenizer.decode(text_ids)
            if protocol.name == "line":
                prediction = cut_line(prediction, plan.data.lang)
            agreement = None
            if choice.family != "base":
                agreement = 1.0 if choice.family == "full" else _agreement(generated, full_tokens[prompt.sample])
            records.append({
                "sample": prompt.sample, "protocol": protocol.name, "policy": choice.label, "family": choice.family,
                "setting": choice.setting, "batch_size": size, "prediction": prediction, "target": prompt.target,
                "metrics": score(prediction, prompt.target, plan.data.lang), "exit_layers": exit_layers,
                "mean_exit_layer": float(np.mean(exit_layers)) if n else None,
                "layers_computed": float(np.mean(exit_layers) + 1) if n else None,
                "tokens": n, "seconds": window.duration_s / share,
                "energy": {"measured": dict(measured),
                           "modelled": modelled_entry(exit_layers, plan.cost, model.config, choice.family)},
                "agreement_with_full": agreement,
                "token_ids": generated,
            })
        return records


def realised_risks(certification: dict, records: list[dict]) -> dict:
    """Per certified row: what was promised (δ, ε, the calibration's n) and what the test split
    realised, the mean per-sample loss against Full() (ROUGE-L below the full model's, or any
    differing output), per protocol and batch size."""
    full = {(r["protocol"], r["batch_size"], r["sample"]): r for r in records if r["family"] == "full"}
    out = {}
    for family, entry in certification["families"].items():
        label = f"{family}@certified"
        losses = {}
        for r in records:
            if r["policy"] != label:
                continue
            ref = full[(r["protocol"], r["batch_size"], r["sample"])]
            if certification["loss"] == "textual":
                loss = float(r["token_ids"] != ref["token_ids"])
            else:
                loss = max(0.0, ref["metrics"]["rouge_l"] - r["metrics"]["rouge_l"])
            losses.setdefault(f"{r['protocol']} (batch {r['batch_size']})", []).append(loss)
        out[label] = {"threshold": entry.get("certified"), "delta": certification["delta"],
                      "epsilon": certification["epsilon"], "calibration_n": certification["n"],
                      "calibration_split": certification["split"], "loss": certification["loss"],
                      "test_loss": {k: float(np.mean(v)) for k, v in losses.items()},
                      "within_delta": {k: bool(np.mean(v) <= certification["delta"]) for k, v in losses.items()}}
    return out


def _header(plan: Plan, meter, runner: _Runner) -> dict:
    header = dict(plan.header)
    methods = "; ".join(f"{s.spec.key}: {s.backend.method} via {s.backend.name}" for s in meter.selections)
    counted = ", ".join(runner.devices) if runner.devices else "none"
    header["energy_method"] = f"measured joules from an EnergyMeter window per batch ({methods}); counted: {counted}"
    return header


@holds_output_lock("out_dir")
def evaluate(checkpoint, data_dir, out_dir, *, policy_dir=None, base=None, policies=None, samples=None,
             batch_size=None, protocols=None, cost_model=None, energy_config=None, config: EvalConfig | None = None,
             progress: bool = True, allow_foreign_policy: bool | None = None, certified=None) -> dict:
    """Evaluates `checkpoint` on the prepared corpus `data_dir` into `out_dir`; returns the summary.

    Keyword arguments other than None replace the fields of `config` (default `EvalConfig()`):
    `policies` (a SPEC, see eval/spec.py), `samples` per protocol, `batch_size` (an int or a
    list of sizes), `protocols` ("completion", "line" or both), `cost_model` (a JSON from
    `greencode energy calibrate --out`), `allow_foreign_policy` (evaluate a policy trained on
    another checkpoint; the report says so). `energy_config` chooses the meter's backends.

    Writes `out_dir/settings.json`, `samples.jsonl` (one record per (sample, policy), as
    finished), `summary.json` and the report (report.md, pareto.png, exits.png). A rerun
    with the same settings resumes, skipping finished records; other settings are refused.
    """
    given = {"policies": policies, "samples": samples, "batch_size": batch_size, "protocols": protocols,
             "cost_model": None if cost_model is None else str(cost_model),
             "allow_foreign_policy": allow_foreign_policy, "certified": None if certified is None else str(certified)}
    cfg = dataclasses.replace(config or EvalConfig(), **{k: v for k, v in given.items() if v is not None})
    out = Path(out_dir)
    inputs = {"checkpoint": checkpoint, "data": data_dir, "policy": policy_dir, "base": base,
              "cost_model": cfg.cost_model or None, "certified": cfg.certified or None}
    check_not_an_input(out, inputs, replacing=True)  # records are appended to it: never into an input
    check_resumable(out, None)
    plan = plan_evaluation(checkpoint, data_dir, policy_dir=policy_dir, base=base, config=cfg,
                           energy_config=energy_config)
    check_resumable(out, plan.settings)
    meter = EnergyMeter(energy_config)
    store = RecordFile(out, plan.settings, inputs)
    total = sum(len(p.prompts) for p in plan.protocols) * len(cfg.batch_size) * len(plan.choices)
    done = sum(1 for k in store.done if k[0] in plan.settings["protocols"])
    bar = tqdm(total=total, initial=min(done, total), unit="sample", desc="evaluate", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    try:
        runner = _Runner(plan, meter, store, bar)
        with SafePoints() as stop:  # a signal stops between batches, never inside a compile or a window
            records = runner.run(stop)
    except KeyboardInterrupt as error:  # a second Ctrl-C, at once: still say what is kept
        if isinstance(error, Interrupted):
            raise
        raise interrupted(runner.kept()) from None
    finally:
        bar.close()
        store.close()
        meter.close()
    summary = summarize(records, lang=plan.data.lang)
    if cfg.certified:
        summary["certified"] = realised_risks(load_certification(cfg.certified), records)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_report(out, summary, records, header=_header(plan, meter, runner))
    return summary
