"""Multi-stage recipes (R1, distillation): see rlsys.pipeline.runner."""

from rlsys.pipeline.runner import run_pipeline

__all__ = ["run_pipeline"]
