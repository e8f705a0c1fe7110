"""Zero-shot accuracy (lm-evaluation-harness, local task files) of full precision and the quality grid's cells.

    python benchmarks/zeroshot.py                          # SmolLM2-135M: fp and the w4a16 cells, 1000 docs a task
    python benchmarks/zeroshot.py --cells fp omniquant-w3a16 --limit 200

Each cell is one of ``benchmarks/quality.py``'s (run there first); this reruns it with ``eval.tasks`` (its
finished blocks load, nothing is recalibrated; perplexity is evaluated again on the same windows). The table
goes between the ``zeroshot`` markers of ``benchmarks/RESULTS.md``: acc (acc_norm) per task, LAMBADA's acc
(perplexity), and the cell's WikiText-2 perplexity.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cells import REPO, local_model, recorded, run_cell, write_section
from quality import cell_overrides, protocol_of

TASKS = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "lambada_openai"]
CELLS = ["fp", "omniquant-w4a16", "awq-w4a16", "gptq-w4a16"]


def with_tasks(limit: int | None):
    protocol = protocol_of("cpu")

    def matches(res: dict) -> bool:
        zs = res.get("zero_shot", {})
        return all(t in zs and zs[t].get("limit") == limit for t in TASKS) and protocol(res)

    return matches


def task_text(r: dict | None, task: str) -> str:
    if r is None:
        return "-"
    if task == "lambada_openai":
        return f"{100 * r['acc']:.1f} ({r['perplexity']:.1f})"
    return f"{100 * r['acc']:.1f} ({100 * r['acc_norm']:.1f})"


def table(model: str, results: dict[str, dict | str | None], limit: int | None) -> str:
    se = f"; at {limit} documents the standard error of an accuracy near 50% is about {100 * math.sqrt(0.25 / limit):.1f} points" \
        if limit else ""
    lines = [f"Model: {model}. lm-evaluation-harness 0-shot from local task files, the first {limit or 'all'} documents "
             f"of each task{se}. Cells: acc (acc_norm), LAMBADA: acc (perplexity). Regenerate: "
             f"`python benchmarks/zeroshot.py{'' if limit == 1000 else f' --limit {limit}'}`.", "",
             "| cell | bits | WikiText-2 ppl | " + " | ".join(TASKS) + " |", "|---|---|---|" + "---|" * len(TASKS)]
    for cell, r in results.items():
        if not isinstance(r, dict):
            lines.append(f"| {cell} | - | {r or 'not run yet'} |" + " |" * len(TASKS))
            continue
        bits = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") else "16"
        lines.append(f"| {cell} | {bits} | {r['perplexity']['wikitext2']['perplexity']:.2f} | "
                     + " | ".join(task_text(r["zero_shot"].get(t), t) for t in TASKS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cells", nargs="+", default=CELLS, help="quality-grid cells: fp or <method>-<quant>")
    ap.add_argument("--limit", type=int, default=1000, help="documents per task (0: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "quality")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args()
    limit = args.limit or None
    out_root = args.out / args.model
    model_args = local_model(args.model, out_root)
    matches = with_tasks(limit)
    results: dict[str, dict | str | None] = {}
    for cell in args.cells:
        out = out_root / cell
        if recorded(out, protocol_of("cpu")) is None:
            results[cell] = f"run `python benchmarks/quality.py` for {cell} first"
            continue
        method, _, quant = cell.partition("-")
        overrides = [*cell_overrides(args.model, method, quant, model_args, "cpu"), f"eval.tasks=[{','.join(TASKS)}]",
                     f"eval.limit={limit if limit else 'null'}", f"eval.task_batch_size={args.batch_size}"]
        print(f"cell {cell} ...", flush=True)
        results[cell] = run_cell(overrides, out, out_root / f"{cell}.zeroshot.log", matches)
    write_section(args.results, "<!-- zeroshot:begin -->", "<!-- zeroshot:end -->", table(args.model, results, limit),
                  "## Zero-shot accuracy")
    print(f"table written to {args.results}")


if __name__ == "__main__":
    main()
