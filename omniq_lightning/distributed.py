"""Data-parallel calibration: the ranks ``torchrun`` starts, and the few collectives the block loop needs.

Every rank holds the whole model (or holds it lazily) and a share of the calibration windows; each block's
statistics (Hessians, Gram samples, ranges, losses) are combined across the ranks before any decision is taken
from them, so every rank takes the same decisions as one process over all windows would, and rank 0's folded block
is the block (it is sent to the others). Only rank 0 writes (run state, checkpoints, exports, results).

Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) every function here is the identity: one process is the world.
A collective that fails because another rank stopped raises :class:`RankLostError`, naming the fix.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")


class RankLostError(RuntimeError):
    """Another rank of a data-parallel run stopped (died, was killed, or its node went away)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` of ``size``, ``local_rank`` of ``local_size`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.size // self.local_size)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World:
        """The world ``torchrun`` describes in the environment (one process when it does not)."""
        env = os.environ if env is None else env
        size = int(env.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(rank=int(env["RANK"]), size=size, local_rank=int(env.get("LOCAL_RANK", "0")),
                   local_size=int(env.get("LOCAL_WORLD_SIZE", str(size))))


def shard_ids(n: int, world: World, chunk: int) -> list[int]:
    """The calibration samples rank ``world.rank`` holds, of ``n``: consecutive runs of ``chunk`` samples dealt to
    the ranks in turn (``chunk = n / size``: one contiguous share each; ``chunk = batch / size``: every global batch
    split evenly over the ranks, in order)."""
    if n % world.size:
        raise ValueError(f"calib.nsamples={n} cannot be shared evenly by {world.size} ranks: use a sample count "
                         f"divisible by the world size (e.g. calib.nsamples={n - n % world.size or world.size}), or "
                         "start another number of ranks (torchrun --nproc_per_node, --nnodes)")
    if chunk < 1 or n % (chunk * world.size):
        raise ValueError(f"{n} samples cannot be dealt to {world.size} ranks in runs of {chunk}")
    return [j for j in range(n) if (j // chunk) % world.size == world.rank]


def check_batch(world: World, n: int, batch_size: int) -> int:
    """The per-rank batch of a trained method whose global batch is ``batch_size`` (so that ``size`` ranks take the
    optimizer steps one process would); refused when the batch or the sample count does not split."""
    if world.size == 1:
        return batch_size
    if batch_size % world.size:
        raise ValueError(f"method.batch_size={batch_size} is the global batch of a trained method, split over the "
                         f"{world.size} ranks: set method.batch_size to a multiple of {world.size} (each rank then "
                         f"takes method.batch_size / {world.size} samples per step), or run one rank")
    if n % batch_size:
        raise ValueError(f"calib.nsamples={n} is not a whole number of global batches of method.batch_size="
                         f"{batch_size}: data-parallel training needs every step to be full on every rank; use a "
                         "multiple of the batch")
    return batch_size // world.size


# --- the process group ---------------------------------------------------------------------------------------------

_WORLD = World()


def world() -> World:
    """The world of this process (set by :func:`start`)."""
    return _WORLD


def start(device: torch.device, timeout_minutes: float = 60.0, env: dict[str, str] | None = None) -> World:
    """Join the process group ``torchrun`` set up (gloo on CPU, nccl on CUDA), once; returns the world."""
    global _WORLD
    w = World.from_env(env)
    if w.size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        log.info("rank %d of %d (%d per node, %s)", w.rank, w.size, w.local_size, backend)
    _WORLD = w
    return w


def stop() -> None:
    """Leave the process group (at the end of a run)."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def active() -> bool:
    return _WORLD.size > 1 and dist.is_initialized()


@contextlib.contextmanager
def guard(what: str) -> Iterator[None]:
    """While active, a collective failing because another rank went away (here or inside Lightning's DDP) raises
    :class:`RankLostError`, naming the fix."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, RankLostError) or not lost_peer(exc):
            raise
        raise RankLostError(
            f"rank {_WORLD.rank} of {_WORLD.size}: another rank stopped answering during {what} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Finished blocks are kept in "
            "the run state: run the same command again (torchrun with any number of ranks that divides "
            "calib.nsamples, or one process) to resume from the first unfinished block; torchrun --max-restarts=N "
            "restarts the ranks by itself") from exc


def collective(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """A collective whose failure from a lost rank is reported as :func:`guard` reports it."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def inner(*args, **kwargs) -> T:
            with guard(what):
                return fn(*args, **kwargs)

        return inner

    return wrap


LOST_SIGNS = ("connection", "peer", "timed out", "timeout", "closed", "broken pipe", "socket", "terminated")


def lost_peer(exc: BaseException) -> bool:
    """Whether a collective's failure says another rank went away (rather than, say, mismatched tensors)."""
    return isinstance(exc, dist.DistBackendError) or any(s in str(exc).lower() for s in LOST_SIGNS)


def _on_backend(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the backend reduces it (nccl: the current CUDA device; gloo: the CPU)."""
    want = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return t if t.device == want else t.to(want)


def _reduce_(t: torch.Tensor, op) -> torch.Tensor:
    if not active():
        return t
    work = _on_backend(t.contiguous())
    dist.all_reduce(work, op=op)
    if work is not t:
        t.copy_(work.to(t.device))
    return t


@collective("a sum over the ranks")
def sum_(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (every rank gets the sum)."""
    return _reduce_(t, dist.ReduceOp.SUM)


@collective("a minimum over the ranks")
def min_(t: torch.Tensor) -> torch.Tensor:
    return _reduce_(t, dist.ReduceOp.MIN)


@collective("a maximum over the ranks")
def max_(t: torch.Tensor) -> torch.Tensor:
    return _reduce_(t, dist.ReduceOp.MAX)


def sum_floats(*values: float) -> list[float]:
    """Python numbers summed over the ranks (in float64)."""
    t = torch.tensor(values, dtype=torch.float64)
    return sum_(t).tolist() if active() else list(values)


@collective("an exchange of statistics")
def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors travel on the CPU), in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(out, obj)
    return out


@collective("a broadcast from rank 0")
def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@collective("a broadcast of the calibrated block")
def broadcast_tensors_(tensors: Sequence[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` copied into every rank's (same shapes, in the same order)."""
    if not active():
        return
    for t in tensors:
        work = _on_backend(t.detach().contiguous())
        dist.broadcast(work, src=0)
        if work is not t:
            t.data.copy_(work.to(t.device))


@collective("a barrier")
def barrier() -> None:
    if active():
        dist.barrier()


def main_first(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 alone (what only rank 0 may do: lock and open the output folder), every rank told whether
    it succeeded: when it raised, the other ranks raise too, naming rank 0's error, instead of waiting for rank 0 at
    the next exchange. Returns ``fn()``'s result on rank 0, None on the others."""
    if not active():
        return fn()
    result, error = None, None
    if _WORLD.main:
        try:
            result = fn()
        except Exception as exc:  # every rank must hear of it before rank 0 re-raises
            error = exc
    message = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 stopped the run: {message}")
    return result


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (so that every rank raises the same error, not just the one that saw
    it)."""
    if not active():
        return flag
    return bool(min_(torch.tensor([1.0 if flag else 0.0])).item())


def merge_ranges(stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-key ``(min, max)`` statistics combined over the ranks, in place (a key some rank never saw, such as an
    MoE expert no token of its share was routed to, takes the others' values)."""
    if not active():
        return stats
    local = {k: (lo.detach().cpu(), hi.detach().cpu()) for k, (lo, hi) in stats.items()}
    for other in gather(local):
        for k, (lo, hi) in other.items():
            if k in stats:
                mine_lo, mine_hi = stats[k]
                lo, hi = torch.minimum(mine_lo, lo.to(mine_lo.device)), torch.maximum(mine_hi, hi.to(mine_hi.device))
            else:
                device = next(iter(stats.values()))[0].device if stats else lo.device
                lo, hi = lo.to(device), hi.to(device)
            stats[k] = (lo, hi)
    return stats
