"""VPTQ on the block rails: each linear's weight vector-quantized onto Hessian-weighted k-means codebooks, column
by column with GPTQ's second-order error feedback (``quant/vq.py``). The format (vector length, codebook sizes,
residual, outliers, normalisation) is the spec's ``w_vq`` (``quant=vq2|vq3|vq4``); this method decides how it
is fitted. Hessians come from the block's calibration inputs, as for GPTQ (``solvers.collect_hessians``).

Not combined with OmniQuant's LET or LWC: LWC clips a scalar grid, which a codebook has no use for, and the
released LLaMA weight-only recipe leaves LET off. Codebook fine-tuning on the block output is not done (the
released VPTQ code dropped it too).
"""

from __future__ import annotations

import time
from dataclasses import replace

from omniq_lightning.calib.phases import phase
from omniq_lightning.methods.base import DataNeeds, Method
from omniq_lightning.quant.gptq import check_damp
from omniq_lightning.quant.vq import vq_quantize
from omniq_lightning.solvers import collect_hessians, weight_linears
from omniq_lightning.transforms import BlockSetup


class VPTQ(Method):
    name = "vptq"

    def __init__(self, damp: float = 0.01, blocksize: int = 128, permute: bool = True, kmeans_iters: int = 50,
                 seed: int = 0, **label) -> None:
        super().__init__(**label)
        self.damp = check_damp(damp)
        if blocksize < 1:
            raise ValueError(f"method.blocksize must be positive, got {blocksize}")
        if kmeans_iters < 0:
            raise ValueError(f"method.kmeans_iters must be 0 or more, got {kmeans_iters}")
        self.blocksize, self.permute, self.kmeans_iters, self.seed = blocksize, bool(permute), kmeans_iters, seed

    def format_needs(self) -> frozenset[str]:
        return frozenset({"codebook"})

    def data_needs(self) -> DataNeeds:
        return DataNeeds(moment_bytes=8)  # float64 input Hessians of the block's linears, all at once

    def setup(self, spec, traits) -> BlockSetup:
        return BlockSetup(replace(spec, lwc=False))

    def calibrate(self, qblock, data, run) -> dict[str, float]:
        qblock.fold_transforms()
        with phase("gptq hessians"):
            hessians = collect_hessians(qblock, data.inputs, run.ctx)
        seconds, without_tokens = [], 0
        for name, lin in weight_linears(qblock).items():
            t0 = time.perf_counter()
            acc = hessians[name]
            without_tokens += acc.n == 0
            with phase("vq rounding"):
                q = vq_quantize(lin.weight, acc.H if acc.n else None, lin.fmt, self.damp, self.blocksize,
                                self.permute, self.kmeans_iters, self.seed)
            lin.set_codes(q)
            seconds.append(time.perf_counter() - t0)
        stats = {"vq_seconds": round(sum(seconds), 3), "vq_seconds_per_linear": round(sum(seconds) / len(seconds), 3)}
        if without_tokens:
            stats["linears_without_tokens"] = float(without_tokens)
        return stats

    def describe(self) -> dict:
        return {"damp": self.damp, "blocksize": self.blocksize, "permute": self.permute,
                "kmeans_iters": self.kmeans_iters, "seed": self.seed}
