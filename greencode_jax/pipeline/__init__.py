"""The main job as a library (package `pipeline`): the stages of `greencode run`, their keys and
the runner (`runner.py`), the stage store where each stage's outputs live in a directory named by
the hash of what made them (`plan.py`, `store.py`), and sweeps over many configs sharing it. Calls the library packages only; `cli` parses and prints around it.

    from greencode_jax.pipeline import run_pipeline
    result = run_pipeline("configs/quickstart.yaml", ["rl.beta=16"])
    result.eval_dir / "summary.json"
"""

from greencode_jax.pipeline.runner import QUICKSTART, PipelineResult, run_pipeline
from greencode_jax.pipeline.stages import RunRecord, digest, read_stage_json

__all__ = ["PipelineResult", "QUICKSTART", "RunRecord", "digest", "read_stage_json", "run_pipeline"]
