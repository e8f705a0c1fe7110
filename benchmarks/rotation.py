"""Rotations for weight-activation quantization on SmolLM2-135M: QuaRot's rotations (``rotation=quarot``) under
GPTQ, round-to-nearest and the default OmniQuant recipe, against the same methods without them, on the quality
grid's protocol (``benchmarks/quality.py``: 16 x 512 calibration tokens of WikiText-2, the first 8 windows of
2048 tokens of WikiText-2 and PTB).

    python benchmarks/rotation.py                          # every cell (resumable), table into RESULTS.md
    python benchmarks/rotation.py --cells gptq-quarot-w4a4 --seeds 1 2
    python benchmarks/rotation.py --protocol paper         # 128 x 2048 calibration tokens (a GPU)

Settings: ``w4a4`` (4-bit per-channel weights, 4-bit per-token activations, 16-bit KV cache), ``w4a4kv4`` (the
quality grid's w4a4 preset: the KV cache at 4 bits too), ``w6a6`` (KV 6), ``w4a8`` (KV 8), ``w3a3kv3``, and
weight-only ``w4a16`` / ``w3a16``. Each cell is a resumable ``train.py`` run; the table goes between the
``rotation`` markers of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cells import REPO, calibration_seconds, local_model, recorded, run_cell, write_section
from quality import METHOD_SETTINGS, PROTOCOLS, protocol_of

SETTINGS = {
    "w4a4": ["quant=w4a4", "quant.kv_bits=16"],
    "w4a4kv4": ["quant=w4a4"],
    "w6a6": ["quant=w6a6"],
    "w4a8": ["quant=w4a8"],
    "w3a3kv3": ["quant=w4a4", "quant.w_bits=3", "quant.a_bits=3", "quant.kv_bits=3"],
    "w4a16": ["quant=w4a16"],
    "w3a16": ["quant=w3a16"],
}
WEIGHT_ONLY = ("w4a16", "w3a16")
METHODS = ("rtn", "gptq", "omniquant")
ROTATIONS = ("none", "quarot")
# the order cells run in: the cheap closed forms first, then the trained ones
ORDER = [(m, r, s) for m in METHODS for r in ROTATIONS[::-1] for s in SETTINGS]


def cell_name(method: str, rotation: str, setting: str) -> str:
    return f"{method}{'' if rotation == 'none' else '-' + rotation}-{setting}"


def overrides(model: str, model_args: list[str], method: str, rotation: str, setting: str, protocol: str,
              seed: int) -> list[str]:
    settings = {**PROTOCOLS[protocol], **METHOD_SETTINGS[protocol].get(method, {})}
    return [f"model={model}", *model_args, f"method={method}", *SETTINGS[setting], f"rotation={rotation}", f"seed={seed}",
            *[f"{k}={v}" for k, v in settings.items()]]


def table(results: dict, protocol: str) -> str:
    p = PROTOCOLS[protocol]
    lines = [f"SmolLM2-135M, {protocol} protocol ({p['calib.nsamples']} x {p['calib.seqlen']} calibration tokens of "
             f"WikiText-2, OmniQuant {METHOD_SETTINGS[protocol].get('omniquant', {}).get('method.epochs', 20)} epochs "
             f"of the default recipe; WikiText-2 / PTB perplexity on the first {p['eval.max_windows']} windows of "
             f"{p['eval.seqlen']} tokens). Regenerate: `python benchmarks/rotation.py`.", "",
             "| method | rotation | " + " | ".join(SETTINGS) + " |", "|---|---|" + "---|" * len(SETTINGS)]
    for method in METHODS:
        for rotation in ROTATIONS:
            cells = []
            for s in SETTINGS:
                r = results.get((method, rotation, s))
                if isinstance(r, dict):
                    cells.append(f"{r['perplexity']['wikitext2']['perplexity']:.2f} / {r['perplexity']['ptb']['perplexity']:.2f}")
                else:
                    cells.append("-" if r is None else "failed")
            lines.append(f"| {method} | {rotation} | " + " | ".join(cells) + " |")
    lines += ["", "Calibration wall time (s), same cells:", "",
              "| method | rotation | " + " | ".join(SETTINGS) + " |", "|---|---|" + "---|" * len(SETTINGS)]
    for method in METHODS:
        for rotation in ROTATIONS:
            cells = []
            for s in SETTINGS:
                r = results.get((method, rotation, s))
                seconds = calibration_seconds(r) if isinstance(r, dict) else None
                cells.append("-" if seconds is None else f"{seconds:.0f}")
            lines.append(f"| {method} | {rotation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "rotation")
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    ap.add_argument("--cells", nargs="+", help="cell names (method[-rotation]-setting); default: all")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_args = local_model(args.model, args.out)
    results = {}
    for method, rotation, setting in ORDER:
        for seed in args.seeds:
            name = cell_name(method, rotation, setting) + (f"--seed{seed}" if seed else "")
            out = args.out / args.protocol / name
            matches = protocol_of(args.protocol, seed)
            if args.cells and cell_name(method, rotation, setting) not in args.cells:
                results[(method, rotation, setting)] = recorded(out, matches) if seed == 0 else None
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"== {name}", flush=True)
            res = run_cell(overrides(args.model, model_args, method, rotation, setting, args.protocol, seed), out,
                           out.with_suffix(".log"), matches)
            if seed == 0:
                results[(method, rotation, setting)] = res
            print(f"   {res['perplexity']['wikitext2']['perplexity']:.2f}" if isinstance(res, dict) else f"   {res}",
                  flush=True)
    if not args.no_write:
        write_section(REPO / "benchmarks" / "RESULTS.md", "<!-- rotation:begin -->", "<!-- rotation:end -->",
                      table(results, args.protocol), "## Rotations for weight-activation quantization")
    print(table(results, args.protocol))


if __name__ == "__main__":
    main()
