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
