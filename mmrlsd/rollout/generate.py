"""Rollouts with Hugging Face `generate`: G samples per prompt, batched, vision special tokens suppressed.

Sampled responses could otherwise contain the image placeholder token, which breaks the next forward pass (the
processor counts placeholders against the image grid), so every vision special token is suppressed.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mmrlsd.data.prompts import chat_text, encode
from mmrlsd.train import dist, fsdp
from mmrlsd.types import Rollouts

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def vision_token_ids(processor) -> list[int]:
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return sorted({i for i in ids if i is not None and i != tok.unk_token_id})


def eos_token_ids(model, processor) -> list[int]:
    tok = processor.tokenizer
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        if i is not None and i != tok.unk_token_id:
            ids.append(i)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return sorted(set(ids))


class RowSeededSampler:
    """Sampling with one random stream per sequence, seeded by (seed, global row index).

    A logits processor for `generate(do_sample=False)`: after temperature/top-k/top-p warping it adds Gumbel noise
    drawn from the row's own generator, and greedy argmax then samples exactly from the warped softmax
    (Gumbel-max trick). The samples of a row therefore do not depend on how rows are batched or split across
    ranks, which makes a 2-rank run reproduce a single-process run and `gen_batch_size` change nothing.
    """

    def __init__(self, seed: int, rows: list[int]):
        self.gens = [torch.Generator().manual_seed(seed * 1_000_003 + r) for r in rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.gens])
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))  # (n, V)
        return scores.float() + gumbel.to(scores.device, torch.float32)


def _warpers(temperature: float, top_p: float, top_k: int) -> list:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def _slice_enc(enc, start: int, stop: int) -> dict:
    """Rows start..stop of a left-padded prompt encoding, with their images' pixel rows."""
    out = {k: enc[k][start:stop] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in enc}
    if enc.get("pixel_values") is not None:
        image_token = enc["mm_token_type_ids"] if "mm_token_type_ids" in enc else None
        n_img = _images_per_row(enc, image_token)
        first, last = sum(n_img[:start]), sum(n_img[:stop])
        thw = enc["image_grid_thw"]
        patches = thw.prod(dim=1).tolist()
        p0, p1 = sum(patches[:first]), sum(patches[:last])
        if last > first:
            out["pixel_values"] = enc["pixel_values"][p0:p1]
            out["image_grid_thw"] = thw[first:last]
    return out


def _images_per_row(enc, mm_types) -> list[int]:
    """Images in each row: count maximal runs of image tokens (each image is one contiguous run)."""
    if mm_types is None:
        raise ValueError("encoding has pixel_values but no mm_token_type_ids")
    is_img = (mm_types == 1).int()  # (N, L)
    starts = is_img[:, 1:] & (1 - is_img[:, :-1])
    return (starts.sum(dim=1) + is_img[:, 0]).tolist()


def images_per_row(enc) -> list[int]:
    if enc.get("pixel_values") is None:
        return [0] * enc["input_ids"].shape[0]
    return _images_per_row(enc, enc["mm_token_type_ids"])


@torch.no_grad()
def generate(
    model, processor, enc, *, group_size: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
    top_k: int = 0, gen_batch_size: int = 0, seed: int | None = None, progress: bool = False,
    row_offset: int | None = None,
) -> Rollouts:  # fmt: skip
    """Sample responses for the N prompt rows of `enc` (already repeated G times per prompt).

    `temperature == 0` means greedy decoding. Sampling is seeded per row (`RowSeededSampler`): row i of this
    call uses the stream (seed, row_offset + i), `row_offset` defaulting to rank * N. Returns right-padded response ids with a mask that covers the
    tokens up to and including the first EOS.

    Under FSDP every rank must pass as many rows (so as many `generate` calls): the decode steps are kept in
    step by `synced_gpus`, and a call without images runs the vision tower on a dummy image.
    """
    from transformers import LogitsProcessorList

    tok = processor.tokenizer
    n = enc["input_ids"].shape[0]
    eos = eos_token_ids(model, processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    sample = temperature > 0
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=vision_token_ids(processor),
        eos_token_id=eos, pad_token_id=pad, use_cache=True, temperature=None, top_p=None, top_k=None,
        synced_gpus=dist.enabled(),  # under FSDP every rank must run the same number of forwards
    )  # fmt: skip
    if row_offset is None:
        row_offset = dist.rank() * n  # every rank holds the same number of rows
    chunk = gen_batch_size or n
    device = next(model.parameters()).device
    pieces = []
    for start in tqdm(range(0, n, chunk), desc="generate", disable=not progress, leave=False):
        stop = min(n, start + chunk)
        inputs = {k: v.to(device) for k, v in _slice_enc(enc, start, stop).items()}
        if "pixel_values" not in inputs and fsdp.tower_is_collective(model):
            fsdp.dummy_vision(model)  # the other ranks' `generate` may encode images now, before its prefill
        procs = LogitsProcessorList()
        if sample:
            base = 0 if seed is None else seed
            rows = list(range(row_offset + start, row_offset + stop))
            procs.extend(_warpers(temperature, top_p, top_k) + [RowSeededSampler(base, rows)])
        out = model.generate(**inputs, logits_processor=procs, **kwargs)
        pieces.append(out[:, inputs["input_ids"].shape[1] :].cpu())
    width = max(p.shape[1] for p in pieces)
    ids = torch.full((n, max(width, 1)), pad, dtype=torch.long)
    row = 0
    for p in pieces:
        ids[row : row + p.shape[0], : p.shape[1]] = p
        row += p.shape[0]
    is_eos = torch.isin(ids, torch.tensor(eos))  # (N, T)
    # mask: positions up to and including the first EOS; everything after is padding
    after_eos = (is_eos.cumsum(dim=1) - is_eos.int()) > 0  # (N, T)
    mask = (~after_eos).long()
    if width == 0:
        mask.zero_()
    ids = ids.masked_fill(mask == 0, pad)
    texts = tok.batch_decode([r[m.bool()] for r, m in zip(ids, mask)], skip_special_tokens=True)
    return Rollouts(response_ids=ids, response_mask=mask, texts=texts, group_size=group_size)


def generate_texts(
    model, processor, prompts: list[tuple[str, list]], *, max_new_tokens: int, temperature: float = 0.0,
    top_p: float = 1.0, batch_size: int = 8, progress: bool = True, seed: int = 0,
) -> list[str]:  # fmt: skip
    """Answers for `(user_text, images)` prompts (images before the text in one user turn), for evaluation."""
    texts: list[str] = []
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        chats = [chat_text(processor, text, len(images)) for text, images in chunk]
        enc = encode(processor, chats, [images for _, images in chunk])
        r = generate(model, processor, enc, group_size=1, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, seed=seed + start)  # fmt: skip
        texts.extend(r.texts)
        bar.update(len(chunk))
    bar.close()
    return texts
