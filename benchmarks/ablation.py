"""The practices of gradient-based PTQ, measured on our rails: one axis at a time from a named base recipe.

    python benchmarks/ablation.py                                  # every row, both models
    python benchmarks/ablation.py --models stories260k --rows base loss=mse_channel
    python benchmarks/ablation.py --rows default --seeds 0 1 2     # run-to-run noise (calibration windows)
    python benchmarks/ablation.py --base default --rows epochs=0 loss=mse_channel   # axes from the default

Each row changes one setting of OmniQuant's base recipe (``--base``, default ``released``: the released
OmniQuant code), except the rows marked "combined" (the candidates for the default) and the baselines
(AWQ, GPTQ, SmoothQuant, RTN) run on the same protocol for reference. Every cell is a resumable
``train.py`` run (the same calibration and evaluation windows in every cell of a model); its perplexity
and calibration wall time go into the table between the ``ablation`` markers of ``benchmarks/RESULTS.md``
(``ablation-<base>`` for another base, whose cells live in their own folder).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

from cells import REPO, calibration_seconds, local_model, recorded, run_cell, settings_match, write_section

WEIGHT_ACTIVATION = {"w8a8", "w6a6", "w4a4"}
# Per model: its settings, its protocol, the corpus the table reports, and OmniQuant's epochs.
MODELS = {
    "smollm2-135m": {
        "settings": ["w4a16", "w3a16", "w2a16g64", "w4a4", "w6a6"],
        "protocol": {"calib.nsamples": 16, "calib.seqlen": 512, "eval.corpora": "[wikitext2]", "eval.seqlen": 2048,
                     "eval.max_windows": 8},
        "corpus": "wikitext2",
        "epochs": 3,
    },
    "stories260k": {
        "settings": ["w4a16", "w3a16", "w4a4", "w6a6"],
        "protocol": {"calib.nsamples": 16, "eval.max_windows": 20},
        "corpus": "tinystories",
        "epochs": 10,
    },
}
COMMON = {"eval.fp_baseline": "false", "trainer.enable_progress_bar": "false"}

# (row name, what it tests, OmniQuant overrides, settings it applies to: None = all). Baselines: method=...
ROWS: list[tuple[str, str, list[str], set[str] | None]] = [
    ("base", "the base recipe", [], None),
    # loss
    ("loss=mse_channel", "loss", ["method.loss=mse_channel"], None),
    ("loss=mse_token", "loss", ["method.loss=mse_token"], None),
    ("loss=cosine", "loss", ["method.loss=cosine"], None),
    ("aug_loss", "loss", ["method.aug_loss=true"], None),
    # degrees of freedom
    ("learn_rounding", "degrees of freedom", ["method.learn_rounding=true"], None),
    ("rounding only", "degrees of freedom", ["method.learn_rounding=true", "quant.lwc=false"], None),
    ("let=true", "degrees of freedom", ["method.let=true"], {"w4a16", "w3a16", "w2a16g64"}),
    ("let=false", "degrees of freedom", ["method.let=false"], WEIGHT_ACTIVATION),
    # grid
    ("grid=power", "grid", ["quant.w_grid=power"], None),
    # optimizer and schedule
    ("optimizer=signsgd", "optimizer", ["method.optimizer=signsgd"], None),
    ("optimizer=sgd", "optimizer", ["method.optimizer=sgd"], None),
    ("schedule=linear", "schedule", ["method.schedule=linear"], None),
    ("lr_budget=2560", "schedule", ["method.lr_budget=2560"], None),
    ("keep_best", "schedule", ["method.keep_best=true"], None),
    # initialisation
    ("init=minmax", "initialisation", ["method.init=minmax"], None),
    ("init=mse", "initialisation", ["method.init=mse"], None),
    ("init=awq", "initialisation", ["method.init=awq"], None),
    # OmniQuant's range gradient and LET truncation
    ("ranges=detached", "ranges", ["method.ranges=detached"], None),
    ("let_min_scale=0", "ranges", ["method.let_min_scale=0"], WEIGHT_ACTIVATION),
    ("ranges=detached, let_min_scale=0", "ranges", ["method.ranges=detached", "method.let_min_scale=0"],
     WEIGHT_ACTIVATION),
    # closed form after training
    ("rounding=gptq", "after training", ["method.rounding=gptq"], None),
    # what training adds to a recipe's closed-form steps (from base=default: AWQ's search, then GPTQ, untrained)
    ("epochs=0", "training", ["method.epochs=0"], None),
    # the candidates for the default, then the recipe named default
    ("awq + gptq", "combined", ["method.init=awq", "method.keep_best=true", "method.rounding=gptq"], None),
    ("awq + gptq + mse_channel", "combined",
     ["method.init=awq", "method.keep_best=true", "method.rounding=gptq", "method.loss=mse_channel"], None),
    ("awq + learned rounding", "combined",
     ["method.init=awq", "method.learn_rounding=true", "method.keep_best=true"], None),
    ("default", "combined", ["method.recipe=default"], None),
]
BASELINES = ["awq", "gptq", "smoothquant", "rtn"]


def applies(row: tuple, setting: str) -> bool:
    only = row[3]
    return only is None or setting in only


def cell_overrides(model: str, setting: str, row: tuple | None, baseline: str | None, base: str, seed: int,
                   model_args: list[str]) -> list[str]:
    spec = MODELS[model]
    common = [f"model={model}", *model_args, f"quant={setting}", f"seed={seed}",
              *[f"{k}={v}" for k, v in {**spec["protocol"], **COMMON}.items()]]
    if baseline is not None:
        return [*common, f"method={baseline}"]
    recipe = [] if any(o.startswith("method.recipe=") for o in row[2]) else [f"method.recipe={base}"]
    return [*common, "method=omniquant", *recipe, f"method.epochs={spec['epochs']}", *row[2]]


def matches_protocol(model: str, overrides: list[str]) -> Callable[[dict], bool]:
    """Whether a finished cell ran under this model's protocol and with the cell's own OmniQuant settings (the
    last ``method.*`` override of each key wins, as in Hydra)."""
    numeric = {k: v for k, v in MODELS[model]["protocol"].items() if isinstance(v, int)}
    method = dict(o.split("=", 1) for o in overrides if o.startswith("method.") and "=" in o)

    def matches(res: dict) -> bool:
        return settings_match(res, {**numeric, **(method if res["config"]["method"]["name"] == "omniquant" else {})})

    return matches


def cell_name(row_name: str, setting: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in row_name)  # no '=': Hydra parses output_dir
    return f"{safe}--{setting}" + (f"--seed{seed}" if seed else "")


def value(res, corpus: str) -> float | None:
    return res["perplexity"][corpus]["perplexity"] if isinstance(res, dict) else None


def fmt_cell(vals: list[float | None], base: float | None, seconds: list[float]) -> str:
    got = [v for v in vals if v is not None]
    if not got:
        return "-"
    v = statistics.median(got)
    text = f"{v:.2f}" if v < 1e4 else f"{v:.3g}"
    if len(got) > 1:
        text += f" (±{(max(got) - min(got)) / 2:.2f}, {len(got)} seeds)"
    if base is not None and len(got) == 1:
        text += f" ({100 * (v / base - 1):+.0f}%)"
    if seconds:
        text += f" · {statistics.median(seconds):.0f} s"
    return text


def table(results: dict, models: list[str], base: str, seeds: list[int]) -> str:
    lines = [
        f"Base recipe: `{base}`; each row changes one setting (rows marked combined change several). Cells: "
        "perplexity (change against the base row) · calibration wall time, CPU machine (2 cores). "
        "Regenerate: `python benchmarks/ablation.py`.",
        "",
    ]
    for model in models:
        spec = MODELS[model]
        p = spec["protocol"]
        lines += [f"**{model}** ({spec['corpus']} perplexity; calibration {p['calib.nsamples']} windows"
                  f"{' x ' + str(p['calib.seqlen']) + ' tokens' if 'calib.seqlen' in p else ''}, OmniQuant "
                  f"{spec['epochs']} epochs, {p['eval.max_windows']} evaluation windows)", ""]
        cols = spec["settings"]
        lines += ["| row | axis | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        base_vals = {s: value(results.get((model, "base", s, seeds[0])), spec["corpus"]) for s in cols}
        names = [(r[0], r[1]) for r in ROWS] + [(f"method={b}", "baseline") for b in BASELINES]
        for name, axis in names:
            cells = []
            for s in cols:
                runs = [results.get((model, name, s, seed)) for seed in seeds]
                vals = [value(r, spec["corpus"]) for r in runs]
                secs = [calibration_seconds(r) for r in runs if isinstance(r, dict)]
                reason = next((r for r in runs if isinstance(r, str)), None)
                cells.append(fmt_cell(vals, None if name == "base" else base_vals[s], secs)
                             if any(v is not None for v in vals) else ("n/a" if reason else "-"))
            if any(c != "-" for c in cells):
                lines.append(f"| {name} | {axis} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rows", nargs="+", default=None, help="row names (default: all), or method=NAME baselines")
    ap.add_argument("--settings", nargs="+", default=None)
    ap.add_argument("--base", default="released")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "ablation")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="run cells without rewriting RESULTS.md")
    args = ap.parse_args()
    wanted = set(args.rows) if args.rows else None
    results: dict = {}
    for model in args.models:
        model_root = args.out / model
        model_root.mkdir(parents=True, exist_ok=True)
        model_args = local_model(model, model_root)
        # cells of another base recipe live apart: a row's name means a different run there
        out_root = model_root if args.base == "released" else model_root / f"base-{args.base}"
        out_root.mkdir(exist_ok=True)
        entries = [(r[0], r, None) for r in ROWS] + [(f"method={b}", None, b) for b in BASELINES]
        for setting in MODELS[model]["settings"]:
            for name, row, baseline in entries:
                if row is not None and not applies(row, setting):
                    continue
                if baseline == "smoothquant" and setting not in WEIGHT_ACTIVATION:
                    continue
                for seed in args.seeds:
                    out = out_root / cell_name(name, setting, seed)
                    selected = (wanted is None or name in wanted) and (args.settings is None or setting in args.settings)
                    overrides = cell_overrides(model, setting, row, baseline, args.base, seed, model_args)
                    matches = matches_protocol(model, overrides)
                    if selected:
                        print(f"cell {model} {setting} {name} seed {seed} ...", flush=True)
                        res = run_cell(overrides, out, out_root / f"{out.name}.log", matches)
                        print(f"  {value(res, MODELS[model]['corpus']) if isinstance(res, dict) else res}", flush=True)
                    else:
                        res = recorded(out, matches)
                    if res is not None:
                        results[(model, name, setting, seed)] = res
    if not args.no_write:
        tag = "ablation" if args.base == "released" else f"ablation-{args.base}"
        write_section(args.results, f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->",
                      table(results, args.models, args.base, args.seeds), f"## Best practices: the ablation ({tag})")
        print(f"table written to {args.results}")


if __name__ == "__main__":
    main()
