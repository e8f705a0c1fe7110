"""Where a weight-activation model's error sits: a finished run's fake-quant export, evaluated with one group of
activation quantizers switched off at a time (16 bits there, everything else as quantized).

    python benchmarks/error_sites.py outputs/rotation/cpu/gptq-quarot-w4a4 [--windows 4]

Sites: the attention's input (q/k/v projections), the o projection's input, the MLP's input (gate/up), the down
projection's input, the queries and the KV cache; then every block with all its activation quantizers off. The
perplexity recovered by switching a site off is what that site costs (on the run's first evaluation corpus, its
first ``--windows`` windows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omniq_lightning.data import load_corpus, tokenize  # noqa: E402
from omniq_lightning.eval import perplexity  # noqa: E402
from omniq_lightning.export import load_fake_quant  # noqa: E402
from omniq_lightning.nn import ActQuantizer, ClusterActQuantizer, QuantLinear, QuantMatMul  # noqa: E402
from omniq_lightning.solvers.hooks import quantizers_off  # noqa: E402

SITES = {
    "q/k/v input": lambda name: name.endswith(("q_proj", "k_proj", "v_proj", "qkv_proj")),
    "o input": lambda name: name.endswith(("o_proj", "out_proj")),
    "gate/up input": lambda name: name.endswith(("gate_proj", "up_proj", "gate_up_proj", "fc1")),
    "down input": lambda name: name.endswith(("down_proj", "fc2")),
}


def quantizers(model, block_prefix: str | None = None, site: str | None = None) -> list:
    found = []
    for name, m in model.named_modules():
        if block_prefix is not None and not name.startswith(block_prefix):
            continue
        if isinstance(m, QuantLinear) and m.act_quant is not None and (site is None or SITES.get(site, lambda n: False)(name)):
            found.append(m.act_quant)
        if isinstance(m, QuantMatMul):
            if site in (None, "queries"):
                found.append(m.q_quant)
            if site in (None, "KV cache"):
                found += [m.k_quant, m.v_quant]
    return [q for q in found if isinstance(q, (ActQuantizer, ClusterActQuantizer)) and q.active]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    config = json.loads((args.run / "results.json").read_text())["config"]
    loaded = load_fake_quant(args.run / "model")
    corpus, seqlen = config["eval"]["corpora"][0], int(config["eval"]["seqlen"])
    ids = tokenize(load_corpus(corpus, "eval", args.data_dir or config["paths"]["data_dir"]), loaded.tokenizer)

    def ppl() -> float:
        return perplexity(loaded.model, ids, seqlen, max_windows=args.windows).perplexity

    base = ppl()
    with quantizers_off(quantizers(loaded.model)):
        weights_only = ppl()
    print(f"{args.run.name}: {base:.2f} as quantized, {weights_only:.2f} with every activation in 16 bits "
          f"({corpus}, {args.windows} windows of {seqlen})")
    print("| activations in 16 bits at | perplexity | recovered |")
    print("|---|---|---|")
    for site in [*SITES, "queries", "KV cache"]:
        qs = quantizers(loaded.model, site=site)
        if not qs:
            continue
        with quantizers_off(qs):
            p = ppl()
        print(f"| {site} | {p:.2f} | {100 * (base - p) / max(base - weights_only, 1e-9):.0f}% |")
    prefix = loaded.adapter.blocks_prefix(loaded.model)
    for i in range(len(loaded.adapter.blocks(loaded.model))):
        with quantizers_off(quantizers(loaded.model, block_prefix=f"{prefix}.{i}.")):
            p = ppl()
        print(f"| block {i} | {p:.2f} | {100 * (base - p) / max(base - weights_only, 1e-9):.0f}% |")


if __name__ == "__main__":
    main()
