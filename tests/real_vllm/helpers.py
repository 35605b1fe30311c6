"""Prompts and comparisons shared by the vLLM tests."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from mmrlsd.data.encoding import chat_text, encode
from mmrlsd.model.logprobs import build_sequences, token_logprobs
from mmrlsd.rollout.generate import eos_token_ids, generate
from mmrlsd.rollout.vllm_engine import rollouts_from_ids

# Small engines that start fast: no torch.compile, a 256 MiB KV cache.
ENGINE_SETTINGS = dict(enforce_eager=True, cpu_kvcache_gb=0.25, max_num_seqs=16)


def picture(k: int, colour: str = "red") -> Image.Image:
    img = Image.new("RGB", (56, 56), "white")
    d = ImageDraw.Draw(img)
    for j in range(k):
        d.rectangle([4 + 12 * j, 20, 12 + 12 * j, 28], fill=colour)
    return img


def prompts(proc) -> tuple[list[str], list[list]]:
    """Three chat prompts: one image, two images, text only."""
    items = [("how many red squares are there in the picture ?", [picture(2)]),
             ("compare the two pictures : which has more squares ?", [picture(1, "blue"), picture(3)]),
             ("what is 3 + 4 ?", [])]  # fmt: skip
    return [chat_text(proc, t, len(i)) for t, i in items], [i for _, i in items]


def hf_generate(model, proc, texts, images, *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0):
    enc = encode(proc, texts, images)
    r = generate(
        model, proc, enc, group_size=1, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    return enc, r


def rows(r) -> list[list[int]]:
    """Response ids up to and including the first EOS, per row."""
    return [ids[m.bool()].tolist() for ids, m in zip(r.response_ids, r.response_mask)]


def vllm_greedy(eng, model, proc, texts, images, *, max_new_tokens: int, logprobs: bool = False):
    """`(rollouts, per-row lists of the sampled tokens' log-probs or None)`."""
    eos = eos_token_ids(model, proc)
    params = eng.sampling_params(n=1, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, seed=0,
                                 eos=eos, logprobs=logprobs)  # fmt: skip
    outs = eng.generate_outputs(texts, images, params)
    tok = proc.tokenizer
    r = rollouts_from_ids([list(c.token_ids) for c in outs], eos, tok.pad_token_id, tok, group_size=1)
    lps = None
    if logprobs:
        lps = [[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] for c in outs]
    return r, lps


def vllm_sample(
    eng, model, proc, texts, images, *, n: int, seed: int, max_new_tokens: int = 12
) -> list[list[int]]:
    eos = eos_token_ids(model, proc)
    params = eng.sampling_params(n=n, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, seed=seed,
                                 eos=eos)  # fmt: skip
    return eng.generate_ids(texts, images, params)


def teacher_forced(model, enc, r) -> torch.Tensor:
    """HF log-probs `(N, T)` of the response tokens in `r` (zeros past each row's end)."""
    lp, _ = token_logprobs(model, build_sequences(enc, r), micro_batch_size=8)
    return lp * r.response_mask
