"""How robust are the quality claims the test suite asserts? Every claim re-measured across calibration seeds
and thread counts, so that a test asserts only a margin that held everywhere.

    python benchmarks/margins.py                   # seeds 0 1 2, OMP_NUM_THREADS 1 and 2
    python benchmarks/margins.py --seeds 0 1 2 3 4

Each claim is a ratio ``better / worse`` of two quick stories260K runs (the test suite's settings:
16 calibration windows, 20 evaluation windows); the table gives the largest ratio seen (the margin a test
may assert, with some room) and writes it between the ``margins`` markers of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from cells import REPO, write_section

QUICK = ["calib.nsamples=16", "eval.max_windows=20", "eval.fp_baseline=false", "trainer.enable_progress_bar=false"]
MIXED = "quant.mixed.candidates=[w2,w3,w4,w8]"
VQ2_TINY = ["quant.w_vq.vector=2", "quant.w_vq.centroids=16", "quant.w_vq.normalize=false"]  # tests/test_vptq.py
# claim -> (better run, worse run); a run is (method, quant, overrides)
CLAIMS = {
    "omniquant < rtn, w3a16": (("omniquant", "w3a16", ["method.epochs=10"]), ("rtn", "w3a16", [])),
    "omniquant < rtn, w4a4": (("omniquant", "w4a4", ["method.epochs=10"]), ("rtn", "w4a4", [])),
    "gptq < rtn, w3a16": (("gptq", "w3a16", []), ("rtn", "w3a16", [])),
    "awq < rtn, w3a16": (("awq", "w3a16", []), ("rtn", "w3a16", [])),
    "gptq < rtn, w4a16": (("gptq", "w4a16", []), ("rtn", "w4a16", [])),
    "awq < rtn, w4a16": (("awq", "w4a16", []), ("rtn", "w4a16", [])),
    "smoothquant < rtn, w6a6": (("smoothquant", "w6a6", []), ("rtn", "w6a6", [])),
    "smoothquant < rtn, w4a4": (("smoothquant", "w4a4", []), ("rtn", "w4a4", [])),
    "mixed rtn < uniform rtn, at w3a16's budget": (("rtn", "mixed", ["quant.mixed.avg_bits=BUDGET", MIXED]), ("rtn", "w3a16", [])),
    "mixed gptq < uniform gptq, at w3a16's budget": (("gptq", "mixed", ["quant.mixed.avg_bits=BUDGET", MIXED]), ("gptq", "w3a16", [])),
    "rptq < rtn static per tensor, w4a8": (("rptq", "w4a8", []), ("rtn", "w4a8", ["quant.a_granularity=tensor"])),
    "rptq < smoothquant static per tensor, w4a8": (("rptq", "w4a8", []),
                                                   ("smoothquant", "w4a8", ["quant.a_granularity=tensor"])),
    "rptq < rtn static per tensor, w4a4": (("rptq", "w4a4", []), ("rtn", "w4a4", ["quant.a_granularity=tensor"])),
    "vptq 2 index bits < gptq w2": (("vptq", "vq2", VQ2_TINY), ("gptq", "w2a16", [])),
    "vptq 2 index bits < awq w2": (("vptq", "vq2", VQ2_TINY), ("awq", "w2a16", [])),
}


def run(method: str, quant: str, overrides: list[str], seed: int, threads: int, out: Path) -> dict:
    tag = "-".join([method, quant, *[o.split("=")[-1].strip("[]").replace(",", "") for o in overrides],
                    f"s{seed}", f"t{threads}"])
    folder = out / tag
    if not (folder / "results.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        done = subprocess.run([sys.executable, "train.py", f"method={method}", f"quant={quant}", *overrides, *QUICK,
                               f"seed={seed}", f"output_dir={folder}"], cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{tag} failed: {done.stderr[-2000:]}")
    return json.loads((folder / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--claims", nargs="+", default=list(CLAIMS))
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "margins")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args()
    rows = []
    for claim in args.claims:
        better, worse = CLAIMS[claim]
        ratios = []
        for seed in args.seeds:
            for threads in args.threads:
                w = run(*worse, seed, threads, args.out)
                ov = [o.replace("BUDGET", str(w["bits_per_weight"])) for o in better[2]]
                b = run(better[0], better[1], ov, seed, threads, args.out)
                ratios.append(b["perplexity"]["tinystories"]["perplexity"] / w["perplexity"]["tinystories"]["perplexity"])
        rows.append((claim, min(ratios), max(ratios), len(ratios)))
        print(f"{claim}: ratio {min(ratios):.3f} .. {max(ratios):.3f} over {len(ratios)} runs", flush=True)
    lines = [f"CPU machine; `python benchmarks/margins.py` (calibration seeds {args.seeds}, OMP_NUM_THREADS "
             f"{args.threads}; stories260K, the test suite's quick settings). A test asserts a ratio above the largest "
             "seen.", "", "| claim (better / worse perplexity) | smallest ratio | largest ratio | runs |", "|---|---|---|---|"]
    lines += [f"| {c} | {lo:.3f} | {hi:.3f} | {n} |" for c, lo, hi, n in rows]
    write_section(args.results, "<!-- margins:begin -->", "<!-- margins:end -->", "\n".join(lines),
                  "## Robust margins behind the tests")


if __name__ == "__main__":
    main()
