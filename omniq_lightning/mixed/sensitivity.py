"""How much each linear's quantization costs the model, per candidate format (the input of bit allocation).

Both estimators predict the increase of the model's next-token NLL on calibration windows, so linears of
different blocks compare on one scale:

* ``measured``: quantize that linear alone (round-to-nearest in the candidate format, every other weight
  in full precision) and measure the NLL increase: one model forward per linear, candidate and window.
* ``proxy``: the diagonal (empirical) Fisher of the NLL times the squared quantization error,
  ``1/2 sum_ij F_ij (Q(W) - W)_ij^2`` (the second-order estimate HAWQ and OBD use): one forward and
  backward per window, then no model run at all per candidate.
* ``kfac``: the Kronecker-factored Fisher instead of its diagonal, ``1/2 sum_r S_r d_r H d_r^T`` with
  ``d = Q(W) - W``, ``H`` the mean ``x x^T`` of the linear's inputs and ``S_r`` the summed squared gradient of
  the NLL at output ``r`` (per window, averaged over windows; its diagonal is the ``proxy``'s Fisher under the
  same token-independence assumption). It sees how a row's errors add up through correlated inputs, which
  is what GPTQ's error feedback exploits; ``kfac-gptq`` takes ``d`` from GPTQ on ``H`` (the rounding a GPTQ
  run gives that linear alone) instead of round-to-nearest. One forward and backward per window, then one
  ``[out, in] x [in, in]`` product (and for ``kfac-gptq`` one GPTQ solve) per linear and candidate.

Scores are written to ``sensitivity.json`` as they are computed (atomically, linear by linear for the
measured estimator), and a rerun continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from omniq_lightning.io import write_json
from omniq_lightning.quant import WeightFormat, fake_quant_weight
from omniq_lightning.quant.gptq import format_column_quantizer, gptq_quantize


def linear_shapes(model: nn.Module, adapter) -> dict[str, tuple[int, int]]:
    """Every linear of every block that gets quantized, by its name in the model: ``(out, in)``."""
    prefix = adapter.blocks_prefix(model)
    shapes = {}
    for i, block in enumerate(adapter.blocks(model)):
        keep = adapter.keep_full_precision(block)
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear) and name not in keep:
                shapes[f"{prefix}.{i}.{name}"] = (m.out_features, m.in_features)
    return shapes


def window_nll(model: nn.Module, window: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The mean next-token NLL of one token window (differentiable)."""
    ids = window[None].to(device)
    return F.cross_entropy(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), ids[0, 1:])


@torch.no_grad()
def nll(model: nn.Module, windows: torch.Tensor, device: torch.device) -> float:
    """Mean next-token NLL of ``model`` over the token windows ``[n, seqlen]``."""
    return sum(window_nll(model, w, device).item() for w in windows) / len(windows)


@contextlib.contextmanager
def grads_for(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, nn.Parameter]]:
    """While active, only the named linears' weights require gradients (each parameter's flag is restored after)."""
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    params = {n: model.get_submodule(n).weight for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def fisher_diagonal(model: nn.Module, windows: torch.Tensor, names: Sequence[str], device: torch.device):
    """The empirical Fisher diagonal of the windows' mean NLL for the named linears' weights (float32, CPU)."""
    with grads_for(model, names) as params:
        fisher = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
        for w in windows:
            grads = torch.autograd.grad(window_nll(model, w, device), list(params.values()))
            for n, g in zip(params, grads, strict=True):
                fisher[n] += g.detach().float().pow(2).cpu() / len(windows)
    return fisher


def kfac_factors(model: nn.Module, windows: torch.Tensor, names: Sequence[str], device: torch.device
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per named linear, the Kronecker factors of its empirical Fisher (float64, CPU): ``H`` ``[in, in]``, the
    mean of ``x x^T`` over a window's tokens, and ``S`` ``[out]``, the sum over its tokens of the squared
    gradient of the window's mean NLL at each output; both averaged over the windows."""
    mods = {n: model.get_submodule(n) for n in names}
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mods.items()}
    S = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_m, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            H[name] += (x.T @ x).cpu() / (x.shape[0] * len(windows))
            outputs[name] = out
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        with grads_for(model, names):  # the weights require gradients, so the outputs carry them
            for w in windows:
                loss = window_nll(model, w, device)
                names_out = list(outputs)
                grads = torch.autograd.grad(loss, [outputs[n] for n in names_out])
                for n, g in zip(names_out, grads, strict=True):
                    S[n] += g.detach().to(torch.float64).reshape(-1, g.shape[-1]).pow(2).sum(0).cpu() / len(windows)
                outputs.clear()
    finally:
        for h in handles:
            h.remove()
    return {n: (H[n], S[n]) for n in names}


def kfac_score(error: torch.Tensor, H: torch.Tensor, S: torch.Tensor) -> float:
    """``1/2 sum_r S_r e_r H e_r^T``: the K-FAC second-order NLL increase of a weight error ``e`` ``[out, in]``."""
    e = error.to(torch.float64)
    return 0.5 * float((S * ((e @ H) * e).sum(1)).sum())


def gptq_error(w: torch.Tensor, H: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """The weight error GPTQ leaves in format ``fmt``, given the input second moment ``H``."""
    w = w.detach().float()
    quantize, _ = format_column_quantizer(w, fmt)
    return gptq_quantize(w, H, quantize) - w  # GPTQ's default dampening and block size


def _key(fmt: WeightFormat) -> str:
    return json.dumps(fmt.to_dict(), sort_keys=True)


class SensitivityStore:
    """``sensitivity.json``: per linear, per candidate format (its JSON), the predicted NLL increase."""

    def __init__(self, path: Path, estimator: str, windows: int) -> None:
        self.path, self.estimator, self.windows = path, estimator, windows
        self.scores: dict[str, dict[str, float]] = {}
        self.seconds = 0.0
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("estimator") == estimator and data.get("windows") == windows:
                self.scores, self.seconds = data["scores"], float(data.get("seconds", 0.0))

    def get(self, name: str, fmt: WeightFormat) -> float | None:
        return self.scores.get(name, {}).get(_key(fmt))

    def put(self, name: str, fmt: WeightFormat, value: float) -> None:
        self.scores.setdefault(name, {})[_key(fmt)] = value

    def save(self) -> None:
        write_json(self.path, {"estimator": self.estimator, "windows": self.windows, "seconds": round(self.seconds, 3),
                               "scores": self.scores})


def sensitivities(model: nn.Module, shapes: Mapping[str, tuple[int, int]], candidates: Sequence[WeightFormat],
                  windows: torch.Tensor, estimator: str, store: SensitivityStore, device: torch.device,
                  progress: Callable[[str], None] = print) -> dict[str, dict[WeightFormat, float]]:
    """Every linear's predicted NLL increase per candidate that fits it (a group size must divide its width)."""
    fits = {n: [c for c in candidates if in_f % (c.group_size or in_f) == 0] for n, (_, in_f) in shapes.items()}
    missing = [n for n in shapes if any(store.get(n, c) is None for c in fits[n])]
    model.to(device)
    t0 = time.perf_counter()
    if missing and estimator == "proxy":
        fisher = fisher_diagonal(model, windows, missing, device)
        for n in missing:
            w = model.get_submodule(n).weight.detach().float().cpu()
            for c in fits[n]:
                err = fake_quant_weight(w, c) - w
                store.put(n, c, 0.5 * float((fisher[n] * err.pow(2)).sum()))
        store.seconds += time.perf_counter() - t0
        store.save()
    elif missing and estimator in ("kfac", "kfac-gptq"):
        factors = kfac_factors(model, windows, missing, device)
        for k, n in enumerate(missing):
            H, S = factors.pop(n)
            w = model.get_submodule(n).weight.detach().float().cpu()
            for c in fits[n]:
                err = gptq_error(w, H, c) if estimator == "kfac-gptq" else fake_quant_weight(w, c) - w
                store.put(n, c, kfac_score(err, H, S))
            if k % 40 == 0:
                progress(f"sensitivity ({estimator}): {k + 1}/{len(missing)} linears")
        store.seconds += time.perf_counter() - t0
        store.save()
    elif missing:
        base = nll(model, windows, device)
        for k, n in enumerate(missing):
            lin = model.get_submodule(n)
            w0 = lin.weight.detach().clone()
            try:
                for c in fits[n]:
                    lin.weight.data = fake_quant_weight(w0, c)
                    store.put(n, c, nll(model, windows, device) - base)
            finally:
                lin.weight.data = w0
            store.seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            store.save()  # resumable linear by linear
            if k % 20 == 0:
                progress(f"sensitivity (measured): {k + 1}/{len(missing)} linears")
    if not all(fits.values()):
        raise ValueError(f"no candidate format fits {[n for n, f in fits.items() if not f][:3]}: add a candidate "
                         "whose group size divides those widths (or a per-channel one)")
    return {n: {c: store.get(n, c) for c in fits[n]} for n in shapes}
