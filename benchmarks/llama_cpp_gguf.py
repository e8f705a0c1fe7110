"""GGUF files measured by llama.cpp itself: the perplexity llama.cpp computes for a file made here, over the same
token windows our evaluation used, beside our fake-quant perplexity and llama.cpp's own quantization of the same
full-precision model (``llama_model_quantize``, no importance matrix).

    python benchmarks/llama_cpp_gguf.py RUN_DIR [RUN_DIR ...] [--source SOURCE.gguf --types Q4_0]

``RUN_DIR`` is a finished ``train.py ... quant=gguf export.format=gguf`` output folder; its ``config.yaml`` names
the model, the corpora, the window length and count. Needs ``llama-cpp-python`` (a build from source: on CPUs
where llama.cpp's native build crashes, ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON -DGGML_OPENMP=OFF" pip install llama-cpp-python``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def windows_of(run: Path, res: dict, corpus: str) -> torch.Tensor:
    """The evaluation windows a run used: its tokenizer, the corpus, the window length and count it reported."""
    from transformers import AutoTokenizer

    from omniq_lightning.config import compose
    from omniq_lightning.data.corpora import load_corpus
    from omniq_lightning.data.windows import eval_windows, tokenize

    entry = res["perplexity"][corpus]
    ids = tokenize(load_corpus(corpus, "eval", compose([]).paths.data_dir), AutoTokenizer.from_pretrained(run / "model"))
    return eval_windows(ids, int(entry["seqlen"]), int(entry["windows"]))


def llamacpp_perplexity(path: Path, windows: torch.Tensor, threads: int = 2) -> tuple[float, float]:
    """(perplexity, seconds) of llama.cpp on ``windows``: every window predicts its ``seqlen - 1`` next tokens, as
    our evaluation does."""
    from llama_cpp import Llama

    seqlen = windows.shape[1]
    llm = Llama(model_path=str(path), n_ctx=seqlen, n_batch=512, logits_all=True, verbose=False, n_threads=threads)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[: seqlen - 1], dtype=np.float32))
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
        count += seqlen - 1
    llm.close()
    return math.exp(nll / count), time.perf_counter() - t0


def llamacpp_quantize(source: Path, qtype: str, dest: Path) -> Path:
    """llama.cpp's own quantization of ``source`` to ``qtype`` (round to nearest with its error search)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--source", type=Path, help="a GGUF of the full-precision model, for llama.cpp's own quantization")
    ap.add_argument("--types", nargs="*", default=[])
    args = ap.parse_args()
    rows = []
    run = res = None
    for run in args.runs:
        res = json.loads((run / "results.json").read_text())
        f = run / "model-gguf" / "model.gguf"
        for corpus in res["perplexity"]:
            ppl, secs = llamacpp_perplexity(f, windows_of(run, res, corpus))
            rows.append((f"{res['method']} {res['quant']['name']}", corpus, res["perplexity"][corpus]["perplexity"],
                         ppl, f.stat().st_size / 2**20, secs))
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types:
            f = llamacpp_quantize(args.source, qtype, Path(tmp) / f"{qtype}.gguf")
            for corpus in res["perplexity"]:
                ppl, secs = llamacpp_perplexity(f, windows_of(run, res, corpus))
                rows.append((f"llama.cpp's own {qtype}", corpus, float("nan"), ppl, f.stat().st_size / 2**20, secs))
    print("| file | corpus | our fake-quant perplexity | llama.cpp perplexity | file MiB | llama.cpp eval s |")
    print("|---|---|---|---|---|---|")
    for name, corpus, ours, theirs, mib, secs in rows:
        ours_s = "-" if math.isnan(ours) else f"{ours:.4f}"
        print(f"| {name} | {corpus} | {ours_s} | {theirs:.4f} | {mib:.1f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
