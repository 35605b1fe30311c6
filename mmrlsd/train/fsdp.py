"""PyTorch FSDP2 (`fully_shard`) for Qwen-VL: every vision block and every decoder layer is its own shard group,
then the vision tower, then the root. Mixed precision: float32 parameters (the master weights the optimizer
updates) all-gathered in the compute dtype, gradients reduced in float32 (`MixedPrecisionPolicy`). CPU offload of
the frozen teacher is optional. Launch with torchrun; a single process runs without FSDP:

    torchrun --nproc_per_node 8 -m mmrlsd train configs/qwen3vl_8b.yaml                      # one node
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m mmrlsd train configs/qwen3vl_8b.yaml                                              # four nodes

Text-only micro-batches: the vision tower's parameters are all-gathered in its forward and its gradients
reduce-scattered in its backward, collectively, so wherever one rank may call the tower every rank must, in the
same order. A rank with no image there runs it on a dummy image instead (`dummy_vision`, output x 0) at the
same point: inside the root forward (`tower_on_every_rank`: `response_logits`, the shared prefill), before
`generate` (which encodes images before its prefill) and in `vision_features` (the fast path). The cost is one
all-gather of the tower per text-only forward. Likewise every rank runs as many forwards: the fast path pads its
token-budget micro-batches to the ranks' maximum (`packing.plan_micro_batches`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

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


def shard_model(
    model: torch.nn.Module, compute_dtype: torch.dtype | None = None, offload: bool = False
) -> torch.nn.Module:
    """Apply FSDP2 in place: each block/layer, then the root.

    `compute_dtype` different from the parameters' dtype (bf16 compute over float32 master weights): each unit's
    parameters are all-gathered in `compute_dtype` for its forward and backward, and gradients are reduced and
    kept in float32 (`MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=float32)`). None or the same
    dtype: no mixed-precision policy (everything in the parameters' dtype)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kw = {"offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    stored = next(model.parameters()).dtype
    if compute_dtype is not None and compute_dtype != stored:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
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


def tower_is_collective(model: torch.nn.Module) -> bool:
    """Whether a vision-tower call is a collective: the model is FSDP-sharded under torch.distributed."""
    return td.is_available() and td.is_initialized() and is_sharded(model)


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):  # a ModelOutput
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def dummy_vision(model: torch.nn.Module) -> torch.Tensor:
    """Run the vision tower on one all-zero image of the smallest grid (1 x m x m patches, m the spatial merge
    size: one merged token) and return all its outputs (deepstack features included) summed x 0: a scalar 0 which,
    added to an activation, gives every tower parameter a zero gradient, so the tower's backward (its
    reduce-scatter) runs too."""
    inner = model.model
    embed, m = inner.visual.patch_embed, inner.visual.spatial_merge_size
    device = next(model.parameters()).device
    dim = embed.in_channels * embed.temporal_patch_size * embed.patch_size**2
    out = inner.get_image_features(
        torch.zeros(m * m, dim, device=device), torch.tensor([[1, m, m]], device=device)
    )
    return sum(t.float().sum() for t in _tensors(out) if t.is_floating_point()) * 0


@contextmanager
def tower_on_every_rank(model: torch.nn.Module, has_images: bool):
    """Around a `model(...)` forward: under FSDP and without images, the language model's input embeddings get
    `dummy_vision(model)` (0) added, i.e. the tower runs where the forward of a rank with images runs it (after
    the embeddings, before the decoder layers). A no-op with images or without FSDP."""
    if has_images or not tower_is_collective(model):
        yield
        return

    def add_zero(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        return args, {**kwargs, "inputs_embeds": embeds + dummy_vision(model).to(embeds.dtype)}

    handle = model.model.language_model.register_forward_pre_hook(add_zero, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
