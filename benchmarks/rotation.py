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
# recipes: a method and its settings (the learned ones add FlatQuant's activation clipping and affine transforms)
RECIPES = {
    "rtn": ["method=rtn"],
    "gptq": ["method=gptq"],
    "gptq, act-order, clip 0.9": ["method=gptq", "method.act_order=true", "quant.lac=true", "quant.lac_init=2.2"],
    "omniquant": ["method=omniquant"],
    "omniquant + LAC": ["method=omniquant", "quant.lac=true"],
    "omniquant + LAC + affine": ["method=omniquant", "quant.lac=true", "method.affine=true"],
}
METHODS = tuple(RECIPES)
SLUGS = {"rtn": "rtn", "gptq": "gptq", "gptq, act-order, clip 0.9": "gptq-ao-clip", "omniquant": "omniquant",
         "omniquant + LAC": "omniquant-lac", "omniquant + LAC + affine": "omniquant-lac-affine"}
ROTATIONS = ("none", "quarot")
# the order cells run in: the cheap closed forms first, then the trained ones
ORDER = [(m, r, s) for m in METHODS for r in ROTATIONS[::-1] for s in SETTINGS]


def cell_name(method: str, rotation: str, setting: str) -> str:
    return f"{SLUGS[method]}{'' if rotation == 'none' else '-' + rotation}-{setting}"


def overrides(model: str, model_args: list[str], method: str, rotation: str, setting: str, protocol: str,
              seed: int) -> list[str]:
    name = RECIPES[method][0].removeprefix("method=")
    settings = {**PROTOCOLS[protocol], **METHOD_SETTINGS[protocol].get(name, {})}
    extra = [a for a in RECIPES[method][1:] if not (setting in WEIGHT_ONLY and a.startswith("quant.lac"))]
    return [f"model={model}", *model_args, RECIPES[method][0], *SETTINGS[setting], *extra, f"rotation={rotation}",
            f"seed={seed}", *[f"{k}={v}" for k, v in settings.items()]]


PUBLISHED = [  # WikiText-2 perplexity at 2048 context, LLaMA-2-7B (FP16 5.47), as the papers report them
    ("OmniQuant", "14.26", "14.74"), ("QuaRot", "6.05", "6.10"), ("SpinQuant", "5.9", "5.96"),
    ("OSTQuant", "5.60", "5.91"), ("FlatQuant", "-", "5.78 (GPTQ weights)"),
]


def w4a4_table(results: dict, fp: dict | None) -> str:
    """Ours on SmolLM2-135M beside the published LLaMA-2-7B figures (for reference: another model, another scale)."""
    base = fp["perplexity"]["wikitext2"]["perplexity"] if isinstance(fp, dict) else None

    def cell(key):
        r = results.get(key)
        if not isinstance(r, dict):
            return "-"
        ppl = r["perplexity"]["wikitext2"]["perplexity"]
        return f"{ppl:.2f}" + (f" ({ppl / base:.2f}x)" if base else "")

    lines = ["| LLaMA-2-7B (FP16 5.47), published | W4A4 | W4A4KV4 |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in PUBLISHED]
    lines += ["", f"| SmolLM2-135M (FP {base:.2f}), ours |" if base else "| SmolLM2-135M, ours |", ""]
    lines[-2] += " W4A4 | W4A4KV4 |"
    lines[-1] = "|---|---|---|"
    for method in METHODS:
        for rotation in ROTATIONS:
            if not any(isinstance(results.get((method, rotation, s)), dict) for s in ("w4a4", "w4a4kv4")):
                continue
            lines.append(f"| {method}{'' if rotation == 'none' else ' + ' + rotation} | "
                         f"{cell((method, rotation, 'w4a4'))} | {cell((method, rotation, 'w4a4kv4'))} |")
    return "\n".join(lines)


def table(results: dict, protocol: str) -> str:
    p = PROTOCOLS[protocol]
    ran = [(m, r) for m in METHODS for r in ROTATIONS if any(results.get((m, r, s)) for s in SETTINGS)]
    header = ["| recipe | rotation | " + " | ".join(SETTINGS) + " |", "|---|---|" + "---|" * len(SETTINGS)]

    def ppl(r) -> str:
        if isinstance(r, dict):
            return f"{r['perplexity']['wikitext2']['perplexity']:.2f} / {r['perplexity']['ptb']['perplexity']:.2f}"
        return "-" if r is None else "failed"

    def seconds(r) -> str:
        return f"{calibration_seconds(r):.0f}" if isinstance(r, dict) and calibration_seconds(r) is not None else "-"

    fp = results.get("fp")
    fp_text = (f"; full precision {fp['perplexity']['wikitext2']['perplexity']:.2f} / "
               f"{fp['perplexity']['ptb']['perplexity']:.2f}" if isinstance(fp, dict) else "")
    lines = [f"SmolLM2-135M, {protocol} protocol ({p['calib.nsamples']} x {p['calib.seqlen']} calibration tokens of "
             f"WikiText-2, OmniQuant {METHOD_SETTINGS[protocol].get('omniquant', {}).get('method.epochs', 20)} epochs "
             f"of the default recipe; WikiText-2 / PTB perplexity on the first {p['eval.max_windows']} windows of "
             f"{p['eval.seqlen']} tokens{fp_text}). Regenerate: `python benchmarks/rotation.py --cells ...`.", "",
             *header]
    lines += [f"| {m} | {r} | " + " | ".join(ppl(results.get((m, r, s))) for s in SETTINGS) + " |" for m, r in ran]
    lines += ["", "W4A4 beside the published figures (WikiText-2):", "", w4a4_table(results, fp),
              "", "Calibration wall time (s), same cells:", "", *header]
    lines += [f"| {m} | {r} | " + " | ".join(seconds(results.get((m, r, s))) for s in SETTINGS) + " |" for m, r in ran]
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
    fp_out = args.out / args.protocol / "fp"
    fp_cell = [f"model={args.model}", *model_args, "method=fp",
               *[f"{k}={v}" for k, v in PROTOCOLS[args.protocol].items() if not k.startswith("calib.")]]
    results["fp"] = run_cell(fp_cell, fp_out, fp_out.with_suffix(".log"), lambda res: True)
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
