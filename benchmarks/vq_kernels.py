"""VQ kernels on a GPU: the codebook-lookup GEMV and the dequantization kernel against a dense fp16 matmul.

    python benchmarks/vq_kernels.py                 # needs a CUDA device and the built extension

For each linear shape (SmolLM2-135M's and LLaMA-2-7B's), a random weight is vector-quantized in the vq2 and
vq3 formats (the codebooks and indices are what matters for speed, not their quality), then timed with CUDA
events, median of 200 calls after 20 warm-up calls: ``x [tokens, in] @ W^T`` by the GEMV (1 and 8 tokens),
by a dense fp16 ``F.linear`` on the already dequantized weight, and the dequantization kernel alone.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omniq_lightning.nn.vq_linear import dequantize_with_kernel, gemv_with_kernel  # noqa: E402
from omniq_lightning.quant.cuda import status  # noqa: E402
from omniq_lightning.quant.spec import VectorFormat  # noqa: E402
from omniq_lightning.quant.vq import vq_quantize  # noqa: E402

SHAPES = {"smollm2 q/o 576x576": (576, 576), "smollm2 up 1536x576": (1536, 576), "smollm2 down 576x1536": (576, 1536),
          "llama2-7b q 4096x4096": (4096, 4096), "llama2-7b up 11008x4096": (11008, 4096),
          "llama2-7b down 4096x11008": (4096, 11008)}
FORMATS = {"vq2": VectorFormat(4, 256), "vq3": VectorFormat(4, 256, residual_centroids=16)}


def median_ms(fn, warmup: int = 20, iters: int = 200) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = ["| shape | format | tokens | GEMV ms | dense fp16 ms | GEMV / dense | dequantize ms |", "|---|---|---|---|---|---|---|"]
    for label, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f) * 0.02
        for name, fmt in FORMATS.items():
            q = vq_quantize(w, None, fmt, iters=3).to("cuda")  # no Hessian: codebooks by plain k-means
            if dequantize_with_kernel(q) is None:
                raise SystemExit(f"the CUDA extension is not available: {status()}")
            dense = q.dequantize().half()
            t_deq = median_ms(lambda q=q: dequantize_with_kernel(q))
            for tokens in (1, 8):
                x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
                t_gemv = median_ms(lambda x=x, q=q: gemv_with_kernel(x, q))
                t_dense = median_ms(lambda x=x, d=dense: F.linear(x, d))
                rows.append(f"| {label} | {name} | {tokens} | {t_gemv:.4f} | {t_dense:.4f} | {t_gemv / t_dense:.2f} "
                            f"| {t_deq:.4f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
