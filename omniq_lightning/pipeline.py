"""The run: every setting checked, the model loaded, the model-level stage, the loop over blocks, evaluation,
export. The only place that knows the order of things.

``method=fp`` (a method config with ``evaluation_only``) evaluates the model as loaded; every other method goes
through :func:`run_calibration`: what can be checked is checked before anything is written to ``output_dir``,
then the stage before the block loop (``passes``: mixed-precision plans, whole-model transforms), then each
block in turn (:func:`calibrate_block`), resuming finished blocks whose fingerprint still matches.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from omniq_lightning import distributed
from omniq_lightning.calib import ActivationCache, BlockDataModule, BlockRun, RunState, observe_linear_inputs
from omniq_lightning.calib.loop import run_samples
from omniq_lightning.calib.phases import add_phases, phase, recording
from omniq_lightning.data import calibration_windows, load_corpus, tokenize
from omniq_lightning.eval import perplexity, placed_for_evaluation, zero_shot
from omniq_lightning.eval.blockwise import blockwise_perplexity
from omniq_lightning.eval.tasks import check_tasks, task_list
from omniq_lightning.export import ExportRequest, check_export, export_dtype, save_fake_quant, write_export
from omniq_lightning.export.online import online_inputs, online_kinds
from omniq_lightning.export.registry import exporter
from omniq_lightning.io import OutputLock, write_json
from omniq_lightning.memory import MemoryPlan, ModelSizes, PlanSettings, plan_memory, resident_bytes, shortfalls
from omniq_lightning.methods import DataNeeds, Method, ModelTraits, build_method
from omniq_lightning.mixed import MixedPrecisionPass, linear_shapes, quant_settings
from omniq_lightning.mixed.plan import MixedSettings
from omniq_lightning.models import BlockContext, LoadedModel, load_model, meta_model
from omniq_lightning.nn.act import restore_cluster_quantizers
from omniq_lightning.nn.formats import for_shape, format_record, kind_of, read_codes
from omniq_lightning.passes import ModelPass, PassContext, run_passes
from omniq_lightning.passes.rotation import RotationPass, RotationSettings
from omniq_lightning.quant import QuantSpec
from omniq_lightning.quant.spec import format_from_dict
from omniq_lightning.report import bits_per_weight, calibration_seconds, environment, export_sizes, peak_memory, summary
from omniq_lightning.solvers import observe_static_ranges
from omniq_lightning.tracking import build_logger, log_summary
from omniq_lightning.transforms import BlockSetup, OnlineRotations

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- settings ---------------------------------------------------------------------------------------------------


def resolve_cache_dtype(setting: str, model_dtype: torch.dtype) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16
    if setting not in CACHE_DTYPES:
        raise ValueError(f"calib.cache_dtype must be auto or one of {sorted(CACHE_DTYPES)}, got {setting!r}")
    return CACHE_DTYPES[setting]


def resolve_device(name: str, planning_only: bool = False) -> torch.device:
    """The run's device; ``planning_only`` (a dry run's memory plan) accepts a CUDA device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available() and not planning_only:
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
        return "bf16-mixed" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "16-mixed"
    if setting == "16-mixed" and device.type != "cuda":
        raise ValueError("trainer.precision=16-mixed needs a CUDA device; on CPU use 32, bf16-mixed or auto")
    return "32-true" if setting == "32" else setting


def integer(cfg: DictConfig, key: str, minimum: int | None = None, optional: bool = False) -> int | None:
    """The integer setting ``key`` (a dotted path), refused with its name and the fix when it is not one."""
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be an integer{' or null' if optional else ''}, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{key} must be at least {minimum}, got {number}")
    return number


def check_settings(cfg: DictConfig) -> None:
    """The numeric and evaluation settings every run reads, before anything loads."""
    integer(cfg, "seed")
    for key in ("eval.seqlen", "eval.batch_size", "eval.task_batch_size"):
        integer(cfg, key, minimum=1)
    integer(cfg, "eval.max_windows", minimum=1, optional=True)
    if not cfg.method.get("evaluation_only"):
        integer(cfg, "calib.seed")
        integer(cfg, "calib.nsamples", minimum=1)
        integer(cfg, "calib.seqlen", minimum=2)
    check_tasks(task_list(cfg.eval.get("tasks")), cfg.eval.get("limit"), cfg.paths.data_dir)
    if cfg.model.get("lazy") and task_list(cfg.eval.get("tasks")):
        raise ValueError("eval.tasks (zero-shot) runs the model whole, and model.lazy=true holds it block by block: "
                         "use eval.tasks=[] (perplexity is evaluated block by block) or model.lazy=false")


def check_format_capabilities(method: Method, formats) -> None:
    """Every weight format of the run has what the method needs (``nn.formats`` capabilities)."""
    needs = method.format_needs()
    for fmt in {f for f in formats if f.quantized}:
        kind = kind_of(fmt)
        missing = sorted(needs - kind.capabilities)
        if missing:
            hint = f"; {kind.hint}" if kind.hint else ""
            raise ValueError(f"weight format {fmt.name} ({kind.name}) lacks what method={method.name} needs "
                             f"({', '.join(missing)}){hint}")


@dataclass
class Job:
    """A calibration run as its settings decide it, checked before any model loads."""

    cfg: DictConfig
    method: Method
    spec: QuantSpec
    mixed: MixedSettings | None
    export_format: str
    export_dtype: torch.dtype
    device: torch.device
    precision: str
    out_dir: Path
    config: dict[str, Any]
    rotation: RotationSettings | None = None
    passes: list[ModelPass] = field(default_factory=list)
    memory_plan: MemoryPlan | None = None
    world: distributed.World = field(default_factory=distributed.World)

    @property
    def quant_name(self) -> str:
        """The run's quantization label: the preset's own name for a mixed plan (``mixed3.0``), else the spec's."""
        return str(self.cfg.quant.name) if self.mixed is not None else self.spec.name


def prepare(cfg: DictConfig) -> Job:
    """Build and check everything the settings alone decide (method, quantization, export, device)."""
    check_settings(cfg)
    method = build_method(OmegaConf.to_container(cfg.method, resolve=True))
    spec, mixed = quant_settings(OmegaConf.to_container(cfg.quant, resolve=True))
    method.validate(spec)
    check_format_capabilities(method, {spec.weight_format} if mixed is None else set(mixed.candidates))
    export_format = str(cfg.export.format)
    exporter(export_format)  # known
    dtype = export_dtype(str(cfg.export.get("dtype", "auto")), str(cfg.model.dtype))
    world = distributed.World.from_env()
    device = resolve_device(cfg.device, planning_only=bool(cfg.calib.get("dry_run", False)))
    if device.type == "cuda" and world.size > 1:
        if device.index is not None:
            raise ValueError(f"device={cfg.device} would put every rank on one GPU: use device=cuda (or auto) with "
                             "torchrun, each rank then takes cuda:LOCAL_RANK")
        device = torch.device("cuda", world.local_rank)  # one device per rank of a node
    precision = resolve_precision(str(cfg.trainer.precision), device)
    config = OmegaConf.to_container(cfg, resolve=True)
    # what "auto" settings became on this machine: a resume elsewhere must not silently change them
    config["resolved"] = {"device_type": device.type, "precision": precision}
    rotation = None
    if str(cfg.rotation.name) != "none":
        rotation = RotationSettings.from_config(OmegaConf.to_container(cfg.rotation, resolve=True),
                                                spec.quantizes_activations, spec.quantizes_kv)
    passes = ([RotationPass(rotation)] if rotation is not None else []) + method.model_passes(spec)
    passes += getattr(spec.weight_format, "model_passes", list)()  # a format's per-linear plan (a GGUF mix)
    if mixed is not None:
        passes.append(MixedPrecisionPass(mixed))
    if cfg.model.get("lazy") and passes:
        raise ValueError(f"model.lazy=true holds the model block by block, and this run has whole-model passes "
                         f"({', '.join(p.name for p in passes)}): use model.lazy=false")
    job = Job(cfg, method, spec, mixed, export_format, dtype, device, precision, Path(cfg.output_dir), config,
              rotation, passes, world=world)
    check_world(job)
    return job


def check_world(job: Job) -> None:
    """Refuse, before any work, a data-parallel run (``torchrun``) whose samples, batch, passes or method cannot be
    shared by its ranks."""
    if job.world.size == 1:
        return
    if job.passes:
        raise ValueError(f"whole-model passes ({', '.join(p.name for p in job.passes)}) run in one process: start "
                         "this run without torchrun (one process), or without the rotation / mixed-precision / GGUF "
                         "mix settings")
    job.method.check_world(job.world.size)
    shard(job, int(job.cfg.calib.nsamples))  # the samples and a trained method's batch split over the ranks


def rank_batch(job: Job, n: int) -> int:
    """A rank's samples per training step: a trained method's global batch (``method.batch_size``) split over the
    ranks (refused when it does not split, or ``n`` samples are no whole number of global batches)."""
    needs = job.method.data_needs()
    return distributed.check_batch(job.world, n, needs.batch_size) if needs.trains else needs.batch_size


def shard(job: Job, n: int) -> list[int]:
    """The calibration samples this rank holds, of ``n``: a trained method's ranks split every global batch evenly
    (so that their averaged gradients are one process's batch gradient); closed forms take contiguous shares."""
    chunk = rank_batch(job, n) if job.method.data_needs().trains else n // job.world.size
    return distributed.shard_ids(n, job.world, chunk)


# --- the model --------------------------------------------------------------------------------------------------


def load(cfg: DictConfig) -> LoadedModel:
    m = cfg.model
    return load_model(
        m.path,
        gguf_file=m.gguf_file,
        models_dir=cfg.paths.models_dir,
        dtype=m.dtype,
        attn_implementation=m.attn_implementation,
        trust_remote_code=bool(m.trust_remote_code),
        lazy=bool(m.get("lazy", False)),
    )


def model_traits(loaded: LoadedModel) -> ModelTraits:
    adapter, blocks = loaded.adapter, loaded.adapter.blocks(loaded.model)
    block = adapter.prepare_block(copy.deepcopy(blocks[0]))
    return ModelTraits(adapter.recipe_family, adapter.let_for_weight_only, adapter.experts, tuple(adapter.sites(block)),
                       adapter.residual_norm, bool(adapter.residual_writers(block).norms))


def check_seqlen(seqlen: int, loaded: LoadedModel, what: str) -> None:
    context = loaded.adapter.context_length(loaded.model)
    if seqlen > context:
        raise ValueError(
            f"{what}.seqlen={seqlen} is longer than the model's context of {context} tokens: "
            f"use {what}.seqlen={context} or less"
        )


def with_rotations(setup: BlockSetup, rotation: RotationSettings | None) -> BlockSetup:
    """The method's block setup with the run's online rotations; a diagonal transform on the up -> down site cannot
    sit under a rotation of the down projection's input, so it goes."""
    if rotation is None:
        return setup
    scales = tuple(x for x in setup.scale_locations if not (rotation.down and x == "up_down"))
    return replace(setup, scale_locations=scales, rotations=OnlineRotations(rotation.qk, rotation.down, rotation.seed))


def online_transforms(spec: QuantSpec, setup: BlockSetup, rotation: RotationSettings | None,
                      traits: ModelTraits) -> tuple[str, ...]:
    """The kinds of transform (``export.online.ONLINE_KINDS``) a quantized model of this setup runs online."""
    kinds = []
    if setup.rotations.down:
        kinds.append("input_rotation")
    if any(x != "vo" for x in setup.affine_locations):  # at v -> o they fold
        kinds.append("input_affine")
    if setup.rotations.qk and (spec.quantizes_activations or spec.quantizes_kv):
        kinds.append("qk_rotation")
    if rotation is not None and rotation.residual and traits.sandwich_norms:
        kinds.append("norm_output_rotation")
    return tuple(kinds)


def check_formats_fit(shapes: Mapping[str, tuple[int, int]], fmt) -> None:
    """Every quantized linear can take the format (e.g. its group size divides the input width)."""
    for name, (out_f, in_f) in shapes.items():
        try:
            for_shape(fmt, out_f, in_f).validate_shape(out_f, in_f)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None


def calibration_data(cfg: DictConfig, loaded: LoadedModel) -> torch.Tensor:
    """The calibration windows ``[nsamples, seqlen]`` (seeded: the same settings give the same windows)."""
    seqlen, n = int(cfg.calib.seqlen), int(cfg.calib.nsamples)
    check_seqlen(seqlen, loaded, "calib")
    corpus = load_corpus(cfg.calib.corpus, "calib", cfg.paths.data_dir)
    return calibration_windows(tokenize(corpus, loaded.tokenizer), n, seqlen, int(cfg.calib.seed))


def evaluate(cfg: DictConfig, loaded: LoadedModel, device: torch.device,
             block_at: Callable[[int], torch.nn.Module] | None = None) -> dict[str, dict[str, Any]]:
    """Perplexity on every configured corpus (``perplexity``) and, when ``eval.tasks`` names any, zero-shot
    accuracy through lm-evaluation-harness (``zero_shot``). A lazily held model is evaluated block by block,
    block ``i`` being ``block_at(i)`` (default: its full-precision weights from the checkpoint)."""
    seqlen = int(cfg.eval.seqlen)
    check_seqlen(seqlen, loaded, "eval")
    if loaded.lazy:
        if block_at is None:
            block_at = lambda i: loaded.read_block(i).to(device)  # noqa: E731
        with outside_blocks_on(loaded, device):
            return {"perplexity": corpus_perplexities(
                cfg, loaded, ["blockwise", str(device)],
                lambda ids, name: blockwise_perplexity(loaded.model, loaded.adapter, block_at, ids, seqlen, corpus=name,
                                                       max_windows=cfg.eval.max_windows, device=device))}
    max_memory = cfg.eval.get("max_memory")
    max_memory = None if max_memory is None else OmegaConf.to_container(max_memory, resolve=True)
    with placed_for_evaluation(loaded.model, device, max_memory, cfg.eval.get("offload_dir")) as placement:
        out: dict[str, dict[str, Any]] = {"perplexity": corpus_perplexities(
            cfg, loaded, list(placement.devices),
            lambda ids, name: perplexity(loaded.model, ids, seqlen, corpus=name, max_windows=cfg.eval.max_windows,
                                         batch_size=int(cfg.eval.batch_size), device=placement.input_device))}
        tasks = task_list(cfg.eval.get("tasks"))
        if tasks:
            t0 = time.perf_counter()
            out["zero_shot"] = zero_shot(loaded.model, loaded.tokenizer, tasks, cfg.paths.data_dir, cfg.eval.get("limit"),
                                         int(cfg.eval.get("task_batch_size", 8)), str(placement.input_device),
                                         loaded.adapter.context_length(loaded.model))
            log.info("zero-shot %s (%.0f s)", {t: r.get("acc") for t, r in out["zero_shot"].items()},
                     time.perf_counter() - t0)
    return out


def corpus_perplexities(cfg: DictConfig, loaded: LoadedModel, placement: list[str],
                        measure: Callable[[torch.Tensor, str], Any]) -> dict[str, dict[str, Any]]:
    """``measure(ids, name)`` (a :class:`PerplexityResult`) on each corpus of ``eval.corpora``, with its record."""
    results = {}
    for name in cfg.eval.corpora:
        corpus = load_corpus(name, "eval", cfg.paths.data_dir)
        ids = tokenize(corpus, loaded.tokenizer)
        t0 = time.perf_counter()
        res = measure(ids, name)
        results[name] = {**res.to_dict(), "source": corpus.origin, "placement": placement,
                         "seconds": round(time.perf_counter() - t0, 3)}
        log.info("%s perplexity %.4f (%d windows of %d tokens)", name, res.perplexity, res.windows, res.seqlen)
    return results


@contextlib.contextmanager
def outside_blocks_on(loaded: LoadedModel, device: torch.device):
    """While active, a lazily held model's parts outside its blocks (its head read) are on ``device`` (then back
    on the CPU)."""
    with loaded.head_loaded():
        for m in loaded.outside_blocks():
            m.to(device)
        try:
            yield
        finally:
            to_cpu(loaded)


def to_cpu(loaded: LoadedModel) -> None:
    """The model's real tensors on the CPU (a lazily held model's blocks stay on the meta device)."""
    if not loaded.lazy:
        loaded.model.to("cpu")
        return
    for m in loaded.outside_blocks():
        if not any(p.is_meta for p in m.parameters()):  # a head not read yet stays on the meta device
            m.to("cpu")


def restored_blocks(loaded: LoadedModel, state: RunState, setup: BlockSetup, formats: Mapping[int, dict[str, Any]],
                    device: torch.device) -> Callable[[int], torch.nn.Module]:
    """``block_at(i)``: block ``i`` as the run finished it, rebuilt from the checkpoint and the run state, in the
    model's dtype on ``device`` (how a lazily held model's quantized blocks are evaluated and exported)."""
    def block_at(i: int) -> torch.nn.Module:
        fp = loaded.read_block(i)
        dtype = next(fp.parameters()).dtype
        block = loaded.adapter.prepare_block(fp.to(device=device, dtype=torch.float32))
        return to_model_dtype(restore_block(loaded.adapter, state, i, block, replace(setup, formats=formats[i])),
                              dtype)
    return block_at


# --- the block loop ---------------------------------------------------------------------------------------------


CACHES = 3  # full-precision inputs and outputs, quantized inputs (a fourth for augmented targets)


def available_bytes(where: str, device: torch.device, cache_dir: Path) -> tuple[int, str]:
    """Free bytes where the activation caches will live, and a name for that place."""
    if where == "disk":
        probe = cache_dir
        while not probe.exists():
            probe = probe.parent
        return shutil.disk_usage(probe).free, f"the disk of {cache_dir}"
    if where in ("device", "auto") and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], str(device)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "CPU memory"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "CPU memory"


def check_cache_memory(job: Job, hidden: int, model_dtype: torch.dtype) -> None:
    """Refuse, before any work, a calibration whose activation caches cannot fit where they are to live."""
    cfg = job.cfg
    n, seqlen = int(cfg.calib.nsamples) // job.world.size, int(cfg.calib.seqlen)  # this rank's share
    dtype = resolve_cache_dtype(str(cfg.calib.cache_dtype), model_dtype)
    caches = CACHES + bool(job.method.data_needs().augmented_targets)
    one = n * seqlen * hidden * torch.empty(0, dtype=dtype).element_size()
    free, where = available_bytes(str(cfg.calib.cache), job.device, Path(cfg.calib.cache_dir))
    setting = str(cfg.calib.cache)
    if setting == "disk":  # the output folder's disk, which every rank shares
        free //= job.world.size
    elif not (setting in ("device", "auto") and job.device.type == "cuda"):  # the CPU memory of a node's ranks
        free //= job.world.local_size
    if caches * one > free:
        gib = 2**30
        raise MemoryError(
            f"calib.nsamples={n} x calib.seqlen={seqlen} needs {caches} activation caches of {one / gib:.2f} GiB "
            f"({caches * one / gib:.2f} GiB) in {where}, where {free / gib:.2f} GiB is free: use fewer calib.nsamples "
            f"(at most {int(free // (caches * seqlen * (one // (n * seqlen))))}), a shorter calib.seqlen, or "
            "calib.cache=disk with calib.cache_dir on a disk with room")


def plan_run(job: Job) -> MemoryPlan:
    """The run's memory plan (``omniq_lightning.memory``) from the model's config alone: no weights are read."""
    cfg, m = job.cfg, job.cfg.model
    runtime = resident_bytes()  # before the meta model (whose structure the run does not keep)
    model, adapter = meta_model(m.path, gguf_file=m.gguf_file, models_dir=cfg.paths.models_dir, dtype=m.dtype,
                                trust_remote_code=bool(m.trust_remote_code))
    sizes = ModelSizes.of(model, adapter)
    model_dtype = sizes.dtype
    needs = job.method.data_needs()
    cache_dtype = resolve_cache_dtype(str(cfg.calib.cache_dtype), model_dtype)
    windows = cfg.eval.max_windows or 200  # unknown before the corpus is read: about WikiText-2's at 2048 tokens
    settings = PlanSettings(
        nsamples=int(cfg.calib.nsamples), seqlen=int(cfg.calib.seqlen),
        cache_bytes=torch.empty(0, dtype=cache_dtype).element_size(),
        caches=CACHES + bool(needs.augmented_targets), cache_where=str(cfg.calib.cache), device=job.device.type,
        lazy=bool(m.get("lazy", False)), batch_size=needs.batch_size, moment_bytes=needs.moment_bytes,
        trains=needs.trains, eval_seqlen=int(cfg.eval.seqlen), eval_batch=int(cfg.eval.batch_size),
        eval_windows=int(windows), export_packed=job.export_format != "fake",
        runtime_bytes=runtime, corpus_chars=corpus_chars(cfg), ranks=job.world.size,
        ranks_per_node=job.world.local_size)
    return plan_memory(sizes, settings)


UNREAD_CORPUS_CHARS = 1_300_000  # a corpus the plan cannot read yet counts as WikiText-2's test text


def corpus_chars(cfg: DictConfig) -> int:
    """The characters of the calibration and evaluation corpora (read, not tokenized) for the memory plan; one
    that cannot be read yet (offline, not downloaded) counts as :data:`UNREAD_CORPUS_CHARS` (the run itself will
    name what is missing)."""
    total = 0
    for role, name in [("calib", str(cfg.calib.corpus))] + [("eval", str(c)) for c in cfg.eval.corpora]:
        try:
            total += sum(len(d) for d in load_corpus(name, role, cfg.paths.data_dir).documents)
        except OSError:  # FileNotFoundError, ConnectionError
            total += UNREAD_CORPUS_CHARS
    return total


def free_memory(job: Job) -> dict[str, int]:
    """What the CPU (beyond this process's own memory, which the plan counts), the device and the output folder's
    disk (with what a previous run of the folder already wrote) have free."""
    free = {"cpu": available_bytes("cpu", torch.device("cpu"), job.out_dir)[0] + resident_bytes()}
    if job.device.type == "cuda":
        free["device"] = torch.cuda.mem_get_info(job.device)[0]
    written = sum(f.stat().st_size for f in job.out_dir.rglob("*") if f.is_file()) if job.out_dir.exists() else 0
    free["disk"] = available_bytes("disk", job.device, job.out_dir)[0] + written
    return free


def check_memory_plan(job: Job, plan: MemoryPlan) -> None:
    """Refuse, before the model loads, a run whose planned peaks exceed what is free (``calib.check_memory=false``
    runs it anyway)."""
    short = shortfalls(plan, free_memory(job))
    if short and job.cfg.calib.get("check_memory", True):
        raise MemoryError("this run does not fit, by its memory plan: " + "; ".join(short)
                          + ". (calib.dry_run=true prints the whole plan; calib.check_memory=false runs it anyway)")


@contextlib.contextmanager
def run_log(out_dir: Path):
    """While active, this library's log lines also go to ``out_dir/run.log``."""
    handler = logging.FileHandler(out_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("omniq_lightning")
    level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def check_finite(cache: ActivationCache, what: str) -> None:
    if not distributed.all_true(bool(torch.isfinite(cache.data).all())):  # every rank's share
        raise FloatingPointError(
            f"{what} contain NaN or Inf in the {cache.dtype} activation cache: the hidden states overflow it. "
            "Use calib.cache_dtype=bfloat16 or float32"
        )


@dataclass
class Caches:
    """The block loop's activations: the full-precision block inputs and outputs, the quantized inputs (what the
    quantized blocks so far produce) and, for methods that ask, the fp block's outputs on the quantized inputs."""

    fp_in: ActivationCache
    fp_out: ActivationCache
    q_in: ActivationCache
    aug: ActivationCache | None

    def next_block(self) -> None:
        """This block's fp outputs are the next block's fp inputs."""
        self.fp_in, self.fp_out = self.fp_out, self.fp_in

    def close(self) -> None:
        for c in (self.fp_in, self.fp_out, self.q_in, self.aug):
            if c is not None:
                c.close()


@dataclass
class BlockLoop:
    """What every block of the loop shares."""

    job: Job
    loaded: LoadedModel
    setup: BlockSetup
    formats: dict[int, dict[str, Any]]  # per block: its linears' planned formats, by name within the block
    fingerprints: dict[int, dict[str, Any]]
    state: RunState
    contexts: list[BlockContext]
    caches: Caches
    needs: DataNeeds
    logger: Any = None


def block_fingerprint(job: Job, setup: BlockSetup, formats: Mapping[str, Any], pass_digests: Mapping[str, str]
                      ) -> dict[str, Any]:
    """Everything that decides a block beyond the run's configuration: its linears' formats, the transforms it
    gets, the method's resolved settings and the model-level stage's decisions."""
    return {
        "formats": {n: format_record(f) for n, f in sorted(formats.items())},
        "transforms": {"scale_locations": list(setup.scale_locations), "scale_alpha": setup.scale_alpha,
                       "scale_shift": setup.scale_shift},
        "spec": job.spec.to_dict(),
        "method": {"name": job.method.name, "class": type(job.method).__qualname__,
                   "settings": json.loads(json.dumps(job.method.describe(), sort_keys=True, default=str))},
        "passes": dict(sorted(pass_digests.items())),
    }


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """What differs between two block fingerprints, in words (linears by name, ``prefix`` their block's path, or
    the part that changed)."""
    changes = []
    for name in sorted(set(old.get("formats", {})) | set(new.get("formats", {}))):
        a, b = old.get("formats", {}).get(name), new.get("formats", {}).get(name)
        if a != b:
            changes.append(f"{prefix}{name}: {format_from_dict(a).name if a else '16-bit'} -> "
                           f"{format_from_dict(b).name if b else '16-bit'}")
    for part in ("transforms", "spec", "method", "passes"):
        if old.get(part) != new.get(part):
            changes.append(f"{part}: {old.get(part)} -> {new.get(part)}")
    return changes


def check_finished_blocks(state: RunState, fingerprints: Mapping[int, dict[str, Any]], recalibrate: bool,
                          prefix: str = "") -> None:
    """Finished blocks are reused only if what decided them is what decides them now. Otherwise the run is refused,
    naming what changed, or with ``calib.recalibrate_changed=true`` the blocks from the first changed one on
    are calibrated again (later blocks take its outputs as their inputs)."""
    changed = {}
    for i, fp in fingerprints.items():
        if state.is_finished(i):
            old = state.block_fingerprint(i)
            if old is None:
                changed[i] = ["the block was recorded without a fingerprint (an older version of omniq-lightning)"]
            elif old != fp:
                changed[i] = fingerprint_changes(old, fp, f"{prefix}.{i}." if prefix else "")
    if not changed:
        return
    first = min(changed)
    if recalibrate:
        log.warning("finished blocks %s were calibrated under other settings: calibrating block %d and later again",
                    sorted(changed), first)
        state.forget_blocks(first)
        return
    details = "; ".join(f"block {i}: " + ", ".join(c[:4]) + (f" (and {len(c) - 4} more)" if len(c) > 4 else "")
                        for i, c in sorted(changed.items())[:3])
    raise ValueError(f"{state.dir} holds finished blocks calibrated under other settings than this run's, so they "
                     f"cannot be reused ({details}). Use another output_dir for a new run, or set "
                     "calib.recalibrate_changed=true to calibrate the changed blocks (and those after them) again")


def new_cache(job: Job, loaded: LoadedModel, ids: list[int], total: int, seqlen: int, tag: str) -> ActivationCache:
    """An activation cache of the calibration samples ``ids`` (this rank's, of ``total``)."""
    model = loaded.model
    dtype = resolve_cache_dtype(str(job.cfg.calib.cache_dtype), next(model.parameters()).dtype)
    name = f"{tag}.bin" if job.world.size == 1 else f"{tag}.rank{job.world.rank}.bin"
    return ActivationCache(len(ids), (seqlen, loaded.adapter.hidden_size(model)), dtype, job.device,
                           where=job.cfg.calib.cache, path=Path(job.cfg.calib.cache_dir) / name, ids=ids, total=total)


def calibrate_blocks(loop_parts: dict[str, Any], windows: torch.Tensor) -> list[dict[str, Any]]:
    """Calibrate every block in order (resuming finished ones); returns the blocks' records."""
    job, loaded = loop_parts["job"], loop_parts["loaded"]
    model, adapter = loaded.model, loaded.adapter
    total, seqlen = windows.shape
    ids = shard(job, total)  # all of them, in one process
    to_cpu(loaded)
    for m in adapter.pre_block_modules(model):
        m.to(job.device)
    fp_in = new_cache(job, loaded, ids, total, seqlen, "fp_in")
    contexts = adapter.capture(model, (windows[i : i + 1] for i in ids), fp_in, job.device)
    check_finite(fp_in, "block 0 inputs")
    needs = job.method.data_needs()
    caches = Caches(fp_in, new_cache(job, loaded, ids, total, seqlen, "fp_out"),
                    new_cache(job, loaded, ids, total, seqlen, "q_in"),
                    new_cache(job, loaded, ids, total, seqlen, "aug") if needs.augmented_targets else None)
    caches.q_in.data.copy_(fp_in.data)
    loop = BlockLoop(contexts=contexts, caches=caches, needs=needs, **loop_parts)
    records = []
    blocks = adapter.blocks(model)
    try:
        for i in tqdm(range(len(blocks)), desc="blocks",
                      disable=not job.cfg.trainer.enable_progress_bar or not job.world.main):
            records.append(calibrate_block(loop, i))
    finally:
        caches.close()
    return records


def calibrate_block(loop: BlockLoop, i: int) -> dict[str, Any]:
    """One block: its full-precision outputs (the targets, and the next block's inputs), then either its finished
    state from a previous run or a new calibration (built, calibrated by the method, folded, saved), then the
    quantized block's outputs on the quantized inputs (the next block's quantized inputs)."""
    t0 = time.perf_counter()
    with recording(sync_cuda=loop.job.device.type == "cuda") as phases:
        record = calibrate_block_phases(loop, i, t0)
    record["phases"] = phases.rounded()
    if loop.logger is not None:
        loop.logger.log_metrics({f"block_{i}/{k}": v for k, v in record.items()
                                 if k not in ("block", "phases") and v is not None})
    log.info("block %d/%d: output MSE %.3e (%.1f s)", i + 1, len(loop.contexts), record["output_mse"],
             record["seconds"])
    return record


def calibrate_block_phases(loop: BlockLoop, i: int, t0: float) -> dict[str, Any]:
    """:func:`calibrate_block`'s work, its phases marked."""
    job, adapter, caches, state = loop.job, loop.loaded.adapter, loop.caches, loop.state
    blocks, ctx, device = adapter.blocks(loop.loaded.model), loop.contexts[i], job.device
    setup = replace(loop.setup, formats=loop.formats[i])
    model_dtype = next(blocks[i].parameters()).dtype
    held = blocks[i]  # a lazily held model's block stays on the meta device; its weights are read for the loop
    with phase("load"):
        blocks[i] = loop.loaded.read_block(i)
    block = adapter.prepare_block(blocks[i].to(device=device, dtype=torch.float32))
    finished = state.is_finished(i)

    def fp_block(x: torch.Tensor) -> torch.Tensor:
        return adapter.call_block(block, x, ctx)

    with (phase("full-precision outputs"),
          observe_linear_inputs(block) if setup.scaled and not finished else contextlib.nullcontext({}) as stats):
        run_samples(fp_block, caches.fp_in, out=caches.fp_out)
    check_finite(caches.fp_out, f"block {i} full-precision outputs")
    if finished:
        folded = resume_block(loop, i, block, setup)
        block_stats: dict[str, float | None] = {"resumed": 1.0, "calibration_seconds": state.block_seconds(i)}
    else:
        if caches.aug is not None:
            with phase("full-precision outputs"):
                run_samples(fp_block, caches.q_in, out=caches.aug)
        folded, block_stats = fit_block_and_save(loop, i, block, setup, stats, t0)
    with phase("quantized outputs"):
        mse = run_samples(lambda x: adapter.call_block(folded, x, ctx), caches.q_in, out=caches.q_in,
                          target=caches.fp_out)
    caches.next_block()
    if loop.loaded.lazy:  # the finished block lives in the run state only
        blocks[i] = held
    else:
        blocks[i] = to_model_dtype(folded, model_dtype).to("cpu")  # offload: one block on the device
    return {"block": i, "output_mse": mse, "seconds": round(time.perf_counter() - t0, 3), **block_stats}


def to_model_dtype(block: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A calibrated (float32) block's parameters in the model's dtype; static activation ranges stay float32."""
    for p in block.parameters():
        p.data = p.data.to(dtype)
    return block


def resume_block(loop: BlockLoop, i: int, block, setup: BlockSetup):
    """A finished block from the run state (see :func:`restore_block`), on the run's device."""
    return restore_block(loop.loaded.adapter, loop.state, i, block, setup).to(loop.job.device)


def restore_block(adapter, state: RunState, i: int, block, setup: BlockSetup):
    """A finished block, rebuilt from its prepared float32 full-precision ``block`` and loaded from the run state
    (its layers built with 16-bit weights: the quantized weights are in the state, whatever their format's kind)."""
    shell = BlockSetup(replace(setup.spec, w_bits=16, w_vq=None, w_format=None, lwc=False), rotations=setup.rotations,
                       affine_locations=setup.affine_locations)
    folded = adapter.finish_block(adapter.build_quant_block(block, shell).fold())
    saved = {k[len("block."):]: v for k, v in state.load_block(i).items() if k.startswith("block.")}
    restore_cluster_quantizers(folded, saved)  # RPTQ's per-cluster quantizers, saved with the block
    folded.load_state_dict(saved)
    return folded


def fit_block_and_save(loop: BlockLoop, i: int, block, setup: BlockSetup, stats, t0: float):
    """Build the quantized block, let the method calibrate it, fold it and save it (with its codes and learned
    tensors) as finished."""
    job, adapter, caches, ctx = loop.job, loop.loaded.adapter, loop.caches, loop.contexts[i]
    with phase("setup"):
        qblock = adapter.build_quant_block(block, setup, stats).to(job.device)
        observe_static_ranges(qblock, caches.q_in, ctx)
    resume = loop.state.begin_block(i, loop.fingerprints[i]) if job.world.main else None
    run = BlockRun(index=i, n_blocks=len(loop.contexts), ctx=ctx, device=job.device, precision=job.precision,
                   checkpoint_dir=loop.state.checkpoint_dir(i), resume_checkpoint=distributed.broadcast_object(resume),
                   logger=loop.logger, progress_bar=bool(job.cfg.trainer.enable_progress_bar) and job.world.main)
    data = BlockDataModule(caches.q_in, caches.fp_out, rank_batch(job, caches.q_in.total), caches.aug)
    with phase("method, other"):  # what the method's own phases do not cover
        calibrated = job.method.calibrate(qblock, data, run) or {}
    with phase("fold and save"):
        observe_static_ranges(qblock, caches.q_in, ctx)  # again: the learned transforms moved the ranges
        learned, learned_stats = qblock.learned_record()
        folded = adapter.finish_block(job.method.finalize(qblock))
        codes = {k: v for name, q in qblock.codes.items() for k, v in q.tensors(f"qweight.{name}").items()}
        formats = {name: format_record(q.fmt) for name, q in qblock.codes.items()}
        block_stats = {**learned_stats, **calibrated, "calibration_seconds": round(time.perf_counter() - t0, 3)}
        if job.world.main:
            loop.state.save_block(i, {**{f"block.{k}": v for k, v in folded.state_dict().items()}, **learned,
                                      **codes}, metadata={"formats": json.dumps(formats, sort_keys=True)},
                                  seconds=block_stats["calibration_seconds"], fingerprint=loop.fingerprints[i])
        # rank 0's block is the block: every rank goes on from the same weights and ranges
        distributed.broadcast_tensors_(list(folded.state_dict().values()))
    return folded, block_stats


# --- results ----------------------------------------------------------------------------------------------------


def stored_codes(state: RunState, adapter, model) -> dict[str, Any]:
    """Every quantized linear's stored codes, as saved with its finished block, keyed by its name in the model."""
    prefix = adapter.blocks_prefix(model)
    out: dict[str, Any] = {}
    for i in range(len(adapter.blocks(model))):
        tensors = state.load_block(i)
        for name, fmt in json.loads(state.block_metadata(i).get("formats", "{}")).items():
            out[f"{prefix}.{i}.{name}"] = read_codes(tensors, f"qweight.{name}", format_from_dict(fmt))
    return out


def stored_formats(state: RunState, adapter, model) -> dict[str, Any]:
    """Every quantized linear's format as its finished block recorded it, by name in the model."""
    prefix = adapter.blocks_prefix(model)
    return {f"{prefix}.{i}.{name}": format_from_dict(fmt) for i in range(len(adapter.blocks(model)))
            for name, fmt in json.loads(state.block_metadata(i).get("formats", "{}")).items()}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the job the config describes and return (and write) its results."""
    if cfg.method.get("evaluation_only"):
        return run_evaluation(cfg)
    return run_calibration(cfg)


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """``method=fp``: the model evaluated as loaded."""
    t_start = time.perf_counter()
    check_settings(cfg)
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.output_dir)
    loaded = load(cfg)
    t_loaded = time.perf_counter()
    results: dict[str, Any] = {"model": model_record(cfg, loaded), "method": str(cfg.method.name), "quant": None}
    results.update(evaluate(cfg, loaded, device))
    t_done = time.perf_counter()
    return finish(results, cfg, device, out_dir, OmegaConf.to_container(cfg, resolve=True),
                  {"load": t_loaded - t_start, "evaluate_fp": 0.0, "quantize": 0.0, "evaluate": t_done - t_loaded,
                   "total": t_done - t_start})


def model_record(cfg: DictConfig, loaded: LoadedModel) -> dict[str, Any]:
    return {"name": cfg.model.name, "path": loaded.source.location, "gguf_file": loaded.source.gguf_file,
            "dtype": cfg.model.dtype}


def finish(results: dict[str, Any], cfg: DictConfig, device: torch.device, out_dir: Path, config: dict,
           seconds: dict[str, float]) -> dict[str, Any]:
    results.update({
        "wall_seconds": {
            **{k: round(v, 3) for k, v in seconds.items() if k != "total"},
            # the blocks' calibration summed over the runs that did it (a resumed run counts its earlier work)
            "calibration": calibration_seconds(results.get("blocks")),
            "total": round(seconds["total"], 3),
        },
        "memory": peak_memory(device),
        "device": str(device),
        "environment": environment(),
        "config": config,
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", results)
    print(summary(results, out_dir))
    return results


def run_calibration(cfg: DictConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    job = prepare(cfg)
    job.memory_plan = plan = plan_run(job)
    if cfg.calib.get("dry_run", False):
        if job.world.main:
            print(plan.describe())
        return {"memory_plan": plan.to_dict()}
    if job.world.main:
        log.info("%s", plan.describe())
    check_cache_memory(job, plan.sizes.hidden, plan.sizes.dtype)
    check_memory_plan(job, plan)
    torch.manual_seed(int(cfg.seed))
    loaded = load(cfg)
    model, adapter = loaded.model, loaded.adapter
    traits = model_traits(loaded)
    job.method.check_model(traits)
    for p in job.passes:
        p.check_model(traits)
    shapes = linear_shapes(model, adapter)  # before quantization swaps the linears
    if job.mixed is None:
        check_formats_fit(shapes, job.spec.weight_format)
    setup = with_rotations(job.method.setup(job.spec, traits), job.rotation)
    adapter.check_setup(model, setup)
    config = model.config.to_dict()
    layout = adapter.gguf_layout(config)
    request = ExportRequest(job.spec, frozenset(for_shape(job.spec.weight_format, *shape) for shape in shapes.values()),
                            adapter.fused_experts,
                            frozenset(shapes.values()), online_transforms(job.spec, setup, job.rotation, traits),
                            config.get("model_type"), layout, bool(adapter.checkpoint_prefixes(config)))
    for formats in export_checks(job, request):
        check_export(job.export_format, replace(request, formats=formats))
    check_seqlen(int(cfg.eval.seqlen), loaded, "eval")
    windows = calibration_data(cfg, loaded)
    distributed.start(job.device, float(cfg.calib.get("dist_timeout_minutes", 60)))
    try:
        with contextlib.ExitStack() as held:  # rank 0 alone locks the folder and writes the run's log
            distributed.main_first(lambda: (held.enter_context(OutputLock(job.out_dir)),
                                            held.enter_context(run_log(job.out_dir))))
            return calibrate_and_evaluate(job, loaded, setup, shapes, request, windows, t_start)
    finally:
        distributed.stop()


def export_checks(job: Job, request: ExportRequest) -> list[frozenset]:
    """The sets of weight formats the export is asked to hold before any work. A plan still to be allocated
    (sensitivities cost minutes to hours) may pick any candidate, so each quantized one is asked alone (a float
    candidate such as F16 beside them needs no asking); a plan the user gives, and any plan's mix of formats, is
    checked once it is known, before calibration."""
    if job.mixed is None:
        return [request.formats]
    if job.mixed.plan:
        return []
    quantized = [c for c in job.mixed.candidates if c.quantized]
    return [frozenset({c}) for c in quantized] or [frozenset(job.mixed.candidates)]


def calibrate_and_evaluate(job: Job, loaded: LoadedModel, setup: BlockSetup,
                           shapes: Mapping[str, tuple[int, int]], request: ExportRequest, windows: torch.Tensor,
                           t_start: float) -> dict[str, Any]:
    """The work of a checked run, in its locked output folder: the model-level stage, the block loop, evaluation,
    export, results."""
    cfg, model, adapter = job.cfg, loaded.model, loaded.adapter
    state = open_state(job)
    ctx = PassContext(model, adapter, windows, job.device, job.out_dir, shapes)
    pass_results = run_passes(job.passes, ctx, state)
    to_cpu(loaded)
    planned = {}  # per linear: a pass's format (a bit plan), else the spec's
    for r in pass_results.values():
        planned.update(r.formats or {})
    formats = {n: for_shape(planned.get(n, job.spec.weight_format), *shapes[n]) for n in shapes}
    if job.mixed is not None:
        check_export(job.export_format, replace(request, formats=frozenset(formats.values())))
    prefix = adapter.blocks_prefix(model)
    per_block = {i: {n[len(f"{prefix}.{i}."):]: f for n, f in formats.items() if n.startswith(f"{prefix}.{i}.")}
                 for i in range(len(adapter.blocks(model)))}
    digests = {name: r.digest() for name, r in pass_results.items()}
    fingerprints = {i: block_fingerprint(job, setup, f, digests) for i, f in per_block.items()}
    check_finished_blocks(state, fingerprints, bool(cfg.calib.get("recalibrate_changed", False)), prefix)
    for name, r in pass_results.items():
        state.save_pass(name, r)
    t_loaded = time.perf_counter()

    results: dict[str, Any] = {"model": model_record(cfg, loaded), "method": job.method.name,
                               "quant": {"name": job.quant_name, **job.spec.to_dict()}}
    if job.world.size > 1:  # how many ranks calibrated (not a result-deciding setting: any world size resumes)
        results["ranks"] = {"world_size": job.world.size, "per_node": job.world.local_size}
    if job.memory_plan is not None:  # beside the measured peaks (``memory``)
        results["memory_plan"] = job.memory_plan.to_dict()
    if cfg.eval.fp_baseline and job.world.main:  # the other ranks wait at the block loop's first exchange
        results.update({f"{k}_fp": v for k, v in evaluate(cfg, loaded, job.device).items()})
    t_q0 = time.perf_counter()
    logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True), job.out_dir,
                          f"{cfg.model.name}-{job.method.tag}", job.config) if job.world.main else None
    loop_parts = dict(job=job, loaded=loaded, setup=setup, formats=per_block, fingerprints=fingerprints, state=state,
                      logger=logger)
    with distributed.guard("the block loop"):
        results["blocks"] = calibrate_blocks(loop_parts, windows)
    if not job.world.main:  # rank 0 evaluates, exports and writes the results
        return {"rank": job.world.rank, "blocks": results["blocks"]}
    results["calibration_phases"] = phase_totals(results["blocks"])
    results["method_settings"] = job.method.describe()
    t_quant = time.perf_counter()
    written = stored_formats(state, adapter, model)
    results["bits_per_weight"] = round(bits_per_weight(shapes, written), 4)
    for name, r in pass_results.items():
        results[name] = r.info
    quantized = restored_blocks(loaded, state, setup, per_block, job.device) if loaded.lazy else None
    results.update(evaluate(cfg, loaded, job.device, quantized))
    export_results(job, loaded, setup, state, written, results, quantized)
    table = [{"corpus": c, "fp": results.get("perplexity_fp", {}).get(c, {}).get("perplexity"),
              job.method.name: r["perplexity"]} for c, r in results["perplexity"].items()]
    metrics = {f"ppl/{c}": r["perplexity"] for c, r in results["perplexity"].items()}
    metrics |= {f"zero_shot/{t}/{m}": v for t, r in results.get("zero_shot", {}).items()
                for m, v in r.items() if m in ("acc", "acc_norm", "perplexity")}
    log_summary(logger, metrics, table)
    t_done = time.perf_counter()
    return finish(results, cfg, job.device, job.out_dir, job.config,
                  {"load": t_loaded - t_start, "evaluate_fp": t_q0 - t_loaded, "quantize": t_quant - t_q0,
                   "evaluate": t_done - t_quant, "total": t_done - t_start})


def open_state(job: Job) -> RunState:
    """The run state: rank 0 opens (or starts) it; the other ranks hold rank 0's record of the finished blocks (so
    that every rank resumes the same blocks) and never write."""
    state = distributed.main_first(lambda: RunState.open(job.out_dir, job.config))
    record = distributed.broadcast_object((state.finished, state.passes) if job.world.main else None)
    return state if job.world.main else RunState.follow(job.out_dir, job.config, record)


def phase_totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The block loop's time in this run, phase by phase, summed over its blocks (the largest first); a block
    finished by an earlier run counts only what it cost this one (its outputs)."""
    total: dict[str, float] = {}
    for r in records:
        total = add_phases(total, r.get("phases", {}))
    return {"blocks_calibrated": sum(1 for r in records if not r.get("resumed")),
            "seconds": {k: round(v, 3) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}}


def export_results(job: Job, loaded: LoadedModel, setup: BlockSetup, state: RunState, written: Mapping[str, Any],
                   results: dict[str, Any], block_at: Callable[[int], torch.nn.Module] | None = None) -> None:
    """The fake-quant model (always), and the packed checkpoint ``export.format`` names, from the stored codes;
    a lazily held model's blocks come from ``block_at`` one at a time."""
    extra: dict[str, Any] = {"method": job.method.name, "model": job.cfg.model.name}
    if job.mixed is not None:  # the bits of each layer
        extra["formats"] = {n: f.to_dict() for n, f in sorted(written.items())}
    if job.rotation is not None:  # what load_fake_quant re-attaches
        extra["rotation"] = {"settings": asdict(job.rotation), "hidden": loaded.adapter.hidden_size(loaded.model)}
    if setup.affine_locations:
        extra["affine_locations"] = list(setup.affine_locations)
    fake_dir = job.out_dir / "model"
    with loaded.head_loaded():
        results["export"] = str(save_fake_quant(loaded.model, loaded.tokenizer, job.spec, fake_dir, extra,
                                                loaded.adapter, name=job.quant_name, block_at=block_at))
    if job.export_format != "fake":
        codes = stored_codes(state, loaded.adapter, loaded.model)
        packed = write_export(job.export_format, fake_dir, codes, job.spec,
                              job.out_dir / f"model-{job.export_format}", job.export_dtype,
                              online_kinds(loaded.model, job.spec.quantizes_activations or job.spec.quantizes_kv),
                              tuple(online_inputs(loaded.model)))
        results["export_packed"] = {"format": job.export_format, "path": str(packed),
                                    **export_sizes(packed, loaded.model)}

