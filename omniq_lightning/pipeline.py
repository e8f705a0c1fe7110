"""The run: load, capture, the loop over blocks, evaluation, export. The only place that knows the order of things."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import resource
import subprocess
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from omniq_lightning.calib import ActivationCache, BlockDataModule, BlockRun, RunState, observe_linear_inputs
from omniq_lightning.data import calibration_windows, load_corpus, tokenize
from omniq_lightning.eval import perplexity, placed_for_evaluation, zero_shot
from omniq_lightning.export import ExportRequest, check_export, export_dtype, save_fake_quant, write_packed
from omniq_lightning.io import write_json
from omniq_lightning.methods import METHODS, Method, build_method
from omniq_lightning.mixed import BitPlan, linear_shapes, plan_for_run, quant_settings
from omniq_lightning.models import BlockContext, LoadedModel, ModelAdapter, load_model
from omniq_lightning.nn import ActQuantizer, ClusterActQuantizer
from omniq_lightning.nn.act import restore_cluster_quantizers
from omniq_lightning.quant import QuantizedWeight, QuantSpec, WeightFormat
from omniq_lightning.quant.cuda import status as cuda_extension_status
from omniq_lightning.quant.spec import VectorFormat
from omniq_lightning.quant.vq import VectorQuantizedWeight
from omniq_lightning.tracking import build_logger, log_summary
from omniq_lightning.transforms import BlockPlan

log = logging.getLogger(__name__)

AVAILABLE_METHODS = ("fp", *METHODS)
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_cache_dtype(setting: str, model_dtype: torch.dtype) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16
    if setting not in CACHE_DTYPES:
        raise ValueError(f"calib.cache_dtype must be auto or one of {sorted(CACHE_DTYPES)}, got {setting!r}")
    return CACHE_DTYPES[setting]


def check_finite(cache: ActivationCache, what: str) -> None:
    if not torch.isfinite(cache.data).all():
        raise FloatingPointError(
            f"{what} contain NaN or Inf in the {cache.dtype} activation cache: the hidden states overflow it. "
            "Use calib.cache_dtype=bfloat16 or float32"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} was requested but CUDA is not available: use device=cpu or device=auto")
    return device


def resolve_precision(setting: str, device: torch.device) -> str:
    """Lightning precision for block calibration; ``auto`` avoids fp16 overflow (bf16 where it exists)."""
    allowed = ("auto", "32", "32-true", "bf16-mixed", "16-mixed")
    if setting not in allowed:
        raise ValueError(f"trainer.precision must be one of {allowed}, got {setting!r}")
    if setting == "auto":
        if device.type != "cuda":
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if setting in ("bf16-mixed", "16-mixed") and device.type != "cuda":
        raise ValueError(f"trainer.precision={setting} needs a CUDA device; on CPU use 32 (or auto)")
    return "32-true" if setting == "32" else setting


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


def check_spec_fits(loaded: LoadedModel, spec: QuantSpec) -> None:
    """Every linear layer of every block can take the spec (group size divides its input width)."""
    if not spec.quantizes_weights:
        return
    fmt = spec.weight_format
    for i, block in enumerate(loaded.adapter.blocks(loaded.model)):
        for name, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                try:
                    spec.validate_linear(m.in_features)
                    if isinstance(fmt, VectorFormat):
                        fmt.validate_shape(m.out_features, m.in_features)
                except ValueError as exc:
                    raise ValueError(f"block {i} {name}: {exc}") from None


def check_method_format(method: Method, spec: QuantSpec) -> None:
    """Vector formats need a method that fits codebooks; scalar methods need a grid."""
    vector = isinstance(spec.weight_format, VectorFormat)
    if vector and not method.vector_formats:
        raise ValueError(f"quant={spec.name} vector-quantizes the weights, which method={method.name} cannot do: use "
                         "method=vptq, or a scalar preset such as quant=w2a16g64")


def evaluate(cfg: DictConfig, loaded: LoadedModel, device: torch.device) -> dict[str, dict[str, Any]]:
    """Perplexity on every configured corpus (``perplexity``) and, when ``eval.tasks`` names any, zero-shot
    accuracy through lm-evaluation-harness (``zero_shot``)."""
    seqlen = int(cfg.eval.seqlen)
    check_seqlen(seqlen, loaded, "eval")
    max_memory = cfg.eval.get("max_memory")
    max_memory = None if max_memory is None else OmegaConf.to_container(max_memory, resolve=True)
    results = {}
    with placed_for_evaluation(loaded.model, device, max_memory, cfg.eval.get("offload_dir")) as placement:
        for name in cfg.eval.corpora:
            corpus = load_corpus(name, "eval", cfg.paths.data_dir)
            ids = tokenize(corpus, loaded.tokenizer)
            t0 = time.perf_counter()
            res = perplexity(loaded.model, ids, seqlen, corpus=name, max_windows=cfg.eval.max_windows,
                             batch_size=int(cfg.eval.batch_size), device=placement.input_device)
            results[name] = {**res.to_dict(), "source": corpus.origin, "placement": list(placement.devices),
                             "seconds": round(time.perf_counter() - t0, 3)}
            log.info("%s perplexity %.4f (%d windows of %d tokens)", name, res.perplexity, res.windows, seqlen)
        out: dict[str, dict[str, Any]] = {"perplexity": results}
        tasks = list(cfg.eval.get("tasks") or [])
        if tasks:
            t0 = time.perf_counter()
            out["zero_shot"] = zero_shot(loaded.model, loaded.tokenizer, tasks, cfg.paths.data_dir, cfg.eval.get("limit"),
                                         int(cfg.eval.get("task_batch_size", 8)), str(placement.input_device),
                                         loaded.adapter.context_length(loaded.model))
            log.info("zero-shot %s (%.0f s)", {t: r.get("acc") for t, r in out["zero_shot"].items()},
                     time.perf_counter() - t0)
    return out


# --- the block loop -----------------------------------------------------------------------------------


@torch.no_grad()
def run_over(fn, src: ActivationCache, dst: ActivationCache, target: ActivationCache | None = None) -> float | None:
    """``dst[j] = fn(src[j])`` for every sample (``dst`` may be ``src``); returns the MSE to ``target``."""
    err, count = 0.0, 0
    for j in range(len(src)):
        out = fn(src[j].unsqueeze(0).float())[0]
        if target is not None:
            err += torch.mean((out.float() - target[j].float()) ** 2).item()
            count += 1
        dst[j] = out
    return err / count if count else None


@torch.no_grad()
def observe_static_ranges(qblock, inputs: ActivationCache, ctx: BlockContext) -> None:
    """Record the ranges of per-tensor (static) activation quantizers on the block's calibration inputs."""
    static = [m for m in qblock.modules() if isinstance(m, (ActQuantizer, ClusterActQuantizer)) and m.static and m.active]
    if not static:
        return
    for m in static:
        m.reset_range()
        m.observing = True
    for j in range(len(inputs)):
        qblock(inputs[j].unsqueeze(0).float(), ctx)
    for m in static:
        m.observing = False


def calibration_data(cfg: DictConfig, loaded: LoadedModel) -> torch.Tensor:
    """The calibration windows ``[nsamples, seqlen]`` (seeded: the same settings give the same windows)."""
    seqlen, n = int(cfg.calib.seqlen), int(cfg.calib.nsamples)
    check_seqlen(seqlen, loaded, "calib")
    corpus = load_corpus(cfg.calib.corpus, "calib", cfg.paths.data_dir)
    return calibration_windows(tokenize(corpus, loaded.tokenizer), n, seqlen, int(cfg.calib.seed))


def quantize(cfg: DictConfig, loaded: LoadedModel, plan: BlockPlan, method: Method, device: torch.device,
             state: RunState, logger, windows: torch.Tensor, bit_plan: BitPlan | None = None) -> list[dict[str, Any]]:
    """Quantize every block in order, resuming finished blocks from ``state``; returns per-block records. With a
    mixed-precision ``bit_plan``, each block's linears take their planned formats."""
    model, adapter = loaded.model, loaded.adapter
    n, seqlen = windows.shape
    cache_dtype = resolve_cache_dtype(str(cfg.calib.cache_dtype), next(model.parameters()).dtype)
    cache_dir = Path(cfg.calib.cache_dir)

    def new_cache(tag: str) -> ActivationCache:
        return ActivationCache(n, (seqlen, adapter.hidden_size(model)), cache_dtype, device,
                               where=cfg.calib.cache, path=cache_dir / f"{tag}.bin")

    model.to("cpu")
    for m in adapter.pre_block_modules(model):
        m.to(device)
    fp_in = new_cache("fp_in")
    contexts = adapter.capture(model, (windows[i : i + 1] for i in range(n)), fp_in, device)
    check_finite(fp_in, "block 0 inputs")
    q_in, fp_out = new_cache("q_in"), new_cache("fp_out")
    q_in.data.copy_(fp_in.data)
    aug = new_cache("aug") if getattr(method, "aug_loss", False) else None
    precision = resolve_precision(str(cfg.trainer.precision), device)
    batch_size = int(cfg.method.get("batch_size", 1))
    blocks = adapter.blocks(model)
    prefix = adapter.blocks_prefix(model)
    base_plan = plan
    records = []
    progress = bool(cfg.trainer.enable_progress_bar)
    for i in tqdm(range(len(blocks)), desc="blocks", disable=not progress):
        t0 = time.perf_counter()
        ctx = contexts[i]
        plan = base_plan if bit_plan is None else replace(base_plan, formats=bit_plan.for_block(f"{prefix}.{i}"))
        model_dtype = next(blocks[i].parameters()).dtype
        block = adapter.prepare_block(blocks[i].to(device=device, dtype=torch.float32))
        finished = state.is_finished(i)
        gather = plan.let and not finished
        with observe_linear_inputs(block) if gather else contextlib.nullcontext({}) as stats:
            run_over(lambda x, b=block, c=ctx: adapter.call_block(b, x, c), fp_in, fp_out)
        check_finite(fp_out, f"block {i} full-precision outputs")
        if aug is not None and not finished:
            run_over(lambda x, b=block, c=ctx: adapter.call_block(b, x, c), q_in, aug)
        if finished:
            folded = adapter.finish_block(adapter.quantize_block(block, replace(plan, let_roles=())).fold())
            saved = {k[len("block."):]: v for k, v in state.load_block(i).items() if k.startswith("block.")}
            restore_cluster_quantizers(folded, saved)  # RPTQ's per-cluster quantizers, saved with the block
            folded.load_state_dict(saved)
            folded.to(device)
            block_stats: dict[str, float | None] = {"resumed": 1.0, "calibration_seconds": state.block_seconds(i)}
        else:
            qblock = adapter.quantize_block(block, plan, stats).to(device)
            observe_static_ranges(qblock, q_in, ctx)
            run = BlockRun(index=i, n_blocks=len(blocks), ctx=ctx, device=device, precision=precision,
                           checkpoint_dir=state.checkpoint_dir(i), resume_checkpoint=state.resume_checkpoint(i),
                           logger=logger, progress_bar=progress)
            calibrated = method.calibrate(qblock, BlockDataModule(q_in, fp_out, batch_size, aug), run) or {}
            observe_static_ranges(qblock, q_in, ctx)  # again: the learned transforms moved the ranges
            learned, learned_stats = qblock.learned_record()
            folded = adapter.finish_block(method.finalize(qblock))
            codes = {k: v for name, q in qblock.quantized.items() for k, v in q.tensors(f"qweight.{name}").items()}
            formats = {name: q.fmt.to_dict() for name, q in qblock.quantized.items()}
            block_stats = {**learned_stats, **calibrated, "calibration_seconds": round(time.perf_counter() - t0, 3)}
            state.save_block(i, {**{f"block.{k}": v for k, v in folded.state_dict().items()}, **learned, **codes},
                             metadata={"formats": json.dumps(formats, sort_keys=True)},
                             seconds=block_stats["calibration_seconds"])
        mse = run_over(lambda x, b=folded, c=ctx: adapter.call_block(b, x, c), q_in, q_in, target=fp_out)
        fp_in, fp_out = fp_out, fp_in
        for p in folded.parameters():  # parameters only: static activation ranges stay float32
            p.data = p.data.to(model_dtype)
        blocks[i] = folded.to("cpu") if device.type != "cpu" else folded  # offload: one block on the device
        record = {"block": i, "output_mse": mse, "seconds": round(time.perf_counter() - t0, 3), **block_stats}
        records.append(record)
        if logger is not None:
            logger.log_metrics({f"block_{i}/{k}": v for k, v in record.items() if k != "block" and v is not None})
        log.info("block %d/%d: output MSE %.3e (%.1f s)", i + 1, len(blocks), mse, record["seconds"])
    for c in (fp_in, fp_out, q_in, aug):
        if c is not None:
            c.close()
    return records


# --- results --------------------------------------------------------------------------------------------


def calibration_seconds(records: list[dict] | None) -> float | None:
    """The summed calibration seconds of the blocks, each as recorded by the run that calibrated it; None when
    nothing was calibrated or a resumed block predates the record."""
    if not records or any(r.get("calibration_seconds") is None for r in records):
        return None
    return round(sum(r["calibration_seconds"] for r in records), 3)


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


def quantized_weights(state: RunState, adapter: ModelAdapter, model
                      ) -> dict[str, QuantizedWeight | VectorQuantizedWeight]:
    """Every quantized linear's codes and grid, as saved with its finished block, keyed by its name in the model."""
    prefix = adapter.blocks_prefix(model)
    out: dict[str, QuantizedWeight] = {}
    for i in range(len(adapter.blocks(model))):
        tensors = state.load_block(i)
        for name, fmt in json.loads(state.block_metadata(i).get("formats", "{}")).items():
            key = f"qweight.{name}"
            if fmt.get("kind") == VectorFormat.kind:
                out[f"{prefix}.{i}.{name}"] = VectorQuantizedWeight.from_tensors(tensors, key, VectorFormat.from_dict(fmt))
            else:
                out[f"{prefix}.{i}.{name}"] = QuantizedWeight(tensors[f"{key}.codes"], tensors[f"{key}.scale"],
                                                             tensors[f"{key}.zero"], WeightFormat(**fmt))
    return out


def export_sizes(path: Path, model) -> dict[str, float]:
    """The checkpoint's tensor bytes against the same model's parameters in fp16."""
    stored = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    fp16 = 2 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"bytes": stored, "fp16_bytes": fp16, "fraction_of_fp16": round(stored / fp16, 4)}


def bits_per_weight(shapes: dict[str, tuple[int, int]], spec: QuantSpec, bit_plan: BitPlan | None = None) -> float:
    """Average storage bits per weight of the blocks' quantized linears (``linear_shapes`` of the model before
    quantization) in their weight formats (the spec's, or each linear's in a mixed plan), counted by
    ``WeightFormat.storage_bits``: the codes, a 16-bit scale per group and, for asymmetric grids, the zero point
    or midpoint."""
    if not shapes:
        raise ValueError("no quantizable linears found: bits per weight are undefined")
    if bit_plan is not None:
        return bit_plan.avg_bits(shapes)
    fmt = spec.weight_format
    return sum(fmt.storage_bits(*s) for s in shapes.values()) / max(sum(o * i for o, i in shapes.values()), 1)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the job the config describes and return (and write) its results."""
    t_start = time.perf_counter()
    name = cfg.method.name
    if name not in AVAILABLE_METHODS:
        raise ValueError(f"unknown method '{name}'; available methods: {', '.join(AVAILABLE_METHODS)}")
    spec, mixed = quant_settings(cfg.quant)  # validated up front, before any model loads
    export_format = str(cfg.get("export", {}).get("format", "fake"))
    packed_dtype = export_dtype(str(cfg.get("export", {}).get("dtype", "auto")), str(cfg.model.dtype))
    method = None if name == "fp" else build_method(name, OmegaConf.to_container(cfg.method, resolve=True))
    if method is not None:
        check_method_format(method, spec)
        method.validate(spec)
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    # what "auto" settings became on this machine: a resume elsewhere must not silently change them
    config["resolved"] = {"device_type": device.type, "precision": resolve_precision(str(cfg.trainer.precision), device)}
    state = None if method is None else RunState.open(out_dir, config)

    loaded = load(cfg)
    bit_plan, windows = None, None
    if method is not None:
        if mixed is None:
            check_spec_fits(loaded, spec)
        plan = method.plan(spec, loaded.adapter.family, loaded.adapter.let_for_weight_only)
        loaded.adapter.check_plan(loaded.model, plan)
        formats = {plan.spec.weight_format} if mixed is None else set(mixed.candidates)
        check_export(export_format, ExportRequest(plan.spec, frozenset(formats), moe=not loaded.adapter.packed_export))
        windows = calibration_data(cfg, loaded)
        if mixed is not None:
            bit_plan, plan_info = plan_for_run(loaded.model, loaded.adapter, mixed, windows, out_dir, device)
            loaded.model.to("cpu")
    t_loaded = time.perf_counter()
    results: dict[str, Any] = {
        "model": {"name": cfg.model.name, "path": loaded.source.location, "gguf_file": loaded.source.gguf_file,
                  "dtype": cfg.model.dtype},
        "method": name,
        "quant": None if method is None else {"name": spec.name, **spec.to_dict()},
    }
    t_q0 = t_quant = t_loaded
    if method is None:
        results.update(evaluate(cfg, loaded, device))
    else:
        if cfg.eval.fp_baseline:
            results.update({f"{k}_fp": v for k, v in evaluate(cfg, loaded, device).items()})
        shapes = linear_shapes(loaded.model, loaded.adapter)  # before quantization swaps the linears
        t_q0 = time.perf_counter()
        logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True), out_dir,
                              f"{cfg.model.name}-{cfg.method.tag}", config)
        results["blocks"] = quantize(cfg, loaded, plan, method, device, state, logger, windows, bit_plan)
        results["method_settings"] = method.describe()
        t_quant = time.perf_counter()
        results["bits_per_weight"] = round(bits_per_weight(shapes, spec, bit_plan), 4)
        if bit_plan is not None:
            results["bit_plan"] = plan_info
        results.update(evaluate(cfg, loaded, device))
        extra = {"method": name, "model": cfg.model.name}
        if bit_plan is not None:  # the bits of each layer
            extra["formats"] = {n: f.to_dict() for n, f in sorted(bit_plan.formats.items())}
        results["export"] = str(save_fake_quant(loaded.model, loaded.tokenizer, spec, out_dir / "model", extra,
                                                loaded.adapter))
        if export_format != "fake":
            quantized = quantized_weights(state, loaded.adapter, loaded.model)
            packed = write_packed(out_dir / "model", quantized, spec, export_format, out_dir / f"model-{export_format}",
                                  packed_dtype)
            results["export_packed"] = {"format": export_format, "path": str(packed), **export_sizes(packed, loaded.model)}
        table = [{"corpus": c, "fp": results.get("perplexity_fp", {}).get(c, {}).get("perplexity"),
                  name: r["perplexity"]} for c, r in results["perplexity"].items()]
        summary_metrics = {f"ppl/{c}": r["perplexity"] for c, r in results["perplexity"].items()}
        summary_metrics |= {f"zero_shot/{t}/{m}": v for t, r in results.get("zero_shot", {}).items()
                            for m, v in r.items() if m in ("acc", "acc_norm", "perplexity")}
        log_summary(logger, summary_metrics, table)
    t_done = time.perf_counter()
    results.update({
        "wall_seconds": {
            "load": round(t_loaded - t_start, 3),
            "evaluate_fp": round(t_q0 - t_loaded, 3),
            "quantize": round(t_quant - t_q0, 3),
            # the blocks' calibration summed over the runs that did it (a resumed run counts its earlier work)
            "calibration": calibration_seconds(results.get("blocks")),
            "evaluate": round(t_done - t_quant, 3),
            "total": round(t_done - t_start, 3),
        },
        "memory": peak_memory(device),
        "device": str(device),
        "environment": environment(),
        "config": config,
    })
    write_json(out_dir / "results.json", results)
    print(summary(results, out_dir))
    return results


def summary(results: dict[str, Any], out_dir: Path) -> str:
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
