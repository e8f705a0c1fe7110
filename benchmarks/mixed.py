"""Importance-based mixed precision against uniform formats at equal budgets, and perplexity against bits.

    python benchmarks/mixed.py                                   # both parts, SmolLM2-135M, the quality protocol
    python benchmarks/mixed.py --part budgets --methods rtn gptq
    python benchmarks/mixed.py --part curve --estimators proxy

Every cell is a resumable ``train.py`` run under the CPU protocol of ``benchmarks/quality.py`` (the same
calibration and evaluation windows); uniform cells are that grid's own cells (run here if missing).

* ``budgets``: each method with ``quant=mixed`` at exactly the bits per weight of its uniform ``w3a16`` and
  ``w2a16g64`` cells (scales and zero points counted the same way), against those cells, for each of
  ``--budget-estimators``: ``proxy`` (diagonal Fisher, round-to-nearest error) and ``kfac`` (K-FAC with the
  method's own rounding: ``kfac-gptq`` for GPTQ, ``kfac`` for the others) and ``local`` (the expansion at the
  uniform base plan with the plan search, ``local-gptq`` for GPTQ).
* ``curve``: ``--curve-method`` (GPTQ) at ``--budgets`` bits for each estimator, beside its uniform cells. The
  sensitivities depend only on the model and the calibration windows, so an estimator's scores are computed
  in its first cell and copied into the others (``sensitivity.json`` keeps the seconds they cost, reported once;
  the local estimators' scores depend on the base format too, and are recomputed where it differs).
  ``measured`` runs the model once per linear, candidate and window: hours for SmolLM2-135M on a CPU.

Tables go between the ``mixed`` markers of ``benchmarks/RESULTS.md``, the curve to ``mixed_<model>.png``.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

from cells import REPO, bits_plot, local_model, recorded, run_cell, save_bits_plot, settings_match, write_section
from quality import cell_folder, cell_overrides, protocol_of

METHODS = ["rtn", "gptq", "awq", "omniquant"]
BUDGET_OF = ["w3a16", "w2a16g64"]  # uniform settings whose exact bits are the budgets
UNIFORM = ["w2a16g64", "w3a16", "w3a16g64", "w4a16", "w4a16g64"]  # the curve's uniform points
BUDGETS = [2.25, 2.5, 3.0, 3.5, 4.0]
ESTIMATORS = ["proxy", "kfac-gptq", "local-gptq", "measured"]  # the curve's (GPTQ's)
BUDGET_ESTIMATORS = ["proxy", "kfac", "local"]
SENSITIVITY = "sensitivity.json"


def own_estimator(method: str, estimator: str) -> str:
    """``kfac`` and ``local`` with the method's own rounding: GPTQ's for GPTQ, round-to-nearest's for the others."""
    return f"{estimator}-gptq" if estimator in ("kfac", "local") and method == "gptq" else estimator


def mixed_folder(method: str, budget: float, estimator: str) -> str:
    return f"{method}-mixed{budget:g}-{estimator}"


def mixed_matches(budget: float, estimator: str) -> Callable[[dict], bool]:
    protocol = protocol_of("cpu")
    return lambda res: protocol(res) and settings_match(res, {"quant.mixed.avg_bits": budget, "quant.mixed.sensitivity": estimator})


def value(res, corpus: str = "wikitext2") -> float | None:
    return res["perplexity"][corpus]["perplexity"] if isinstance(res, dict) else None


def text(res, corpus: str = "wikitext2") -> str:
    if res is None:
        return "not run yet"
    if isinstance(res, str):
        return res.split(":")[0]
    return f"{value(res, corpus):.2f}"


class Cells:
    """The uniform cells (the quality grid's folder) and the mixed cells (their own folder) of one model."""

    def __init__(self, model: str, out: Path) -> None:
        self.model = model
        self.uniform_root = out / "quality" / model
        self.mixed_root = out / "mixed" / model
        self.uniform_root.mkdir(parents=True, exist_ok=True)
        self.mixed_root.mkdir(parents=True, exist_ok=True)
        self.model_args = local_model(model, self.uniform_root)

    def uniform(self, method: str, quant: str, run: bool) -> dict | str | None:
        out = self.uniform_root / cell_folder(method, quant)
        if not run:
            return recorded(out, protocol_of("cpu"))
        print(f"cell {method} {quant} ...", flush=True)
        return run_cell(cell_overrides(self.model, method, quant, self.model_args, "cpu"), out,
                        self.uniform_root / f"{out.name}.log", protocol_of("cpu"))

    def mixed(self, method: str, budget: float, estimator: str, run: bool) -> dict | str | None:
        out = self.mixed_root / mixed_folder(method, budget, estimator)
        matches = mixed_matches(budget, estimator)
        if not run:
            return recorded(out, matches)
        donor = next((d / SENSITIVITY for d in sorted(self.mixed_root.glob(f"*-{estimator}"))
                      if (d / SENSITIVITY).is_file() and d != out), None)
        if donor is not None and not (out / SENSITIVITY).is_file():
            out.mkdir(exist_ok=True)
            shutil.copy2(donor, out / SENSITIVITY)  # the same model and calibration windows: the same scores
        print(f"cell {method} mixed {budget:g} ({estimator}) ...", flush=True)
        overrides = [*cell_overrides(self.model, method, "mixed", self.model_args, "cpu"),
                     f"quant.mixed.avg_bits={budget}", f"quant.mixed.sensitivity={estimator}"]
        return run_cell(overrides, out, self.mixed_root / f"{out.name}.log", matches)


def budgets_table(rows: dict[str, list[tuple[str, str, dict | str | None, dict | str | None]]]) -> str:
    lines = ["| method | budget (uniform setting) | estimator | uniform WikiText-2 / PTB | mixed WikiText-2 / PTB | "
             "mixed / uniform (WikiText-2) | mixed bits | sensitivity s |", "|---|---|---|---|---|---|---|---|"]
    for method, entries in rows.items():
        for quant, estimator, uni, mix in entries:
            bits = f"{uni['bits_per_weight']:.4f}" if isinstance(uni, dict) else "-"
            ratio = f"{value(mix) / value(uni):.3f}" if isinstance(uni, dict) and isinstance(mix, dict) else "-"
            mbits = f"{mix['bits_per_weight']:.4f}" if isinstance(mix, dict) else "-"
            secs = "-"
            if isinstance(mix, dict):  # a run that resumed its bit plan did not compute the sensitivities
                secs = (f"{mix['bit_plan']['sensitivity_seconds']:.0f}" if "sensitivity_seconds" in mix["bit_plan"]
                        else "(plan resumed)")
            lines.append(f"| {method} | {bits} ({quant}) | {estimator} | {text(uni)} / {text(uni, 'ptb')} | {text(mix)} / "
                         f"{text(mix, 'ptb')} | {ratio} | {mbits} | {secs} |")
    return "\n".join(lines)


def curve_table(method: str, uniform: dict[str, dict | str | None], curve: dict[tuple[str, float], dict | str | None],
                estimators: list[str], budgets: list[float]) -> str:
    lines = [f"{method}, uniform settings:", "", "| setting | bits | WikiText-2 | PTB |", "|---|---|---|---|"]
    for q, r in uniform.items():
        lines.append(f"| {q} | {r['bits_per_weight']:.4f} | {text(r)} | {text(r, 'ptb')} |" if isinstance(r, dict)
                     else f"| {q} | - | {text(r)} | - |")
    lines += ["", f"{method}, mixed (WikiText-2 / PTB; bits per weight of the plan):", "",
              "| budget | " + " | ".join(estimators) + " |", "|---|" + "---|" * len(estimators)]
    for b in budgets:
        cells = []
        for e in estimators:
            r = curve.get((e, b))
            cells.append(f"{text(r)} / {text(r, 'ptb')} ({r['bits_per_weight']:.3f})" if isinstance(r, dict) else text(r))
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    costs = []
    for e in estimators:
        done = [r for (ee, _), r in curve.items() if ee == e and isinstance(r, dict)]
        if done:
            costs.append(f"{e} {done[0]['bit_plan'].get('sensitivity_seconds', 0):.0f} s")
    if costs:
        lines += ["", "Sensitivity cost, once per model (computed in the first cell, reused by the others): "
                  + ", ".join(costs) + "."]
    return "\n".join(lines)


def plot(method: str, uniform: dict, curve: dict, estimators: list[str], path: Path, model: str) -> None:
    fig, ax = bits_plot()
    pts = sorted((r["bits_per_weight"], value(r), q) for q, r in uniform.items() if isinstance(r, dict))
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="black", label=f"{method}, uniform", zorder=3)
        for b, v, q in pts:
            ax.annotate(q, (b, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for e in estimators:
        got = sorted((r["bits_per_weight"], value(r)) for (ee, _), r in curve.items() if ee == e and isinstance(r, dict))
        if got:
            ax.plot([g[0] for g in got], [g[1] for g in got], marker="o", label=f"{method}, mixed ({e})")
    save_bits_plot(fig, ax, path, f"{model}: mixed precision against uniform formats",
                   "average bits per weight (scales and zero points included)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--part", nargs="+", default=["budgets", "curve"], choices=["budgets", "curve"])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--curve-method", default="gptq", choices=METHODS)
    ap.add_argument("--estimators", nargs="+", default=ESTIMATORS, choices=ESTIMATORS)
    ap.add_argument("--budget-estimators", nargs="+", default=BUDGET_ESTIMATORS, choices=BUDGET_ESTIMATORS)
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--out", type=Path, default=REPO / "outputs")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = ap.parse_args()
    cells = Cells(args.model, args.out)

    budget_rows: dict[str, list] = {}
    for method in METHODS:
        run = "budgets" in args.part and method in args.methods
        entries = []
        for quant in BUDGET_OF:
            uni = cells.uniform(method, quant, run)
            for e in BUDGET_ESTIMATORS:
                est = own_estimator(method, e)
                mix = (cells.mixed(method, uni["bits_per_weight"], est, run and e in args.budget_estimators)
                       if isinstance(uni, dict) else None)
                entries.append((quant, est, uni, mix))
        budget_rows[method] = entries

    run_curve = "curve" in args.part
    uniform = {q: cells.uniform(args.curve_method, q, run_curve) for q in UNIFORM}
    curve = {(e, b): cells.mixed(args.curve_method, b, e, run_curve and e in args.estimators)
             for e in ESTIMATORS for b in args.budgets}

    section = "\n".join([
        f"Model: {args.model}; the quality grid's CPU protocol (`benchmarks/quality.py`); candidates "
        "w2, w2g64, w3, w3g64, w4, w4g64, w8 (`configs/quant/mixed.yaml`). Regenerate: `python benchmarks/mixed.py`.",
        "", "**Mixed against uniform at the uniform setting's exact bits**", "",
        budgets_table(budget_rows), "", "**Perplexity against bits**", "",
        curve_table(args.curve_method, uniform, curve, ESTIMATORS, args.budgets),
    ])
    write_section(args.results, "<!-- mixed:begin -->", "<!-- mixed:end -->", section, "## Mixed precision")
    plot(args.curve_method, uniform, curve, ESTIMATORS, REPO / "benchmarks" / f"mixed_{args.model}.png", args.model)
    print(f"tables written to {args.results}")


if __name__ == "__main__":
    main()
