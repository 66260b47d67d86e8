"""Multi-process training with ``torchrun``: process-group setup and gathering predictions.

``torchrun --nproc_per_node N -m models.train ...`` (or across machines with ``--nnodes`` and a
rendezvous endpoint) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup` reads them and joins the group (NCCL when the process has a GPU,
gloo on the CPU). Without those variables everything here is a single-process no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` processes, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0, which writes checkpoints, logs and the report."""
        return self.rank == 0


def setup(device: str | None) -> Context:
    """Join the process group torchrun describes in the environment, or run alone.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:K"`` or None (CUDA when available). Under
            torchrun with CUDA, each process takes ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if world_size > 1:
            resolved = torch.device("cuda", local_rank)
        elif resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Context(rank, world_size, local_rank, resolved)


def cleanup(context: Context) -> None:
    """Leave the process group (when one was joined)."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    """Wait for every process (no-op alone)."""
    if context.distributed:
        dist.barrier()


def all_mean(context: Context, value: float) -> float:
    """The mean of ``value`` over the processes."""
    if not context.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device(context))
    dist.all_reduce(tensor)
    return tensor.item() / context.world_size


def any_true(context: Context, flag: bool) -> bool:
    """True on every process when ``flag`` is True on any one of them."""
    if not context.distributed:
        return flag
    tensor = torch.tensor([int(flag)], device=_collective_device(context))
    dist.all_reduce(tensor)
    return bool(tensor.item())


def gather_predictions(
    context: Context, indices: Tensor, scores: Tensor, targets: Tensor, dataset_size: int
) -> tuple[Tensor, Tensor]:
    """Every process's predictions, in dataset order, without the sampler's padding.

    ``DistributedSampler`` pads the dataset to a multiple of the world size by repeating samples;
    each sample is kept once, by its dataset index.

    Args:
        indices: ``Tensor[n]`` int64, this process's sample indices.
        scores: ``Tensor[n, C]`` float.
        targets: ``Tensor[n, C]`` float.
        dataset_size: the number of samples of the split (every index must appear).

    Returns:
        ``(scores Tensor[dataset_size, C], targets Tensor[dataset_size, C])``, on the CPU.

    Raises:
        RuntimeError: an index of ``range(dataset_size)`` came from no process.
    """
    parts = [(indices.cpu(), scores.cpu(), targets.cpu())]
    if context.distributed:
        gathered: list = [None] * context.world_size
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    all_indices = torch.cat([p[0] for p in parts])
    all_scores = torch.cat([p[1] for p in parts])
    all_targets = torch.cat([p[2] for p in parts])
    # Keep each index's first occurrence (a stable sort keeps the gathered order within ties).
    order = torch.sort(all_indices, stable=True).indices
    sorted_indices = all_indices[order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    keep = order[first]
    if not torch.equal(all_indices[keep], torch.arange(dataset_size)):
        kept = set(all_indices[keep].tolist())
        missing = [i for i in range(dataset_size) if i not in kept][:5]
        raise RuntimeError(
            f"gather_predictions: expected predictions for samples 0..{dataset_size - 1}, "
            f"missing {missing}, got {len(kept)} distinct indices"
        )
    return all_scores[keep], all_targets[keep]


def _collective_device(context: Context) -> torch.device:
    return context.device if context.device.type == "cuda" else torch.device("cpu")
