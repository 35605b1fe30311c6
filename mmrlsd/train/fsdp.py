"""PyTorch FSDP2 (`fully_shard`) for Qwen-VL: every vision block and every decoder layer is its own shard group,
then the vision tower, then the root. Mixed precision (bf16 parameters and compute, fp32 gradient reduction) and CPU offload of the frozen
teacher are optional. Launch with torchrun; a single process runs without FSDP:

    torchrun --nproc_per_node 8 -m mmrlsd train configs/qwen3vl_8b.yaml                      # one node
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m mmrlsd train configs/qwen3vl_8b.yaml                                              # four nodes
"""

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
    td.init_process_group(backend=backend)
    return True


def destroy_distributed() -> None:
    if td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def layer_modules(model) -> list[torch.nn.Module]:
    """The vision blocks and decoder layers of a Qwen2/2.5/3-VL model, in order."""
    inner = model.model
    return list(inner.visual.blocks) + list(inner.language_model.layers)


def shard_model(model: torch.nn.Module, mixed_precision: bool = False, offload: bool = False) -> torch.nn.Module:
    """Apply FSDP2 in place: each block/layer, then the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kw = {"offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in layer_modules(model):
        fully_shard(module, **kw)
    # The vision tower (patch embedding, merger) is its own unit too: transformers' `generate` encodes images via
    # `get_image_features` before the first forward, outside the root module's hooks.
    fully_shard(model.model.visual, **kw)
    fully_shard(model, **kw)
    model._get_fsdp_state()._lazy_init()  # make the root the root before `generate` calls the tower directly
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def copy_weights(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """dst <- src for two models sharded the same way (or both unsharded): the teacher snapshot refresh."""
    reshard(dst)
    reshard(src)
    with torch.no_grad():
        for a, b in zip(dst.parameters(), src.parameters(), strict=True):
            a.copy_(b.to(a.device) if a.device != b.device else b)


def reshard(model: torch.nn.Module) -> None:
    """Return every FSDP unit to its sharded state (the root stays unsharded after a forward by default)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
