"""The one forward pass used for the student, the teacher and the update: log-probs (and entropy) of the
sampled response tokens given `[prompt | response]`.

Sequences are laid out as `[left-padded prompt (P) | right-padded response (T)]`, so response token t sits at
column P + t in every row and is predicted by the logits at column P + t - 1. Only the last T + 1 positions'
logits are computed (`logits_to_keep`). Position ids, including Qwen-VL's 3-D mRoPE ids, are computed by the
model from `input_ids`, `image_grid_thw` and `attention_mask` for each sequence itself, so the teacher's longer
prompt gets its own positions.

The fast path (`FastOptions`, all off by default) runs the same computation with padding-free
packing (`mmrlsd.model.packing`), vision features shared by a prompt's G rows (`mmrlsd.model.vision`) and
memory-lean log-probs (`lean_logprobs`: the lm_head projection and logsumexp in chunks of tokens, with a
custom backward that recomputes each chunk, so no `[tokens, vocab]` fp32 logits are ever held). It calls the
model's parts directly: the vision tower, `model.model.language_model` with `inputs_embeds` and explicit
position ids, and the lm_head weight.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from types import MethodType

import torch

from mmrlsd.data.encoding import images_per_row, pixel_group, rows_images
from mmrlsd.model.packing import (
    FastOptions,
    Layout,
    make_layout,
    packed_attention,
    plan_micro_batches,
    rope_positions,
)
from mmrlsd.model.vision import VisionFeatures, tower_on_every_rank, vision_features
from mmrlsd.types import Rollouts, SeqBatch


def build_sequences(enc, rollouts: Rollouts) -> SeqBatch:
    """Concatenate a left-padded prompt encoding (N rows) with the N responses."""
    ids = torch.cat([enc["input_ids"], rollouts.response_ids], dim=1)  # (N, P+T)
    attn = torch.cat([enc["attention_mask"], rollouts.response_mask.to(enc["attention_mask"].dtype)], dim=1)
    mm = enc.get("mm_token_type_ids")
    if mm is not None:
        mm = torch.cat([mm, torch.zeros_like(rollouts.response_ids, dtype=mm.dtype)], dim=1)  # (N, P+T)
    return SeqBatch(
        input_ids=ids,
        attention_mask=attn,
        mm_token_type_ids=mm,
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
        images_per_seq=images_per_row(enc),
        prompt_len=enc["input_ids"].shape[1],
        pixel_group_size=pixel_group(enc),
    )


def _rows_images(seq: SeqBatch, start: int, stop: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if seq.pixel_values is None:
        return None, None
    thw, group = seq.image_grid_thw, seq.pixel_group_size
    return rows_images(seq.pixel_values, thw, seq.images_per_seq, start, stop, group)


def seq_pixels(seq: SeqBatch, start: int, stop: int) -> torch.Tensor | None:
    """The pixel rows of sequences start..stop, in order (copied only where stored once per group)."""
    return _rows_images(seq, start, stop)[0]


def slice_seq(seq: SeqBatch, start: int, stop: int) -> SeqBatch:
    """Rows start..stop with exactly their images' pixel rows."""
    pv, thw = _rows_images(seq, start, stop)
    mm = seq.mm_token_type_ids[start:stop] if seq.mm_token_type_ids is not None else None
    return SeqBatch(
        input_ids=seq.input_ids[start:stop], attention_mask=seq.attention_mask[start:stop], mm_token_type_ids=mm,
        pixel_values=pv, image_grid_thw=thw, images_per_seq=seq.images_per_seq[start:stop],
        prompt_len=seq.prompt_len,
    )  # fmt: skip


def forward_logprobs(
    model, seq: SeqBatch, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(logp, entropy)`, each `(n, T)`: log π(y_t | prompt, y_<t) of the sampled tokens, and the entropy of
    π(· | prompt, y_<t) (detached). Gradients flow through `logp` when enabled by the caller."""
    return logprobs_from_logits(response_logits(model, seq), seq, with_entropy)


def response_logits(model, seq: SeqBatch) -> torch.Tensor:
    """`(n, T, V)` fp32 logits that predict the response tokens: position P+t-1 predicts response token t."""
    device = next(model.parameters()).device
    T = seq.response_len
    inputs = {"input_ids": seq.input_ids, "attention_mask": seq.attention_mask}
    if seq.mm_token_type_ids is not None:
        inputs["mm_token_type_ids"] = seq.mm_token_type_ids
    if seq.pixel_values is not None:
        every_row = seq_pixels(seq, 0, len(seq.images_per_seq))  # (stored once per group: repeated here)
        inputs["pixel_values"] = every_row.to(model.dtype)
        inputs["image_grid_thw"] = seq.image_grid_thw
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with tower_on_every_rank(model, has_images=seq.pixel_values is not None):  # FSDP: a dummy image if none
        out = model(**inputs, use_cache=False, logits_to_keep=T + 1)
    return out.logits[:, :-1].float()  # (n, T, V)


def logprobs_from_logits(
    logits: torch.Tensor, seq: SeqBatch, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(logp, entropy)` of `seq`'s response tokens from `response_logits` `(n, T, V)`; entropy detached."""
    targets = seq.input_ids[:, seq.prompt_len :].to(logits.device)  # (n, T)
    logz = torch.logsumexp(logits, dim=-1)  # (n, T)
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - logz  # (n, T)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = torch.softmax(logits, dim=-1)
            entropy = logz - (p * logits).sum(-1)  # (n, T): H = logZ - E_p[logit]
    return logp, entropy


class _ChunkedLogProbs(torch.autograd.Function):
    """log π(y) of the targets from hidden states, the projection done `chunk` tokens at a time.

    Forward keeps only logZ per token; backward recomputes each chunk's logits:
    ∂logp/∂logits = onehot(y) - softmax(logits), then ∂/∂h = g·W and ∂/∂W = gᵀ·h (accumulated in fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, with_entropy):
        R = hidden.shape[0]
        logp = torch.empty(R, dtype=torch.float32, device=hidden.device)
        logz = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        for s in range(0, R, chunk):
            logits = (hidden[s : s + chunk] @ weight.T).float()  # (c, V)
            lz = torch.logsumexp(logits, dim=-1)  # (c,)
            logz[s : s + chunk] = lz
            logp[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lz
            if ent is not None:
                ent[s : s + chunk] = lz - (torch.softmax(logits, dim=-1) * logits).sum(
                    -1
                )  # H = logZ - E_p[logit]
        ctx.save_for_backward(hidden, weight, targets, logz)
        ctx.chunk = chunk
        ent = ent if ent is not None else torch.zeros(0, device=hidden.device)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        hidden, weight, targets, logz = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, y, go = hidden[s : s + ctx.chunk], targets[s : s + ctx.chunk], grad_logp[s : s + ctx.chunk]
            logits = (h @ weight.T).float()  # (c, V)
            g = -torch.exp(logits - logz[s : s + ctx.chunk, None]) * go[:, None]  # (c, V): -p·ĝ
            g.scatter_add_(-1, y[:, None], go[:, None])  # + onehot(y)·ĝ
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[s : s + ctx.chunk] = g @ weight
            if need_w:
                grad_w += (g.T @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def lean_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(logp, entropy)`, each `(R,)` fp32: log softmax(h·Wᵀ)[y] of `targets` `(R,)` given `hidden` `(R, H)`
    and the lm_head `weight` `(V, H)`; entropy detached. `chunk <= 0`: one full `(R, V)` fp32 logits matrix
    (the reference); otherwise at most `(chunk, V)` at a time, with the same values and gradients."""
    if chunk <= 0:
        logits = (hidden @ weight.T).float()  # (R, V)
        logz = torch.logsumexp(logits, dim=-1)  # (R,)
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        return logp, entropy
    logp, ent = _ChunkedLogProbs.apply(hidden, weight, targets, chunk, with_entropy)
    return logp, (ent if with_entropy else None)


def fast_forward_logprobs(
    model, seq: SeqBatch, rows: list[int], fast: FastOptions, positions: torch.Tensor,
    vision: VisionFeatures | None = None, with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """`forward_logprobs` of `rows` by the fast path: `(logp, entropy)`, each `(len(rows), T)`, 0 off the
    response. `positions` is `rope_positions(model, seq)`; `vision` holds shared features (None: the rows'
    own images go through the vision tower here, once per row)."""
    device = next(model.parameters()).device
    layout = make_layout(model, seq, rows, fast, positions)
    if vision is None:
        vision = vision_features(model, seq, layout.prompt_rows, group_size=1)
    img, deep = vision.gather(layout.prompt_rows) if vision is not None else (None, None)  # (n_img_tok, H)
    logp_r, ent_r = root_method(model, "mmrlsd_layout_logprobs", layout_logprobs)(
        layout, img, deep, fast, with_entropy
    )
    n, T = len(rows), seq.response_len
    at = (layout.out_row.to(device), layout.out_col.to(device))
    logp = torch.zeros(n, T, dtype=torch.float32, device=device).index_put(at, logp_r)  # (n, T)
    ent = torch.zeros(n, T, device=device).index_put(at, ent_r) if ent_r is not None else None
    return logp, ent


def layout_logprobs(
    model, layout: Layout, img: torch.Tensor | None, deep: list[torch.Tensor] | None, fast: FastOptions,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Embeddings (image features merged in), the language model and the lm_head on one layout: `(logp, entropy)`
    of its `R` predicted tokens, each `(R,)`. Under FSDP2 it runs as a forward method of the root module."""
    device = next(model.parameters()).device
    ids = layout.input_ids.to(device)
    embeds = model.get_input_embeddings()(ids)  # (b, L, H)
    extra = {}
    if img is not None:  # the merge Qwen2VLModel.forward does: placeholders replaced in order
        is_img = ids == model.config.image_token_id  # (b, L)
        if int(is_img.sum()) != img.shape[0]:
            raise ValueError(f"{int(is_img.sum())} image placeholders but {img.shape[0]} image features")
        embeds = embeds.masked_scatter(is_img[..., None], img.to(embeds.dtype))
        if (
            deep is not None
        ):  # Qwen3-VL deepstack: added to the first layers' hidden states at image positions
            extra = {
                "visual_pos_masks": is_img,
                "deepstack_visual_embeds": [d.to(embeds.dtype) for d in deep],
            }
    attn = layout.attention_mask.to(device) if layout.attention_mask is not None else None
    inputs = {"inputs_embeds": embeds, "attention_mask": attn, "position_ids": layout.position_ids.to(device),
              "use_cache": False, **extra}  # fmt: skip
    with packed_attention(model, layout, fast.attention) if fast.packing else nullcontext({}) as kw:
        out = model.model.language_model(**{**inputs, **kw})
    hidden = out.last_hidden_state.reshape(-1, embeds.shape[-1])[layout.pred_index.to(device)]  # (R, H)
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("lm_head with a bias is not supported by the fast path")
    return lean_logprobs(hidden, head.weight, layout.targets.to(device), fast.logprob_chunk, with_entropy)


def root_method(model, name: str, fn):
    """`fn` bound to `model`. Under FSDP2 it is registered as a forward method of the root module
    (`register_fsdp_forward_method`), so the root's parameters (embeddings, final norm, lm_head) are gathered
    before it and their gradients reduce-scattered after the backward, as for `model.forward`."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if not isinstance(model, FSDPModule):
        return partial(fn, model)
    if name not in model.__dict__:
        model.__dict__[name] = MethodType(fn, model)
        register_fsdp_forward_method(model, name)
    return getattr(model, name)


@torch.no_grad()
def token_logprobs(
    model, seq: SeqBatch, micro_batch_size: int, with_entropy: bool = False, fast: FastOptions | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`forward_logprobs` over all rows in micro-batches, without gradients; results on CPU, fp32.

    With `fast` enabled: the fast path, micro-batches by `fast.token_budget` when packing, vision features
    computed once per prompt when `fast.share_vision`."""
    n = seq.input_ids.shape[0]
    if fast is None or not fast.enabled:
        logps, ents = [], []
        for start in range(0, n, micro_batch_size):
            lp, ent = forward_logprobs(
                model, slice_seq(seq, start, min(n, start + micro_batch_size)), with_entropy
            )
            logps.append(lp.float().cpu())
            if ent is not None:
                ents.append(ent.float().cpu())
        return torch.cat(logps), (torch.cat(ents) if ents else None)
    positions = rope_positions(model, seq)
    vision = vision_features(model, seq, list(range(n)), fast.group_size) if fast.share_vision else None
    logp = torch.zeros(n, seq.response_len)
    ent = torch.zeros(n, seq.response_len) if with_entropy else None
    for rows in plan_micro_batches(model, seq, list(range(n)), fast, micro_batch_size):
        lp, e = fast_forward_logprobs(model, seq, rows or [0], fast, positions, vision, with_entropy)
        if not rows:  # under FSDP: another rank has more micro-batches, and each forward is collective
            continue
        logp[rows] = lp.float().cpu()
        if ent is not None:
            ent[rows] = e.float().cpu()
    return logp, ent
