"""Where each method's calibration time goes: the first blocks of SmolLM2-135M calibrated by the real pipeline, on
the quality grid's protocol (16 x 512 calibration tokens), with the phase breakdown every run records
(``results.json``: ``blocks[i].phases``, ``calibration_phases``) and, with ``--profile``, torch.profiler's top
operators.

    python benchmarks/profile_block.py                                   # every method, 2 blocks, w4a16
    python benchmarks/profile_block.py --methods awq --quants w4a16 w4a16g64 --profile
    python benchmarks/profile_block.py --methods omniquant --extra method.batch_size=2

The model is cut to its first ``--blocks`` blocks after loading (the rest never runs); the evaluation is one
window of 512 tokens (its figure means nothing, the time is the calibration). Each cell writes to its own folder
under ``--out`` and starts fresh. The table reports seconds per block (the mean over the blocks) by phase.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cells import REPO, local_model  # noqa: E402
from quality import METHOD_SETTINGS, PROTOCOLS  # noqa: E402

from omniq_lightning import pipeline  # noqa: E402
from omniq_lightning.config import compose  # noqa: E402

# method name -> its overrides (the quality grid's cells; rptq and vptq at their own settings)
METHODS = {
    "rtn": ["method=rtn"],
    "gptq": ["method=gptq"],
    "awq": ["method=awq"],
    "smoothquant": ["method=smoothquant"],
    "omniquant": ["method=omniquant"],
    "rptq": ["method=rptq"],
    "vptq": ["method=vptq"],
}
QUANT_FOR = {"smoothquant": "w6a6", "rptq": "w4a8", "vptq": "vq2"}  # the methods that need another setting


def first_blocks(n: int):
    """``pipeline.load`` that keeps only the model's first ``n`` blocks."""
    real = pipeline.load

    def load(cfg):
        loaded = real(cfg)
        blocks = loaded.adapter.blocks(loaded.model)
        del blocks[n:]
        loaded.model.config.num_hidden_layers = n
        return loaded

    return load


def overrides(model_args: list[str], method: str, quant: str, extra: list[str], out: Path) -> list[str]:
    settings = {**PROTOCOLS["cpu"], **METHOD_SETTINGS["cpu"].get(method, {}), "eval.corpora": "[wikitext2]",
                "eval.seqlen": 512, "eval.max_windows": 1}
    return ["model=smollm2-135m", *model_args, *METHODS[method], f"quant={quant}",
            *[f"{k}={v}" for k, v in settings.items()], *extra, f"output_dir={out}", "logger=none"]


def run_cell(args, method: str, quant: str) -> dict:
    out = args.out / f"{method}-{quant}{''.join('-' + e.replace('=', '') for e in args.extra)}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = compose(overrides(args.model_args, method, quant, args.extra, out))
    t0 = time.perf_counter()
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            res = pipeline.run(cfg)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        (out / "profile.txt").write_text(table)
        print(table, flush=True)
    else:
        res = pipeline.run(cfg)
    res["wall"] = time.perf_counter() - t0
    return res


def phase_table(cells: list[tuple[str, str, dict]]) -> str:
    names: list[str] = []
    for _, _, res in cells:
        for r in res["blocks"]:
            names += [k for k in r.get("phases", {}) if k not in names]  # code before phases: none
    lines = ["| method | setting | s per block | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for method, quant, res in cells:
        blocks = res["blocks"]
        per_block = statistics.mean(r["seconds"] for r in blocks)
        cols = [statistics.mean(r.get("phases", {}).get(k, 0.0) for r in blocks) for k in names]
        lines.append(f"| {method} | {quant} | {per_block:.2f} | " + " | ".join(f"{c:.2f}" if c else "-" for c in cols)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    ap.add_argument("--quants", nargs="+", default=["w4a16"], help="settings (a method that needs another: its own)")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--extra", nargs="*", default=[], help="further overrides for every cell")
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top operators per cell")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "profile")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_args = local_model("smollm2-135m", args.out)
    pipeline.load = first_blocks(args.blocks)
    cells = []
    for method in args.methods:
        for quant in [QUANT_FOR[method]] if method in QUANT_FOR else args.quants:
            print(f"== {method} {quant}", flush=True)
            cells.append((method, quant, run_cell(args, method, quant)))
    print(f"\nSmolLM2-135M, first {args.blocks} blocks, {torch.get_num_threads()} threads; seconds per block by phase:\n")
    print(phase_table(cells))


if __name__ == "__main__":
    main()
