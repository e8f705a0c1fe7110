"""`ActQuantizer`: fake-quantizes activations per token (dynamic) or per tensor (static, observed range)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from omniq_lightning.quant import fake_quant_per_tensor, fake_quant_per_token, tensor_range_params
from omniq_lightning.quant.spec import NO_QUANT_BITS


class ActQuantizer(nn.Module):
    """Per-token ranges are taken from each token at run time; a per-tensor range is observed first.

    To calibrate a static range, run data through with ``observing = True`` (values pass unchanged
    and the running min/max are recorded), then set it back to False.
    """

    def __init__(self, bits: int, granularity: str = "token", symmetric: bool = False, clip_init: float | None = None
                 ) -> None:
        super().__init__()
        self.bits, self.granularity, self.symmetric = bits, granularity, symmetric
        self.ranges = "detached"  # per-token: or "released" (differentiable min/max), set by the method
        self.observing = False
        # learnable activation clipping (per-token quantizers): logits [gamma (max side), beta (min side)]
        self.clip = None if clip_init is None or granularity != "token" else nn.Parameter(
            torch.full((2,), float(clip_init)), requires_grad=False)
        if granularity == "tensor":
            self.register_buffer("lo", torch.tensor(float("inf")))
            self.register_buffer("hi", torch.tensor(float("-inf")))

    def reset_range(self) -> None:
        """Forget the observed range (a static quantizer must be observed again before use)."""
        if self.granularity == "tensor":
            self.lo.fill_(float("inf"))
            self.hi.fill_(float("-inf"))

    @property
    def active(self) -> bool:
        return self.bits != NO_QUANT_BITS

    @property
    def static(self) -> bool:
        """Whether its range is observed on calibration data before use."""
        return self.granularity == "tensor"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if self.granularity == "token":
            return fake_quant_per_token(x, self.bits, self.symmetric, self.ranges, clip=self.clip)
        if self.observing:
            with torch.no_grad():
                self.lo.copy_(torch.minimum(self.lo, x.detach().min().float()))
                self.hi.copy_(torch.maximum(self.hi, x.detach().max().float()))
            return x
        if not torch.isfinite(self.lo):
            raise RuntimeError("a per-tensor activation quantizer was used before its range was observed")
        scale, zero = tensor_range_params(self.lo, self.hi, self.bits, self.symmetric)
        return fake_quant_per_tensor(x, scale.to(x.device), zero.to(x.device), self.bits, self.symmetric)

    def extra_repr(self) -> str:
        lac = "" if self.clip is None else " +LAC"
        return f"a{self.bits} per-{self.granularity} {'sym' if self.symmetric else 'asym'}{lac}"


OBSERVERS = ("minmax", "ema_minmax")


def check_observer(observer: str, ema_decay: float) -> None:
    if observer not in OBSERVERS:
        raise ValueError(f"method.observer must be one of {OBSERVERS}, got {observer!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"method.ema_decay must be in [0, 1) (the released RPTQ uses 0.99), got {ema_decay}")


class ClusterActQuantizer(nn.Module):
    """RPTQ's activation quantizer: channels grouped into clusters (``labels``: a cluster id per channel,
    broadcast against the activation's trailing dimensions, e.g. ``[C]`` for a linear's input or
    ``[heads, 1, head_dim]`` for attention keys), one range per cluster.

    Static (default): each cluster's range is observed on the calibration data (``observing``), then fixed.
    ``observer="minmax"`` keeps the extremes over every calibration token; ``"ema_minmax"`` (the released RPTQ
    code's default) keeps, per channel, an exponential moving average of each observed batch's min and max
    (``ema_decay`` for the old value; the first batch starts it), a cluster's range being the extremes of its
    channels' averages. Dynamic: each token's range within each cluster, at run time.
    """

    def __init__(self, bits: int, labels: torch.Tensor, n_clusters: int, symmetric: bool = False,
                 dynamic: bool = False, observer: str = "minmax", ema_decay: float = 0.99) -> None:
        super().__init__()
        check_observer(observer, ema_decay)
        self.bits, self.symmetric, self.dynamic, self.n_clusters = bits, symmetric, dynamic, n_clusters
        self.observer, self.ema_decay = observer, ema_decay
        self.observing = False
        self._channel_lo: torch.Tensor | None = None  # ema_minmax: the per-channel averages while observing
        self._channel_hi: torch.Tensor | None = None
        # its settings travel with its state (an export re-creates it from these buffers alone)
        self.register_buffer("config", torch.tensor([bits, int(symmetric), int(dynamic), n_clusters]))
        self.register_buffer("labels", labels.long().clone())  # its own copy: buffers are saved one by one
        self.register_buffer("lo", torch.full((n_clusters,), float("inf")))
        self.register_buffer("hi", torch.full((n_clusters,), float("-inf")))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> ClusterActQuantizer:
        """Re-create a quantizer from its saved buffers (``config``, ``labels``, ``lo``, ``hi``)."""
        bits, symmetric, dynamic, n = (int(v) for v in state["config"].tolist())
        q = cls(bits, state["labels"], n, bool(symmetric), bool(dynamic))
        q.load_state_dict(state)
        return q

    @property
    def active(self) -> bool:
        return self.bits != NO_QUANT_BITS

    @property
    def static(self) -> bool:
        return not self.dynamic

    def reset_range(self) -> None:
        self.lo.fill_(float("inf"))
        self.hi.fill_(float("-inf"))
        self._channel_lo = self._channel_hi = None

    def _per_channel(self, x: torch.Tensor, reduce: str) -> torch.Tensor:
        """Per channel (each element of ``labels``): the min or max of ``x`` over the dimensions it broadcasts."""
        x = x.detach().float()
        shape = (1,) * (x.dim() - self.labels.dim()) + tuple(self.labels.shape)
        dims = [d for d in range(x.dim()) if shape[d] == 1]
        out = x.amin(dims, keepdim=True) if reduce == "amin" else x.amax(dims, keepdim=True)
        return out.reshape(self.labels.shape)

    def _observe(self, x: torch.Tensor) -> None:
        if self.observer == "minmax":
            self.lo.copy_(torch.minimum(self.lo, self._per_cluster(x, "amin")))
            self.hi.copy_(torch.maximum(self.hi, self._per_cluster(x, "amax")))
            return
        lo, hi = self._per_channel(x, "amin"), self._per_channel(x, "amax")
        if self._channel_lo is not None:
            d = self.ema_decay
            lo, hi = d * self._channel_lo + (1 - d) * lo, d * self._channel_hi + (1 - d) * hi
        self._channel_lo, self._channel_hi = lo, hi
        self.lo.copy_(self._per_cluster(lo, "amin"))
        self.hi.copy_(self._per_cluster(hi, "amax"))

    def _per_cluster(self, x: torch.Tensor, reduce: str) -> torch.Tensor:
        """Per cluster: the min or max over every element of ``x`` in it."""
        labels = self.labels.to(x.device).expand_as(x).reshape(-1)
        fill = float("inf") if reduce == "amin" else float("-inf")
        out = torch.full((self.n_clusters,), fill, device=x.device, dtype=torch.float32)
        return out.scatter_reduce(0, labels, x.detach().reshape(-1).float(), reduce, include_self=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if self.observing:
            with torch.no_grad():
                self._observe(x)
            return x
        labels = self.labels.to(x.device).expand_as(x)
        if self.dynamic:  # each token's own range in each cluster
            tokens = x.detach().float().reshape(-1, x.shape[-1])
            lab = labels.reshape(-1, x.shape[-1])
            lo = torch.full((tokens.shape[0], self.n_clusters), float("inf"), device=x.device)
            hi = torch.full_like(lo, float("-inf"))
            lo = lo.scatter_reduce(1, lab, tokens, "amin").gather(1, lab).reshape(x.shape)
            hi = hi.scatter_reduce(1, lab, tokens, "amax").gather(1, lab).reshape(x.shape)
        else:
            if not torch.isfinite(self.lo).all():
                raise RuntimeError("a per-cluster activation quantizer was used before its ranges were observed")
            lo, hi = self.lo.to(x.device)[labels], self.hi.to(x.device)[labels]
        scale, zero = tensor_range_params(lo, hi, self.bits, self.symmetric)
        return fake_quant_per_tensor(x, scale, zero, self.bits, self.symmetric)

    def extra_repr(self) -> str:
        kind = "dynamic per token" if self.dynamic else "static"
        return f"a{self.bits} per-cluster ({self.n_clusters} clusters, {kind}) {'sym' if self.symmetric else 'asym'}"


def restore_cluster_quantizers(root: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Put back the per-cluster quantizers a saved ``state`` of ``root`` holds (keys ``<module>.labels``) in place
    of the default ones a freshly built module has, so that ``root.load_state_dict(state)`` then fits."""
    for key in [k for k in state if k.endswith(".labels")]:
        module = key[: -len(".labels")]
        sub = {k[len(module) + 1 :]: v for k, v in state.items() if k.startswith(module + ".")}
        root.set_submodule(module, ClusterActQuantizer.from_state(sub))
