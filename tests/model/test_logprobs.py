"""Batched, padded log-probs (student and teacher) equal one-sequence forwards; the teacher gets its own positions."""

import pytest
import torch
from PIL import Image

from mmrlsd.data.encoding import chat_text, encode
from mmrlsd.model.load import load_model
from mmrlsd.model.logprobs import build_sequences, slice_seq, token_logprobs
from mmrlsd.rollout.generate import generate
from mmrlsd.types import Rollouts


def _prompts(proc, teacher: bool):
    ref = "\nHere is a reference solution:\n3" if teacher else ""
    imgs = [[Image.new("RGB", (56, 56), "red")], [Image.new("RGB", (84, 56), "blue")], []]
    texts = [chat_text(proc, "how many red shapes?" + ref, 1),
             chat_text(proc, "a longer question about the blue shapes in the picture" + ref, 1),
             chat_text(proc, "text only: 2 + 1 = ?" + ref, 0)]  # fmt: skip
    G = 2
    return [t for t in texts for _ in range(G)], [i for i in imgs for _ in range(G)]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_batched_teacher_logprobs_match_single_sequence_forward(arch, tiny_model):
    model, proc = load_model(str(tiny_model(arch)))
    s_texts, imgs = _prompts(proc, teacher=False)
    t_texts, _ = _prompts(proc, teacher=True)
    enc = encode(proc, s_texts, imgs)
    rollouts = generate(model, proc, enc, group_size=2, max_new_tokens=10, seed=0)
    rollouts.response_mask[1, 6:] = 0  # one shorter response, to exercise right padding
    t_enc = encode(proc, t_texts, imgs)
    seq = build_sequences(t_enc, rollouts)
    assert seq.prompt_len > enc["input_ids"].shape[1]  # the teacher prompt is longer
    batched, _ = token_logprobs(model, seq, micro_batch_size=4)  # micro-batches split image ownership
    for i in range(len(t_texts)):
        L = int(rollouts.response_mask[i].sum())
        one = encode(proc, [t_texts[i]], [imgs[i]])  # no padding at all
        r1 = Rollouts(rollouts.response_ids[i : i + 1, :L], torch.ones(1, L, dtype=torch.long), [""], 1)
        single, _ = token_logprobs(model, build_sequences(one, r1), micro_batch_size=1)
        torch.testing.assert_close(batched[i, :L], single[0], rtol=0, atol=1e-5)


def test_slice_seq_keeps_image_rows(tiny_model):
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    texts, imgs = _prompts(proc, teacher=False)
    enc = encode(proc, texts, imgs)
    r = Rollouts(torch.zeros(6, 3, dtype=torch.long), torch.ones(6, 3, dtype=torch.long), [""] * 6, 2)
    seq = build_sequences(enc, r)
    assert seq.images_per_seq == [1, 1, 1, 1, 0, 0]
    part = slice_seq(seq, 2, 5)
    # rows 2,3 own image 2,3 (84x56 -> grid 1x4x6 = 24 patches each); row 4 owns none
    assert part.image_grid_thw.tolist() == [[1, 4, 6], [1, 4, 6]] and part.pixel_values.shape[0] == 48
    assert slice_seq(seq, 4, 6).pixel_values is None
