"""`greencode serve CHECKPOINT [--policy DIR] [--host H] [--port P] [--slots N] [--max-context T]
[--max-queue Q] [--config FILE] [serve.field=value ...]`: parses, loads, prints, serves.

Wiring (in main.py's build_parser): `serve_cmd.register(sub)`. Heavy imports happen inside the
handler, so `--help` answers at once. The server runs until Ctrl-C or SIGTERM: uvicorn finishes
the open requests (at most a few seconds), the engine stops, and the command ends as every
interrupted command does (status 130 / 143, one line).
"""

from __future__ import annotations

FLAGS = ("host", "port", "slots", "max_context", "max_queue")


def serve_config(config_path, overrides, args):
    """The `serve` section (file, then overrides, then flags) and the energy meter's config."""
    from greencode_jax.config import load_sections
    from greencode_jax.energy import EnergyConfig

    config = load_sections(config_path, list(overrides), ("serve",), "serve")
    flags = {name: getattr(args, name) for name in FLAGS if getattr(args, name, None) is not None}
    section = config.serve.with_overrides([f"{k}={v}" for k, v in flags.items()], "flag") if flags else config.serve
    return section, EnergyConfig()


def cmd_serve(args):
    from greencode_jax.energy.meter import EnergyMeter
    from greencode_jax.serve.loading import load_served
    from greencode_jax.serve.server import Server

    section, energy = serve_config(args.config, args.overrides, args)
    served = load_served(args.checkpoint, policy_dir=args.policy, cost_model=section.cost_model,
                         default_policy=section.policy, default_threshold=section.threshold,
                         allow_foreign_policy=args.allow_foreign_policy)
    meter = EnergyMeter(energy)
    server = Server(served, section, meter)
    policy, _, label = served.policies.resolve(None, None)
    methods = sorted({b.method for b in meter.backends}) or ["unavailable"]
    certified = f" (certified: {served.certification})" if served.certification else ""
    print(f"greencode serve: {server.url}/v1/completions", flush=True)
    print(f"  model {served.name}: {served.model.config.family}, {served.model.config.num_layers} layers, exits "
          f"{list(served.model.config.exit_layers)}; fill-in-the-middle: {'yes' if served.fim else 'no'}")
    print(f"  default policy: {label}{certified}")
    print(f"  energy: {', '.join(methods)} ({'; '.join(b.reason for b in meter.backends)})"
          + (f"; modelled from {section.cost_model}" if served.cost else ""))
    print(f"  {section.slots} slots, context {server.engine.max_context} tokens, queue {section.max_queue}; "
          "Ctrl-C stops", flush=True)
    server.serve()


def register(subparsers):
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible completion server: per-request exit policy, joules in every reply",
        description="Serves CHECKPOINT over HTTP: POST /v1/completions (OpenAI's completions schema, plus `policy` "
                    "and `threshold` per request), GET /v1/models, /health, /metrics. Requests are decoded together "
                    "in slots (continuous batching), each exiting on its own. See docs/serve.md.")
    p.add_argument("checkpoint", help="a greencode checkpoint or Hugging Face model directory")
    p.add_argument("--policy", help="a learned policy directory (train-policy's output); its certify.json, in it "
                                    "or next to it, gives the default threshold")
    p.add_argument("--host", help="address to listen on (serve.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (serve.port, default 8000; 0: any free port)")
    p.add_argument("--slots", type=int, help="sequences decoded together (serve.slots, default 8)")
    p.add_argument("--max-context", dest="max_context", type=int,
                   help="prompt + max_tokens limit in tokens (serve.max_context, default 1024)")
    p.add_argument("--max-queue", dest="max_queue", type=int,
                   help="sequences that may wait for a slot; more get 429 (serve.max_queue, default 64)")
    p.add_argument("--config", help="a YAML file with a serve: section")
    p.add_argument("--allow-foreign-policy", action="store_true",
                   help="serve a --policy trained on another checkpoint")
    p.add_argument("overrides", nargs="*", help="serve.field=value overrides, e.g. serve.tokens_per_step=8")
    p.set_defaults(func=cmd_serve)

