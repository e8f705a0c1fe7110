"""Beyond one machine's memory (issue 24): lazy loading's peak memory against loading the model whole, and the
memory plan against measured peaks and for models too large for this machine.

    python benchmarks/scale.py plan [--device cuda]       # llama2-70b / mixtral-8x7b / qwen3-30b-a3b plans
    python benchmarks/scale.py lazy --model smollm2       # SmolLM2-135M (as safetensors), whole vs lazy
    python benchmarks/scale.py lazy --model random        # a random 1.6B Llama (30 blocks, bfloat16) saved to disk
    python benchmarks/scale.py ranks --model smollm2      # one process against two torchrun ranks (gloo, CPU)

``lazy`` runs ``train.py`` (RTN w4a16, 8 x 256 calibration tokens, 4 WikiText-2 windows of 256) twice in fresh
processes, the model whole and lazily held, and prints each run's peak resident memory (VmHWM), its
memory plan's CPU peak, the perplexities and whether the exported weights are identical. Models are written under
``outputs/scale/`` (the random model once: about 3.2 GB).

``ranks`` calibrates each method (RTN, GPTQ, AWQ, OmniQuant's default recipe with a global batch of 2) once in
one process and once data-parallel under ``torchrun`` (threads shared out so both use the same cores), and prints
the perplexities, their relative difference, the largest difference between the exported weights, and the times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "scale"
CONFIGS = REPO / "benchmarks" / "model_configs"
SMOLLM2 = REPO.parent / "shared" / "models" / "smollm2-135m-instruct"
RANDOM = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 30, "num_attention_heads": 16,
          "num_key_value_heads": 16, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def smollm2_safetensors() -> Path:
    """SmolLM2-135M dequantized from its GGUF file and saved as a safetensors checkpoint (lazy loading reads those)."""
    folder = OUT / "smollm2-135m-safetensors"
    if not (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(SMOLLM2, gguf_file=gguf, dtype="float32")
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder, max_shard_size="100MB")
        AutoTokenizer.from_pretrained(SMOLLM2, gguf_file=gguf).save_pretrained(folder)
    return folder


def random_llama() -> Path:
    """A random Llama of about 1.6B parameters (bfloat16, SmolLM2's tokenizer), saved in shards of 1 GB."""
    folder = OUT / "random-llama-1.6b"
    if not (folder / "model.safetensors.index.json").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(smollm2_safetensors())
        config = LlamaConfig(vocab_size=len(tokenizer), **RANDOM)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder, max_shard_size="1GB")
        tokenizer.save_pretrained(folder)
    return folder


def run_cell(model_dir: Path, dtype: str, lazy: bool) -> dict:
    out = OUT / "runs" / f"{model_dir.name}-lazy{int(lazy)}"
    cmd = [sys.executable, "train.py", "model=smollm2-135m", f"model.path={model_dir}", "model.gguf_file=null",
           f"model.dtype={dtype}", f"model.lazy={str(lazy).lower()}", "method=rtn", "quant=w4a16",
           "calib.nsamples=8", "calib.seqlen=256", "eval.seqlen=256", "eval.max_windows=4", "eval.corpora=[wikitext2]",
           "trainer.enable_progress_bar=false", f"output_dir={out}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    res = json.loads((out / "results.json").read_text())
    res["wall"] = time.perf_counter() - t0
    res["out"] = out
    return res


def export_tensors(run: Path) -> dict:
    """The fake-quant export of a run folder, every tensor by name."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run / "model").glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same_export(a: Path, b: Path) -> bool:
    import torch

    ta, tb = export_tensors(a), export_tensors(b)
    return set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def lazy(args) -> None:
    model_dir, dtype = (smollm2_safetensors(), "float32") if args.model == "smollm2" else (random_llama(), "bfloat16")
    rows = [run_cell(model_dir, dtype, flag) for flag in (False, True)]
    print(f"| {args.model} ({dtype}) | peak RSS GiB | plan CPU GiB | plan / measured | WikiText-2 fp -> w4a16 | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for flag, r in zip(("whole", "lazy"), rows, strict=True):
        peak, plan = r["memory"]["cpu_peak_rss_gib"], r["memory_plan"]["cpu"]["total_gib"]
        ppl = f"{r['perplexity_fp']['wikitext2']['perplexity']:.4f} -> {r['perplexity']['wikitext2']['perplexity']:.4f}"
        print(f"| {flag} | {peak:.3f} | {plan:.3f} | {plan / peak:.2f} | {ppl} | {r['wall']:.0f} |")
    print(f"lazy / whole peak: {rows[1]['memory']['cpu_peak_rss_gib'] / rows[0]['memory']['cpu_peak_rss_gib']:.3f}; "
          f"exported weights identical: {same_export(rows[0]['out'], rows[1]['out'])}")


RANK_MODELS = {"smollm2": ["model=smollm2-135m"], "stories260k": ["model=stories260k"]}


def ranks_cell(args, method: str, ranks: int) -> dict:
    """One calibration, by one process (2 threads) or by ``torchrun`` with ``ranks`` ranks (1 thread each)."""
    out = OUT / "ranks" / f"{args.model}-{method}-{ranks}"
    overrides = [*RANK_MODELS[args.model], f"method={method}", f"quant={args.quant}",
                 f"calib.nsamples={args.nsamples}", f"calib.seqlen={args.seqlen}", f"eval.max_windows={args.windows}",
                 "eval.fp_baseline=false", "trainer.enable_progress_bar=false", f"output_dir={out}"]
    if method == "omniquant":  # a global batch two ranks can split (the same batch for both)
        overrides += ["method.batch_size=2"] + ([f"method.epochs={args.epochs}"] if args.epochs else [])
    launcher = [sys.executable, "train.py"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // ranks))}
    subprocess.run(["rm", "-rf", str(out)], check=True)
    t0 = time.perf_counter()
    subprocess.run([*launcher, *overrides], cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=env)
    res = json.loads((out / "results.json").read_text())
    res["wall"], res["out"] = time.perf_counter() - t0, out
    return res


def max_export_difference(a: Path, b: Path) -> float:
    ta, tb = export_tensors(a), export_tensors(b)
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def ranks(args) -> None:
    print(f"| {args.model} {args.quant} | ranks | perplexity | relative difference | max export difference | "
          "calibration s | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method in args.methods.split(","):
        cells = {n: ranks_cell(args, method, n) for n in (1, args.ranks)}
        base = cells[1]
        for n, r in cells.items():
            corpus = next(iter(r["perplexity"]))
            ppl, ref = r["perplexity"][corpus]["perplexity"], base["perplexity"][corpus]["perplexity"]
            diff = max_export_difference(base["out"], r["out"]) if n > 1 else 0.0
            print(f"| {method} | {n} | {ppl:.4f} | {abs(ppl / ref - 1):.2e} | {diff:.2e} | "
                  f"{r['wall_seconds']['quantize']:.0f} | {r['wall']:.0f} |", flush=True)


def plan(args) -> None:
    for name in ("llama2-70b", "mixtral-8x7b", "qwen3-30b-a3b"):
        for flag in ("false", "true"):
            cmd = [sys.executable, "train.py", f"model={name}", f"model.path={CONFIGS / name}", f"method={args.method}",
                   f"model.lazy={flag}", "calib.dry_run=true", f"eval.max_windows={args.windows}",
                   "eval.corpora=[wikitext2]", f"device={args.device}"]
            out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
            print(f"### {name}, method={args.method}, model.lazy={flag}, device={args.device}\n```\n{out.strip()}\n```")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("lazy")
    a.add_argument("--model", choices=("smollm2", "random"), default="smollm2")
    a.set_defaults(fn=lazy)
    r = sub.add_parser("ranks", help="one process against torchrun ranks (gloo on this CPU)")
    r.add_argument("--model", choices=tuple(RANK_MODELS), default="smollm2")
    r.add_argument("--methods", default="rtn,gptq,awq,omniquant")
    r.add_argument("--quant", default="w4a16")
    r.add_argument("--ranks", type=int, default=2)
    r.add_argument("--threads", type=int, default=2, help="threads in all (each rank gets threads / ranks)")
    r.add_argument("--nsamples", type=int, default=16)
    r.add_argument("--seqlen", type=int, default=512)
    r.add_argument("--windows", type=int, default=20)
    r.add_argument("--epochs", type=int, default=0, help="omniquant epochs (0: the recipe's)")
    r.set_defaults(fn=ranks)
    b = sub.add_parser("plan")
    b.add_argument("--method", default="gptq")
    b.add_argument("--windows", type=int, default=40)
    b.add_argument("--device", default="cuda", help="the device the plan is for (a dry run needs none)")
    b.set_defaults(fn=plan)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
