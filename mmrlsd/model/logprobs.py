"""The one forward pass used for the student, the teacher and the update: log-probs (and entropy) of the
sampled response tokens given `[prompt | response]`.

Sequences are laid out as `[left-padded prompt (P) | right-padded response (T)]`, so response token t sits at
column P + t in every row and is predicted by the logits at column P + t - 1. Only the last T + 1 positions'
logits are computed (`logits_to_keep`). Position ids, including Qwen-VL's 3-D mRoPE ids, are computed by the
model from `input_ids`, `image_grid_thw` and `attention_mask` for each sequence itself, so the teacher's longer
prompt gets its own positions.
"""

from __future__ import annotations

import torch

from mmrlsd.rollout.generate import images_per_row
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
    )


def slice_seq(seq: SeqBatch, start: int, stop: int) -> SeqBatch:
    """Rows start..stop with exactly their images' pixel rows."""
    pv, thw = None, None
    first, last = sum(seq.images_per_seq[:start]), sum(seq.images_per_seq[:stop])
    if seq.pixel_values is not None and last > first:
        patches = seq.image_grid_thw.prod(dim=1).tolist()
        pv = seq.pixel_values[sum(patches[:first]) : sum(patches[:last])]
        thw = seq.image_grid_thw[first:last]
    mm = seq.mm_token_type_ids[start:stop] if seq.mm_token_type_ids is not None else None
    return SeqBatch(
        input_ids=seq.input_ids[start:stop], attention_mask=seq.attention_mask[start:stop], mm_token_type_ids=mm,
        pixel_values=pv, image_grid_thw=thw, images_per_seq=seq.images_per_seq[start:stop],
        prompt_len=seq.prompt_len,
    )  # fmt: skip


def forward_logprobs(model, seq: SeqBatch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(logp, entropy)`, each `(n, T)`: log π(y_t | prompt, y_<t) of the sampled tokens, and the entropy of
    π(· | prompt, y_<t) (detached). Gradients flow through `logp` when enabled by the caller."""
    device = next(model.parameters()).device
    T = seq.response_len
    inputs = {"input_ids": seq.input_ids, "attention_mask": seq.attention_mask}
    if seq.mm_token_type_ids is not None:
        inputs["mm_token_type_ids"] = seq.mm_token_type_ids
    if seq.pixel_values is not None:
        inputs["pixel_values"] = seq.pixel_values.to(model.dtype)
        inputs["image_grid_thw"] = seq.image_grid_thw
    inputs = {k: v.to(device) for k, v in inputs.items()}
    out = model(**inputs, use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, :-1].float()  # (n, T, V): position P+t-1 predicts response token t
    targets = seq.input_ids[:, seq.prompt_len :].to(device)  # (n, T)
    logz = torch.logsumexp(logits, dim=-1)  # (n, T)
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - logz  # (n, T)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = torch.softmax(logits, dim=-1)
            entropy = logz - (p * logits).sum(-1)  # (n, T): H = logZ - E_p[logit]
    return logp, entropy


@torch.no_grad()
def token_logprobs(
    model, seq: SeqBatch, micro_batch_size: int, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`forward_logprobs` over all rows in micro-batches, without gradients; results on CPU, fp32."""
    logps, ents = [], []
    n = seq.input_ids.shape[0]
    for start in range(0, n, micro_batch_size):
        lp, ent = forward_logprobs(model, slice_seq(seq, start, min(n, start + micro_batch_size)), with_entropy)
        logps.append(lp.float().cpu())
        if ent is not None:
            ents.append(ent.float().cpu())
    return torch.cat(logps), (torch.cat(ents) if ents else None)
