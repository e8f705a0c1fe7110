"""Round trip of packed exports: load each packed checkpoint of a finished run back with its consumer library
and compare its perplexity with the fake-quant model the run evaluated.

    python train.py model=smollm2-135m method=awq quant=w4a16 export.format=compressed-tensors output_dir=RUN
    python benchmarks/roundtrip.py RUN            # every model-<format> folder in RUN

- ``compressed-tensors``: transformers with the compressed-tensors package (decompressed on load, the mode
  compressed-tensors supports on CPU for asymmetric schemes).
- ``gptq``: GPTQModel's torch kernel through transformers where ``gptqmodel`` and ``optimum`` import, and always
  the format's reference dequantizer (``dequantize_gptq``) written into the fake-quant model. GPTQModel 7.7
  declares torch >= 2.14.1, so beside this project's torch it goes in without its dependencies:
  ``pip install --no-deps gptqmodel==7.7.0 optimum pypcre logbar tokenicer device-smi defuser``.

The perplexity is taken on the run's first evaluation corpus with the run's sequence length and windows, and
compared with the run's own figure (``results.json``) as a relative difference. File sizes are those the run
recorded (``export_packed``) or measured here, against the model's weights at FP16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FORMATS = ("compressed-tensors", "gptq")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def load_compressed_tensors(packed: Path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))


def load_gptq_reference(packed: Path, fake: Path):
    """The fake-quant model with every packed linear's weight replaced by the reference dequantization."""
    from safetensors.torch import load_file

    from omniq_lightning.export.gptq import dequantize_gptq
    from omniq_lightning.export.hf import load_fake_quant

    cfg = json.loads((packed / "config.json").read_text())["quantization_config"]
    v1 = cfg["checkpoint_format"] == "gptq"
    model = load_fake_quant(fake).model
    tensors: dict[str, torch.Tensor] = {}
    for shard in packed.glob("*.safetensors"):
        tensors.update(load_file(str(shard)))
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    with torch.no_grad():
        for name in names:
            lin = model.get_submodule(name)
            lin.weight.copy_(dequantize_gptq(tensors, name, cfg["bits"], v1).to(lin.weight.dtype))
    return model, len(names)


def load_gptqmodel(packed: Path):
    """GPTQModel's pure-torch kernel (``backend="torch"``), which runs on the CPU."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = json.loads((packed / "config.json").read_text())["quantization_config"]["bits"]
    return AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float16, device_map="cpu",
                                                quantization_config=GPTQConfig(bits=bits, backend="torch"))


def consumers(fmt: str, packed: Path, fake: Path, notes: list[str]) -> dict[str, Callable[[], torch.nn.Module]]:
    """The loaders that read a packed export back, by name."""
    if fmt == "compressed-tensors":
        return {"transformers + compressed-tensors": partial(load_compressed_tensors, packed)}
    loaders = {"reference dequantizer": lambda: load_gptq_reference(packed, fake)[0]}
    try:
        import gptqmodel  # noqa: F401
        import optimum  # noqa: F401  (transformers loads GPTQ checkpoints through both)
        loaders["transformers + GPTQModel (torch kernel, fp16)"] = partial(load_gptqmodel, packed)
    except ImportError as exc:
        notes.append(f"{exc.name} is not importable here: GPTQ checked with the reference dequantizer only")
    return loaders


def measure(model, ids, seqlen: int, windows: int) -> float:
    from omniq_lightning.eval import perplexity

    return perplexity(model, ids, seqlen, max_windows=windows).perplexity


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run's output_dir (results.json, model/, model-<format>/)")
    ap.add_argument("--data-dir", default=None, help="data directory (default: the run's paths.data_dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from omniq_lightning.data import load_corpus, tokenize

    found = [f for f in FORMATS if (args.run / f"model-{f}" / "config.json").is_file()]
    if not found:
        raise SystemExit(f"{args.run} has no packed export (model-<format>/): rerun it with export.format="
                         f"{'|'.join(FORMATS)}; its finished blocks load, nothing is recalibrated")
    res = json.loads((args.run / "results.json").read_text())
    corpus, ours = next(iter(res["perplexity"].items()))
    seqlen, windows = int(ours["seqlen"]), int(ours["windows"])
    tok = AutoTokenizer.from_pretrained(args.run / "model")
    data_dir = args.data_dir or res["config"].get("paths", {}).get("data_dir")  # the run's own data by default
    ids = tokenize(load_corpus(corpus, "eval", data_dir), tok)
    fp16 = res.get("export_packed", {}).get("fp16_bytes")
    report = {"run": str(args.run), "corpus": corpus, "seqlen": seqlen, "windows": windows,
              "fake_quant_perplexity": ours["perplexity"], "bits_per_weight": res.get("bits_per_weight"),
              "fp16_bytes": fp16, "formats": {}}
    for fmt in found:
        packed = args.run / f"model-{fmt}"
        loaders = consumers(fmt, packed, args.run / "model", report.setdefault("notes", []))
        rows = {}
        for how, load in loaders.items():
            t0 = time.perf_counter()
            model = load().eval()
            ppl = measure(model, ids, seqlen, windows)
            rows[how] = {"perplexity": ppl, "relative_difference": abs(ppl - ours["perplexity"]) / ours["perplexity"],
                         "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{fmt:20s} {how:45s} ppl {ppl:.4f} vs {ours['perplexity']:.4f} "
                  f"(rel {rows[how]['relative_difference']:.2e})", flush=True)
            del model
        size = folder_bytes(packed)
        report["formats"][fmt] = {"bytes": size, "fraction_of_fp16": round(size / fp16, 4) if fp16 else None,
                                  "loaded": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
