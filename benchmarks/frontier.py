"""The time-quality frontier of the default recipe (``method=omniquant``): its training epochs (0 = AWQ's start and
GPTQ's rounding only) against wall time and perplexity, on the quality grid's protocol (``benchmarks/quality.py``).

    python benchmarks/frontier.py                                   # w4a16, w3a16, w4a4 x epochs 0 1 2 3
    python benchmarks/frontier.py --quants w4a16 --epochs 0 1       # a subset
    python benchmarks/frontier.py --extra method.batch_size=2       # another variant, as its own cells

Each cell is a resumable ``train.py`` run under ``outputs/frontier/``; the table goes between the ``frontier``
markers of ``benchmarks/RESULTS.md`` (calibration seconds, WikiText-2 / PTB perplexity, and the phases the
calibration spent its time in).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cells import REPO, calibration_seconds, local_model, recorded, run_cell, settings_match, write_section
from quality import PROTOCOLS, cell_overrides


def cell_name(quant: str, epochs: int, extra: list[str]) -> str:
    tag = "".join(f"-{a.split('.')[-1].replace('=', '')}" for a in extra)
    return f"omniquant-{quant}-e{epochs}{tag}"


def phases_text(res: dict) -> str:
    """The calibration's phases, the largest first, as shares of the blocks' time."""
    phases = res.get("calibration_phases", {}).get("seconds", {})
    total = sum(phases.values())
    if not total:
        return "-"
    return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])[:4])


def table(rows: list[tuple[str, int, list[str], dict | str | None]]) -> str:
    lines = ["| setting | epochs | variant | calibration (s) | WikiText-2 | PTB | where the time went |",
             "|---|---|---|---|---|---|---|"]
    for quant, epochs, extra, res in rows:
        variant = " ".join(extra) or "-"
        if not isinstance(res, dict):
            lines.append(f"| {quant} | {epochs} | {variant} | {res or 'not run yet'} | | | |")
            continue
        ppl = res["perplexity"]
        lines.append(f"| {quant} | {epochs} | {variant} | {calibration_seconds(res):.0f} | "
                     f"{ppl['wikitext2']['perplexity']:.2f} | {ppl['ptb']['perplexity']:.2f} | {phases_text(res)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quants", nargs="+", default=["w4a16", "w3a16", "w4a4"])
    ap.add_argument("--epochs", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--extra", nargs="*", default=[], help="further overrides, e.g. method.batch_size=2")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "frontier")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_args = local_model(args.model, args.out)
    numeric = {k: v for k, v in PROTOCOLS["cpu"].items() if isinstance(v, int)}
    rows = []
    for quant in args.quants:
        for epochs in args.epochs:
            name = cell_name(quant, epochs, args.extra)
            out = args.out / name
            base = [o for o in cell_overrides(args.model, "omniquant", quant, model_args, "cpu")
                    if not o.startswith("method.epochs=")]
            overrides = [*base, f"method.epochs={epochs}", *args.extra]
            settings = {**numeric, "method.epochs": epochs, **dict(e.split("=", 1) for e in args.extra)}

            def matches(res, settings=settings):
                return settings_match(res, settings)

            print(f"== {name}", flush=True)
            res = run_cell(overrides, out, out.with_suffix(".log"), matches)
            rows.append((quant, epochs, args.extra, res if isinstance(res, dict) else recorded(out, matches)))
            print(f"   {table(rows[-1:]).splitlines()[-1]}", flush=True)
    text = table(rows)
    if not args.no_write:
        write_section(REPO / "benchmarks" / "RESULTS.md", "<!-- frontier:begin -->", "<!-- frontier:end -->", text,
                      "## Calibration speed: the default recipe's time-quality frontier")
    print(text)


if __name__ == "__main__":
    main()
