"""The vision tower's windowed attention batched by window length (`model.vision_windows`,
`mmrlsd.model.vision.windows_sdpa_forward`) against transformers' sdpa loop over the windows.

Each window runs the same sdpa arithmetic, batched with the windows of its length instead of alone, so the tower's
output and every parameter gradient are compared bit for bit, on images large enough for several windows of
different lengths (Qwen2.5-VL's window attention; each image is one window in Qwen2-VL and Qwen3-VL)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmrlsd.data.encoding import chat_text, encode
from mmrlsd.model import vision
from mmrlsd.model.load import load_model

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _images(proc):
    rng = np.random.default_rng(0)
    sizes = [(224, 224), (252, 196), (448, 336), (224, 224)]  # two images of one size: one batched call
    pics = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    enc = encode(proc, [chat_text(proc, "q", len(pics))], [pics])
    return enc["pixel_values"], enc["image_grid_thw"]


def _tower(model, px, thw, monkeypatch):
    """The tower's merged output, its parameters' gradients (of the output's squared sum), and how many sdpa calls
    it made."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))  # fmt: skip
    visual = model.model.visual
    visual.zero_grad()
    out = visual(px, grid_thw=thw)
    out = out.pooler_output if hasattr(out, "pooler_output") else out
    out = out if torch.is_tensor(out) else torch.cat(list(out))
    out.square().sum().backward()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    grads = {n: p.grad.clone() for n, p in visual.named_parameters() if p.grad is not None}
    return out.detach(), grads, calls


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_windows_give_the_towers_numbers_bit_for_bit(arch, tiny_model, monkeypatch):
    model, proc = load_model(str(tiny_model(arch)), max_pixels=448 * 448)
    px, thw = _images(proc)
    ref, ref_grads, ref_calls = _tower(model, px, thw, monkeypatch)
    assert vision.batch_vision_windows(model)
    assert model.model.visual.config._attn_implementation == vision.VISION_WINDOWS
    assert model.model.language_model.config._attn_implementation == "sdpa"  # the text model keeps its own
    out, grads, calls = _tower(model, px, thw, monkeypatch)
    assert torch.equal(out, ref)
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name
    blocks = len(model.model.visual.blocks)
    assert len(ref_calls) >= 4 * blocks  # transformers: one call per window (four images at least)
    assert blocks <= len(calls) < len(ref_calls)  # one call per window length per block
    assert sum(c[0] for c in calls) == len(ref_calls)  # every window batched into one of them


def test_windows_of_different_lengths_in_one_block():
    """Windows of three lengths, out of order: each query attends only within its window (against a
    block-diagonal mask over the whole sequence, float64)."""
    gen = torch.Generator().manual_seed(0)
    bounds = [0, 4, 9, 13, 15, 20]  # lengths 4, 5, 4, 2, 5
    q, k, v = (torch.randn(1, 3, 20, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out, _ = vision.windows_sdpa_forward(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=torch.tensor(bounds))
    window = torch.zeros(20, dtype=torch.long)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        window[a:b] = i
    mask = window[:, None] == window[None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=0, atol=1e-12)


def test_the_setting_stays_in_memory_and_off_for_other_kernels(tiny_model, tmp_path):
    model, _ = load_model(str(tiny_model("qwen2_5_vl")), attn_implementation="eager")
    assert not vision.batch_vision_windows(model)  # eager: transformers' own
    model, _ = load_model(str(tiny_model("qwen2_5_vl")))
    assert vision.batch_vision_windows(model)
    model.save_pretrained(tmp_path)
    assert vision.VISION_WINDOWS not in (tmp_path / "config.json").read_text()
    json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_patch_embedding_gives_the_convolutions_numbers(arch, tiny_model, monkeypatch):
    """The patch embedding as a matrix multiply (`model.linear_patch_embed`): the tower's output and every
    parameter gradient (the convolution kernel's included) equal the convolution's up to float rounding, the
    convolution no longer runs, and the checkpoint is unchanged."""
    model, proc = load_model(str(tiny_model(arch)), max_pixels=448 * 448)
    px, thw = _images(proc)
    ref, ref_grads, _ = _tower(model, px, thw, monkeypatch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert vision.linear_patch_embed(model)
    conv = model.model.visual.patch_embed.proj
    monkeypatch.setattr(conv, "_conv_forward", lambda *a: pytest.fail("the convolution ran"))
    out, grads, _ = _tower(model, px, thw, monkeypatch)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and "patch_embed.proj.weight" in grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_linear_patch_embedding_leaves_other_convolutions_alone(tiny_model):
    model, _ = load_model(str(tiny_model("qwen2_vl")))
    embed = model.model.visual.patch_embed
    embed.proj = torch.nn.Conv3d(3, embed.proj.out_channels, kernel_size=(2, 14, 14), stride=(2, 7, 7), bias=False)
    assert not vision.linear_patch_embed(model)  # overlapping kernels: a real convolution
    assert "forward" not in vars(embed)
    assert not vision.linear_patch_embed(torch.nn.Linear(2, 2))  # no vision tower


@pytest.mark.parametrize(("windows", "linear"), [(True, True), (False, False), (True, False)])
def test_the_step_context_applies_the_towers_settings(windows, linear, tiny_model):
    """`model.vision_windows` and `model.linear_patch_embed` reach the policy and the teacher, each on its own."""
    import copy

    from mmrlsd.config import load_config, packaged_prompt
    from mmrlsd.data.prompts import PromptBuilder
    from mmrlsd.train.step import StepContext

    cfg = load_config(None, ["model.path=x", "data.train_files=[a.jsonl]", f"model.vision_windows={str(windows).lower()}",
                             f"model.linear_patch_embed={str(linear).lower()}"])  # fmt: skip
    policy, proc = load_model(str(tiny_model("qwen2_vl")))
    teacher = copy.deepcopy(policy)
    StepContext(cfg, policy, teacher, proc, torch.optim.SGD(policy.parameters(), lr=0.1),
                PromptBuilder(proc, packaged_prompt("student.jinja"), packaged_prompt("teacher.jinja"), "answer"))  # fmt: skip
    want = vision.VISION_WINDOWS if windows else "sdpa"
    assert [m.model.visual.config._attn_implementation for m in (policy, teacher)] == [want, want]
    assert [("forward" in vars(m.model.visual.patch_embed)) for m in (policy, teacher)] == [linear, linear]
