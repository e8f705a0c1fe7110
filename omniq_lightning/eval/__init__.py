"""Evaluation: perplexity (zero-shot tasks come later)."""

from omniq_lightning.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
