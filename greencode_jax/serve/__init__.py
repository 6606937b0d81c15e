"""`greencode serve`: an OpenAI-compatible completion server with per-request exit policies,
continuous batching with per-sequence exits, joules in every reply and Prometheus metrics.

    served = load_served(checkpoint, policy_dir=...)   # serve/loading.py
    Server(served, config.serve, meter).serve()        # serve/server.py
"""
