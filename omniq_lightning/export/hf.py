"""Fake-quant models in Hugging Face format (safetensors), loadable by ``transformers`` as they are.

Weights are stored already quantized and folded (LWC clipping and LET transforms included), so a
weight-only model is an ordinary checkpoint: ``AutoModelForCausalLM.from_pretrained`` reproduces its
perplexity. ``omniq_quant.json`` records the quantization; for weight-activation settings,
:func:`load_fake_quant` re-attaches the activation and KV quantizers that plain ``transformers`` lacks.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors import safe_open

from omniq_lightning.io import write_json
from omniq_lightning.quant import QuantSpec

MANIFEST = "omniq_quant.json"


def save_fake_quant(model, tokenizer, spec: QuantSpec, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write the model, tokenizer and manifest to ``path`` (complete or not at all: written beside, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / MANIFEST, {"format": "omniq-fake-quant-v1", "quant": spec.to_dict(), "name": spec.name,
                                **(extra or {})})
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: {path} is not an omniq-lightning fake-quant export")
    return json.loads(f.read_text())


def load_fake_quant(path: str | os.PathLike, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """Load an export with its runtime quantizers (activations, KV cache) attached."""
    from omniq_lightning.models import load_model

    loaded = load_model(str(path), dtype=dtype, attn_implementation=attn_implementation)
    spec = QuantSpec(**read_manifest(path)["quant"])
    if spec.weight_only:
        return loaded
    runtime = replace(spec, w_bits=16, lwc=False)  # weights are already quantized in the file
    blocks = loaded.adapter.blocks(loaded.model)
    for i in range(len(blocks)):
        blocks[i] = loaded.adapter.quantize_block(blocks[i], runtime).fold()
    static = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            static.update({k: sf.get_tensor(k) for k in sf.keys() if ".act_quant." in k})
    if static:
        loaded.model.load_state_dict(static, strict=False)
    return loaded
