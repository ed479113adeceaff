"""What every process of a multi-process run needs to agree on: its rank, barriers, shared decisions, batch shards.

A multi-process `iterppo fit` is SPMD: every process runs the whole outer loop. Rank 0 collects, evaluates and
writes every file; all ranks take part in the phase fits. The helpers below are no-ops in a single process, so
the single-process code path (and its numbers) is unchanged.

`ShardedBatchSampler` is how the fits get data: every rank draws the *same* global batches (the same RNG
stream, seeded per step by the loop) and keeps a contiguous slice of each, so a run's global batches do not
depend on the number of processes. Lightning's DistributedSampler would draw a different permutation per
world size; phase Trainers therefore run with `use_distributed_sampler=False`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a copy; the input is untouched). Identity in a single process."""
    if not is_distributed():
        return tensor
    # NCCL reduces GPU tensors only; gloo CPU ones (and GPU ones too).
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    out = tensor.detach().clone().to(device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """Contiguous slice [start, stop) of n items for this rank; the first n % world ranks get one more."""
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of `sampler`'s indices of size `batch_size`, each cut to this rank's contiguous slice.

    With world size 1 this is exactly `BatchSampler(sampler, batch_size, drop_last=False)`, i.e. what
    `DataLoader(shuffle=True, batch_size=...)` does, so single-process runs draw the same batches as before.
    A final global batch smaller than the world size would leave a rank without data (and ZeRO-3's
    collectives would hang): it is dropped, so a multi-process epoch skips at most world - 1 examples.
    """

    def __init__(
        self, sampler: Sampler[int] | Sequence[int], batch_size: int, rank_: int | None = None, world: int | None = None
    ):
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def _global_batches(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            batch.append(int(index))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            if len(batch) < self.world:
                return
            start, stop = shard_bounds(len(batch), self.rank, self.world)
            yield batch[start:stop]

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (1 if rest >= self.world else 0)


def global_share(local_count: torch.Tensor | float) -> torch.Tensor | None:
    """`world * local / sum over ranks of local`: the factor that turns a rank's mean loss into its share of the
    global mean (DeepSpeed and DDP average gradients over ranks). None in a single process, where the plain
    mean is already the global one (and stays bit-identical to a run without this code).
    """
    if not is_distributed():
        return None
    local = torch.as_tensor(local_count, dtype=torch.float64).reshape(1)
    total = all_reduce_sum(local)
    return (local * world_size() / total.clamp_min(1.0)).squeeze(0).float()


def global_offset(local_n: int) -> tuple[int, int]:
    """(index of this rank's first row in the global batch, global batch size), ranks in order."""
    if not is_distributed():
        return 0, local_n
    sizes = torch.zeros(world_size(), dtype=torch.long)
    sizes[rank()] = local_n
    sizes = all_reduce_sum(sizes)
    return int(sizes[: rank()].sum()), int(sizes.sum())


def global_mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Mean of `values` (1-D) over every rank's rows, optionally weighted (e.g. by token counts)."""
    values = values.detach().double().reshape(-1)
    w = torch.ones_like(values) if weights is None else weights.detach().double().reshape(-1)
    totals = all_reduce_sum(torch.stack([(values * w).sum(), w.sum()]))
    return float(totals[0] / totals[1].clamp_min(1e-300))


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (e.g. a non-finite loss: all ranks stop together)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)
