"""Padding-free packing: packed log-probs equal the padded Hugging Face forward's (fp32, 1e-5) on all three
architectures, with plain segments, shared prefixes and token-budget micro-batches; layouts and micro-batch
plans checked by hand."""

import pytest
import torch
from PIL import Image

from mmrlsd.data.encoding import chat_text, encode
from mmrlsd.model.load import load_model
from mmrlsd.model.logprobs import build_sequences, token_logprobs
from mmrlsd.model.packing import FastOptions, micro_batches, pack, plan_units, rope_positions
from mmrlsd.rollout.generate import generate
from mmrlsd.types import Rollouts, SeqBatch

G = 2


def rollout_batch(arch, tiny_model, teacher: bool = True):
    """3 prompts x G=2 (two with images of different sizes, one text-only), one response cut short."""
    model, proc = load_model(str(tiny_model(arch)))
    ref = "\nHere is a reference solution:\n3" if teacher else ""
    imgs = [[Image.new("RGB", (56, 56), "red")], [Image.new("RGB", (84, 56), "blue")], []]
    texts = [chat_text(proc, "how many red shapes?" + ref, 1),
             chat_text(proc, "a longer question about the blue shapes in the picture" + ref, 1),
             chat_text(proc, "text only: 2 + 1 = ?" + ref, 0)]  # fmt: skip
    enc = encode(proc, [t for t in texts for _ in range(G)], [i for i in imgs for _ in range(G)])
    rollouts = generate(model, proc, enc, group_size=G, max_new_tokens=10, seed=0)
    rollouts.response_mask[1, 6:] = 0  # a shorter response: right padding inside the batch
    rollouts.response_mask[4, 3:] = 0
    return model, build_sequences(enc, rollouts), rollouts.response_mask.bool()


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_logprobs_equal_padded(arch, tiny_model):
    model, seq, mask = rollout_batch(arch, tiny_model)
    ref, _ = token_logprobs(model, seq, micro_batch_size=4)  # the padded HF forward, full logits
    options = {
        "packed": FastOptions(
            packing=True, token_budget=60, group_size=G
        ),  # 60 tokens: several micro-batches
        "packed, shared prefix": FastOptions(packing=True, share_prefix=True, token_budget=0, group_size=G),
        "everything": FastOptions(
            packing=True, share_prefix=True, share_vision=True, logprob_chunk=5, token_budget=90, group_size=G
        ),  # fmt: skip
        "padded fast path": FastOptions(packing=False, share_vision=True, logprob_chunk=7, group_size=G),
    }
    for name, fast in options.items():
        out, _ = token_logprobs(model, seq, micro_batch_size=3, fast=fast)
        torch.testing.assert_close(out[mask], ref[mask], rtol=0, atol=1e-5, msg=name)
        assert (out[~mask] == 0).all(), name  # nothing is written off the response


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_packed_positions_are_each_sequences_own(arch, tiny_model):
    """The 3-D mRoPE ids of a packed row equal those of the sequence encoded alone (no padding at all)."""
    model, seq, _ = rollout_batch(arch, tiny_model, teacher=False)
    layout = pack(seq, [2, 3, 4], rope_positions(model, seq))
    starts = [s for s, _, _ in layout.segments]
    for k, r in enumerate([2, 3, 4]):
        cols = seq.attention_mask[r].nonzero().squeeze(1)
        alone = SeqBatch(seq.input_ids[r : r + 1, cols], torch.ones(1, cols.numel(), dtype=torch.long),
                         seq.mm_token_type_ids[r : r + 1, cols], None, seq.image_grid_thw[r : r + 1] if r < 4 else None,
                         [1 if r < 4 else 0], 0)  # fmt: skip
        own = rope_positions(model, alone)[:, 0]  # (3, L_r)
        got = layout.position_ids[1:, 0, starts[k] : starts[k] + cols.numel()]
        assert torch.equal(got, own)
        assert torch.equal(
            layout.position_ids[0, 0, starts[k] : starts[k] + cols.numel()], torch.arange(cols.numel())
        )


def test_pack_layout_by_hand():
    """Two rows of one prompt (P = 3 columns, 2 real prompt tokens each), T = 3.

    row 0: [pad 7 8 | 20 21 pad]  -> real tokens 7 8 20 21
    row 1: [pad 7 8 | 30 pad pad] -> real tokens 7 8 30
    plain packing:   [7 8 20 21 | 7 8 30]; token 20 is predicted at packed index 1, 21 at 2, 30 at 5
    shared prefix:   [7 8 | 20 21 | 30]  ; 20 at 1, 21 at 2, 30 at 1 (the prompt's last token again)
    """
    ids = torch.tensor([[0, 7, 8, 20, 21, 0], [0, 7, 8, 30, 0, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    seq = SeqBatch(ids, attn, None, None, None, [0, 0], prompt_len=3)
    pos = (attn.cumsum(1) - 1).clamp(min=0)[None].expand(3, -1, -1)  # text-only: 0, 1, 2, ... per row
    plain = pack(seq, [0, 1], pos)
    assert plain.input_ids.tolist() == [[7, 8, 20, 21, 7, 8, 30]]
    assert plain.pred_index.tolist() == [1, 2, 5] and plain.targets.tolist() == [20, 21, 30]
    assert plain.out_row.tolist() == [0, 0, 1] and plain.out_col.tolist() == [0, 1, 0]
    assert plain.segments == [(0, 4, []), (4, 3, [])] and plain.cu_seqlens.tolist() == [0, 4, 7]
    shared = pack(seq, [0, 1], pos, group_size=2, share_prefix=True)
    assert shared.input_ids.tolist() == [[7, 8, 20, 21, 30]]
    assert shared.pred_index.tolist() == [1, 2, 1] and shared.segments == [(0, 2, [2, 1])]
    assert shared.position_ids[0, 0].tolist() == [0, 1, 2, 3, 2]  # each response continues after the prompt
    assert shared.prompt_rows == [0]


def test_shared_prefix_refuses_rows_with_different_prompts():
    ids = torch.tensor([[5, 6, 20], [5, 9, 30]])
    seq = SeqBatch(ids, torch.ones_like(ids), None, None, None, [0, 0], prompt_len=2)
    with pytest.raises(ValueError, match="share a group but not a prompt"):
        pack(seq, [0, 1], torch.zeros(3, 2, 3, dtype=torch.long), group_size=2, share_prefix=True)


def test_micro_batches_token_budget():
    # sizes 5, 3, 4, 2 with budget 7, first-fit decreasing: 5 -> bin A (2 left), 4 -> bin B (3 left),
    # 3 -> bin B (0 left), 2 -> bin A (0 left): A = rows {0, 3}, B = rows {1, 2}
    assert micro_batches([[0], [1], [2], [3]], [5, 3, 4, 2], token_budget=7, max_rows=0) == [[0, 3], [1, 2]]
    # a unit larger than the budget gets a micro-batch of its own; units stay whole
    assert micro_batches([[0, 1], [2]], [9, 2], token_budget=4, max_rows=0) == [[0, 1], [2]]
    # no budget: consecutive runs of max_rows rows (the padded path's split)
    assert micro_batches([[0], [1], [2]], [1, 1, 1], token_budget=0, max_rows=2) == [[0, 1], [2]]


def test_plan_units_count_a_shared_prompt_once():
    # prompt 2 real tokens in both rows; responses 2 and 1 tokens: plain 4 + 3, shared 2 + 2 + 1 = 5
    ids = torch.tensor([[0, 7, 8, 20, 21, 0], [0, 7, 8, 30, 0, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    seq = SeqBatch(ids, attn, None, None, None, [0, 0], prompt_len=3)
    assert plan_units(seq, [0, 1], group_size=2, share_prefix=False) == ([[0], [1]], [4, 3])
    assert plan_units(seq, [0, 1], group_size=2, share_prefix=True) == ([[0, 1]], [5])


def test_text_only_rollouts_pack(tiny_model):
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    enc = encode(proc, [chat_text(proc, "2 + 1 = ?", 0)] * 2 + [chat_text(proc, "a longer text question", 0)] * 2,
                 [[], [], [], []])  # fmt: skip
    r = Rollouts(torch.tensor([[5, 6, 7], [8, 9, 0], [5, 5, 5], [6, 0, 0]]),
                 torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]]), [""] * 4, 2)  # fmt: skip
    seq = build_sequences(enc, r)
    ref, _ = token_logprobs(model, seq, micro_batch_size=4)
    out, _ = token_logprobs(model, seq, 4, fast=FastOptions(packing=True, share_prefix=True, group_size=2))
    m = r.response_mask.bool()
    torch.testing.assert_close(out[m], ref[m], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_flex_attention_packing_on_cpu(tiny_model):
    """flex_attention (compiled by inductor: about two minutes on two shared cores) gives the same log-probs."""
    model, seq, mask = rollout_batch("qwen2_5_vl", tiny_model)
    ref, _ = token_logprobs(model, seq, micro_batch_size=4)
    for share_prefix in (False, True):
        fast = FastOptions(packing=True, share_prefix=share_prefix, attention="flex_attention", group_size=G)
        out, _ = token_logprobs(model, seq, 6, fast=fast)
        torch.testing.assert_close(out[mask], ref[mask], rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "varlen_sdpa", "flex_attention"])
def test_packed_logprobs_on_gpu(kernel, tiny_model):
    model, seq, mask = rollout_batch("qwen2_5_vl", tiny_model)
    model = model.cuda()
    ref, _ = token_logprobs(model, seq, micro_batch_size=4)
    fast = FastOptions(packing=True, share_prefix=True, share_vision=True, logprob_chunk=8, attention=kernel,
                       group_size=G)  # fmt: skip
    out, _ = token_logprobs(model, seq, 6, fast=fast)
    torch.testing.assert_close(out[mask], ref[mask], rtol=0, atol=1e-5)


def test_varlen_sdpa_reads_grouped_heads_as_repeated():
    """varlen_sdpa lets sdpa read the shared key/value heads of grouped-query attention as stored: the outputs and
    the query gradient equal those of repeating the heads first (as transformers does) bit for bit, the key and
    value gradients to float rounding (the sum over the query heads of a group runs in another order), over a
    packed row of two segments (a prefix and two responses, then a plain sequence)."""
    from mmrlsd.model.packing import varlen_sdpa_forward

    gen = torch.Generator().manual_seed(0)
    heads, kv, d, L = 4, 2, 16, 23
    segments = [(0, 7, [5, 6]), (1, 5, [])]
    q, k, v = (torch.randn(1, h, L, d, generator=gen) for h in (heads, kv, kv))
    grad = torch.randn(1, L, heads, d, generator=gen)

    def run(repeat: bool):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        qq, kk, vv = leaves
        if repeat:
            kk, vv = kk.repeat_interleave(heads // kv, 1), vv.repeat_interleave(heads // kv, 1)
        out, _ = varlen_sdpa_forward(None, qq, kk, vv, None, mmrlsd_segments=segments)
        out.backward(grad)
        return out, [x.grad for x in leaves]

    (out, grads), (ref, ref_grads) = run(False), run(True)
    assert out.shape == (1, L, heads, d) and torch.equal(out, ref)
    assert torch.equal(grads[0], ref_grads[0])
    for a, b in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
        assert a.abs().max() > 0.1
