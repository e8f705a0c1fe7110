"""Fused CUDA fake-quant vs the eager PyTorch reference on LLaMA-2-7B shapes.

    python benchmarks/fake_quant.py                  # on a CUDA machine: fused and reference
    python benchmarks/fake_quant.py --device cpu     # reference only, smaller shapes

Reports the median time of forward and forward+backward, effective GB/s (bytes that must move:
read the input once, write the output once; backward also reads the upstream gradient and writes the
input gradient), that bandwidth as a fraction of the device's measured copy bandwidth, and the
speedup of the fused kernels. Prints a Markdown table to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from omniq_lightning.quant import WeightFormat
from omniq_lightning.quant import functional as F
from omniq_lightning.quant import weight as W
from omniq_lightning.quant.cuda import load_extension
from omniq_lightning.quant.ops import fake_quant_per_token, fake_quant_weight

GPU_CASES = [
    ("weight 4096x4096 g128", "weight", (4096, 4096), 128),
    ("weight 4096x4096 per-channel", "weight", (4096, 4096), None),
    ("weight 11008x4096 g128", "weight", (11008, 4096), 128),
    ("weight 11008x4096 per-channel", "weight", (11008, 4096), None),
    ("act 2048x4096 per-token", "token", (2048, 4096), None),
]
CPU_CASES = [
    ("weight 1024x1024 g128", "weight", (1024, 1024), 128),
    ("weight 1024x1024 per-channel", "weight", (1024, 1024), None),
    ("act 512x1024 per-token", "token", (512, 1024), None),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = median_seconds(lambda: dst.copy_(src), device, repeats=20)
    return 2 * nbytes / t / 1e9


def make_fn(kind, shape, group, dtype, device, fused, backward, bits=4):
    x = torch.randn(shape, device=device, dtype=dtype) * 0.05
    x.requires_grad_(backward)
    n_groups = shape[0] * shape[1] // (group or shape[1])
    gamma = torch.full((n_groups,), 4.0, device=device, requires_grad=backward)
    beta = torch.full((n_groups,), 4.0, device=device, requires_grad=backward)
    dy = torch.randn(shape, device=device, dtype=dtype)

    fmt = WeightFormat(bits, group)

    def forward():
        if kind == "weight":
            if fused:
                return fake_quant_weight(x, fmt, gamma, beta)
            return W.reference_fake_quant_weight(x, fmt, gamma, beta)
        return fake_quant_per_token(x, 8) if fused else F.reference_fake_quant_per_token(x, 8)

    def step():
        with torch.set_grad_enabled(backward):
            y = forward()
            if backward:
                x.grad = gamma.grad = beta.grad = None
                y.backward(dy)

    bytes_moved = x.numel() * x.element_size() * (4 if backward else 2)
    return step, bytes_moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    use_fused = device.type == "cuda" and load_extension() is not None
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bw = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 27))
    print(f"device: {name}; dtype {args.dtype}; measured copy bandwidth {bw:.0f} GB/s; torch {torch.__version__}")
    if not use_fused:
        print("fused kernels unavailable on this device: timing the reference only")
    print("| case | pass | reference ms | fused ms | fused GB/s | % of copy BW | speedup |")
    print("|---|---|---|---|---|---|---|")
    for label, kind, shape, group in cases:
        for backward in (False, True):
            ref_fn, nbytes = make_fn(kind, shape, group, dtype, device, fused=False, backward=backward)
            t_ref = median_seconds(ref_fn, device, args.repeats)
            pass_name = "fwd+bwd" if backward else "fwd"
            if use_fused:
                fused_fn, _ = make_fn(kind, shape, group, dtype, device, fused=True, backward=backward)
                t_f = median_seconds(fused_fn, device, args.repeats)
                gbs = nbytes / t_f / 1e9
                print(
                    f"| {label} | {pass_name} | {t_ref * 1e3:.3f} | {t_f * 1e3:.3f} | {gbs:.0f} | "
                    f"{100 * gbs / bw:.0f}% | {t_ref / t_f:.1f}x |"
                )
            else:
                print(f"| {label} | {pass_name} | {t_ref * 1e3:.3f} | - | - | - | - |")


if __name__ == "__main__":
    main()
