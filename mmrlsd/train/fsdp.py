"""PyTorch FSDP2 (`fully_shard`) for Qwen-VL: every vision block and every decoder layer is its own shard group,
then the vision tower, then the root. Mixed precision: float32 parameters (the master weights the optimizer
updates) all-gathered in the compute dtype, gradients reduced in float32 (`MixedPrecisionPolicy`). CPU offload of
the frozen teacher is optional. Launch with torchrun; a single process runs without FSDP:

    torchrun --nproc_per_node 8 -m mmrlsd train configs/qwen3vl_8b.yaml                      # one node
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m mmrlsd train configs/qwen3vl_8b.yaml                                              # four nodes

Text-only micro-batches: the vision tower's parameters are all-gathered in its forward and its gradients
reduce-scattered in its backward, collectively, so wherever one rank may call the tower every rank must, in the
same order. A rank with no image there runs it on a dummy image instead (`mmrlsd.model.vision.dummy_vision`, output x 0) at the
same point: inside the root forward (`tower_on_every_rank`: `response_logits`, the shared prefill), before
`generate` (which encodes images before its prefill) and in `vision_features` (the fast path). The cost is one
all-gather of the tower per text-only forward. Likewise every rank runs as many forwards: the fast path pads its
token-budget micro-batches to the ranks' maximum (`packing.plan_micro_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def layer_modules(model) -> list[torch.nn.Module]:
    """The vision blocks and decoder layers of a Qwen2/2.5/3-VL model, in order."""
    inner = model.model
    return list(inner.visual.blocks) + list(inner.language_model.layers)


def shard_model(
    model: torch.nn.Module,
    compute_dtype: torch.dtype | None = None,
    offload: bool = False,
    from_rank0: bool = False,
) -> torch.nn.Module:
    """Apply FSDP2 in place: each block/layer, then the root.

    `compute_dtype` different from the parameters' dtype (bf16 compute over float32 master weights): each unit's
    parameters are all-gathered in `compute_dtype` for its forward and backward, and gradients are reduced and
    kept in float32 (`MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=float32)`). None or the same
    dtype: no mixed-precision policy (everything in the parameters' dtype).

    `from_rank0`: only rank 0's model holds weights (read from disk, on the CPU); the other ranks' models are
    empty, on the meta device (`load_model(empty=True)`). After sharding, those ranks allocate their shards
    and every rank receives its shard of rank 0's weights, and rank 0's buffers, which are not in the state dict
    (rotary `inv_freq`), so no rank but 0 ever holds the full weights (`load_from_rank0`)."""
    import torch.distributed as td
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    # rank 0's full weights, kept alive (not copied) until the broadcast: fully_shard replaces the parameters
    full = model.state_dict() if from_rank0 and td.get_rank() == 0 else {}
    # pinned CPU memory speeds up the copies to the GPU and needs CUDA: a CPU-only run offloads unpinned
    offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    kw = {"offload_policy": offload_policy}
    stored = next(model.parameters()).dtype
    if compute_dtype is not None and compute_dtype != stored:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for module in layer_modules(model):
        fully_shard(module, **kw)
    # The vision tower (patch embedding, merger) is its own unit too: transformers' `generate` encodes images via
    # `get_image_features` before the first forward, outside the root module's hooks.
    fully_shard(model.model.visual, **kw)
    fully_shard(model, **kw)
    if from_rank0:
        load_from_rank0(model, full, offload)
        full.clear()
    model._get_fsdp_state()._lazy_init()  # make the root the root before `generate` calls the tower directly
    return model


def load_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor], offload: bool = False) -> None:
    """Fill a sharded `model` with rank 0's weights: `full` is rank 0's full state dict (empty on the other ranks,
    whose parameters may still be on the meta device). Ranks > 0 allocate their shards (on the CPU when
    `offload`, else on FSDP's device), then each tensor is broadcast from rank 0 and each rank keeps its shard
    (`set_model_state_dict(broadcast_from_rank0=True)`, one tensor at a time). The buffers, outside the state
    dict, are then replaced by rank 0's (values, dtype and shape) on FSDP's device."""
    import torch.distributed as td
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = model._get_fsdp_state()._device  # where fully_shard put rank 0's parameters and buffers
    rank0 = td.get_rank() == 0
    if not rank0:
        model.to_empty(device="cpu" if offload else device)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=opts)
    spec = [{n: (b.shape, b.dtype) for n, b in model.named_buffers()} if rank0 else None]
    td.broadcast_object_list(spec, src=0)
    for name, (shape, dtype) in spec[0].items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if not rank0:
            module._buffers[attr] = torch.empty(shape, dtype=dtype, device=device)
        td.broadcast(module._buffers[attr], src=0)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU, on rank 0 only (the other ranks get an empty dict): for saving.
    For every rank's full weights (the rollout engine's sync), see `gathered_weights`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def gathered_weights(
    model: torch.nn.Module, device: str | None = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, full tensor)` for every entry of the state dict, on every rank, gathered one tensor at a time and
    moved to `device` (None: left where the gather put it): what each rank's colocated vLLM engine loads. Every
    rank must iterate it to the end in step (each sharded tensor is one all-gather). Unsharded models yield
    their own tensors."""
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        full = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
        yield name, (full.to(device) if device is not None else full)


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
