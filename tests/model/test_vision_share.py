"""Vision features once per prompt: the same log-probs and gradients (1e-5, fp32) as running the vision tower for
every response, on all three architectures (Qwen3-VL's deepstack included), with one tower forward per batch;
and the fused update (packing + shared vision + lean log-probs + Δ_t, Â_t formed inside the update) takes the
same step as the plain `ppo_update` after a separate old-log-prob pass."""

import copy

import pytest
import torch
from PIL import Image

from mmrlsd.algo.methods import TokenRule, privileged_gain, token_advantages
from mmrlsd.data.encoding import PIXEL_GROUP, chat_text, encode, repeat_encoding, slice_encoding
from mmrlsd.model.load import load_model
from mmrlsd.model.logprobs import (
    build_sequences,
    fast_forward_logprobs,
    forward_logprobs,
    seq_pixels,
    slice_seq,
    token_logprobs,
)
from mmrlsd.model.packing import FastOptions, rope_positions
from mmrlsd.model.vision import vision_features
from mmrlsd.rollout.generate import generate
from mmrlsd.train.update import Credit, ppo_update

G = 3


def batch(arch, tiny_model):
    """2 image prompts (different sizes) and 1 text-only prompt, G = 3 responses each."""
    model, proc = load_model(str(tiny_model(arch)))
    texts = [chat_text(proc, "how many red shapes?", 1), chat_text(proc, "what is 2 + 2 ?", 0),
             chat_text(proc, "a longer question about the blue shapes", 1)]  # fmt: skip
    imgs = [[Image.new("RGB", (56, 56), "red")], [], [Image.new("RGB", (84, 56), "blue")]]
    enc = repeat_encoding(encode(proc, texts, imgs), G)
    r = generate(model, proc, enc, group_size=G, max_new_tokens=8, seed=0)
    r.response_mask[2, 5:] = 0
    return model, proc, texts, imgs, build_sequences(enc, r), r.response_mask.float()


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_repeat_encoding_equals_encoding_repeated_prompts(arch, tiny_model):
    model, proc, texts, imgs, _, _ = batch(arch, tiny_model)
    """The repeated encoding is the encoding of the repeated prompts (any rows, through `slice_encoding`), with each
    prompt's pixel rows stored once: the processor's own tensor, not G copies."""
    full = encode(proc, [t for t in texts for _ in range(G)], [i for i in imgs for _ in range(G)])
    once = encode(proc, texts, imgs)
    rep = repeat_encoding(once, G)
    assert set(rep) == {k for k in full if full[k] is not None} | {PIXEL_GROUP}
    assert rep[PIXEL_GROUP] == G and rep["pixel_values"] is once["pixel_values"]
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(rep[k], full[k]), k
    n = 3 * G
    for start, stop in [(0, n), (0, 1), (1, 2), (2, 7), (G - 1, 2 * G + 1), (G, 2 * G), (n - 1, n)]:
        got, want = slice_encoding(rep, start, stop), slice_encoding(full, start, stop)
        assert got.keys() == want.keys(), (start, stop)
        for k in got:
            assert torch.equal(got[k], want[k]), (start, stop, k)
    with pytest.raises(ValueError, match="already repeated"):
        repeat_encoding(rep, G)


def _count_tower_calls(model):
    calls = []
    handle = model.model.visual.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_shared_vision_logprobs_and_gradients_equal_per_response(arch, tiny_model):
    model, _, _, _, seq, mask = batch(arch, tiny_model)
    n = seq.input_ids.shape[0]  # 9 rows, 6 of them with an image
    torch.manual_seed(0)
    w = torch.randn(n, seq.response_len) * mask / mask.sum()  # an arbitrary token-mean loss Σ w_t·logp_t
    micro = [[0, 1, 2, 3], [4, 5, 6, 7], [8]]  # splits prompt 1's rows over two micro-batches

    # per response (the plain HF forward): the tower runs on every row's own copy of the image
    calls, h = _count_tower_calls(model)
    model.zero_grad()
    ref = torch.zeros(n, seq.response_len)
    for rows in micro:
        logp, _ = forward_logprobs(model, slice_seq(seq, rows[0], rows[-1] + 1))
        (logp * w[rows]).sum().backward()
        ref[rows] = logp.detach()
    h.remove()
    red, blue = seq.image_grid_thw.prod(dim=1)[[0, 3]].tolist()  # patches of one red / one blue image
    assert calls == [3 * red, 2 * blue, blue]  # micro-batch rows 0-2 red (row 3 text-only), 6-7 blue, 8 blue
    grads_ref = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    # shared: one tower forward for the 2 distinct images, leaves collect the micro-batches' gradients
    calls, h = _count_tower_calls(model)
    model.zero_grad()
    fast = FastOptions(share_vision=True, group_size=G)
    tower = vision_features(model, seq, list(range(n)), G)
    leaf = tower.detached()
    out = torch.zeros(n, seq.response_len)
    positions = rope_positions(model, seq)
    for rows in micro:
        logp, _ = fast_forward_logprobs(model, seq, rows, fast, positions, vision=leaf)
        (logp * w[rows]).sum().backward()
        out[rows] = logp.detach()
    tower.backward_from(leaf)
    h.remove()
    assert calls == [red + blue]  # the tower ran once, on the images of rows 0 and 6 only
    m = mask.bool()
    torch.testing.assert_close(out[m], ref[m], rtol=0, atol=1e-5)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(grads_ref)
    assert any(".visual." in f".{k}" for k in grads)  # the vision tower does get gradients
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=0, atol=1e-5, msg=k)


def test_shared_vision_in_no_grad_passes(tiny_model):
    model, _, _, _, seq, mask = batch("qwen2_5_vl", tiny_model)
    ref, _ = token_logprobs(model, seq, 4)
    for packing in (False, True):
        out, _ = token_logprobs(
            model, seq, 4, fast=FastOptions(packing=packing, share_vision=True, group_size=G)
        )
        torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-5)


def _step_inputs(seq, mask, model):
    torch.manual_seed(1)
    n = seq.input_ids.shape[0]
    adv = torch.randn(n)
    old, _ = token_logprobs(model, seq, 4)  # (N, T) the behaviour policy
    teacher = old + 0.3 * torch.randn_like(old)  # a teacher that disagrees a little
    return old, Credit(adv, teacher, mask, TokenRule("rlsd", lam=0.5, eps_w=0.2))


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_fused_update_takes_the_same_step_as_ppo_update(arch, tiny_model):
    """One optimizer step (SGD, lr 1: the step is the gradient): ppo_update after an old-log-prob pass (Δ_t and
    Â_t handed in as tensors) vs the fused update with everything on, Δ_t and Â_t formed inside it from the
    update's own forward."""
    model, _, _, _, seq, mask = batch(arch, tiny_model)
    old, credit = _step_inputs(seq, mask, model)
    delta = privileged_gain(credit.teacher_logp, old, mask)
    token_adv = token_advantages(credit.rule, credit.adv, delta, mask)
    kw = dict(mini_batches=1, micro_batch_size=4, clip_low=0.2, clip_high=0.28, clip_c=3.0, grad_clip=0.0)
    a = copy.deepcopy(model)
    ua = ppo_update(a, torch.optim.SGD(a.parameters(), lr=1.0), seq, mask, old_logp=old, token_adv=token_adv, **kw)
    b = copy.deepcopy(model)
    fast = FastOptions(packing=True, share_prefix=True, share_vision=True, logprob_chunk=5, token_budget=80,
                       group_size=G)  # fmt: skip
    ub = ppo_update(b, torch.optim.SGD(b.parameters(), lr=1.0), seq, mask, credit=credit, fast=fast, **kw)
    on = mask.bool()
    torch.testing.assert_close(ub.student_logp[on], old[on], rtol=0, atol=1e-5)  # π_old = π_θ
    torch.testing.assert_close(ub.delta[on], delta[on], rtol=0, atol=1e-5)
    torch.testing.assert_close(ub.token_adv[on], token_adv[on], rtol=0, atol=1e-5)
    assert ua.delta is None and ua.token_adv is None and ua.student_logp is old  # handed in, not formed
    stats_a, stats_b = ua.stats, ub.stats
    assert stats_b["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats_b["loss"] == pytest.approx(stats_a["loss"], abs=1e-6)
    assert stats_b["actor/entropy"] == pytest.approx(stats_a["actor/entropy"], abs=1e-5)
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-5, msg=k)


def test_fast_update_with_two_mini_batches_and_old_logp(tiny_model):
    """Two optimizer steps per rollout batch: the plain and the fast forward of the one update loop take the same
    steps from the same Â_t; the fused behaviour pass is refused (π_old != π_θ after the first step)."""
    model, _, _, _, seq, mask = batch("qwen2_vl", tiny_model)
    old, credit = _step_inputs(seq, mask, model)
    token_adv = token_advantages(credit.rule, credit.adv, privileged_gain(credit.teacher_logp, old, mask), mask)
    kw = dict(mini_batches=2, micro_batch_size=3, clip_low=0.2, clip_high=0.28, clip_c=3.0, grad_clip=1.0)
    a = copy.deepcopy(model)
    ppo_update(a, torch.optim.SGD(a.parameters(), lr=0.5), seq, mask, old_logp=old, token_adv=token_adv, **kw)
    b = copy.deepcopy(model)
    fast = FastOptions(packing=True, share_vision=True, token_budget=100, group_size=G)
    ppo_update(b, torch.optim.SGD(b.parameters(), lr=0.5), seq, mask, old_logp=old, token_adv=token_adv,
               fast=fast, **kw)  # fmt: skip
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="mini_batches == 1"):
        ppo_update(b, torch.optim.SGD(b.parameters(), lr=0.5), seq, mask, credit=credit, fast=fast, **kw)


FSDP_RUN = """
import sys
from pathlib import Path
sys.path[:0] = [{plugins!r}, {train!r}]
from test_train_smoke import tiny_overrides
from mmrlsd.config import load_config
from mmrlsd.train.loop import train
args = tiny_overrides({model!r}, {data!r}, **{{"trainer.total_steps": 2, "trainer.save_every": 1,
    "trainer.keep_last": 0, "trainer.threads": 1, "rollout.batch_size": 2, "optim.micro_batch_size": 2,
    "algo.teacher_refresh": 1}})
cfg = load_config(None, args)
cfg.model.packing = cfg.model.share_vision = cfg.model.share_prefix = True
cfg.model.logprob_chunk, cfg.optim.token_budget = 7, 120
train(cfg, Path(sys.argv[1]), progress=False)
"""


@pytest.mark.slow
def test_fast_path_under_fsdp2_matches_one_process(tiny_model, tmp_path):
    """2 CPU ranks (torchrun, gloo, FSDP2) on the fast path end with the weights of one process (2 steps); the
    fast path's forward is registered as a forward method of the FSDP root (`root_method`)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tinydata import write_records

    from mmrlsd.log import read_metrics
    from mmrlsd.train.checkpoint import load_policy_weights

    repo = Path(__file__).resolve().parents[2]
    data = write_records(tmp_path / "data", n=8, text_only_every=0)
    script = tmp_path / "run.py"
    script.write_text(FSDP_RUN.format(plugins=str(repo / "tests" / "plugins"), train=str(repo / "tests" / "train"),
                                      model=str(tiny_model("qwen2_vl")), data=str(data)))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for cmd, out in ((torchrun, "two"), ([sys.executable], "one")):
        r = subprocess.run([*cmd, str(script), str(tmp_path / out)], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=900)  # fmt: skip
        assert (tmp_path / out / "checkpoint-2").is_dir(), r.stderr[-3000:]
    for a, b in zip(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")):
        for k in ("loss", "actor/grad_norm", "rlsd/delta_mean"):
            assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])
    w2, w1 = (
        load_policy_weights(tmp_path / "two" / "checkpoint-2"),
        load_policy_weights(tmp_path / "one" / "checkpoint-2"),
    )
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)


def test_deepstack_features_in_either_transformers_layout(tiny_model, monkeypatch):
    """Qwen3-VL's deepstack features come split per image (transformers >= 5.19) or as one tensor per layer (5.17):
    `vision_features` gives the same features from both."""
    model, _, _, _, seq, _ = batch("qwen3_vl", tiny_model)
    rows = list(range(seq.input_ids.shape[0]))
    ref = vision_features(model, seq, rows, G)
    inner, real = model.model, model.model.get_image_features

    def joined(*a, **k):  # transformers 5.17's layout
        out = real(*a, **k)
        out.deepstack_features = [torch.cat(list(d)) if not torch.is_tensor(d) else d for d in out.deepstack_features]
        return out

    monkeypatch.setattr(inner, "get_image_features", joined)
    every_row = seq_pixels(seq, 0, len(rows))  # pixel rows are stored once per group
    assert all(torch.is_tensor(d) for d in joined(every_row, seq.image_grid_thw).deepstack_features)
    new = vision_features(model, seq, rows, G)
    assert ref.deepstack is not None and len(new.deepstack) == len(ref.deepstack)
    for a, b in zip(new.deepstack, ref.deepstack):
        assert a.shape == b.shape and a.dim() == 2 and torch.equal(a, b)
    assert torch.equal(new.embeds, ref.embeds)
