"""The quality table: every method x quantization setting on one model, like for like.

    python benchmarks/quality.py                      # SmolLM2-135M, the CPU protocol below, all cells
    python benchmarks/quality.py --methods rtn gptq --quants w3a16   # a subset (the table keeps other cells)
    python benchmarks/quality.py --methods awq omniquant --quants w4a16 --seeds 1 2   # run-to-run noise

Each cell is one ``python train.py`` run in its own output folder under ``--out``; a finished cell
(``results.json`` with this protocol's evaluation) is reused, an interrupted one resumes where it
stopped (the pipeline's own block-level resume), so the command can be run again until the table is
full. The table (perplexity, bits per weight counting scales and zero points, calibration wall time,
peak memory) replaces the section between the ``quality`` markers in ``benchmarks/RESULTS.md``; a PNG
plots perplexity against bits per weight. The grid is calibration seed 0; cells run with other seeds
(``--seeds``: other calibration windows, the same evaluation windows) give the run-to-run noise table.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

from cells import (
    REPO,
    bits_plot,
    calibration_seconds,
    local_model,
    recorded,
    run_cell,
    save_bits_plot,
    settings_match,
    write_section,
)

METHODS = ["fp", "rtn", "gptq", "awq", "smoothquant", "omniquant", "vptq"]
# A model whose widths a group size does not divide refuses that setting (SmolLM2-135M: 128 does not divide
# its hidden width 576); add a dividing one as a column with e.g. --quants w3a16g64 w4a16g64.
QUANTS = ["w4a16", "w4a16g128", "w3a16", "w3a16g128", "w2a16g64", "w6a6", "w4a4", "vq2", "vq3", "vq4"]
VECTOR = {"vq2", "vq3", "vq4"}  # vector formats (method=vptq only)
WEIGHT_ACTIVATION = {"w8a8", "w6a6", "w4a4"}

# The CPU protocol (2 cores): small calibration, few epochs, a fixed number of evaluation windows.
PROTOCOL = {
    "calib.nsamples": 16,
    "calib.seqlen": 512,
    "eval.corpora": "[wikitext2,ptb]",
    "eval.seqlen": 2048,
    "eval.max_windows": 8,
    "eval.fp_baseline": "false",
    "trainer.enable_progress_bar": "false",
}
# The papers' protocol (a GPU): 128 x 2048 calibration tokens, OmniQuant's recipe epochs (20), 40 evaluation windows.
PAPER_PROTOCOL = {**PROTOCOL, "calib.nsamples": 128, "calib.seqlen": 2048, "eval.max_windows": 40}
PROTOCOLS = {"cpu": PROTOCOL, "paper": PAPER_PROTOCOL}
# Per protocol, method settings beside each method's defaults (the CPU protocol shortens OmniQuant).
METHOD_SETTINGS = {"cpu": {"omniquant": {"method.epochs": 3}}, "paper": {}}


def cell_overrides(model: str, method: str, quant: str, model_args: list[str], name: str, seed: int = 0) -> list[str]:
    settings = {**PROTOCOLS[name], **METHOD_SETTINGS[name].get(method, {})}
    quant_arg = [] if method == "fp" else [f"quant={quant}"]
    return [f"model={model}", *model_args, f"method={method}", *quant_arg, f"seed={seed}",
            *[f"{k}={v}" for k, v in settings.items()]]


def cell_folder(method: str, quant: str, seed: int = 0) -> str:
    """A cell's output folder: ``<method>-<quant>``, with ``--seed<k>`` for other calibration seeds."""
    name = "fp" if method == "fp" else f"{method}-{quant}"
    return name + (f"--seed{seed}" if seed else "")


def skip_reason(method: str, quant: str) -> str | None:
    if method == "smoothquant" and quant not in WEIGHT_ACTIVATION:
        return "n/a: SmoothQuant needs activation quantization"
    if (method == "vptq") != (quant in VECTOR) and method != "fp":
        return "n/a: vector formats are VPTQ's" if method != "vptq" else "n/a: VPTQ takes vector formats"
    return None


def protocol_of(name: str, seed: int = 0) -> Callable[[dict], bool]:
    """Whether a finished cell ran under this protocol (calibration, evaluation and method settings) and
    calibration seed: a cell calibrated otherwise must not enter the table silently (the pipeline refuses to
    resume different calibration settings, naming them: delete the cell)."""

    def matches(res: dict) -> bool:
        cfg = res["config"]
        if sorted(cfg["eval"]["corpora"]) != ["ptb", "wikitext2"] or int(cfg.get("seed", 0)) != seed:
            return False
        numeric = {k: v for k, v in PROTOCOLS[name].items() if isinstance(v, int)}
        return settings_match(res, {**numeric, **METHOD_SETTINGS[name].get(cfg["method"]["name"], {})})

    return matches


def cell_text(res: dict | str | None, corpus: str, notes: list[str] | None = None) -> str:
    """A perplexity; an empty cell gets a numbered note with its reason when ``notes`` collects them."""
    if res is None:
        return "not run yet"
    if isinstance(res, str):
        if notes is None:
            return res
        if res not in notes:
            notes.append(res)
        return f"{'failed' if res.startswith('failed') else 'n/a'} [{notes.index(res) + 1}]"  # refused, skipped: n/a
    return f"{res['perplexity'][corpus]['perplexity']:.2f}"


def table(model: str, grid: dict[tuple[str, str], dict | str | None], quants: list[str], name: str) -> str:
    p = PROTOCOLS[name]
    oq = METHOD_SETTINGS[name].get("omniquant", {}).get("method.epochs")
    device = next((r.get("environment", {}).get("cuda_device") for r in grid.values() if isinstance(r, dict)), None)
    lines = [
        f"Model: {model}. Protocol ({name}, {device or 'CPU machine'}): calibration {p['calib.nsamples']} windows x "
        f"{p['calib.seqlen']} tokens of the model's calibration corpus (WikiText-2), OmniQuant "
        f"{f'{oq} epochs, ' if oq else ''}default recipe; perplexity on the first "
        f"{p['eval.max_windows']} windows of {p['eval.seqlen']} tokens of WikiText-2 raw test and PTB test. "
        f"Regenerate: `python benchmarks/quality.py{'' if name == 'cpu' else ' --protocol ' + name}`.",
        "",
    ]
    notes: list[str] = []
    for corpus, title in (("wikitext2", "WikiText-2"), ("ptb", "PTB")):
        lines += [
            f"**{title} perplexity**",
            "",
            "| method | " + " | ".join(quants) + " |",
            "|---|" + "---|" * len(quants),
        ]
        for method in METHODS:
            cells = [cell_text(grid.get((method, "fp" if method == "fp" else q)), corpus, notes) for q in quants]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"[{i}] {note}" + ("  " if i < len(notes) else "") for i, note in enumerate(notes, 1)]
    lines.append("")
    lines += [
        "**Bits per weight / calibration wall time (s) / peak CPU memory (GiB)**",
        "",
        "| method | " + " | ".join(quants) + " |",
        "|---|" + "---|" * len(quants),
    ]
    for method in METHODS[1:]:
        cells = []
        for q in quants:
            r = grid.get((method, q))
            cells.append(
                f"{r['bits_per_weight']:.2f} / {calibration_seconds(r):.0f} / "
                f"{r['memory']['cpu_peak_rss_gib']:.1f}"
                if isinstance(r, dict)
                else "-"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_table(runs: dict[tuple[str, str, int], dict | str | None], quants: list[str]) -> str:
    """Run-to-run noise: for each cell run with more than one calibration seed, the median perplexity and its
    range over the seeds (the same evaluation windows in every run)."""
    lines = []
    for corpus, title in (("wikitext2", "WikiText-2"), ("ptb", "PTB")):
        rows = []
        for method in METHODS[1:]:
            cells = []
            for q in quants:
                vals = [r["perplexity"][corpus]["perplexity"] for (m, qq, _), r in sorted(runs.items())
                        if m == method and qq == q and isinstance(r, dict)]
                cells.append(f"{statistics.median(vals):.2f} [{min(vals):.2f}, {max(vals):.2f}] ({len(vals)})"
                             if len(vals) > 1 else "-")
            if any(c != "-" for c in cells):
                rows.append(f"| {method} | " + " | ".join(cells) + " |")
        if rows:
            lines += ["", f"**Run-to-run noise, {title}: median [min, max] (calibration seeds)**", "",
                      "| method | " + " | ".join(quants) + " |", "|---|" + "---|" * len(quants), *rows]
    return "\n".join(lines)


def plot(grid: dict, path: Path, model: str) -> None:
    fig, ax = bits_plot()
    for method in METHODS[1:]:
        pts = sorted(
            (r["bits_per_weight"], r["perplexity"]["wikitext2"]["perplexity"], q)
            for (m, q), r in grid.items()
            if m == method and isinstance(r, dict) and q not in WEIGHT_ACTIVATION
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    fp = grid.get(("fp", "fp"))
    if isinstance(fp, dict):
        ax.axhline(fp["perplexity"]["wikitext2"]["perplexity"], color="gray", linestyle="--", label="fp")
    save_bits_plot(fig, ax, path, f"{model}: weight-only quantization")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--quants", nargs="+", default=QUANTS)
    ap.add_argument("--protocol", default="cpu", choices=sorted(PROTOCOLS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds to run (0: the grid)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "quality")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args()
    suffix = "" if args.protocol == "cpu" else f"-{args.protocol}"
    out_root = args.out / (args.model + suffix)
    out_root.mkdir(parents=True, exist_ok=True)
    model_args = local_model(args.model, out_root)
    matches = protocol_of(args.protocol)
    columns = [*QUANTS, *(q for q in args.quants if q not in QUANTS)]
    columns += sorted(
        {d.name.split("-", 1)[1] for d in out_root.glob("*-*") if (d / "results.json").is_file() and "--seed" not in d.name}
        - set(columns)
    )  # settings run earlier with --quants stay in the table
    seeds = sorted({0, *args.seeds, *(int(d.name.rsplit("--seed", 1)[1]) for d in out_root.glob("*--seed*") if d.is_dir())})
    runs: dict[tuple[str, str, int], dict | str | None] = {}
    for method in METHODS:  # existing cells are read even when not selected, so the tables stay whole
        for q in ["fp"] if method == "fp" else columns:
            reason = skip_reason(method, q)
            for seed in [0] if method == "fp" else seeds:
                out = out_root / cell_folder(method, q, seed)
                matches = protocol_of(args.protocol, seed)
                if reason:
                    runs[(method, q, seed)] = reason
                elif method in args.methods and (method == "fp" or q in args.quants) and seed in args.seeds:
                    print(f"cell {method} {q} seed {seed} ...", flush=True)
                    overrides = cell_overrides(args.model, method, q, model_args, args.protocol, seed)
                    r = runs[(method, q, seed)] = run_cell(overrides, out, out_root / f"{out.name}.log", matches)
                    print(f"  {cell_text(r, 'wikitext2') if not isinstance(r, str) else r}", flush=True)
                else:
                    runs[(method, q, seed)] = recorded(out, matches)
    grid = {(m, q): r for (m, q, seed), r in runs.items() if seed == 0}
    section = "\n\n".join(filter(None, [table(args.model, grid, columns, args.protocol), noise_table(runs, columns)]))
    begin, end = f"<!-- quality{suffix}:begin -->", f"<!-- quality{suffix}:end -->"
    write_section(args.results, begin, end, section,
                  f"## Quality: methods x settings ({args.protocol} protocol)")
    plot(grid, REPO / "benchmarks" / f"quality_{args.model}{suffix}.png", args.model)
    print(f"table written to {args.results}")


if __name__ == "__main__":
    main()
