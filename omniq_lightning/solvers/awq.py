"""AWQ's closed forms on the block rails: the activation-aware scale search over the block's diagonal transforms,
then the clipping search (see ``methods/awq.py`` for the method, and OmniQuant's default recipe, which starts
from them).

Scales: for each site AutoAWQ searches (norm -> linears, v -> o when there is one value head per query head,
up -> down / fc1 -> fc2), ``s = mean|x|^r`` normalised by ``sqrt(max(s) min(s))``,
with ``r`` on a grid in [0, 1); the ``r`` that minimises the paper's objective wins: the output error of
the site's target linears, ``sum_t || Q(W_t diag(s)) (diag(s)^-1 x_t) - W_t x_t ||^2``, on sampled inputs
(the same tokens the clipping search uses; cheap enough to search every site of every block on a CPU).
Clipping: for each linear but the query and key projections, output channel and group, the range is shrunk
on a grid (1.0 down to ``1 - max_shrink``) to minimise that group's output error on sampled inputs; the
chosen ratio is stored as LWC logits, so folding is the same as for OmniQuant.
"""

from __future__ import annotations

import torch

from omniq_lightning import distributed
from omniq_lightning.calib import ActivationCache
from omniq_lightning.calib.loop import current_sample
from omniq_lightning.calib.phases import phase
from omniq_lightning.nn import NO_CLIP_LOGIT, LETRouter, QuantLinear, clip_logit
from omniq_lightning.solvers.hooks import run_with_input_hooks, weight_linears
from omniq_lightning.transforms import QuantBlock

MAX_CLIP_ROWS = 2048  # tokens sampled per linear for the clipping search
AWQ_LOCATIONS = ("norm", "vo", "up_down")  # AutoAWQ's pairs: norm -> linears, v -> o, up -> down (fc1 -> fc2)
NO_CLIP_SUFFIXES = ("q_proj", "k_proj", "qkv_proj")


@torch.no_grad()
def linear_inputs(qblock: QuantBlock, inputs: ActivationCache, ctx, max_rows: int) -> dict[str, torch.Tensor]:
    """Per weight-quantized linear (and MoE router): its inputs (as transformed by the current LET), up to
    ``max_rows`` tokens spread evenly over the calibration samples, each sample's stride starting at its own
    offset (so the first token, LLaMA's attention sink, is not over-represented). An MoE expert sees only the
    tokens routed to it; one that sees none has no entry."""
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
    per_sample = max(1, max_rows // inputs.total)

    def keep(name: str):
        def fn(x: torch.Tensor) -> None:
            x = x.detach().reshape(-1, x.shape[-1]).float()
            step = max(1, x.shape[0] // per_sample)
            j = current_sample()
            rows.setdefault(name, []).append((j, x[(j * 7919) % step :: step][:per_sample]))

        return fn

    names = [*weight_linears(qblock), *(n for n, m in qblock.block.named_modules() if isinstance(m, LETRouter))]
    with phase("input sampling"):
        run_with_input_hooks(qblock, inputs, ctx, {n: keep(n) for n in names})
    return gathered_rows(rows)


def gathered_rows(rows: dict[str, list[tuple[int, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Per name, the sampled rows of every rank of a data-parallel run, in sample order (one process's: its own)."""
    if distributed.active():
        device = next((t.device for v in rows.values() for _, t in v), torch.device("cpu"))
        merged: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for other in distributed.gather({n: [(j, t.cpu()) for j, t in v] for n, v in rows.items()}):
            for n, v in other.items():
                merged.setdefault(n, []).extend((j, t.to(device)) for j, t in v)
        rows = merged
    return {n: torch.cat([t for _, t in sorted(v, key=lambda jt: jt[0])]) for n, v in rows.items()}


def quantized_targets(qblock: QuantBlock, pair) -> list[str]:
    """The pair's targets whose weights are quantized (a router or a full-precision gate has no error to search)."""
    return [t for t in pair.targets if getattr(qblock.block.get_submodule(t), "wq", None) is not None]


def quadratic_output_mse(d: torch.Tensor, gram: torch.Tensor, n_tokens: int) -> float:
    """``mean((X d^T)^2)`` over the ``n_tokens`` rows of ``X`` and the rows of ``d`` [out, in], from ``X``'s Gram
    matrix ``X^T X`` [in, in] alone."""
    return ((d @ gram) * d).sum().item() / (n_tokens * d.shape[0])


@torch.no_grad()
def pair_error(
    qblock: QuantBlock, pair, x: dict[str, torch.Tensor], refs: dict[str, torch.Tensor | None], s: torch.Tensor,
    grams: dict[str, torch.Tensor],
) -> float:
    """AWQ's objective for one candidate scale: the mean squared output error of the pair's target linears
    (against their full-precision outputs) when their weight columns are multiplied by ``s`` before quantization
    and their inputs divided by it (and quantized, when the linear quantizes its input). A linear with a
    full-precision input has no ``refs`` entry but its inputs' Gram matrix in ``grams``: its error is the
    quadratic form of the weight error, ``tr(D^T X^T X D)`` with ``D = diag(1/s) Q(W diag(s))^T - W^T``, without
    a product over the tokens per candidate."""
    s_t = pair.expand_target(s)
    err = 0.0
    for name, ref in refs.items():
        lin = qblock.block.get_submodule(name)
        w = lin.effective()[0].float()
        wq = lin.wq.fake_quant_with(w * s_t)
        if ref is None:
            d = wq / s_t - w  # [out, in]
            err += quadratic_output_mse(d, grams[name], x[name].shape[0])
            continue
        xs = lin.act_quant(x[name] / s_t)
        err += torch.mean((xs @ wq.T - ref) ** 2).item()
    return err


@torch.no_grad()
def search_scales(qblock: QuantBlock, inputs: ActivationCache, ctx, n_grid: int) -> dict:
    """Grid-search each norm/linear pair's scale exponent; pairs AWQ does not use are removed."""
    for name in [n for n, p in qblock.let.items() if p.location == "qk"]:
        del qblock.let[name]
    for pair in qblock.let.values():
        pair.scale.fill_(1.0)
        pair.shift = None
    for wq in qblock.weight_quantizers():  # scales are searched on plain min/max ranges; clipping comes after
        if wq.lwc_gamma is not None:
            wq.set_clip(NO_CLIP_LOGIT)
    x = linear_inputs(qblock, inputs, ctx, MAX_CLIP_ROWS)
    chosen = {}
    for name, pair in list(qblock.let.items()):
        targets = [t for t in quantized_targets(qblock, pair) if t in x]
        if pair.targets[0] not in x or not targets:  # an MoE expert that got no calibration token: unscaled
            del qblock.let[name]
            continue
        mean_abs = x[pair.targets[0]].abs().mean(0)
        if mean_abs.numel() != pair.scale.numel():  # e.g. v -> o under grouped-query attention: not searched
            del qblock.let[name]
            continue
        refs, grams = {}, {}
        for t in targets:
            lin = qblock.block.get_submodule(t)
            if lin.act_quant is None:  # full-precision inputs: the error is a quadratic form in the weights
                refs[t] = None
                # linears that read the same input (q/k/v, gate/up) share its Gram matrix
                same = next((u for u in grams if torch.equal(x[u], x[t])), None)
                grams[t] = grams[same] if same is not None else x[t].T @ x[t]
            else:
                refs[t] = x[t] @ lin.effective()[0].float().T
        best = (float("inf"), 0.0, torch.ones_like(pair.scale))
        for r in range(n_grid):
            ratio = r / n_grid
            s = mean_abs.pow(ratio).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            err = pair_error(qblock, pair, x, refs, s, grams)
            if err < best[0]:
                best = (err, ratio, s.clone())
        pair.scale.copy_(best[2])
        chosen[name] = best[1]
    return chosen


def group_gram(x: torch.Tensor, group: int) -> torch.Tensor:
    """Per input group, the Gram matrix of the sampled inputs ``x`` [tokens, in]: [groups, group, group]."""
    xg = x.T.reshape(x.shape[1] // group, group, -1)  # [groups, group, tokens]
    return xg @ xg.transpose(1, 2)


def group_output_errors(diff: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``sum_t (diff[o, g] . x_g[t])^2`` for every output channel ``o`` and input group ``g`` (``diff``:
    [out, groups, group], the weight error), through the groups' Gram matrices: one ``group x group`` product per
    channel and group instead of one per token, and no [out, groups, tokens] intermediate."""
    return torch.einsum("ogk,gkl,ogl->og", diff, gram, diff)


@torch.no_grad()
def search_clipping(qblock: QuantBlock, inputs: ActivationCache, ctx, n_grid: int, max_shrink: float) -> None:
    """Per output channel and group, the clip ratio minimising ``|| (Q(W) - W) x ||^2`` on sampled inputs."""
    if len(qblock.let):
        qblock.apply_let()
    x = linear_inputs(qblock, inputs, ctx, MAX_CLIP_ROWS)
    ratios = [1.0 - max_shrink * i / n_grid for i in range(n_grid + 1)]
    for name, lin in qblock.block.named_modules():
        if not isinstance(lin, QuantLinear) or lin.wq is None or lin.wq.lwc_gamma is None or name not in x:
            continue
        if name.endswith(NO_CLIP_SUFFIXES):  # as AutoAWQ: query and key projections are not clipped
            continue
        wq = lin.wq
        w = lin.effective()[0].detach().float()
        group = wq.clip_group
        gram = group_gram(x[name], group)
        best_err = torch.full(wq.lwc_gamma.shape, float("inf"), device=w.device)
        best_logit = torch.empty_like(best_err)
        for r in ratios:
            lg = torch.full_like(best_err, clip_logit(r))
            q = wq.fake_quant_with(w, lg, lg)
            err = group_output_errors((q - w).reshape(lin.out_features, -1, group), gram)  # [out, groups]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_logit = torch.where(better, lg, best_logit)
        wq.set_clip(best_logit)


def awq_block(qblock: QuantBlock, inputs, ctx, n_grid: int, clip: bool, max_shrink: float) -> dict:
    with phase("awq scale search"):
        chosen = search_scales(qblock, inputs, ctx, n_grid)
    if clip:
        with phase("awq clipping search"):
            search_clipping(qblock, inputs, ctx, n_grid, max_shrink)
    return chosen
