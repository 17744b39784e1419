"""Evaluation: identity similarity (dlib descriptors) and CLIP-T over a set of reference photos."""

from pv_jax.evaluation.run import evaluate, markdown_table, summarize

__all__ = ["evaluate", "markdown_table", "summarize"]
