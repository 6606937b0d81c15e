"""The benchmarks behind `greencode bench ...`, as library functions.

Each module holds one benchmark: a `run_bench_*` function with keyword arguments that returns
its figures (a dict, as written by `--json`), a `format_bench_*` function that turns them into
the text the command prints, and an optional `progress` callback that receives the lines a
long run prints while it measures (`report.py`). `zoo.py` holds what the model benchmarks
share: the built-in model shapes, the PyTorch reference and its device, and interleaved timing.

`bench` imports the core packages (models, convert, generate, train, rl, energy, eval, data,
parallel); none of them imports `bench`, and `bench` never imports `cli`. Torch,
transformers, stable-baselines3 and gymnasium are imported inside the functions that need
them. Nothing is imported here: each benchmark module loads only what it measures.
"""
