"""The quality table: every method x quantization setting on one model, like for like.

    python benchmarks/quality.py                      # SmolLM2-135M, the CPU protocol below, all cells
    python benchmarks/quality.py --methods rtn gptq --quants w3a16   # a subset (the table keeps other cells)

Each cell is one ``python train.py`` run in its own output folder under ``--out``; a finished cell
(``results.json`` with this protocol's evaluation) is reused, an interrupted one resumes where it
stopped (the pipeline's own block-level resume), so the command can be run again until the table is
full. The table (perplexity, bits per weight counting scales and zero points, calibration wall time,
peak memory) replaces the section between the ``quality`` markers in ``benchmarks/RESULTS.md``; a PNG
plots perplexity against bits per weight.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["fp", "rtn", "gptq", "awq", "smoothquant", "omniquant"]
# A model whose widths a group size does not divide refuses that setting (SmolLM2-135M: 128 does not divide
# its hidden width 576); add a dividing one as a column with e.g. --quants w3a16g64 w4a16g64.
QUANTS = ["w4a16", "w4a16g128", "w3a16", "w3a16g128", "w2a16g64", "w6a6", "w4a4"]
WEIGHT_ACTIVATION = {"w8a8", "w6a6", "w4a4"}
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"

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
METHOD_SETTINGS = {"omniquant": {"method.epochs": 3}}


def local_model(model: str, out_root: Path) -> list[str]:
    """A GGUF model is dequantized once into a safetensors folder that every cell loads (the same float32
    weights and tokenizer; it saves the GGUF tokenizer conversion, about 11 s, in each of the ~30 runs). Returns the
    overrides that point a cell at it, or none for a model that is not a GGUF file."""
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import load

    cfg = compose([f"model={model}"])
    if not cfg.model.gguf_file:
        return []
    folder = out_root / "model-safetensors"
    if not (folder / "config.json").is_file():
        print(f"dequantizing {cfg.model.gguf_file} once into {folder} ...", flush=True)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        loaded = load(cfg)
        loaded.tokenizer.save_pretrained(tmp)
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(folder)  # the folder exists only once complete
    return [f"model.path={folder.resolve()}", "model.gguf_file=null"]


def cell_overrides(model: str, method: str, quant: str, out: Path, model_args: list[str]) -> list[str]:
    settings = {**PROTOCOL, **METHOD_SETTINGS.get(method, {})}
    quant_arg = [] if method == "fp" else [f"quant={quant}"]
    return [
        f"model={model}",
        *model_args,
        f"method={method}",
        *quant_arg,
        f"output_dir={out}",
        *[f"{k}={v}" for k, v in settings.items()],
    ]


def skip_reason(method: str, quant: str) -> str | None:
    if method == "smoothquant" and quant not in WEIGHT_ACTIVATION:
        return "n/a: SmoothQuant needs activation quantization"
    return None


def finished(out: Path) -> dict | None:
    f = out / "results.json"
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    cfg = res["config"]
    if sorted(cfg["eval"]["corpora"]) != ["ptb", "wikitext2"]:
        return None  # evaluated under another protocol: run again (calibrated blocks are reused)
    method_settings = METHOD_SETTINGS.get(cfg["method"]["name"], {})
    for key, value in {**PROTOCOL, **method_settings}.items():
        section, name = key.split(".")
        if isinstance(value, int) and cfg[section].get(name) != value:
            # another protocol: evaluation settings rerun the evaluation on the calibrated blocks; the
            # pipeline refuses to resume different calibration settings, naming them (delete the cell)
            return None
    return res


def failure_file(out: Path) -> Path:
    return out.with_name(out.name + ".failed")


def error_line(log: str) -> str:
    """The exception a failed run ended with (Hydra prints its hint after it), else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return (errors or lines or ["(no output)"])[-1]


def recorded(out: Path) -> dict | str | None:
    """A cell's finished result, else the reason its last run failed, else None (not run yet)."""
    res = finished(out)
    if res is None and failure_file(out).is_file():
        return failure_file(out).read_text().strip()
    return res


def run_cell(model: str, method: str, quant: str, out: Path, log_dir: Path, model_args: list[str]) -> dict | str:
    res = finished(out)
    if res is not None:
        return res
    log = log_dir / f"{out.name}.log"
    t0 = time.time()
    with open(log, "w") as f:
        done = subprocess.run(
            [sys.executable, "train.py", *cell_overrides(model, method, quant, out, model_args)],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        error = error_line(log.read_text())
        # a setting the model cannot take is refused (ValueError) before calibration: not applicable
        verdict = "refused" if error.startswith("ValueError") else f"failed after {time.time() - t0:.0f} s"
        reason = f"{verdict}: {error}"
        failure_file(out).write_text(reason + "\n")
        return reason
    failure_file(out).unlink(missing_ok=True)
    return finished(out) or "finished without results.json"


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


def table(model: str, grid: dict[tuple[str, str], dict | str | None], quants: list[str]) -> str:
    lines = [
        f"Model: {model}. Protocol (CPU): calibration {PROTOCOL['calib.nsamples']} windows x "
        f"{PROTOCOL['calib.seqlen']} tokens of the model's calibration corpus (WikiText-2), OmniQuant "
        f"{METHOD_SETTINGS['omniquant']['method.epochs']} epochs (released defaults otherwise); perplexity on the first "
        f"{PROTOCOL['eval.max_windows']} windows of {PROTOCOL['eval.seqlen']} tokens of WikiText-2 raw test and PTB test. "
        "Regenerate: `python benchmarks/quality.py`.",
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
                f"{r['bits_per_weight']:.2f} / {r['wall_seconds']['quantize']:.0f} / "
                f"{r['memory']['cpu_peak_rss_gib']:.1f}"
                if isinstance(r, dict)
                else "-"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(grid: dict, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    ax.set_xlabel("bits per weight (scales and zero points included)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{model}: weight-only quantization")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_results(section: str, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## Quality: methods x settings\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--quants", nargs="+", default=QUANTS)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "quality")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args()
    out_root = args.out / args.model
    out_root.mkdir(parents=True, exist_ok=True)
    model_args = local_model(args.model, out_root)
    columns = [*QUANTS, *(q for q in args.quants if q not in QUANTS)]
    columns += sorted(
        {d.name.split("-", 1)[1] for d in out_root.glob("*-*") if (d / "results.json").is_file()} - set(columns)
    )  # settings run earlier with --quants stay in the table
    grid: dict[tuple[str, str], dict | str | None] = {}
    for method in METHODS:  # existing cells are read even when not selected, so the table stays whole
        for q in ["fp"] if method == "fp" else columns:
            out = out_root / ("fp" if method == "fp" else f"{method}-{q}")
            reason = skip_reason(method, q)
            if reason:
                grid[(method, q)] = reason
            elif method in args.methods and (method == "fp" or q in args.quants):
                print(f"cell {method} {q} ...", flush=True)
                grid[(method, q)] = run_cell(args.model, method, q, out, out_root, model_args)
                r = grid[(method, q)]
                print(f"  {cell_text(r, 'wikitext2') if not isinstance(r, str) else r}", flush=True)
            else:
                grid[(method, q)] = recorded(out)
    write_results(table(args.model, grid, columns), args.results)
    plot(grid, REPO / "benchmarks" / f"quality_{args.model}.png", args.model)
    print(f"table written to {args.results}")


if __name__ == "__main__":
    main()
