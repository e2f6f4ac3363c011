"""One process or many (torchrun): process-group set-up and small helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> Dist:
    """Initialises the process group under torchrun (nccl on GPU, gloo on CPU); a no-op otherwise."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def sum_across(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (itself in one process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def mean_across(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (itself in one process)."""
    return sum_across(value) / (dist.get_world_size() if dist.is_initialized() else 1)


@contextmanager
def session() -> Iterator[Dist]:
    """setup() for a with-block. When the block ends cleanly, the ranks meet at a barrier and tear the
    group down together: gloo can abort a rank that tears down while another still works (rank 0
    writing its files). After an error the group is left to the process's exit, as a teardown could
    wait forever on ranks that are still inside a collective."""
    d = setup()
    yield d
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
