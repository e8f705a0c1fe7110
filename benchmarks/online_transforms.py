"""What the online transforms cost at inference: forward time per token of a SmolLM2-135M-shaped block (hidden 576,
MLP 1536, 9 heads of 64, 3 KV heads) at 16 bits, without and with the transforms that run online.

    python benchmarks/online_transforms.py                 # CPU, float32, 1 token (decode) and 512 (prefill)
    python benchmarks/online_transforms.py --device cuda --dtype bfloat16

Variants: ``plain`` (R1 and R2 fold into the weights: no cost), ``R3`` (every query and key head after RoPE),
``R4`` (before the down projection), ``quarot`` (both), ``affine`` (learned Kronecker transforms before q/k/v,
gate/up and down: each reader applies it, as the fake-quant model does; a deployment applies it once per site),
and ``quarot+affine``.
Median of ``--repeats`` timed forwards after warm-up; the overhead is relative to ``plain``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omniq_lightning.models import LlamaAdapter  # noqa: E402
from omniq_lightning.models.base import BlockContext  # noqa: E402
from omniq_lightning.quant import QuantSpec  # noqa: E402
from omniq_lightning.transforms import BlockSetup, OnlineRotations  # noqa: E402
from omniq_lightning.transforms.affine import AFFINE_LOCATIONS  # noqa: E402

VARIANTS = {
    "plain": {},
    "R3 (queries and keys)": {"rotations": OnlineRotations(qk=True, down=False)},
    "R4 (down input)": {"rotations": OnlineRotations(qk=False, down=True)},
    "quarot (R3 + R4)": {"rotations": OnlineRotations(qk=True, down=True)},
    "affine": {"affine_locations": AFFINE_LOCATIONS},
    "quarot + affine": {"rotations": OnlineRotations(qk=True, down=True), "affine_locations": AFFINE_LOCATIONS},
}


def smollm2_block(device, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, max_position_embeddings=2048, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaDecoderLayer(cfg, layer_idx=0).to(device).eval(), LlamaRotaryEmbedding(cfg).to(device)


def time_forward(fn, repeats: int, device) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 512])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    block, rope = smollm2_block(device, dtype)
    adapter = LlamaAdapter()
    spec = QuantSpec(w_bits=16, lwc=False, kv_bits=16)
    built = {}
    for name, extra in VARIANTS.items():
        qb = adapter.build_quant_block(adapter.prepare_block(copy.deepcopy(block)), BlockSetup(spec, **extra))
        built[name] = adapter.finish_block(qb.fold()).to(device=device, dtype=dtype)
    print(f"device {device} ({torch.get_num_threads()} threads), {args.dtype}, SmolLM2-135M-shaped block, "
          f"median of {args.repeats}")
    print("| tokens | variant | ms per forward | us per token | overhead |")
    print("|---|---|---|---|---|")
    for n in args.tokens:
        x = torch.randn(1, n, 576, device=device, dtype=dtype)
        pos = torch.arange(n, device=device)[None]
        ctx = BlockContext({"position_embeddings": tuple(t.to(dtype) for t in rope(x, pos)), "position_ids": pos,
                            "attention_mask": None})
        base = None
        for name, b in built.items():
            t = time_forward(lambda b=b, x=x, ctx=ctx: adapter.call_block(b, x, ctx), args.repeats, device)
            base = base or t
            print(f"| {n} | {name} | {t * 1e3:.3f} | {t / n * 1e6:.1f} | {100 * (t / base - 1):+.0f}% |")


if __name__ == "__main__":
    main()
