"""Tokenizing corpora and cutting them into calibration and evaluation windows."""

from __future__ import annotations

import torch

from omniq_lightning.data.corpora import CorpusText


def tokenize(corpus: CorpusText, tokenizer) -> torch.Tensor:
    """The corpus as one 1-D tensor of token ids, following the corpus's joining convention."""
    if corpus.joiner is not None:
        ids = tokenizer(corpus.joiner.join(corpus.documents), return_tensors="pt").input_ids[0]
        return ids.to(torch.long)
    pieces = [tokenizer(doc).input_ids for doc in corpus.documents]  # each document with its own BOS
    return torch.tensor([t for p in pieces for t in p], dtype=torch.long)


def check_long_enough(ids: torch.Tensor, seqlen: int, what: str) -> None:
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 tokens, got {seqlen}")
    if ids.numel() < seqlen + (1 if what == "calibration" else 0):
        raise ValueError(
            f"the {what} text has {ids.numel()} tokens, shorter than one window of seqlen={seqlen}: "
            "use a shorter seqlen or a longer corpus"
        )


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows ``[nsamples, seqlen]``, reproducible for a given seed."""
    if nsamples < 1:
        raise ValueError(f"calib.nsamples must be positive, got {nsamples}")
    check_long_enough(ids, seqlen, "calibration")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seqlen]`` over the joined text (the GPTQ/OmniQuant protocol)."""
    check_long_enough(ids, seqlen, "evaluation")
    n = ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"eval.max_windows must be positive or null, got {max_windows}")
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)
