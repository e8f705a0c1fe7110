"""GGUF files measured by llama.cpp itself: the perplexity llama.cpp computes for a file made here, over the same
token windows our evaluation used, beside our fake-quant perplexity and llama.cpp's own quantization of the same
full-precision model to the same type or named mix, without and with an importance matrix computed on the text of
our calibration windows; and llama.cpp's inference speed and resident memory for each file against F16.

    python benchmarks/llama_cpp_gguf.py RUN_DIR [RUN_DIR ...] --source SOURCE.gguf [--bin LLAMA_CPP_BIN] \
        [--imatrix] [--bench] [--out TABLE.md]

``RUN_DIR`` is a finished ``train.py ... quant=gguf|gguf_mix export.format=gguf`` output folder; its
``config.yaml`` names the calibration windows and its ``results.json`` the evaluation windows. ``--source`` is a
GGUF of the full-precision model (one quantized file works too: llama.cpp requantizes from its dequantized weights,
which are then the full-precision model, as for SmolLM2 here). Needs ``llama-cpp-python`` (a build from source: on
CPUs where llama.cpp's native build crashes, ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON -DGGML_OPENMP=OFF" pip install llama-cpp-python``); ``--imatrix`` and ``--bench`` need llama.cpp's
``llama-imatrix``, ``llama-quantize`` and ``llama-bench`` in ``--bin`` (built from llama.cpp's sources, e.g. the
``vendor/llama.cpp`` of that sdist: ``cmake -B build -DLLAMA_BUILD_TOOLS=ON ... && cmake --build build --target
llama-imatrix llama-quantize llama-bench``).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def windows_of(run: Path, res: dict, corpus: str) -> torch.Tensor:
    """The evaluation windows a run used: its tokenizer, the corpus, the window length and count it reported."""
    from transformers import AutoTokenizer

    from omniq_lightning.config import compose
    from omniq_lightning.data.corpora import load_corpus
    from omniq_lightning.data.windows import eval_windows, tokenize

    entry = res["perplexity"][corpus]
    ids = tokenize(load_corpus(corpus, "eval", compose([]).paths.data_dir), AutoTokenizer.from_pretrained(run / "model"))
    return eval_windows(ids, int(entry["seqlen"]), int(entry["windows"]))


def llamacpp_perplexity(path: Path, windows: torch.Tensor, threads: int = 2) -> tuple[float, float]:
    """(perplexity, seconds) of llama.cpp on ``windows``: every window predicts its ``seqlen - 1`` next tokens, as
    our evaluation does."""
    from llama_cpp import Llama

    seqlen = windows.shape[1]
    llm = Llama(model_path=str(path), n_ctx=seqlen, n_batch=512, logits_all=True, verbose=False, n_threads=threads)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.from_numpy(np.array(llm.scores[: seqlen - 1], dtype=np.float32))
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
        count += seqlen - 1
    llm.close()
    return math.exp(nll / count), time.perf_counter() - t0


def llamacpp_quantize(source: Path, ftype: str, dest: Path, imatrix: Path | None = None,
                      bin_dir: Path | None = None, pure: bool = False) -> Path:
    """llama.cpp's own quantization of ``source`` to file type ``ftype`` (its per-tensor mix, round to nearest with
    its error search; every tensor in ``ftype``'s base type with ``pure``; weighted by ``imatrix`` when given).
    Through ``llama-quantize`` when ``bin_dir`` is given, else llama-cpp-python's binding."""
    if bin_dir is not None:
        cmd = [str(tool(bin_dir, "llama-quantize")), "--allow-requantize", *(["--pure"] if pure else [])]
        cmd += ["--imatrix", str(imatrix)] if imatrix is not None else []
        subprocess.run([*cmd, str(source), str(dest), ftype, "2"], check=True, capture_output=True)
        return dest
    if imatrix is not None:
        raise SystemExit("an importance matrix needs llama.cpp's llama-quantize: pass --bin")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.pure = pure
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return dest


def tool(bin_dir: Path | None, name: str) -> Path:
    path = (bin_dir or Path(".")) / name
    if not path.is_file():
        raise SystemExit(f"{name} not found in {bin_dir}: pass --bin, the folder of llama.cpp's built tools")
    return path


def run_settings(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def calibration_text(run: Path) -> tuple[str, int, int]:
    """The text of the run's calibration windows (decoded), their count and length: what llama.cpp's importance
    matrix is computed on, for a comparison on equal data."""
    from transformers import AutoTokenizer

    from omniq_lightning.config import compose
    from omniq_lightning.data.corpora import load_corpus
    from omniq_lightning.data.windows import calibration_windows, tokenize

    s = run_settings(run)
    tok = AutoTokenizer.from_pretrained(run / "model")
    ids = tokenize(load_corpus(s["calib.corpus"], "calib", compose([]).paths.data_dir), tok)
    windows = calibration_windows(ids, int(s["calib.nsamples"]), int(s["calib.seqlen"]), int(s["calib.seed"]))
    return "\n".join(tok.decode(w) for w in windows.tolist()), windows.shape[0], windows.shape[1]


def llamacpp_imatrix(source: Path, run: Path, dest: Path, bin_dir: Path) -> Path:
    text, n, seqlen = calibration_text(run)
    corpus = dest.with_suffix(".txt")
    corpus.write_text(text)
    subprocess.run([str(tool(bin_dir, "llama-imatrix")), "-m", str(source), "-f", str(corpus), "-o", str(dest),
                    "-c", str(seqlen), "--chunks", str(n), "-t", "2", "--no-ppl"], check=True, capture_output=True)
    return dest


def llamacpp_bench(path: Path, bin_dir: Path, threads: int = 2, reps: int = 3) -> dict:
    """llama-bench's prompt processing (512 tokens) and generation (128 tokens) speed, tokens per second (mean of
    ``reps`` runs), and the peak resident memory of the process (MiB)."""
    cmd = [str(tool(bin_dir, "llama-bench")), "-m", str(path), "-p", "512", "-n", "128", "-t", str(threads),
           "-r", str(reps), "-o", "json"]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        peak_kib = 0
        while proc.poll() is None:  # the process's own high-water mark (getrusage's would include the forking
            peak_kib = max(peak_kib, high_water_kib(proc.pid))  # Python's, which execve keeps)
            time.sleep(0.02)
        if proc.returncode:
            raise RuntimeError(f"llama-bench failed on {path} ({proc.returncode})")
        out.seek(0)
        rows = json.loads(out.read())
    speed = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}
    return {"pp512": speed["pp"], "tg128": speed["tg"], "rss_mib": peak_kib / 1024}


def high_water_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def file_type(res: dict) -> tuple[str | None, bool]:
    """llama.cpp's file type for a run's file, and whether llama.cpp must keep every linear in its base type
    (``--pure``): a named mix is its own file type; a single type is the file type named after it (``Q4_K`` ->
    ``Q4_K_S``), pure; a mixed plan (``quant=gguf_mixed``) has none (None: llama.cpp makes no such file)."""
    from omniq_lightning.export.gguf import FILE_TYPES

    fmt = res["quant"].get("w_format")
    if not isinstance(fmt, dict) or "mixed" in res["quant"]:
        return None, False
    if fmt.get("mix"):
        return fmt["mix"], False
    return FILE_TYPES[fmt["type"]][len("MOSTLY_"):], fmt["type"] not in ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--source", type=Path, help="a GGUF of the full-precision model, for llama.cpp's own quantization")
    ap.add_argument("--bin", type=Path, help="the folder of llama.cpp's tools (llama-quantize, llama-imatrix, ...)")
    ap.add_argument("--imatrix", action="store_true", help="also llama.cpp's own quantization with an importance "
                    "matrix computed on the text of the run's calibration windows")
    ap.add_argument("--bench", action="store_true", help="llama-bench speed and resident memory, F16 beside each")
    ap.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=True,
                    help="llama.cpp's perplexity of every file (--no-perplexity: the speed table only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the tables here too")
    args = ap.parse_args()
    if (args.imatrix or args.bench) and (args.source is None or args.bin is None):
        ap.error("--imatrix and --bench need --source (the full-precision GGUF) and --bin (llama.cpp's tools)")
    calib = {json.dumps({k: v for k, v in run_settings(r).items() if k.startswith("calib.")}) for r in args.runs}
    if args.imatrix and len(calib) > 1:
        ap.error("the runs were calibrated on different windows: one importance matrix cannot match them all")
    quality = [["file", "type", "corpus", "our fake-quant ppl", "llama.cpp ppl", "file MiB"]]
    speed = [["file", "pp512 tok/s", "tg128 tok/s", "peak RSS MiB", "file MiB"]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        imatrix = None
        if args.imatrix:
            imatrix = llamacpp_imatrix(args.source, args.runs[0], tmp / "imatrix.gguf", args.bin)
        files: dict[str, Path] = {}  # every file once (two runs of one type share llama.cpp's)
        types_checked: list[str] = []
        for run in args.runs:
            res = json.loads((run / "results.json").read_text())
            ftype, pure = file_type(res)
            label = f"{ftype}{' (pure)' if pure else ''}" if ftype else "mixed plan"
            entries = [(f"ours: {res['method']} {res['quant']['name']}", run / "model-gguf" / "model.gguf", res)]
            for name, im in [("llama.cpp", None), ("llama.cpp + imatrix", imatrix)]:
                if args.source is None or ftype is None or (name.endswith("imatrix") and im is None):
                    continue
                key = f"{name} {label}"
                if key not in files:
                    dest = tmp / f"{ftype}{'-pure' if pure else ''}{'-imatrix' if im else ''}.gguf"
                    files[key] = llamacpp_quantize(args.source, ftype, dest, im, args.bin, pure)
                entries.append((key, files[key], None))
            if len(entries) > 1:
                differ = differing_types(entries[0][1], entries[1][1])
                print(f"{label}: {len(differ)} tensors in another type than llama.cpp's own file {differ[:5]}")
                types_checked.append(f"{label}: {'every tensor in the type llama.cpp chose' if not differ else differ}")
            for name, path, own in entries:
                mib = path.stat().st_size / 2**20
                for corpus in res["perplexity"] if args.perplexity else ():
                    ppl, _ = llamacpp_perplexity(path, windows_of(run, res, corpus), args.threads)
                    ours = f"{own['perplexity'][corpus]['perplexity']:.4f}" if own else "-"
                    quality.append([name, label, corpus, ours, f"{ppl:.4f}", f"{mib:.1f}"])
                    print(" | ".join(quality[-1]), flush=True)
                files.setdefault(name, path)
        if args.bench:
            f16 = llamacpp_quantize(args.source, "F16", tmp / "F16.gguf", bin_dir=args.bin)
            # an importance matrix changes the codes, not the types: its files run as fast as the plain ones
            for name, path in [("F16", f16), *((n, f) for n, f in files.items() if "imatrix" not in n)]:
                b = llamacpp_bench(path, args.bin, args.threads)
                speed.append([name, f"{b['pp512']:.1f}", f"{b['tg128']:.1f}", f"{b['rss_mib']:.0f}",
                              f"{path.stat().st_size / 2**20:.1f}"])
                print(" | ".join(speed[-1]), flush=True)
    text = "\n\n".join([table(t) for t in (quality, speed) if len(t) > 1] + ["; ".join(types_checked)])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def differing_types(ours: Path, theirs: Path) -> list[tuple[str, str, str]]:
    """The tensors whose GGUF type differs between two files: (name, ours, theirs)."""
    import gguf

    a, b = ({t.name: t.tensor_type.name for t in gguf.GGUFReader(str(f)).tensors} for f in (ours, theirs))
    return sorted((k, a.get(k, "-"), b.get(k, "-")) for k in set(a) | set(b) if a.get(k) != b.get(k))


def table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


if __name__ == "__main__":
    main()
