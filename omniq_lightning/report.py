"""What a run reports: bits per weight from the formats the finished blocks hold, export sizes, the machine and
library versions, peak memory, and the summary printed at the end."""

from __future__ import annotations

import platform
import resource
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from omniq_lightning.quant.cuda import status as cuda_extension_status
from omniq_lightning.quant.spec import NO_QUANT_BITS


def bits_per_weight(shapes: Mapping[str, tuple[int, int]], formats: Mapping[str, Any]) -> float:
    """Average storage bits per weight of the blocks' quantizable linears (``shapes``: name -> (out, in)) in the
    formats they are stored in (``formats``, by name; a linear without one keeps 16-bit weights), counted by each
    format's ``storage_bits``: codes, scales and zero points, codebooks."""
    if not shapes:
        raise ValueError("no quantizable linears found: bits per weight are undefined")
    total = sum(formats[n].storage_bits(*s) if n in formats else NO_QUANT_BITS * s[0] * s[1] for n, s in shapes.items())
    return total / sum(o * i for o, i in shapes.values())


def calibration_seconds(records: list[dict] | None) -> float | None:
    """The summed calibration seconds of the blocks, each as recorded by the run that calibrated it; None when
    nothing was calibrated or a resumed block predates the record."""
    if not records or any(r.get("calibration_seconds") is None for r in records):
        return None
    return round(sum(r["calibration_seconds"] for r in records), 3)


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: Linux's VmHWM, which starts afresh at exec (``ru_maxrss``
    keeps the parent's peak across fork and exec, so a run started by a large process would report that)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def peak_memory(device: torch.device) -> dict[str, float]:
    mem = {"cpu_peak_rss_gib": round(peak_rss_kib() / 2**20, 3)}
    if device.type == "cuda":
        mem["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return mem


def environment() -> dict[str, Any]:
    versions = {}
    for pkg in ("omniq-lightning", "torch", "transformers", "lightning", "torchmetrics", "hydra-core"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "machine": platform.machine(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "fused_kernels": cuda_extension_status(),
    }


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def export_sizes(path: Path, model) -> dict[str, float]:
    """The checkpoint's tensor bytes against the same model's parameters in fp16."""
    stored = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    fp16 = 2 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"bytes": stored, "fp16_bytes": fp16, "fraction_of_fp16": round(stored / fp16, 4)}


def summary(results: dict[str, Any], out_dir: Path) -> str:
    """The lines a run prints at its end."""
    quant = results["quant"]
    head = f"omniq-lightning: {results['model']['name']} / {results['method']}"
    if quant:
        head += f" {quant['name']} ({results['bits_per_weight']:.2f} bits per weight)"
    lines = [head]
    for name, r in results["perplexity"].items():
        fp = results.get("perplexity_fp", {}).get(name)
        fp_txt = f"full precision {fp['perplexity']:.4f} -> " if fp else ""
        label = "quantized " if quant else ""
        lines.append(f"  {name:<12} perplexity {fp_txt}{label}{r['perplexity']:.4f}  "
                     f"({r['windows']} windows x {r['seqlen']} tokens)")
    for task, r in results.get("zero_shot", {}).items():
        fp = results.get("zero_shot_fp", {}).get(task)
        shown = {m: v for m, v in r.items() if m in ("acc", "acc_norm")}
        fp_txt = f" (full precision {', '.join(f'{m} {fp[m]:.4f}' for m in shown)})" if fp else ""
        lines.append(f"  {task:<14} {', '.join(f'{m} {v:.4f}' for m, v in shown.items())}{fp_txt}  "
                     f"({r['documents']} documents{'' if r['limit'] is None else ', limit'})")
    lines.append(f"  time {results['wall_seconds']['total']:.1f} s; output folder {out_dir}")
    return "\n".join(lines)
