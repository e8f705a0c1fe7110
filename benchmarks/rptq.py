"""RPTQ's settings on one model: clustered static activation ranges and a quantized KV cache, against the
per-tensor static ranges they replace and the per-token dynamic reference.

    python benchmarks/rptq.py                                # SmolLM2-135M, the quality grid's CPU protocol
    python benchmarks/rptq.py --rows rptq "rtn, static per tensor" --settings w4a8

Every cell is a resumable ``train.py`` run under the CPU protocol of ``benchmarks/quality.py`` (the same
calibration and evaluation windows); the table goes between the ``rptq`` markers of ``benchmarks/RESULTS.md``.
Rows: RPTQ with GPTQ weights (its default) and with OmniQuant's LWC (3 epochs, as the grid's OmniQuant);
RPTQ with the released code's range observer (``method.observer=ema_minmax``) and with per-token ranges inside
each cluster (``method.dynamic=true``: for the KV cache, a range per token, head and cluster);
RTN and SmoothQuant with one static range per tensor (``quant.a_granularity=tensor``: what RPTQ's clusters
refine); GPTQ with per-token dynamic activations and KV cache (the usual reference).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cells import REPO, calibration_seconds, local_model, recorded, run_cell, write_section
from quality import PROTOCOL, protocol_of

ACTIVATIONS = ["w4a8", "w4a4"]
KV = ["w4a4kv", "w4a3kv", "w3a3kv"]
SETTINGS = ["w4a16", "w3a16", *ACTIVATIONS, *KV]
# (row, overrides, settings it applies to)
ROWS: list[tuple[str, list[str], list[str]]] = [
    ("rptq", ["method=rptq"], [*ACTIVATIONS, *KV]),
    ("rptq + LWC", ["method=rptq", "method.weights=omniquant", "method.epochs=3"], ACTIVATIONS),
    ("rptq, ema ranges", ["method=rptq", "method.observer=ema_minmax"], [*ACTIVATIONS, *KV]),
    ("rptq, per-token in clusters", ["method=rptq", "method.dynamic=true"], KV),
    ("rtn, static per tensor", ["method=rtn", "quant.a_granularity=tensor"], ACTIVATIONS),
    ("smoothquant, static per tensor", ["method=smoothquant", "quant.a_granularity=tensor"], ACTIVATIONS),
    ("gptq, per-token dynamic", ["method=gptq"], SETTINGS),
]


def folder(row: str, setting: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in row) + f"--{setting}"


def text(res, corpus: str) -> str:
    if res is None:
        return "-"
    if isinstance(res, str):
        return res.split(":")[0]
    return f"{res['perplexity'][corpus]['perplexity']:.2f}"


def table(model: str, results: dict[tuple[str, str], dict | str | None]) -> str:
    p = PROTOCOL
    lines = [f"Model: {model}. Protocol: the quality grid's (calibration {p['calib.nsamples']} x {p['calib.seqlen']} "
             f"tokens of WikiText-2; the first {p['eval.max_windows']} windows of {p['eval.seqlen']} tokens of "
             "WikiText-2 / PTB). Cells: WikiText-2 / PTB perplexity. Regenerate: `python benchmarks/rptq.py`.", "",
             "| row | " + " | ".join(SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    for row, _, applies in ROWS:
        cells = [f"{text(results.get((row, s)), 'wikitext2')} / {text(results.get((row, s)), 'ptb')}"
                 if s in applies else "" for s in SETTINGS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    secs = [f"{row} {s}: {calibration_seconds(r):.0f} s" for (row, s), r in results.items() if isinstance(r, dict)
            and row.startswith("rptq")]
    if secs:
        lines += ["", "Calibration wall time: " + "; ".join(secs) + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "rptq")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args()
    out_root = args.out / args.model
    out_root.mkdir(parents=True, exist_ok=True)
    model_args = local_model(args.model, out_root)
    matches = protocol_of("cpu")
    results: dict[tuple[str, str], dict | str | None] = {}
    for row, overrides, applies in ROWS:
        for s in applies:
            out = out_root / folder(row, s)
            if row in args.rows and s in args.settings:
                print(f"cell {row} {s} ...", flush=True)
                cell = [f"model={args.model}", *model_args, *overrides, f"quant={s}",
                        *[f"{k}={v}" for k, v in PROTOCOL.items()]]
                results[(row, s)] = run_cell(cell, out, out_root / f"{out.name}.log", matches)
                print(f"  {text(results[(row, s)], 'wikitext2')}", flush=True)
            else:
                results[(row, s)] = recorded(out, matches)
    write_section(args.results, "<!-- rptq:begin -->", "<!-- rptq:end -->", table(args.model, results),
                  "## RPTQ on SmolLM2-135M")
    print(f"table written to {args.results}")


if __name__ == "__main__":
    main()
