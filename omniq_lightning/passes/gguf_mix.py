"""`GGUFMixPass`: each linear's GGUF type in one of llama.cpp's named mixes (``Q4_K_M``, ``Q3_K_M``, ...), decided
before the block loop so that every method calibrates each linear on the grid the file will hold.

The roles llama.cpp's rules read (``attn_v``, ``ffn_down``, ``attn_output``, and the layer) are the linears' GGUF
tensor names, from the ``gguf`` package's name map for the architecture the model's adapter names
(``ModelAdapter.gguf_layout``); the rules themselves are :func:`omniq_lightning.quant.gguf.mix_type`.
"""

from __future__ import annotations

import re
from collections import Counter

from omniq_lightning.passes.base import ModelPass, PassContext, PassResult
from omniq_lightning.quant.gguf import GGUFFormat, mix_type

BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)$")


def gguf_roles(linears, layout) -> dict[str, tuple[str, int]]:
    """``{linear name in the model: (its GGUF tensor role, its layer)}`` for a family of GGUF ``layout``
    (``ModelAdapter.gguf_layout``)."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, layout.arch.upper()), layout.config["num_hidden_layers"])
    roles = {}
    for linear in linears:
        source = layout.source_name(linear)
        gname = None if source is None else names.get_name(source)
        match = BLOCK_TENSOR.match(gname or "")
        if match is None:
            raise ValueError(f"linear {linear} has no GGUF block tensor name for architecture {layout.arch}")
        roles[linear] = (match.group(2), int(match.group(1)))
    return roles


class GGUFMixPass(ModelPass):
    """The type of every quantized linear in llama.cpp's file type ``mix``, as a per-linear format plan."""

    name = "gguf_mix"

    def __init__(self, mix: str) -> None:
        self.mix = mix

    def check_model(self, traits) -> None:
        if traits.experts:
            raise ValueError(f"GGUF mix {self.mix} follows llama.cpp's rules for dense models; for a "
                             "mixture-of-experts model use a single type (quant.w_format.type)")

    def run(self, ctx: PassContext) -> PassResult:
        config = ctx.model.config.to_dict()
        layout = ctx.adapter.gguf_layout(config)
        if layout is None:
            raise ValueError(f"no GGUF layout for model_type {config.get('model_type')!r} (ModelAdapter.gguf_layout): "
                             "its GGUF tensor names, which a mix's rules read, are unknown")
        text = layout.config
        heads = text["num_attention_heads"]
        n_gqa = heads // (text.get("num_key_value_heads") or heads)
        n_layers = text["num_hidden_layers"]
        seventy_b = n_layers == 80 and ((layout.arch == "llama" and n_gqa > 1) or layout.arch == "qwen2")
        roles = gguf_roles(sorted(ctx.shapes), layout)
        types = {n: mix_type(self.mix, role, layer, n_layers, n_gqa, seventy_b) for n, (role, layer) in roles.items()}
        return PassResult(record={"mix": self.mix, "types": types},
                          formats={n: GGUFFormat(t) for n, t in types.items()},
                          info={"mix": self.mix, "types": dict(sorted(Counter(types.values()).items()))})
