"""Shared by the table benchmarks (quality, ablation, ...): one cell = one resumable ``train.py`` run.

A cell runs in its own output folder. A finished cell (``results.json`` whose protocol matches) is reused;
an interrupted one resumes where it stopped (the pipeline's block-level resume); a failed one leaves a
``<cell>.failed`` file with the reason, so the table can say why it is empty.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def local_model(model: str, out_root: Path) -> list[str]:
    """A GGUF model is dequantized once into a safetensors folder that every cell loads (the same float32
    weights and tokenizer; it saves the GGUF tokenizer conversion, about 11 s, in each run). Returns the
    overrides that point a cell at it, or none for a model that is not a GGUF file."""
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import load

    cfg = compose([f"model={model}"])
    if not cfg.model.gguf_file:
        return []
    folder = out_root / "model-safetensors"
    if not (folder / "config.json").is_file():
        print(f"dequantizing {cfg.model.gguf_file} once into {folder} ...", flush=True)
        # a private temporary folder per process: two benchmarks started together must not share one
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=out_root))
        loaded = load(cfg)
        loaded.tokenizer.save_pretrained(tmp)
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(folder)  # the folder exists only once complete
        except OSError:  # another process finished first: its folder holds the same weights
            if not (folder / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return [f"model.path={folder.resolve()}", "model.gguf_file=null"]


def failure_file(out: Path) -> Path:
    return out.with_name(out.name + ".failed")


def error_line(log: str) -> str:
    """The exception a failed run ended with (Hydra prints its hint after it), else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return (errors or lines or ["(no output)"])[-1]


def read_results(out: Path, matches: Callable[[dict], bool]) -> dict | None:
    """A cell's results.json if it exists and ``matches`` its protocol, else None."""
    f = out / "results.json"
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    return res if matches(res) else None


def recorded(out: Path, matches: Callable[[dict], bool]) -> dict | str | None:
    """A cell's finished result, else the reason its last run failed, else None (not run yet)."""
    res = read_results(out, matches)
    if res is None and failure_file(out).is_file():
        return failure_file(out).read_text().strip()
    return res


def run_cell(overrides: list[str], out: Path, log: Path, matches: Callable[[dict], bool]) -> dict | str:
    """Run (or reuse, or resume) one cell; returns its results, or the reason it failed."""
    res = read_results(out, matches)
    if res is not None:
        return res
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "train.py", *overrides, f"output_dir={out}"], cwd=REPO, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        error = error_line(log.read_text())
        # a setting the model cannot take is refused (ValueError) before calibration: not applicable
        verdict = "refused" if error.startswith("ValueError") else f"failed after {time.time() - t0:.0f} s"
        reason = f"{verdict}: {error}"
        failure_file(out).write_text(reason + "\n")
        return reason
    failure_file(out).unlink(missing_ok=True)
    return read_results(out, matches) or "finished without results.json"


def settings_match(res: dict, settings: dict) -> bool:
    """Whether a finished run used these ``section.key: value`` settings (numbers and strings compared)."""
    cfg = res["config"]
    for key, value in settings.items():
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(value, str) and value.startswith("["):
            continue  # lists (corpora) are checked by the caller
        if str(node).lower() != str(value).lower():
            return False
    return True


def write_section(path: Path, begin: str, end: str, section: str, heading: str) -> None:
    """Replace the text between the markers in ``path`` (or append it under ``heading``)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n" + block + "\n"
    path.write_text(text)


def bits_plot():
    """A figure for perplexity against bits per weight (log scale), on a headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def save_bits_plot(fig, ax, path: Path, title: str, xlabel: str = "bits per weight (scales and zero points included)") -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def calibration_seconds(res: dict) -> float:
    """A finished cell's calibration time: its blocks' seconds summed over the runs that calibrated them (a cell
    resumed after an interruption counts its earlier work), or the quantize wall time of cells that predate it."""
    seconds = res["wall_seconds"]
    return seconds.get("calibration") or seconds["quantize"]
