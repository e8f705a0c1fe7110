"""Weight and KV-cache memory of a model at batch x sequence length, in FP16 and quantized settings.

    python benchmarks/kv_memory.py                                   # OPT-66B at 64 x 8192, LLaMA-2-70B, Llama-3-8B
    python benchmarks/kv_memory.py --config path/to/config.json --batch 8 --seqlen 4096
    python benchmarks/kv_memory.py --settings w4a16 w4a4kv w3a3kv w4a16g128

Computed from the model's config (a Hugging Face ``config.json`` or the built-in ones below), nothing loaded:
- weights: every linear of every block in the setting's weight format, its bits counted exactly by
  ``WeightFormat.storage_bits`` (codes, a 16-bit scale per group or channel, the zero point of asymmetric
  grids); embeddings, the LM head (unless tied) and norms in FP16, as this project quantizes them;
- KV cache: K and V of every layer for every token of the batch, ``2 x layers x batch x seqlen x kv_heads x
  head_dim`` values at the setting's ``kv_bits``, plus for quantized caches a 16-bit scale and zero point per
  token and head (per-token ranges; static per-cluster ranges, RPTQ's, cost nothing per token, so this is an
  upper bound).
GB here are 10^9 bytes (GiB in brackets).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from omniq_lightning.quant.spec import NO_QUANT_BITS, SCALE_BITS, QuantSpec  # noqa: E402

# Public configs (facebook/opt-66b, meta-llama/Llama-2-70b-hf, meta-llama/Meta-Llama-3-8B), the fields used here.
MODELS = {
    "opt-66b": {"model_type": "opt", "num_hidden_layers": 64, "hidden_size": 9216, "num_attention_heads": 72,
                "ffn_dim": 36864, "vocab_size": 50272, "max_position_embeddings": 2048, "tie_word_embeddings": True},
    "llama-2-70b": {"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 32000,
                    "tie_word_embeddings": False},
    "llama-3-8b": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                   "tie_word_embeddings": False},
}
DEFAULT_RUNS = [("opt-66b", 64, 8192), ("llama-2-70b", 64, 8192), ("llama-3-8b", 64, 8192)]
SETTINGS = ["fp16", "w4a16", "w4a4kv", "w3a3kv"]
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "quant"


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    gated: bool  # SwiGLU (gate, up, down) or a two-layer MLP (fc1, fc2)
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict) -> Shape:
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        gated = c.get("model_type") != "opt"
        ffn = int(c["intermediate_size"] if gated else c["ffn_dim"])
        return cls(layers=int(c["num_hidden_layers"]), hidden=hidden, heads=heads,
                   kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or hidden // heads), ffn=ffn, gated=gated,
                   vocab=int(c["vocab_size"]), tied=bool(c.get("tie_word_embeddings", False)))

    def block_linears(self) -> list[tuple[int, int]]:
        """(out, in) of one block's linears."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = [(q, self.hidden), (kv, self.hidden), (kv, self.hidden), (self.hidden, q)]
        mlp = [(self.ffn, self.hidden)] * (2 if self.gated else 1) + [(self.hidden, self.ffn)]
        return attn + mlp

    def fp16_params(self) -> int:
        """Parameters kept in 16 bits: embeddings, LM head (unless tied), norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


def weight_bytes(shape: Shape, spec: QuantSpec) -> float:
    fmt = spec.weight_format
    bits = shape.layers * sum(fmt.storage_bits(o, i) for o, i in shape.block_linears())
    return (bits + NO_QUANT_BITS * shape.fp16_params()) / 8


def kv_bytes(shape: Shape, kv_bits: int, batch: int, seqlen: int) -> float:
    vectors = 2 * shape.layers * batch * seqlen * shape.kv_heads  # one per token, head, K or V
    bits = vectors * shape.head_dim * kv_bits
    if kv_bits < NO_QUANT_BITS:
        bits += vectors * 2 * SCALE_BITS  # scale and zero point per token and head
    return bits / 8


def spec_for(setting: str) -> QuantSpec:
    """``fp16``, or a preset of ``configs/quant`` (its weight format and kv_bits)."""
    if setting == "fp16":
        return QuantSpec(w_bits=NO_QUANT_BITS, a_bits=NO_QUANT_BITS, kv_bits=NO_QUANT_BITS)
    path = PRESETS / f"{setting}.yaml"
    if not path.is_file():
        raise SystemExit(f"unknown setting {setting!r}: use fp16 or one of {sorted(p.stem for p in PRESETS.glob('*.yaml'))}")
    return QuantSpec.from_config(OmegaConf.load(path))


def table(name: str, config: dict, batch: int, seqlen: int, settings: list[str]) -> str:
    shape = Shape.from_config(config)
    rows = [f"**{name}** (batch {batch} x {seqlen} tokens; {shape.layers} layers, hidden {shape.hidden}, "
            f"{shape.kv_heads} KV heads of {shape.heads})", "",
            "| setting | weights GB | KV cache GB | total GB | saved against fp16 GB | saved against w4a16 GB |",
            "|---|---|---|---|---|---|"]
    w4a16 = spec_for("w4a16")
    ref = weight_bytes(shape, w4a16) + kv_bytes(shape, w4a16.kv_bits, batch, seqlen)
    totals = {}
    for s in settings:
        spec = spec_for(s)
        w, kv = weight_bytes(shape, spec), kv_bytes(shape, spec.kv_bits, batch, seqlen)
        totals[s] = w + kv
        saved = totals.get("fp16", totals[s]) - totals[s]
        rows.append(f"| {s} | {w / 1e9:.1f} | {kv / 1e9:.1f} | {(w + kv) / 1e9:.1f} ({(w + kv) / 2**30:.0f} GiB) "
                    f"| {saved / 1e9:.1f} | {(ref - totals[s]) / 1e9:.1f} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="a Hugging Face config.json (default: the built-in models)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--settings", nargs="+", default=SETTINGS,
                    help="fp16, w4a16, w4a4kv, w3a3kv, or any preset of configs/quant")
    args = ap.parse_args()
    if args.config is not None:
        if not args.config.is_file():
            raise SystemExit(f"config {args.config} not found: pass a model's config.json")
        runs = [(args.config.parent.name, json.loads(args.config.read_text()), args.batch or 1, args.seqlen or 2048)]
    else:
        runs = [(m, MODELS[m], args.batch or b, args.seqlen or s) for m, b, s in DEFAULT_RUNS]
    for name, config, batch, seqlen in runs:
        print(table(name, config, batch, seqlen, args.settings))


if __name__ == "__main__":
    main()
