"""Calibration sampling and evaluation corpora."""

from omniq_lightning.data.corpora import CORPORA, CorpusText, data_dir_from, load_corpus
from omniq_lightning.data.windows import calibration_windows, eval_windows, tokenize

__all__ = ["CORPORA", "CorpusText", "calibration_windows", "data_dir_from", "eval_windows", "load_corpus", "tokenize"]
