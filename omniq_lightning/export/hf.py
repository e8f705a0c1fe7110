"""Fake-quant models in Hugging Face format (safetensors), loadable by ``transformers`` as they are.

Weights are stored already quantized and folded (LWC clipping and LET transforms included), in the model's own
layout (MoE experts fused as transformers keeps them), so a weight-only model is an ordinary checkpoint:
``AutoModelForCausalLM.from_pretrained`` reproduces its perplexity. ``omniq_quant.json`` records the
quantization; for weight-activation settings, :func:`load_fake_quant` re-attaches the activation and KV
quantizers that plain ``transformers`` lacks (static ranges from ``omniq_runtime.safetensors``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omniq_lightning.io import plain_modes, write_json
from omniq_lightning.nn.act import restore_cluster_quantizers
from omniq_lightning.quant import QuantSpec
from omniq_lightning.transforms import BlockSetup, OnlineRotations

MANIFEST = "omniq_quant.json"
RUNTIME_MODULES = ("act_quant", "q_quant", "k_quant", "v_quant", "input_transform")


def is_runtime_state(key: str) -> bool:
    """Whether a state-dict key belongs to what runs beside the weights: an activation or key/value quantizer
    (static ranges, clusters) or an online input transform (a learned affine transform's factors)."""
    return any(f".{q}." in key for q in RUNTIME_MODULES)


RUNTIME = "omniq_runtime.safetensors"  # static activation ranges, by module name in the quantized layout


@contextlib.contextmanager
def without_input_transforms(model):
    """While active, the online input transforms are off the model (their state goes to the runtime file only)."""
    held = [(m, m.input_transform) for m in model.modules() if getattr(m, "input_transform", None) is not None]
    for m, _ in held:
        m.input_transform = None
    try:
        yield
    finally:
        for m, t in held:
            m.input_transform = t


def save_fake_quant(model, tokenizer, spec: QuantSpec, path: str | os.PathLike, extra: dict[str, Any] | None = None,
                    adapter=None, name: str | None = None, block_at: Callable[[int], nn.Module] | None = None) -> Path:
    """Write the model (in the model's own layout: ``adapter.export_layout``), its runtime quantizer state,
    the tokenizer and the manifest to ``path`` (complete or not at all: written beside, then renamed). A model
    held block by block (lazily loaded) gives block ``i`` as ``block_at(i)``: one shard per block is written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if block_at is not None:
        runtime = write_by_block(model, adapter, block_at, tmp)
    else:
        runtime = runtime_state(model)
        with adapter.export_layout(model) if adapter is not None else contextlib.nullcontext(), \
                without_input_transforms(model):
            # the runtime state (activation clipping, static ranges) is in its own file only: the checkpoint stays
            # one that transformers loads without unexpected keys, and the packed exports rewritten from it hold none
            weights = {k: v for k, v in model.state_dict().items() if not is_runtime_state(k)}
            model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
    if runtime:
        save_file(runtime, str(tmp / RUNTIME))
    tokenizer.save_pretrained(tmp)
    plain_modes(tmp)  # safetensors writes 0600 files: every output gets the mode a plain open() gives
    write_json(tmp / MANIFEST, {"format": "omniq-fake-quant-v1", "quant": spec.to_dict(), "name": name or spec.name,
                                **(extra or {})})
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def runtime_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict(prefix=prefix).items()
            if is_runtime_state(k)}


def write_by_block(model, adapter, block_at: Callable[[int], nn.Module], folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a model held block by block, as ``save_pretrained`` lays out a sharded checkpoint: one
    shard for the parts outside the blocks, one per block (each block read, written and dropped in turn), and
    the index. Returns the runtime quantizer state (for its own file)."""
    blocks, prefix, sites = adapter.blocks(model), adapter.blocks_prefix(model), adapter.model_sites(model)
    n = len(blocks) + 1
    weight_map: dict[str, str] = {}
    runtime: dict[str, torch.Tensor] = {}
    total = 0

    def shard(k: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        file = f"model-{k:05d}-of-{n:05d}.safetensors"
        weights = {name: t.detach().cpu().contiguous() for name, t in tensors.items() if not is_runtime_state(name)}
        save_file(weights, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(weights, file))
        total += sum(t.numel() * t.element_size() for t in weights.values())

    outside = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{prefix}.")}
    if sites.tied:  # one tensor: the checkpoint holds the embedding's (as save_pretrained writes a tied head)
        outside.pop(f"{sites.head}.weight", None)
    shard(1, outside)
    for i in range(len(blocks)):
        held = blocks[i]
        blocks[i] = block_at(i).to("cpu")
        try:
            runtime.update(runtime_state(blocks[i], f"{prefix}.{i}."))
            with adapter.export_layout(model), without_input_transforms(model):
                shard(i + 2, blocks[i].state_dict(prefix=f"{prefix}.{i}."))
        finally:
            blocks[i] = held
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return runtime


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: {path} is not an omniq-lightning fake-quant export")
    return json.loads(f.read_text())


def load_fake_quant(path: str | os.PathLike, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """Load an export with its runtime quantizers (activations, KV cache) and its online rotations attached."""
    from omniq_lightning.models import load_model
    from omniq_lightning.passes.rotation import RotationSettings, reattach_rotations

    loaded = load_model(str(path), dtype=dtype, attn_implementation=attn_implementation)
    manifest = read_manifest(path)
    spec = QuantSpec(**manifest["quant"])
    rotations = OnlineRotations()
    if manifest.get("rotation"):
        reattach_rotations(loaded.model, loaded.adapter, manifest["rotation"])
        r = RotationSettings(**manifest["rotation"]["settings"])
        rotations = OnlineRotations(r.qk, r.down, r.seed)
    affine = tuple(manifest.get("affine_locations", ()))
    if spec.weight_only and not rotations.down and not affine:
        return loaded
    # weights: quantized in the file
    runtime = BlockSetup(replace(spec, w_bits=16, lwc=False, w_vq=None, w_format=None), rotations=rotations,
                         affine_locations=affine)
    adapter = loaded.adapter
    blocks = adapter.blocks(loaded.model)
    for i in range(len(blocks)):
        blocks[i] = adapter.finish_block(adapter.build_quant_block(adapter.prepare_block(blocks[i]), runtime).fold())
    runtime = Path(path) / RUNTIME
    if runtime.is_file():
        state = load_file(str(runtime))
        restore_cluster_quantizers(loaded.model, state)  # per-cluster quantizers (RPTQ) replace the defaults
        missing = set(state) - set(loaded.model.state_dict())
        if missing:
            raise ValueError(f"{runtime} holds quantizer state for modules this model does not have: {sorted(missing)[:5]}")
        loaded.model.load_state_dict(state, strict=False)
    return loaded
