"""Thin helpers over torch.distributed that degrade to no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as td


def enabled() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if enabled() else 0


def world_size() -> int:
    return td.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(x: float) -> float:
    if not enabled():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    td.all_reduce(t)
    return float(t.item())


def grad_norm_value(norm) -> float:
    """A grad norm as a Python float (FSDP2 returns a DTensor)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def barrier() -> None:
    if enabled():
        td.barrier()
