"""Pipelines: steps, YAML recipes, the runner and run folders."""

from curate.pipeline.registry import STEPS, build_step, load_steps, register_step
from curate.pipeline.step import Step, StepContext

__all__ = ["STEPS", "Step", "StepContext", "build_step", "load_steps", "register_step"]
