"""The main job as a library (package `pipeline`): the stages of `greencode run`, their keys and
the runner (`runner.py`), the stage store where each stage's outputs live in a directory named by
the hash of what made them (`plan.py`, `store.py`), and sweeps over many configs sharing it. Calls the library packages only; `cli` parses and prints around it.

    from greencode_jax.pipeline import run_pipeline
    result = run_pipeline("configs/quickstart.yaml", ["rl.beta=16"])
    result.eval_dir / "summary.json"
"""

from greencode_jax.pipeline.stages import RunRecord, digest, read_stage_json

_RUNNER = ("PipelineResult", "QUICKSTART", "run_pipeline")


def __getattr__(name):
    """The runner's names, imported on first use: it loads JAX, which `greencode sweep --dry-run` and
    the sweep's scheduler (only planning, never running a stage) do without."""
    if name in _RUNNER:
        from greencode_jax.pipeline import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PipelineResult", "QUICKSTART", "RunRecord", "digest", "read_stage_json", "run_pipeline"]
