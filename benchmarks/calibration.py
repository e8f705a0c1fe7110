"""Seconds per block-epoch and peak memory of OmniQuant block calibration, fused kernels vs the reference.

    python benchmarks/calibration.py                       # CUDA: LLaMA-2-7B-shaped block, 128 x 2048 tokens,
                                                           # W4A16 (LWC) and W4A4 (LWC + LET)
    python benchmarks/calibration.py --shape small         # CPU-sized block (hidden 512), 256-token samples
    python benchmarks/calibration.py --profile out.json    # also a torch.profiler trace and its top ops

The block has random weights (timing does not depend on them). One calibration = ``Trainer.fit`` of a
``BlockLightningModule`` over ``--nsamples`` cached samples, as the pipeline runs it, with the recipe
``--recipe``; the reported time is the median epoch after the first (warm-up) epoch, projected to a
whole model (``--blocks`` x ``--model-epochs``). On CUDA it runs twice, with the fused extension and with
``OMNIQ_DISABLE_CUDA_EXT=1`` (the reference); on CPU only the reference exists.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from omniq_lightning.calib import ActivationCache, BlockDataModule, BlockRun, observe_linear_inputs
from omniq_lightning.methods import ModelTraits, OmniQuant
from omniq_lightning.models import BlockContext, LlamaAdapter
from omniq_lightning.quant import QuantSpec
from omniq_lightning.quant import cuda as cuda_ext
from omniq_lightning.transforms import BlockSetup

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "small": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8),
}
PRESETS = {"w4a4": QuantSpec(w_bits=4, a_bits=4, kv_bits=4), "w4a16": QuantSpec(w_bits=4),
           "w4a16g128": QuantSpec(w_bits=4, w_group_size=128)}


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)


def build(shape: str, seqlen: int, nsamples: int, device: torch.device, spec: QuantSpec, batch_size: int = 1):
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seqlen, 2048), attn_implementation="sdpa")
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, layer_idx=0).to(device).eval()
    rope = LlamaRotaryEmbedding(cfg).to(device)
    x = torch.randn(nsamples, seqlen, cfg.hidden_size, device=device)
    pos = torch.arange(seqlen, device=device)[None]
    ctx = BlockContext({"position_embeddings": rope(x[:1], pos), "position_ids": pos, "attention_mask": None})
    adapter = LlamaAdapter()
    inputs = ActivationCache(nsamples, (seqlen, cfg.hidden_size), torch.float16, device, where="auto")
    targets = ActivationCache(nsamples, (seqlen, cfg.hidden_size), torch.float16, device, where="auto")
    with torch.no_grad(), observe_linear_inputs(block) as stats:
        for i in range(nsamples):
            inputs[i] = x[i]
            targets[i] = adapter.call_block(block, x[i : i + 1], ctx)[0]
    setup = BlockSetup(spec, scale_locations=() if spec.weight_only else ("norm", "vo", "qk"))
    qblock = adapter.build_quant_block(block, setup, stats)
    return qblock, ctx, BlockDataModule(inputs, targets, batch_size=batch_size)


def measure(args, device: torch.device, fused: bool) -> dict:
    os.environ["OMNIQ_DISABLE_CUDA_EXT"] = "0" if fused else "1"
    cuda_ext.load_extension.cache_clear()
    spec = PRESETS[args.quant]
    qblock, ctx, data = build(args.shape, args.seqlen, args.nsamples, device, spec, args.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = EpochTimer()
    precision = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if device.type == "cuda" else "32-true"
    with tempfile.TemporaryDirectory() as tmp:
        run = BlockRun(index=0, n_blocks=1, ctx=ctx, device=device, precision=precision, checkpoint_dir=Path(tmp),
                       resume_checkpoint=None, progress_bar=False, callbacks=[timer])
        method = OmniQuant(recipe=args.recipe, epochs=args.epochs, let=not spec.weight_only)
        method.setup(spec, ModelTraits("llama"))
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                method.calibrate(qblock, data, run)
            prof.export_chrome_trace(f"{args.profile}.{args.quant}.{'fused' if fused else 'reference'}.json")
            sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=15))
        else:
            method.calibrate(qblock, data, run)
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    steady = timer.times[1:] or timer.times
    return {"epoch_s": statistics.median(steady), "peak_gib": peak, "path": "fused" if fused else "reference",
            "extension": cuda_ext.load_extension() is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--quant", nargs="+", choices=sorted(PRESETS), default=["w4a16", "w4a4"])
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=32, help="blocks of the model the projection is for")
    ap.add_argument("--model-epochs", type=int, default=20, help="epochs of the projected calibration")
    ap.add_argument("--profile", default=None, help="write torch.profiler traces with this path prefix")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.shape = args.shape or ("llama2-7b" if gpu else "small")
    args.seqlen = args.seqlen or (2048 if gpu else 256)
    args.nsamples = args.nsamples or (128 if gpu else 8)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; block {args.shape}; {args.nsamples} samples x {args.seqlen} tokens; batch "
          f"{args.batch_size}; {args.epochs} epochs; recipe {args.recipe}; torch {torch.__version__}")
    print(f"| setting | path | s / block-epoch | s / sample | peak memory GiB | projected {args.blocks} blocks x "
          f"{args.model_epochs} epochs |")
    print("|---|---|---|---|---|---|")
    for quant in args.quant:
        args.quant = quant
        rows = [measure(args, device, fused=True)] if gpu else []
        rows.append(measure(args, device, fused=False))
        for r in rows:
            label = r["path"] + ("" if r["path"] == "reference" or r["extension"] else " (extension did not load)")
            total = r["epoch_s"] * args.blocks * args.model_epochs
            print(f"| {quant} | {label} | {r['epoch_s']:.3f} | {r['epoch_s'] / args.nsamples:.4f} | "
                  f"{r['peak_gib']:.2f} | {total / 60:.1f} min |")
        if len(rows) == 2:
            print(f"speedup of the fused path at {quant}: {rows[1]['epoch_s'] / rows[0]['epoch_s']:.2f}x")


if __name__ == "__main__":
    main()
