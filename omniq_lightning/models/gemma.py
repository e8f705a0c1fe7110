"""Gemma-2 and Gemma-3 adapter: RMSNorm as ``x * (1 + w)``, sandwich norms, alternating sliding-window and
global attention (each block replays with its own mask and, on Gemma-3, its own rotary embedding)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from omniq_lightning.models.base import (
    GGUFLayout,
    ModelAdapter,
    ModelSites,
    ResidualWriters,
    flat_rope,
    tied_embeddings,
)
from omniq_lightning.models.llama import attention_sites, gated_mlp_sites
from omniq_lightning.transforms import TransformSite


class GemmaAdapter(ModelAdapter):
    """Sites: input_layernorm -> q/k/v, v -> o, q/k (a diagonal folds on Gemma-2 only: Gemma-3's q_norm / k_norm
    undo a q/k scale), pre_feedforward_layernorm -> gate/up, up -> down. The post-attention and post-feedforward norms act on the
    projections' outputs before the residual add: no exact pair there. Folding a scale into a Gemma norm
    divides ``1 + w``, not ``w``."""

    model_types = ("gemma3_text", "gemma3")
    recipe_family = "llama"  # RMSNorm + rotary + gated MLP: the LLaMA recipes apply
    norm_offset = 1.0

    def text_model_name(self, model: nn.Module) -> str:
        return "model.language_model" if hasattr(model.model, "language_model") else "model"  # multimodal Gemma-3

    def text_model(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.text_model_name(model))

    def residual_writers(self, block: nn.Module) -> ResidualWriters:
        """The sandwich norms sit between o_proj / down_proj and the residual stream: rotated online."""
        return ResidualWriters(norms=("post_attention_layernorm", "post_feedforward_layernorm"))

    def model_sites(self, model: nn.Module) -> ModelSites:
        text = self.text_model_name(model)
        return ModelSites(f"{text}.embed_tokens", f"{text}.norm", "lm_head", tied_embeddings(model))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.text_model(model).layers

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        text = self.text_model(model)
        return [text.embed_tokens, text.rotary_emb]

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn]

    def sites(self, block: nn.Module) -> list[TransformSite]:
        return attention_sites(block, "input_layernorm") + gated_mlp_sites("pre_feedforward_layernorm")

    # --- export layouts ----------------------------------------------------------------------------------------
    gguf_archs = {"gemma3_text": "gemma3", "gemma3": "gemma3"}
    largest_layers = 62  # llama.cpp scales queries by 1/sqrt(hidden / heads) in the family's 27B (this many layers)

    def gguf_layout(self, config: dict) -> GGUFLayout | None:
        """llama.cpp's ``gemma3``: norms stored as ``1 + w``, the sliding-window layers by position, their own
        rotary base; a multimodal checkpoint's text model alone (the vision tower is llama.cpp's projector file)."""
        layout = super().gguf_layout(config)
        if layout is None:
            return None
        text = config.get("text_config") or config
        params = text.get("rope_parameters") or {}
        if "full_attention" in params:  # transformers 5: rotary settings per attention type
            rope, local = dict(params["full_attention"]), params.get("sliding_attention", {}).get("rope_theta")
        else:
            rope, local = flat_rope(text), text.get("rope_local_base_freq")
        hparams = self.window_hparams(text) | {"rope_freq_base_swa": float(local or 10000.0)}
        if text.get("final_logit_softcapping"):
            hparams["final_logit_softcapping"] = float(text["final_logit_softcapping"])
        return replace(layout, config=text, rope=rope, hparams=hparams, norm_shift=self.norm_offset,
                       text_prefixes=(self.text_prefix(config), *self.checkpoint_prefixes(config)),
                       unsupported=self.query_scale_problem(text))

    @staticmethod
    def text_prefix(config: dict) -> str:
        return "model.language_model" if "text_config" in config else "model"  # multimodal: beside the vision tower

    def checkpoint_prefixes(self, config: dict) -> dict[str, str]:
        """transformers saves a multimodal Gemma-3's text model as ``language_model.model``."""
        return {"language_model.model": "model.language_model"} if "text_config" in config else {}

    def window_hparams(self, text: dict) -> dict:
        hparams: dict = {"add_space_prefix": False}  # Gemma's SentencePiece adds no leading space
        if text.get("sliding_window"):
            hparams["sliding_window"] = int(text["sliding_window"])
            if text.get("layer_types"):
                hparams["sliding_window_pattern"] = [t == "sliding_attention" for t in text["layer_types"]]
        return hparams

    def query_scale_problem(self, text: dict) -> str | None:
        """llama.cpp scales Gemma's queries by ``1/sqrt(head_dim)`` (``1/sqrt(hidden / heads)`` for its 27B); a
        model whose ``query_pre_attn_scalar`` says otherwise would compute another function there."""
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        theirs = text["hidden_size"] // heads if text["num_hidden_layers"] == self.largest_layers else head_dim
        ours = text.get("query_pre_attn_scalar", head_dim)
        if ours != theirs:
            return (f"llama.cpp scales this Gemma's queries by 1/sqrt({theirs}), the model by 1/sqrt(query_pre_attn_scalar"
                    f"={ours})")
        return None


class Gemma2Adapter(GemmaAdapter):
    model_types = ("gemma2",)
    # Gemma-2 soft-caps its attention logits: transformers refuses sdpa for it (5.24) or silently drops the cap (5.17)
    required_attn_implementation = "eager"
    gguf_archs = {"gemma2": "gemma2"}
    largest_layers = 46

    def gguf_layout(self, config: dict) -> GGUFLayout | None:
        """llama.cpp's ``gemma2``: norms stored as ``1 + w``, attention and final logit soft-capping, the sliding
        layers by position; its output head is always the embedding."""
        layout = ModelAdapter.gguf_layout(self, config)
        if layout is None:
            return None
        hparams = self.window_hparams(config)
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(cap):
                hparams[cap] = float(config[cap])
        return replace(layout, hparams=hparams, norm_shift=self.norm_offset, separate_head=False,
                       unsupported=self.query_scale_problem(config))
