"""Evaluation: perplexity, and where the model sits while it is evaluated (zero-shot tasks come later)."""

from omniq_lightning.eval.perplexity import PerplexityResult, perplexity
from omniq_lightning.eval.placement import placed_for_evaluation

__all__ = ["PerplexityResult", "perplexity", "placed_for_evaluation"]
