"""Vision features computed once per prompt and shared by its G responses; the vision tower under FSDP.

`repeat_encoding` repeats every prompt G times (its pixel rows stored once), and the naive forward hands every
row's pixel rows to the model, which runs the vision tower G times on the same pixels. Here the tower runs once on
the images of each prompt's first row, and every row's image placeholders are filled by indexing those features
(the same `masked_scatter` merge that Qwen2VLModel.forward does). Autograd's index backward sums the G rows'
gradients; with `detached()` and `backward_from()` the tower's own backward also runs once per prompt per
optimizer step, however many micro-batches the rows are spread over.

Qwen3-VL's deepstack features (added to the first decoder layers' hidden states at the image positions,
transformers' Qwen3VLTextModel._deepstack_process) are shared the same way.

Under FSDP a vision-tower call is a collective (its parameters are all-gathered in the forward, its gradients
reduce-scattered in the backward), so wherever one rank may call the tower every rank must, in the same order: a
rank without images runs it on a dummy image (`dummy_vision`, output x 0), inside the root forward
(`tower_on_every_rank`), before `generate`, and in `vision_features`.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mmrlsd import dist
from mmrlsd.data.encoding import image_offsets, row_pixel_spans
from mmrlsd.model.packing import register_attention
from mmrlsd.types import SeqBatch


@dataclass
class VisionFeatures:
    """Merged vision features of the distinct prompts' images."""

    embeds: torch.Tensor  # (n_tok, H) in group order, each group's images in order
    deepstack: list[torch.Tensor] | None  # per deepstack layer, (n_tok, H) (Qwen3-VL); None otherwise
    spans: dict[int, tuple[int, int]]  # group g -> its rows start..stop of `embeds`
    group_size: int  # G: row r belongs to group r // G

    def index(self, rows: list[int]) -> torch.Tensor:
        """`(n_img_tok,)` rows of `embeds` for the image placeholders of `rows`, in sequence order."""
        parts = [
            torch.arange(*self.spans[r // self.group_size])
            for r in rows
            if r // self.group_size in self.spans
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def gather(self, rows: list[int]) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        idx = self.index(rows).to(self.embeds.device)
        deep = [d[idx] for d in self.deepstack] if self.deepstack is not None else None
        return self.embeds[idx], deep  # (n_img_tok, H)

    def detached(self) -> VisionFeatures:
        """Leaf copies that collect the language model's gradients across micro-batches."""
        deep = [_leaf(d) for d in self.deepstack] if self.deepstack is not None else None
        return VisionFeatures(_leaf(self.embeds), deep, self.spans, self.group_size)

    def backward_from(self, leaf: VisionFeatures) -> None:
        """Send the gradients `leaf` collected through the vision tower, once."""
        pairs = [(self.embeds, leaf.embeds)] + list(zip(self.deepstack or [], leaf.deepstack or []))
        pairs = [(t, lf.grad) for t, lf in pairs if t.requires_grad and lf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.requires_grad)


def vision_features(model, seq: SeqBatch, rows: list[int], group_size: int) -> VisionFeatures | None:
    """Run the vision tower once on the images of each group that `rows` touch (group g is represented by
    its first row g*G). `group_size=1`: once per row, as the naive forward does. None without images, except
    under FSDP, where every rank must call the tower here: then features of no image tied to a dummy call."""
    groups = sorted({r // group_size for r in rows if seq.images_per_seq[r] > 0})
    if seq.pixel_values is None or not groups:
        return _no_image_features(model, group_size) if tower_is_collective(model) else None
    img_start, _ = image_offsets(seq.images_per_seq, seq.image_grid_thw)
    spans = row_pixel_spans(seq.images_per_seq, seq.image_grid_thw, seq.pixel_group_size)
    pix, thw = [], []
    for g in groups:
        r0 = g * group_size
        members = range(r0, min(r0 + group_size, len(seq.images_per_seq)))
        if any(seq.images_per_seq[r] != seq.images_per_seq[r0] for r in members):
            raise ValueError(f"rows {r0}..{r0 + group_size - 1} do not share their images (group {g})")
        a, b = img_start[r0], img_start[r0 + 1]
        pix.append(seq.pixel_values[spans[r0][0] : spans[r0][1]])
        thw.append(seq.image_grid_thw[a:b])
    device = next(model.parameters()).device
    inner = model.model
    out = inner.get_image_features(torch.cat(pix).to(device), torch.cat(thw).to(device))
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out  # tuple of per-image (tok_i, H)
    deep = getattr(out, "deepstack_features", None)
    merged = torch.cat(list(pooled))  # (n_tok, H)
    # each deepstack layer's features: split per image (transformers >= 5.19) or one (n_tok, H) tensor (5.17)
    deepstack = [d if torch.is_tensor(d) else torch.cat(list(d)) for d in deep] if deep else None
    per_image = [t.shape[0] for t in pooled]
    spans, k, start = {}, 0, 0
    for g, t in zip(groups, thw):
        n = sum(per_image[k : k + t.shape[0]])
        spans[g] = (start, start + n)
        k, start = k + t.shape[0], start + n
    return VisionFeatures(merged, deepstack, spans, group_size)


def _no_image_features(model, group_size: int) -> VisionFeatures:
    """`(0, H)` features tied to `dummy_vision` (0): the tower's forward runs now, and its backward runs with
    zero gradients once the rows' (absent) image features get theirs, as on the ranks with images."""
    zero = dummy_vision(model)
    H = model.get_input_embeddings().embedding_dim
    embeds = torch.zeros(0, H, device=zero.device) + zero  # (0, H)
    return VisionFeatures(embeds, None, {}, group_size)


# --- the vision tower under FSDP: every rank calls it where any rank does ---


def tower_is_collective(model: torch.nn.Module) -> bool:
    """Whether a vision-tower call is a collective: the model is FSDP-sharded under torch.distributed."""
    return dist.enabled() and dist.is_sharded(model)


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


# ------------------------------------------------------------------------------------ the tower's attention

# transformers hands a vision block's attention kernel the windows' boundaries (`cu_seq_lens_q`) only when the
# kernel's name contains "flash" (`is_flash_attention_requested`); with sdpa it splits the sequence and calls sdpa
# once per window. This kernel takes the boundaries and is no flash attention.
VISION_WINDOWS = "mmrlsd_windows_sdpa_flash_api"


def windows_sdpa_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A vision block's attention over its windows (each image, or Qwen2.5-VL's 8x8-patch windows) as one batched
    `scaled_dot_product_attention` call per distinct window length, instead of transformers' one call per
    window: the same arithmetic per window, so the same numbers (bit for bit on CPU in the tests), and a few
    kernel launches per block where a 448-pixel image under Qwen2.5-VL's window attention takes 16.

    `query`/`key`/`value` `(1, heads, N, d)` with `cu_seq_lens_q` `(windows + 1,)` the windows' boundaries (each
    window a contiguous range) -> `((1, N, heads, d), None)`. Without boundaries: transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)  # fmt: skip
    bounds = cu.tolist()
    starts_of: dict[int, list[int]] = defaultdict(list)  # window length -> the windows' first positions
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            starts_of[b - a].append(a)
    heads, d = query.shape[1], query.shape[-1]
    outs, order = [], []
    for length, starts in starts_of.items():
        pos = torch.tensor(starts, device=query.device)[:, None] + torch.arange(length, device=query.device)
        q, k, v = (t[0][:, pos].transpose(0, 1) for t in (query, key, value))  # (windows, heads, length, d)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, dropout_p=dropout)
        outs.append(o.transpose(0, 1).reshape(heads, -1, d))  # (heads, windows * length, d)
        order.append(pos.reshape(-1))
    out = torch.cat(outs, dim=1)[:, torch.argsort(torch.cat(order))]  # (heads, N, d) in sequence order
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


def batch_vision_windows(model) -> bool:
    """Run the vision tower's attention through `windows_sdpa_forward` when it runs on sdpa (`model.vision_windows`).
    The kernel name lives on the tower's config in memory only (transformers does not save it). Returns whether
    the tower now uses it."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    config = getattr(visual, "config", None)
    if config is None or config._attn_implementation not in ("sdpa", VISION_WINDOWS):
        return False
    config._attn_implementation = register_attention(VISION_WINDOWS, windows_sdpa_forward)
    return True


# ------------------------------------------------------------------------------ the tower's patch embedding


def _linear_patch_embed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """`PatchEmbed.forward` as one matrix multiply: `(patches, C * t * p * p)` -> `(patches, embed_dim)`."""
    proj = self.proj
    weight = proj.weight.view(proj.out_channels, -1)  # (embed_dim, C * t * p * p): the patches' order
    patches = hidden_states.view(-1, weight.shape[1]).to(weight.dtype)
    return torch.nn.functional.linear(patches, weight, proj.bias)


def linear_patch_embed(model) -> bool:
    """Run the vision tower's patch embedding as a linear layer over the flattened patches (`model.linear_patch_embed`).

    Qwen2-VL, Qwen2.5-VL and Qwen3-VL embed each `(C, t, p, p)` patch with a `Conv3d` whose kernel equals its
    stride, over input already cut into patches: every output is one dot product of a patch with a kernel, which
    is `linear(patches, weight.view(embed_dim, -1), bias)` (vLLM's conv layer takes the same shortcut for such
    kernels). The convolution kernels are slow for this shape: on one CPU thread the tower's embedding of 1,024
    patches took 5.4 ms as a convolution and 0.8 ms as a matrix multiply. The numbers are the same sums in another
    order (equal up to float rounding); the parameters, their names and the checkpoint are unchanged, and their
    gradients flow through the view. Set on the module instance (in memory only); returns whether it applied (a
    tower with another patch embedding keeps its own)."""
    embed = getattr(getattr(getattr(model, "model", None), "visual", None), "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if not isinstance(proj, torch.nn.Conv3d):
        return False
    plain = proj.padding == (0, 0, 0) and proj.dilation == (1, 1, 1) and proj.groups == 1
    if not (plain and tuple(proj.kernel_size) == tuple(proj.stride) and proj.padding_mode == "zeros"):
        return False
    embed.forward = _linear_patch_embed_forward.__get__(embed)
    return True
