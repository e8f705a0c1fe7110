"""Shared fixtures: the real tiny model and data from ../shared (paths via the same config defaults)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODELS_DIR = Path(os.environ.get("OMNIQ_MODELS_DIR", SHARED / "models"))
DATA_DIR = Path(os.environ.get("OMNIQ_DATA_DIR", SHARED / "data"))
STORIES = MODELS_DIR / "stories260K"


@torch.no_grad()
def replay(model, adapter, hidden, contexts):
    """All blocks run standalone on captured block-0 inputs ``[n, seqlen, hidden]``: the last block's outputs."""
    out = []
    for x in hidden:
        h = x.unsqueeze(0)
        for block, ctx in zip(adapter.blocks(model), contexts, strict=True):
            h = adapter.call_block(block, h, ctx)
        out.append(h[0])
    return torch.stack(out)


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test asset {path} is missing: set OMNIQ_MODELS_DIR / OMNIQ_DATA_DIR or put ../shared beside the repo")
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return require(STORIES)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require(DATA_DIR)


@pytest.fixture(scope="session")
def stories(stories_dir):
    from omniq_lightning.models import load_model

    return load_model(str(stories_dir), dtype="float32")


QUICK = ["calib.nsamples=16", "eval.max_windows=20", "eval.fp_baseline=false", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """``quick_run(method, quant, *overrides)``: a quick stories260K run (16 calibration windows, 20
    evaluation windows of 256 tokens), memoized for the session; returns (perplexity, results, output_dir)."""
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    done: dict[tuple, tuple] = {}

    def get(method: str, quant: str, *overrides: str):
        key = (method, quant, *overrides)
        if key not in done:
            out = tmp_path_factory.mktemp(f"{method}-{quant}")
            res = run(compose([f"method={method}", f"quant={quant}", *overrides, *QUICK, f"output_dir={out}",
                               "logger=csv"]))
            done[key] = (res["perplexity"]["tinystories"]["perplexity"], res, out)
        return done[key]

    return get


def llama_cpp_perplexity(path, windows: torch.Tensor, threads: int = 2) -> float | None:
    """llama.cpp's perplexity (llama-cpp-python) of the GGUF file at ``path`` over ``windows`` (each window's
    tokens fed as they are, every next token scored); None where llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], logits_all=True, verbose=False,
                          n_threads=threads)
    nll, n = 0.0, 0
    try:
        for w in windows.tolist():
            llm.reset()
            llm.eval(w)
            logits = torch.from_numpy(np.array(llm.scores[: len(w) - 1], dtype=np.float32))
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
            n += len(w) - 1
    finally:
        llm.close()
    return float(np.exp(nll / n))
