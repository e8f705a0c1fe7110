"""`ActivationCache`: block inputs and targets, on the GPU, in pinned CPU memory or in a disk memmap.

One object, one interface, wherever the tensors live (and whichever share of the calibration samples it holds:
``ids``, of ``total``): ``cache[i]`` returns sample ``i`` on the compute
device, ``cache[i] = x`` stores it, ``cache.batch(idx)`` gathers several samples. The disk backend maps
a file (``torch.from_file``), so models whose calibration activations do not fit in memory still run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

LOCATIONS = ("device", "cpu", "pinned", "disk", "auto")


class ActivationCache:
    def __init__(
        self,
        n: int,
        sample_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str,
        where: str = "auto",
        path: str | os.PathLike | None = None,
        ids: Sequence[int] | None = None,
        total: int | None = None,
    ) -> None:
        if where not in LOCATIONS:
            raise ValueError(f"calib.cache must be one of {LOCATIONS}, got {where!r}")
        self.device = torch.device(device)
        # which calibration samples these are, of how many (a rank of a data-parallel run holds a share)
        self.ids = list(range(n)) if ids is None else list(ids)
        self.total = n if total is None else int(total)
        if len(self.ids) != n:
            raise ValueError(f"an activation cache of {n} samples was given {len(self.ids)} sample ids")
        if where == "auto":
            where = "device" if self.device.type == "cuda" else "cpu"
        if where == "pinned" and not torch.cuda.is_available():
            where = "cpu"  # pinning needs CUDA; plain CPU memory is the same thing without it
        self.where = where
        self.shape = (n, *sample_shape)
        numel = 1
        for s in self.shape:
            numel *= s
        if where == "device":
            self.data = torch.empty(self.shape, dtype=dtype, device=self.device)
        elif where == "disk":
            if path is None:
                raise ValueError("calib.cache=disk needs a file path for the memmap (calib.cache_dir)")
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            self.data = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(self.shape)
        else:
            self.data = torch.empty(self.shape, dtype=dtype, pin_memory=(where == "pinned"))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i].to(self.device, non_blocking=True)

    def __setitem__(self, i: int, value: torch.Tensor) -> None:
        self.data[i].copy_(value.detach(), non_blocking=False)

    def batch(self, idx: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Samples ``idx`` stacked into one ``[len(idx), ...]`` tensor on the compute device."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.data.index_select(0, idx.to(self.data.device)).to(self.device, non_blocking=True)

    def all(self) -> torch.Tensor:
        return self.data.to(self.device)

    def close(self) -> None:
        """Release the storage (and delete the disk file)."""
        self.data = torch.empty(0)
        if self.where == "disk":
            self.path.unlink(missing_ok=True)
