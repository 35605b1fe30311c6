"""Shared prefill in `mmrlsd.rollout.generate`: each prompt's prefix runs once and its KV cache serves its G rows.

Reference: the same call with `share_prefill=False`, where every row runs its full prompt. The two paths compute the
same numbers in batches of different shapes (P prompts x L-1 tokens then N rows x 1 token, against N rows x L
tokens), so the logits agree to float rounding (at most 1e-6 in log-probability here, about one ulp), not bit for
bit. Sampling is a Gumbel argmax over warped logits, which such a change can flip only when two noisy scores tie
that closely: on the fixed seeds below the sampled ids are identical, and every step's log-probabilities (recorded
as the sampler sees them) agree within 1e-5. The ids alone would not catch a wrong position: zeroed `rope_deltas`
(tried once) left the tiny models' samples unchanged but moved the image prompts' log-probs by 4e-3 to 0.2.
"""

import pytest
import torch
from PIL import Image

from mmrlsd.data import encoding
from mmrlsd.data.encoding import PIXEL_GROUP, chat_text, encode, repeat_encoding, slice_encoding
from mmrlsd.model.load import load_model
from mmrlsd.rollout import generate as gen

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
G = 4


def _encoding(proc, images: bool) -> dict:
    """Three prompts of different lengths (left padding), each repeated G times; with `images`, two carry images
    of different sizes and the third is text-only (a mixed batch)."""
    texts = ["how many?", "a longer question about the shapes in this picture", "text only"]
    pics = [[Image.new("RGB", (56, 56), "red")], [Image.new("RGB", (84, 56), "blue")], []]
    if not images:
        pics = [[], [], []]
    chats = [chat_text(proc, t, len(p)) for t, p in zip(texts, pics)]
    return repeat_encoding(encode(proc, chats, pics), G)


def _run(model, proc, enc, monkeypatch, **kw):
    """`generate` plus the log-probabilities the sampler saw at each step `[(N, V)]` and the pixel rows the vision
    tower encoded."""
    seen, pixel_rows = [], [0]
    sample = gen.RowSeededSampler.__call__

    def record(self, input_ids, scores):
        seen.append(torch.log_softmax(scores.float(), dim=-1))
        return sample(self, input_ids, scores)

    def count(module, args, kwargs):
        pixel_rows[0] += args[0].shape[0]

    monkeypatch.setattr(gen.RowSeededSampler, "__call__", record)
    hook = model.model.visual.register_forward_pre_hook(count, with_kwargs=True)
    try:
        r = gen.generate(model, proc, enc, group_size=G, max_new_tokens=12, **kw)
    finally:
        hook.remove()
        monkeypatch.setattr(gen.RowSeededSampler, "__call__", sample)
    return r, seen, pixel_rows[0]


@pytest.mark.parametrize("images", [True, False], ids=["images", "text"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefill_matches_full_prefill(arch, images, tiny_model, monkeypatch):
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images)
    full, full_lp, full_pix = _run(model, proc, enc, monkeypatch, seed=3, share_prefill=False)
    shared, shared_lp, shared_pix = _run(model, proc, enc, monkeypatch, seed=3, share_prefill=True)
    assert torch.equal(shared.response_ids, full.response_ids)
    assert torch.equal(shared.response_mask, full.response_mask)
    assert len(shared_lp) == len(full_lp) > 0
    for step, (a, b) in enumerate(zip(shared_lp, full_lp)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")  # -inf (suppressed) == -inf
    if images:  # the tower sees each prompt's images once, not G times
        assert shared_pix * G == full_pix > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_shared_prefill_matches_full_prefill(arch, tiny_model):
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images=True)
    kw = dict(group_size=G, max_new_tokens=12, temperature=0.0)
    full = gen.generate(model, proc, enc, share_prefill=False, **kw)
    shared = gen.generate(model, proc, enc, share_prefill=True, **kw)
    assert torch.equal(shared.response_ids, full.response_ids)
    for b in range(3):  # greedy: a group's G rows are one response
        assert all(t == shared.texts[b * G] for t in shared.texts[b * G : (b + 1) * G])


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_gen_batch_size_does_not_change_shared_rollouts(arch, tiny_model):
    """Chunks of whole groups (8 -> 2 groups; 6 -> rounded down to 4 = 1 group) and of partial groups (3 < G: one
    prompt prefilled per chunk it spans) give the rows the same samples: row i keeps its stream (seed, i)."""
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images=True)
    kw = dict(group_size=G, max_new_tokens=12, seed=11, share_prefill=True)
    ref = gen.generate(model, proc, enc, **kw)
    for size in (8, 6, 3):
        r = gen.generate(model, proc, enc, gen_batch_size=size, **kw)
        assert torch.equal(r.response_ids, ref.response_ids), size


@pytest.mark.parametrize("share", [True, False])
def test_checkpointed_model_in_training_mode_samples_as_in_eval_mode(share, tiny_model):
    """`generate` runs in eval mode and restores the mode: transformers 5.17 (the GPU machine's) drops the KV cache
    of gradient-checkpointed layers in training mode even without gradients, so every decode step saw one token
    without context (seen there: different greedy ids on both paths; 5.24 keeps the cache)."""
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    enc = _encoding(proc, images=True)
    kw = dict(group_size=G, max_new_tokens=8, seed=0, share_prefill=share)
    ref = gen.generate(model, proc, enc, **kw)
    assert not model.training
    model.gradient_checkpointing_enable()
    model.train()
    r = gen.generate(model, proc, enc, **kw)
    assert model.training
    assert torch.equal(r.response_ids, ref.response_ids)


def test_groups_repeat_detects_differing_rows(tiny_model, monkeypatch):
    """On a plain encoding (every row's pixel rows) the rows of each group are compared; on `repeat_encoding`'s
    (pixel rows once per group) they are equal by construction and not compared."""
    _, proc = load_model(str(tiny_model("qwen2_vl")))
    grouped = _encoding(proc, images=True)
    enc = slice_encoding(grouped, 0, grouped["input_ids"].shape[0])  # plain: G copies of the pixel rows
    assert PIXEL_GROUP not in enc and enc["pixel_values"].shape[0] == G * grouped["pixel_values"].shape[0]
    for e in (enc, grouped):
        assert gen.groups_repeat(e, G)
        assert not gen.groups_repeat(e, 3)  # 12 rows are not groups of 3 repeating one prompt
        assert not gen.groups_repeat(e, 5)  # 12 rows do not split into groups of 5
        tokens = {k: v.clone() if torch.is_tensor(v) else v for k, v in e.items()}
        tokens["input_ids"][G + 1, -3] += 1  # one row of group 1 differs in one token
        assert not gen.groups_repeat(tokens, G)
    pixels = {k: v.clone() for k, v in enc.items()}
    pixels["pixel_values"][-1, 0] += 1.0  # the last pixel row is row 7's (group 1; group 2 is text-only)
    assert not gen.groups_repeat(pixels, G)
    nan = {k: v.clone() for k, v in enc.items()}
    nan["pixel_values"][:, 0] = float("nan")  # NaN equals nothing, as in torch.equal
    assert not gen.groups_repeat(nan, G)

    def bf16(e):  # a dtype NumPy lacks: compared by torch.equal
        return {k: v.to(torch.bfloat16) if k == "pixel_values" else v for k, v in e.items()}

    assert gen.groups_repeat(bf16(enc), G) and not gen.groups_repeat(bf16(pixels), G)
    monkeypatch.setattr(encoding, "_equal", lambda a, b: pytest.fail("compared pixel rows stored once"))
    assert gen.groups_repeat(grouped, G)


@pytest.mark.parametrize("share", [True, False], ids=["shared", "full"])
def test_rollout_copies_pixel_rows_only_for_the_rows_it_runs(share, tiny_model, monkeypatch):
    """`repeat_encoding` stores each prompt's pixel rows once; a shared-prefill rollout reads only the prompts'
    rows (no G copies of them anywhere), the full prefill materialises them for every row it runs."""
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    enc = _encoding(proc, images=True)
    stored = enc["pixel_values"].shape[0]  # the two image prompts' rows, once
    read, real = [], encoding.row_pixels

    def spy(*a, **k):
        out = real(*a, **k)
        read.append(0 if out is None else out.shape[0])
        return out

    monkeypatch.setattr(encoding, "row_pixels", spy)
    gen.generate(model, proc, enc, group_size=G, max_new_tokens=4, seed=0, share_prefill=share)
    assert sum(read) == (stored if share else G * stored)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_falls_back_to_full_prefill_when_group_rows_differ(arch, tiny_model):
    """Same tokens, different pictures within a group: sharing would give every row the first row's image, so
    `generate` warns and runs the full prefill, i.e. exactly the unshared path."""
    model, proc = load_model(str(tiny_model(arch)))
    chat = chat_text(proc, "which colour?", 1)
    colours = ["red", "blue", "green", "white"] * 2  # 2 groups of G rows, every row its own image
    enc = encode(proc, [chat] * 8, [[Image.new("RGB", (56, 56), c)] for c in colours])
    kw = dict(group_size=G, max_new_tokens=8, seed=5)
    with pytest.warns(UserWarning, match="share_prefill"):
        shared = gen.generate(model, proc, enc, share_prefill=True, **kw)
    full = gen.generate(model, proc, enc, share_prefill=False, **kw)
    assert torch.equal(shared.response_ids, full.response_ids)
