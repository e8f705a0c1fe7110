"""Behaviour record of a fixed set of stories260K runs, to check that a refactor changes nothing.

    python benchmarks/behaviour.py record before.json              # run every cell, write its figures
    python benchmarks/behaviour.py record after.json --only rtn-w4a16-gptq
    python benchmarks/behaviour.py compare before.json after.json   # exit 1 on any difference

The cells cover every method, weight-only and weight-activation settings, a mixed-precision plan, an RPTQ
KV-cache preset, every export format, and rotations with learned transforms. For each cell the record holds what a run's results say about the
weights it produced: the perplexity (to the last bit), the bits per weight, each block's output error, and a
SHA-256 per exported checkpoint over its tensors (name, dtype, shape, bytes, in name order) and its
``quantization_config``. Timings, paths and versions are left out. The cells run in this process, one
thread (``torch.set_num_threads(1)``), so that the arithmetic is the same from one record to the next.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUICK = ["model=stories260k", "calib.nsamples=8", "eval.max_windows=8", "eval.fp_baseline=false",
         "trainer.enable_progress_bar=false", "device=cpu"]
CELLS: dict[str, list[str]] = {
    "fp": ["method=fp"],
    "rtn-w4a16-gptq": ["method=rtn", "quant=w4a16", "export.format=gptq"],
    "rtn-w3a16-fake": ["method=rtn", "quant=w3a16"],
    "gptq-w2a16-gptq": ["method=gptq", "quant=w2a16", "export.format=gptq"],
    "awq-w4a16-ct": ["method=awq", "quant=w4a16", "export.format=compressed-tensors"],
    "smoothquant-w8a8-ct": ["method=smoothquant", "quant=w8a8", "quant.w_symmetric=true", "quant.kv_bits=16",
                            "export.format=compressed-tensors"],
    "omniquant-w4a16-default": ["method=omniquant", "quant=w4a16", "method.epochs=2"],
    "omniquant-w4a4-default": ["method=omniquant", "quant=w4a4", "method.epochs=2"],
    "omniquant-w6a6-released": ["method=omniquant", "quant=w6a6", "method.recipe=released", "method.epochs=2"],
    "omniquant-w3a16-learned-rounding": ["method=omniquant", "quant=w3a16", "method.recipe=learned-rounding",
                                         "method.epochs=2", "method.aug_loss=true"],
    "rptq-w4a4kv": ["method=rptq", "quant=w4a4kv"],
    "rptq-w4a8-omniquant": ["method=rptq", "quant=w4a8", "method.weights=omniquant", "method.epochs=2"],
    "rptq-w4a3kv-dynamic-rtn": ["method=rptq", "quant=w4a3kv", "method.weights=rtn", "method.dynamic=true"],
    "vptq-vq2-vq": ["method=vptq", "quant=vq2", "quant.w_vq.vector=2", "quant.w_vq.centroids=16",
                    "quant.w_vq.normalize=false", "method.kmeans_iters=5", "export.format=vq"],
    "gptq-mixed3-fake": ["method=gptq", "quant=mixed", "quant.mixed.avg_bits=3"],
    "rtn-mixed5-ct": ["method=rtn", "quant=mixed", "quant.mixed.avg_bits=5", "quant.mixed.candidates=[w4,w8]",
                      "export.format=compressed-tensors"],
    "gptq-w4a4-quarot": ["method=gptq", "quant=w4a4", "rotation=quarot"],
    "gptq-w4a16-quarot-ct": ["method=gptq", "quant=w4a16", "rotation=quarot", "export.format=compressed-tensors"],
    "omniquant-w4a4-quarot-affine-lac": ["method=omniquant", "quant=w4a4", "rotation=quarot", "method.affine=true",
                                         "quant.lac=true", "method.epochs=2"],
}


def tensors_hash(folder: Path) -> str | None:
    """SHA-256 over a checkpoint's tensors (every safetensors file, keys in order) and its quantization_config."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in sorted(st.keys()):
                t = st.get_tensor(key).contiguous()
                h.update(f"{f.name}:{key}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    config = folder / "config.json"
    if config.is_file():
        qc = json.loads(config.read_text()).get("quantization_config")
        if qc is not None:
            qc = {k: v for k, v in qc.items() if k != "version"}
        h.update(json.dumps(qc, sort_keys=True).encode())
    return h.hexdigest()


def record_cell(name: str, overrides: list[str], work: Path) -> dict:
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    out = work / name
    res = run(compose([*QUICK, *overrides, f"output_dir={out}"]))
    rec = {
        "perplexity": {c: r["perplexity"] for c, r in res["perplexity"].items()},
        "bits_per_weight": res.get("bits_per_weight"),
        "block_output_mse": [b.get("output_mse") for b in res.get("blocks", [])],
        "exports": {},
    }
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("model")):
        rec["exports"][folder.name] = tensors_hash(folder)
    return rec


def record(path: Path, only: list[str] | None, work: Path | None) -> None:
    torch.set_num_threads(1)
    cells = {k: v for k, v in CELLS.items() if not only or k in only}
    unknown = sorted(set(only or []) - set(CELLS))
    if unknown:
        raise SystemExit(f"unknown cell(s) {unknown}; cells: {', '.join(CELLS)}")
    results = json.loads(path.read_text()) if path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        base = work or Path(tmp)
        for name, overrides in cells.items():
            print(f"== {name}: {' '.join(overrides)}", flush=True)
            results[name] = record_cell(name, overrides, base)
            path.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"wrote {path} ({len(results)} cells)")


def compare(a: Path, b: Path) -> int:
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for name in sorted(set(ra) | set(rb)):
        if name not in ra or name not in rb:
            print(f"{name}: only in {'the first' if name in ra else 'the second'} record")
            bad += 1
            continue
        for key in sorted(set(ra[name]) | set(rb[name])):
            va, vb = ra[name].get(key), rb[name].get(key)
            if va != vb:
                print(f"{name}.{key}: {va} != {vb}")
                bad += 1
    print("identical" if not bad else f"{bad} difference(s)")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("path", type=Path)
    r.add_argument("--only", nargs="+")
    r.add_argument("--work", type=Path, help="keep the runs' output folders here (default: a temporary folder)")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.path, args.only, args.work)
    else:
        raise SystemExit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
