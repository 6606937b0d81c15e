"""The main job as a library (package `pipeline`): the stages of `greencode run`, their keys and
the runner (`runner.py`), and the bookkeeping that skips a stage whose outputs are up to date
(`stages.py`). Calls the library packages only; `cli` parses and prints around it.

    from greencode_jax.pipeline import run_pipeline
    result = run_pipeline("configs/quickstart.yaml", ["rl.beta=16"])
    result.eval_dir / "summary.json"
"""

from greencode_jax.pipeline.runner import QUICKSTART, PipelineResult, run_pipeline
from greencode_jax.pipeline.stages import Stages, digest, read_stage_json, remove_stale_outputs

__all__ = ["PipelineResult", "QUICKSTART", "Stages", "digest", "read_stage_json",
           "remove_stale_outputs", "run_pipeline"]
