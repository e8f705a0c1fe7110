"""The run: load, (quantize), evaluate, write ``results.json``. The only place that knows the order of things."""

from __future__ import annotations

import logging
import platform
import resource
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from omniq_lightning.data import load_corpus, tokenize
from omniq_lightning.eval import perplexity
from omniq_lightning.io import write_json
from omniq_lightning.models import LoadedModel, load_model
from omniq_lightning.quant import QuantSpec

log = logging.getLogger(__name__)

AVAILABLE_METHODS = ("fp",)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} was requested but CUDA is not available: use device=cpu or device=auto")
    return device


def load(cfg: DictConfig) -> LoadedModel:
    m = cfg.model
    return load_model(
        m.path,
        gguf_file=m.gguf_file,
        models_dir=cfg.paths.models_dir,
        dtype=m.dtype,
        attn_implementation=m.attn_implementation,
        trust_remote_code=bool(m.trust_remote_code),
    )


def check_seqlen(seqlen: int, loaded: LoadedModel, what: str) -> None:
    context = loaded.adapter.context_length(loaded.model)
    if seqlen > context:
        raise ValueError(
            f"{what}.seqlen={seqlen} is longer than the model's context of {context} tokens: "
            f"use {what}.seqlen={context} or less"
        )


def evaluate(cfg: DictConfig, loaded: LoadedModel, device: torch.device) -> dict[str, dict[str, Any]]:
    """Perplexity on every configured corpus."""
    seqlen = int(cfg.eval.seqlen)
    check_seqlen(seqlen, loaded, "eval")
    loaded.model.to(device)
    results = {}
    for name in cfg.eval.corpora:
        corpus = load_corpus(name, "eval", cfg.paths.data_dir)
        ids = tokenize(corpus, loaded.tokenizer)
        t0 = time.perf_counter()
        res = perplexity(
            loaded.model,
            ids,
            seqlen,
            corpus=name,
            max_windows=cfg.eval.max_windows,
            batch_size=int(cfg.eval.batch_size),
            device=device,
        )
        results[name] = {**res.to_dict(), "source": corpus.origin, "seconds": round(time.perf_counter() - t0, 3)}
        log.info("%s perplexity %.4f (%d windows of %d tokens)", name, res.perplexity, res.windows, seqlen)
    return results


def peak_memory(device: torch.device) -> dict[str, float]:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    mem = {"cpu_peak_rss_gib": round(rss_kib / 2**20, 3)}
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the job the config describes and return (and write) its results."""
    t_start = time.perf_counter()
    method = cfg.method.name
    if method not in AVAILABLE_METHODS:
        raise ValueError(f"method '{method}' is not available yet; available methods: {', '.join(AVAILABLE_METHODS)}")
    spec = QuantSpec.from_config(cfg.quant)  # validated up front, before any model loads
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    loaded = load(cfg)
    t_loaded = time.perf_counter()
    evaluation = evaluate(cfg, loaded, device)
    t_done = time.perf_counter()

    results = {
        "model": {"name": cfg.model.name, "path": loaded.source.location, "gguf_file": loaded.source.gguf_file,
                  "dtype": cfg.model.dtype},
        "method": method,
        "quant": None if method == "fp" else {"name": spec.name, **spec.to_dict()},
        "perplexity": evaluation,
        "wall_seconds": {
            "load": round(t_loaded - t_start, 3),
            "quantize": 0.0,
            "evaluate": round(t_done - t_loaded, 3),
            "total": round(t_done - t_start, 3),
        },
        "memory": peak_memory(device),
        "device": str(device),
        "environment": environment(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out_dir / "results.json", results)
    print(summary(results, out_dir))
    return results


def summary(results: dict[str, Any], out_dir: Path) -> str:
    lines = [f"omniq-lightning: {results['model']['name']} / {results['method']}"
             + (f" {results['quant']['name']}" if results["quant"] else "")]
    for name, r in results["perplexity"].items():
        lines.append(f"  {name:<12} perplexity {r['perplexity']:.4f}  ({r['windows']} windows x {r['seqlen']} tokens)")
    lines.append(f"  time {results['wall_seconds']['total']:.1f} s; results in {out_dir / 'results.json'}")
    return "\n".join(lines)
