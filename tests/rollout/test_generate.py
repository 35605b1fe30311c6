import torch

from mmrlsd.data.encoding import chat_text, encode
from mmrlsd.model.load import load_model
from mmrlsd.rollout.generate import generate, generate_texts, vision_token_ids


def test_vision_tokens_are_never_sampled(tiny_model):
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    banned = vision_token_ids(proc)
    assert len(banned) == 5
    with torch.no_grad():  # make the image placeholder overwhelmingly likely; suppression must still win
        model.lm_head.weight[banned] = model.lm_head.weight[banned] * 0 + 5.0
    enc = encode(proc, [chat_text(proc, "hi", 0)] * 4, [[]] * 4)
    r = generate(model, proc, enc, group_size=4, max_new_tokens=12, temperature=1.0, seed=0)
    assert not torch.isin(r.response_ids, torch.tensor(banned)).any()


def test_eos_mask_and_padding(tiny_model):
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    im_end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make <|im_end|> likely so some responses stop early
        model.lm_head.weight[im_end] += 0.3
    enc = encode(proc, [chat_text(proc, "hi", 0)] * 8, [[]] * 8)
    r = generate(model, proc, enc, group_size=8, max_new_tokens=20, temperature=1.0, seed=1)
    pad = proc.tokenizer.pad_token_id
    for ids, m in zip(r.response_ids, r.response_mask):
        L = int(m.sum())
        assert torch.all(m[:L] == 1) and torch.all(m[L:] == 0)  # mask is a prefix
        assert torch.all(ids[L:] == pad)
        eos_pos = (ids[:L] == im_end).nonzero()
        assert len(eos_pos) <= 1 and (len(eos_pos) == 0 or int(eos_pos[0]) == L - 1)  # EOS only at the end


def test_seeded_sampling_is_reproducible_and_greedy_is_deterministic(tiny_model):
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    enc = encode(proc, [chat_text(proc, "hi", 0)] * 3, [[]] * 3)
    a = generate(model, proc, enc, group_size=3, max_new_tokens=8, seed=5)
    b = generate(model, proc, enc, group_size=3, max_new_tokens=8, seed=5)
    assert torch.equal(a.response_ids, b.response_ids)
    texts = generate_texts(model, proc, [("hi", [])] * 2, max_new_tokens=6, progress=False)
    assert texts[0] == texts[1]


def test_presence_penalty_hand_values():
    from mmrlsd.rollout.generate import PresencePenalty

    # prompt [9, 9] (2 columns) then generated [5, 7, 5]: tokens 5 and 7 lose 1.5 once each; 9 (prompt only) keeps
    ids = torch.tensor([[9, 9, 5, 7, 5], [9, 9, 3, 3, 3]])
    scores = torch.arange(20, dtype=torch.float32).reshape(2, 10)
    out = PresencePenalty(1.5, prompt_len=2)(ids, scores.clone())
    expected = scores.clone()
    expected[0, 5] -= 1.5
    expected[0, 7] -= 1.5
    expected[1, 3] -= 1.5
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(
        PresencePenalty(1.5, prompt_len=5)(ids, scores.clone()), scores
    )  # nothing generated yet


def test_presence_penalty_in_generate(tiny_model):
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    enc = encode(proc, [chat_text(proc, "hi", 0)] * 8, [[]] * 8)

    def repeats(r) -> int:
        return sum(
            int(m.sum()) - len(set(ids[m.bool()].tolist())) for ids, m in zip(r.response_ids, r.response_mask)
        )

    plain = generate(model, proc, enc, group_size=8, max_new_tokens=24, temperature=1.0, seed=3)
    assert repeats(plain) > 0  # this seed repeats tokens without the penalty
    big = generate(
        model, proc, enc, group_size=8, max_new_tokens=24, temperature=1.0, seed=3, presence_penalty=1e4
    )
    assert repeats(big) == 0  # a token once generated is never drawn again in that response
    greedy = generate(
        model, proc, enc, group_size=8, max_new_tokens=24, temperature=0.0, presence_penalty=1e4
    )
    assert repeats(greedy) == 0


def test_row_seeded_noise_is_each_rows_own_stream():
    """The sampler's Gumbel noise for a row is the row's own generator stream (seed·1_000_003 + row), drawn on the
    scores' device: on the CPU the streams are those of `torch.Generator().manual_seed(...)`, and a subset of the
    rows (`select`, as when finished rows leave the batch) continues each row's stream unchanged."""
    from mmrlsd.rollout.generate import RowSeededSampler

    scores = torch.randn(3, 500, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(7 * 1_000_003 + r) for r in (0, 5, 9)]
    expect = []
    for _ in range(3):  # three decode steps
        u = torch.stack([torch.rand(500, generator=g, dtype=torch.float64) for g in gens])
        expect.append(scores + (-torch.log(-torch.log(u))).float())
    s = RowSeededSampler(7, [0, 5, 9])
    first = s(None, scores)
    assert torch.equal(first, expect[0])
    assert torch.equal(s(None, scores), expect[1])  # the noise buffer reused: the next draws of each stream
    assert torch.equal(first, expect[0])  # the first step's result is not overwritten
    assert torch.equal(s.select([1, 2])(None, scores[1:]), expect[2][1:])
    assert s.gens[0].device.type == "cpu"
