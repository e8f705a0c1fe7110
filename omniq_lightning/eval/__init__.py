"""Evaluation: perplexity, zero-shot tasks (lm-evaluation-harness), and where the model sits while evaluated."""

from omniq_lightning.eval.perplexity import PerplexityResult, perplexity
from omniq_lightning.eval.placement import placed_for_evaluation
from omniq_lightning.eval.tasks import TASKS, zero_shot

__all__ = ["TASKS", "PerplexityResult", "perplexity", "placed_for_evaluation", "zero_shot"]
