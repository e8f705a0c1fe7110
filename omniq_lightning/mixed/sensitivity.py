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

* ``local``: the same kind of expansion taken at the *base plan* (every linear in one uniform format, the one
  nearest the budget) instead of at full precision, ``g . d + 1/2 sum_ij F_ij d_ij^2`` with ``d = Q_c(W) -
  Q_base(W)`` and ``g``, ``F`` the mean gradient and the Fisher diagonal of the NLL *at the base plan*: it
  predicts what moving one linear away from the base does to a model whose other linears are all quantized,
  which is the question at 2 bits, where an expansion at full precision is far from the model being built
  (the first-order term no longer vanishes there). The full-precision expansion (the ``proxy``) is kept
  beside it, and ``mixed.search`` evaluates whole plans built from both. ``local-gptq`` rounds with GPTQ on
  each linear's input second moment instead of round-to-nearest (in both expansions).

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
from omniq_lightning.nn.formats import make_quantizer
from omniq_lightning.quant import QuantSpec, WeightFormat
from omniq_lightning.quant.gptq import gptq_quantize

NEAREST = QuantSpec(lwc=False)  # a candidate's quantizer without learned clipping: round to nearest on full ranges


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


def gradient_moments(model: nn.Module, windows: torch.Tensor, names: Sequence[str], device: torch.device
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per named linear, the mean over windows of the gradient of a window's mean NLL, and of its square (the
    empirical Fisher diagonal), for the weights (float32, CPU)."""
    with grads_for(model, names) as params:
        mean = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
        fisher = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
        for w in windows:
            grads = torch.autograd.grad(window_nll(model, w, device), list(params.values()))
            for n, g in zip(params, grads, strict=True):
                g = g.detach().float().cpu()
                mean[n] += g / len(windows)
                fisher[n] += g.pow(2) / len(windows)
    return mean, fisher


def fisher_diagonal(model: nn.Module, windows: torch.Tensor, names: Sequence[str], device: torch.device):
    """The empirical Fisher diagonal of the windows' mean NLL for the named linears' weights (float32, CPU)."""
    return gradient_moments(model, windows, names, device)[1]


def _moment_hook(H: dict[str, torch.Tensor], name: str, windows: int, outputs: dict | None = None):
    """A forward hook adding a window's mean ``x x^T`` of the linear's inputs (over ``windows``) to ``H[name]``
    (float64, CPU), and keeping its output in ``outputs`` where given."""
    def record(_m, args, out):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        H[name] += (x.T @ x).cpu() / (x.shape[0] * windows)
        if outputs is not None:
            outputs[name] = out
    return record


@torch.no_grad()
def input_moments(model: nn.Module, windows: torch.Tensor, names: Sequence[str], device: torch.device
                  ) -> dict[str, torch.Tensor]:
    """Per named linear, the mean ``x x^T`` of its inputs over the windows' tokens (float32, CPU): the
    second moment GPTQ solves with."""
    mods = {n: model.get_submodule(n) for n in names}
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mods.items()}
    handles = [m.register_forward_hook(_moment_hook(H, n, len(windows))) for n, m in mods.items()]
    try:
        for w in windows:
            model(input_ids=w[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: h.float() for n, h in H.items()}


def rounded(w: torch.Tensor, fmt: WeightFormat, H: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` in format ``fmt``: round-to-nearest, or GPTQ's rounding given the input second moment ``H`` (GPTQ's
    default dampening and block size)."""
    quantizer = make_quantizer(fmt, *w.shape, NEAREST, device=w.device)  # any kind with the grid capability
    if quantizer is None:  # a 16-bit candidate (where no quantized one fits, as llama.cpp leaves such rows)
        return w.clone()
    if H is None:
        return quantizer.fake_quant_with(w)
    w32 = w.detach().float()
    quantize, _ = quantizer.column_quantizer(w32)
    return gptq_quantize(w32, H.double(), quantize).to(w.dtype)


def local_expansion(model: nn.Module, fits: Mapping[str, Sequence[WeightFormat]], base: WeightFormat,
                    windows: torch.Tensor, device: torch.device, moments: Mapping[str, torch.Tensor] | None = None,
                    cache: dict | None = None) -> dict[str, dict[WeightFormat, tuple[float, float]]]:
    """Per linear and candidate ``c``, two predictions of the NLL increase, ``(local, full)``:

    * ``local = g . d + 1/2 sum F d^2`` with ``d = Q_c(W) - Q_base(W)`` and ``g``, ``F`` the NLL's mean gradient
      and Fisher diagonal with every named linear at ``base``: the expansion at the base plan;
    * ``full = 1/2 sum F0 (Q_c(W) - W)^2``, ``F0`` the Fisher diagonal at full precision: the expansion there
      (the ``proxy``, with the same rounding).

    Rounding is GPTQ's where ``moments`` gives the linears' input second moments, else round-to-nearest; the
    base roundings are left in ``cache`` (``(name, format) -> weight``)."""
    H = moments or {}
    cache = {} if cache is None else cache
    names = list(fits)
    fisher0 = fisher_diagonal(model, windows, names, device)
    for n in names:
        if (n, base) not in cache:
            cache[(n, base)] = rounded(model.get_submodule(n).weight.detach().cpu(), base, H.get(n))
    with plan_weights(model, {n: base for n in names}, H, cache):
        mean, fisher = gradient_moments(model, windows, names, device)
    scores: dict[str, dict[WeightFormat, tuple[float, float]]] = {}
    for n, formats in fits.items():
        w = model.get_submodule(n).weight.detach().cpu().float()
        qb = cache[(n, base)].float()
        scores[n] = {}
        for c in formats:
            q = qb if c == base else rounded(w, c, H.get(n)).float()
            d = q - qb
            local = float((mean[n] * d).sum() + 0.5 * (fisher[n] * d.pow(2)).sum())
            scores[n][c] = (local, 0.5 * float((fisher0[n] * (q - w).pow(2)).sum()))
    return scores


@contextlib.contextmanager
def plan_weights(model: nn.Module, formats: Mapping[str, WeightFormat], moments: Mapping[str, torch.Tensor],
                 cache: Mapping | None = None) -> Iterator[None]:
    """While active, the named linears hold their weights rounded to ``formats`` (taken from ``cache``,
    ``(name, format) -> weight``, where it has them); the weights are restored after."""
    originals = {n: model.get_submodule(n).weight.data for n in formats}
    cache = cache or {}
    try:
        for n, f in formats.items():
            q = cache[(n, f)] if (n, f) in cache else rounded(originals[n].cpu(), f, moments.get(n))
            model.get_submodule(n).weight.data = q.to(device=originals[n].device, dtype=originals[n].dtype)
        yield
    finally:
        for n, w in originals.items():
            model.get_submodule(n).weight.data = w


def kfac_factors(model: nn.Module, windows: torch.Tensor, names: Sequence[str], device: torch.device
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per named linear, the Kronecker factors of its empirical Fisher (float64, CPU): ``H`` ``[in, in]``, the
    mean of ``x x^T`` over a window's tokens, and ``S`` ``[out]``, the sum over its tokens of the squared
    gradient of the window's mean NLL at each output; both averaged over the windows."""
    mods = {n: model.get_submodule(n) for n in names}
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mods.items()}
    S = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(_moment_hook(H, n, len(windows), outputs)) for n, m in mods.items()]
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
    return rounded(w, fmt, H) - w


LOCAL = ("local", "local-gptq")


def _key(fmt: WeightFormat) -> str:
    return json.dumps(fmt.to_dict(), sort_keys=True)


class SensitivityStore:
    """``sensitivity.json``: per linear, per candidate format (its JSON), the predicted NLL increase (for the
    local estimators, the pair ``[local, full]`` of ``local_expansion``)."""

    def __init__(self, path: Path, estimator: str, windows: int, base: WeightFormat | None = None) -> None:
        self.path, self.estimator, self.windows = path, estimator, windows
        self.base = None if base is None else base.to_dict()  # what the local estimators expanded around
        self.scores: dict[str, dict[str, float]] = {}
        self.seconds = 0.0
        if path.is_file():
            data = json.loads(path.read_text())
            if (data.get("estimator"), data.get("windows"), data.get("base")) == (estimator, windows, self.base):
                self.scores, self.seconds = data["scores"], float(data.get("seconds", 0.0))

    def get(self, name: str, fmt: WeightFormat) -> float | list[float] | None:
        return self.scores.get(name, {}).get(_key(fmt))

    def put(self, name: str, fmt: WeightFormat, value: float | list[float]) -> None:
        self.scores.setdefault(name, {})[_key(fmt)] = value

    def save(self) -> None:
        write_json(self.path, {"estimator": self.estimator, "windows": self.windows, "base": self.base,
                               "seconds": round(self.seconds, 3), "scores": self.scores})


def sensitivities(model: nn.Module, shapes: Mapping[str, tuple[int, int]], candidates: Sequence[WeightFormat],
                  windows: torch.Tensor, estimator: str, store: SensitivityStore, device: torch.device,
                  progress: Callable[[str], None] = print, base: WeightFormat | None = None,
                  moments: Mapping[str, torch.Tensor] | None = None, cache: dict | None = None
                  ) -> dict[str, dict[WeightFormat, float]]:
    """Every linear's predicted NLL increase per candidate that fits it (a group size must divide its width).
    The ``local`` estimators expand around ``base`` (with GPTQ rounding on ``moments`` for ``local-gptq``; the
    base roundings are kept in ``cache``)."""
    fits = {n: [c for c in candidates if c.fits(in_f)] for n, (_, in_f) in shapes.items()}
    missing = [n for n in shapes if any(store.get(n, c) is None for c in fits[n])]
    model.to(device)
    t0 = time.perf_counter()
    if missing and estimator == "proxy":
        fisher = fisher_diagonal(model, windows, missing, device)
        for n in missing:
            w = model.get_submodule(n).weight.detach().float().cpu()
            for c in fits[n]:
                err = rounded(w, c) - w
                store.put(n, c, 0.5 * float((fisher[n] * err.pow(2)).sum()))
        store.seconds += time.perf_counter() - t0
        store.save()
    elif missing and estimator in LOCAL:
        if base is None:
            raise ValueError(f"the {estimator} estimator needs a base format to expand around")
        for n, by_format in local_expansion(model, {n: fits[n] for n in missing}, base, windows, device,
                                            moments, cache).items():
            for c, v in by_format.items():
                store.put(n, c, list(v))
        store.seconds += time.perf_counter() - t0
        store.save()
    elif missing and estimator in ("kfac", "kfac-gptq"):
        factors = kfac_factors(model, windows, missing, device)
        for k, n in enumerate(missing):
            H, S = factors.pop(n)
            w = model.get_submodule(n).weight.detach().float().cpu()
            for c in fits[n]:
                err = gptq_error(w, H, c) if estimator == "kfac-gptq" else rounded(w, c) - w
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
                    lin.weight.data = rounded(w0, c)
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
