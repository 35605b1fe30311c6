"""Process-group set-up and thin helpers over torch.distributed that degrade to no-ops in a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as td


def init_distributed(backend: str = "auto") -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or td.is_initialized():
        return td.is_initialized()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # The trainer's small bookkeeping collectives (stop flags, validation sums, skip counts) use CPU tensors,
        # which NCCL cannot carry: route CPU tensors over gloo and CUDA tensors over NCCL in one group.
        backend = "cpu:gloo,cuda:nccl"
    td.init_process_group(backend=backend)
    return True


def destroy_distributed() -> None:
    if td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def enabled() -> bool:
    """A process group of more than one rank (vLLM's in-process engine creates a group of one)."""
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if enabled() else 0


def world_size() -> int:
    return td.get_world_size() if enabled() else 1


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was wrapped by FSDP2's `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(x: float) -> float:
    if not enabled():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    td.all_reduce(t)
    return float(t.item())


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks (a copy; no-op in one process)."""
    if not enabled():
        return t
    t = t.clone()
    td.all_reduce(t)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank."""
    if not enabled():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def grad_norm_value(norm) -> float:
    """A grad norm as a Python float (FSDP2 returns a DTensor)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def barrier() -> None:
    if enabled():
        td.barrier()


SUMMED = ("loss",)  # each rank reports its share of the global token-mean loss


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Across ranks: `loss` summed, everything else averaged (time/* included). No-op in one process."""
    if not enabled():
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    td.all_reduce(t)
    w = world_size()
    return {k: float(v) if k in SUMMED else float(v) / w for k, v in zip(keys, t.tolist())}
