"""GGUF files for llama.cpp (and Ollama, LM Studio, transformers' ``gguf_file=``): one ``model.gguf`` holding the
model's metadata, its tokenizer and every tensor.

Quantized linears are written from their stored codes in the GGUF type they were calibrated on (``quant/gguf.py``:
the bytes of llama.cpp's blocks), never re-derived from dequantized weights. The other tensors go where llama.cpp's
own quantizer puts them: norms and biases F32; the output head (or the tied embedding that serves as one) Q6_K, Q8_0
where 256 does not divide its rows (or for a Q8_0 file); an untied embedding in the file's base type. Linears a
type's block does not divide were calibrated in llama.cpp's fallback type, or left 16-bit (F16) as llama.cpp does.
The family's tensor names come from the ``gguf`` package's map for the architecture its adapter names
(``ModelAdapter.gguf_layout``), with LLaMA's query/key rows reordered as llama.cpp expects.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from omniq_lightning.export.registry import Exporter, ExportJob, ExportRequest, UnsupportedFormat, register_exporter
from omniq_lightning.models import adapter_for, gguf_model_types
from omniq_lightning.models.base import interleave_rotary_rows
from omniq_lightning.quant.gguf import GGUF_MIXES, GGUFCodes, GGUFFormat, gguf_quantize, pack_rows, type_for_width

# general.file_type of a file of one type (llama.cpp's closest named type) or of a named mix (its own)
FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q4_0": "MOSTLY_Q4_0",
              "Q4_1": "MOSTLY_Q4_1", "Q6_K": "MOSTLY_Q6_K", "Q5_K": "MOSTLY_Q5_K_S", "Q4_K": "MOSTLY_Q4_K_S",
              "Q3_K": "MOSTLY_Q3_K_S", "Q2_K": "MOSTLY_Q2_K"} | {m: f"MOSTLY_{m}" for m in GGUF_MIXES}
GGUF_FILE = "model.gguf"


def head_type(base: str, rows_width: int) -> str:
    """llama.cpp's type for the output head (or the tied embedding used as one) in a file of ``base`` type."""
    if base == "Q8_0" or rows_width % 256:
        return type_for_width("Q8_0", rows_width)
    return "Q6_K"


def rope_metadata(rope: dict) -> dict:
    """The rotary settings of a layout (``GGUFLayout.rope``) as GGUF metadata (the writer's ``add_<name>``): plain
    or linearly scaled rotary embeddings; other scalings are refused."""
    import gguf

    kind = rope.get("rope_type") or "default"
    out = {} if rope.get("rope_theta") is None else {"rope_freq_base": float(rope["rope_theta"])}
    if kind == "linear":
        return out | {"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": float(rope["factor"])}
    if kind != "default":
        raise UnsupportedFormat(f"this GGUF exporter writes plain and linearly scaled rotary embeddings; {kind!r} rope "
                                "scaling is not written yet: use export.format=fake, compressed-tensors or gptq")
    return out


def layout_problem(layout) -> str | None:
    """Why a family's layout cannot be written as a file llama.cpp runs as this model (None: it can)."""
    if layout.unsupported:
        return layout.unsupported
    try:
        rope_metadata(layout.rope)
    except UnsupportedFormat as exc:
        return str(exc)
    return None


def read_tensors(fake_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(fake_dir.glob("*.safetensors")):
        if shard.name.startswith("omniq_"):
            continue
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def add_vocab(writer, folder: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp reads it: GPT-2 style BPE, or SentencePiece (``LlamaHfVocab`` / ``tokenizer.model``),
    with the special tokens and merges."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

    vocab = None
    for cls in (BpeVocab, LlamaHfVocab, SentencePieceVocab):
        try:
            vocab = cls(folder)
            break
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            continue
    if vocab is None:
        raise UnsupportedFormat(f"no tokenizer llama.cpp can read in {folder}: GGUF export writes GPT-2 BPE and "
                                "SentencePiece tokenizers")
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), vocab_size):  # an embedding padded beyond the tokenizer
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_scores(scores[:vocab_size])
    writer.add_token_types(types[:vocab_size])
    SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def add_metadata(writer, layout, file_type: str, name: str) -> None:
    """The model's hyperparameters as llama.cpp reads them: those every family has, then the family's own
    (``GGUFLayout.hparams``, which win)."""
    import gguf

    text = layout.config
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    values = {"name": name, "context_length": text["max_position_embeddings"], "embedding_length": text["hidden_size"],
              "block_count": text["num_hidden_layers"], "feed_forward_length": text["intermediate_size"],
              "head_count": heads, "head_count_kv": text.get("num_key_value_heads") or heads, "key_length": head_dim,
              "value_length": head_dim, "rope_dimension_count": head_dim,
              "layer_norm_rms_eps": float(text["rms_norm_eps"]), "vocab_size": text["vocab_size"],
              "file_type": getattr(gguf.LlamaFileType, FILE_TYPES[file_type]),
              "quantization_version": gguf.GGML_QUANT_VERSION}
    for key, value in (values | rope_metadata(layout.rope) | layout.hparams).items():
        getattr(writer, f"add_{key}")(value)


def tensor_data(t: torch.Tensor, codes: GGUFCodes | None, qtype: str | None):
    """(numpy data, GGML type) of one tensor: packed codes, a quantized 16-bit tensor, F16 or F32."""
    import gguf

    if codes is not None:
        return pack_rows(codes), getattr(gguf.GGMLQuantizationType, codes.fmt.type)
    if qtype is not None and qtype != "F16":
        c = gguf_quantize(t.float(), GGUFFormat(qtype))
        return pack_rows(c), getattr(gguf.GGMLQuantizationType, qtype)
    if t.dim() == 1 or qtype is None:
        return t.float().numpy(), gguf.GGMLQuantizationType.F32
    return t.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16


class GGUFExporter(Exporter):
    name = "gguf"
    kinds = ("gguf",)

    def why_not(self, req: ExportRequest) -> str | None:
        if not req.spec.weight_only:
            return "llama.cpp runs weight-only quantized files (its activations and KV cache are its own settings)"
        if req.fused_experts:
            return "this model's experts are fused 3-D tensors, which the GGUF exporter does not split yet"
        if req.model_type is not None and req.gguf_layout is None:
            return (f"no GGUF layout for model_type {req.model_type!r} (its adapter declares none, "
                    f"ModelAdapter.gguf_layout); the families with one: {', '.join(gguf_model_types())}")
        return None if req.gguf_layout is None else layout_problem(req.gguf_layout)

    def write(self, job: ExportJob) -> Path:
        import gguf

        config = json.loads((job.fake_dir / "config.json").read_text())
        layout = adapter_for(config["model_type"]).gguf_layout(config)
        if layout is None:
            raise UnsupportedFormat(f"no GGUF layout for model_type {config['model_type']!r}: its adapter declares "
                                    f"none (ModelAdapter.gguf_layout); the families with one: {', '.join(gguf_model_types())}")
        problem = layout_problem(layout)
        if problem:
            raise UnsupportedFormat(f"export.format=gguf cannot hold this model: {problem}")
        tensors = read_tensors(job.fake_dir)
        if "lm_head.weight" in tensors and not layout.separate_head:
            raise UnsupportedFormat(f"llama.cpp's {layout.arch} reads its output head from the token embedding, and "
                                    "this run's head is untied from it (a residual rotation unties them): use "
                                    "rotation.residual=false, or export.format=fake / compressed-tensors")
        base = file_base_type(job)
        names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, layout.arch.upper()), layout.config["num_hidden_layers"])
        tied = "lm_head.weight" not in tensors
        codes_of = {layout.source_name(m): c for m, c in job.codes.items()}  # the checkpoint may name modules otherwise
        job.path.mkdir(parents=True, exist_ok=True)
        final = job.path / GGUF_FILE
        tmp = final.with_name(final.name + ".partial")
        writer = gguf.GGUFWriter(str(tmp), layout.arch)
        add_metadata(writer, layout, getattr(job.spec.weight_format, "mix", None) or base,
                     str(config.get("_name_or_path") or "omniq-lightning"))
        add_vocab(writer, job.fake_dir, layout.config["vocab_size"])
        for key, t in tensors.items():
            source = layout.source_name(key)
            if source is None:
                continue  # another tower of a multimodal checkpoint (llama.cpp's projector file holds it)
            gname = names.get_name(source, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise UnsupportedFormat(f"tensor {key} has no GGUF name for architecture {layout.arch}")
            module = source[: -len(".weight")] if source.endswith(".weight") else None
            codes = codes_of.get(module)
            qtype = None
            if t.dim() == 2 and codes is None:  # embedding, head, or a linear left 16-bit
                if key == "lm_head.weight" or (tied and gname == "token_embd.weight"):
                    qtype = head_type(base, t.shape[1])
                elif gname == "token_embd.weight":
                    qtype = type_for_width(base, t.shape[1])
                else:
                    qtype = "F16"
            elif t.dim() == 1 and layout.norm_shift and key.endswith("norm.weight"):
                t = t.float() + layout.norm_shift
            suffix = next((s for s in layout.permuted_rows if module and module.endswith(s)), None)
            if suffix is not None:
                index = interleave_rotary_rows(t.shape[0], layout.permuted_rows[suffix])
                codes, t = (None if codes is None else codes.map(lambda x, i=index: x[i])), t[index]
            data, dtype = tensor_data(t, codes, qtype)
            writer.add_tensor(gname, data, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, final)
        return job.path


def file_base_type(job: ExportJob) -> str:
    """The file's base type (its embedding's, and its ``general.file_type``): the run's GGUF type, or for a mixed
    plan the type that holds the most weights."""
    fmt = job.spec.weight_format
    if fmt.kind == "gguf":
        return fmt.type
    weights = Counter()
    for c in job.codes.values():
        if c.fmt.kind == "gguf":
            weights[c.fmt.type] += c.shape[0] * c.shape[1]
    if not weights:
        raise UnsupportedFormat("export.format=gguf holds GGUF types, and no linear of this run is in one")
    return weights.most_common(1)[0][0]


register_exporter(GGUFExporter())
