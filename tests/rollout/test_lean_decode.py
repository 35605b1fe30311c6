"""The lean decode loop (`rollout.hf_decode: lean`) against Hugging Face `generate` (`hf_decode: generate`).

Both paths run the same forwards (same batch shapes, same KV cache, same positions) and the same logits
processors, so the sampled ids, the response masks and every step's scores as the row-seeded sampler sees them
must agree exactly: the log-probabilities are compared with zero tolerance. A wrong position (an mRoPE offset
dropped, a text position off by one) moves the scores of the image prompts (checked by breaking the loop once).
"""

import pytest
import torch
from test_shared_prefill import ARCHS, G, _encoding  # the same mixed batch of prompts

from mmrlsd.model.load import load_model
from mmrlsd.rollout import generate as gen


def _run(model, proc, enc, monkeypatch, **kw):
    """`generate` plus the log-probabilities the sampler saw at each step `[(N, V)]` (sampling only)."""
    seen = []
    sample = gen.RowSeededSampler.__call__

    def record(self, input_ids, scores):
        seen.append(torch.log_softmax(scores.float(), dim=-1))
        return sample(self, input_ids, scores)

    monkeypatch.setattr(gen.RowSeededSampler, "__call__", record)
    try:
        r = gen.generate(model, proc, enc, group_size=G, **kw)
    finally:
        monkeypatch.setattr(gen.RowSeededSampler, "__call__", sample)
    return r, seen


def _assert_same(a, b):
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert a.texts == b.texts


SAMPLED = {
    "plain": dict(temperature=1.0),
    "warped": dict(temperature=0.7, top_k=40, top_p=0.9),
    "penalty": dict(temperature=0.8, top_p=0.95, presence_penalty=1.5),
}


@pytest.mark.parametrize("share", [True, False], ids=["shared", "full"])
@pytest.mark.parametrize("images", [True, False], ids=["images", "text"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lean_samples_as_generate(arch, images, share, tiny_model, monkeypatch):
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images)
    for name, kw in SAMPLED.items():
        kw = dict(kw, seed=5, max_new_tokens=12, share_prefill=share)
        ref, ref_lp = _run(model, proc, enc, monkeypatch, decode="generate", **kw)
        new, new_lp = _run(model, proc, enc, monkeypatch, decode="lean", **kw)
        _assert_same(new, ref)
        assert len(new_lp) == len(ref_lp) > 0, name
        for step, (a, b) in enumerate(zip(new_lp, ref_lp)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} step {step}")


@pytest.mark.parametrize("arch", ARCHS)
def test_lean_greedy_as_generate(arch, tiny_model):
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images=True)
    for share in (True, False):
        for penalty in (0.0, 1.0):
            kw = dict(group_size=G, max_new_tokens=12, temperature=0.0, share_prefill=share,
                      presence_penalty=penalty)  # fmt: skip
            ref = gen.generate(model, proc, enc, decode="generate", **kw)
            new = gen.generate(model, proc, enc, decode="lean", **kw)
            _assert_same(new, ref)


def test_lean_stops_at_eos_like_generate(tiny_model):
    """Responses that end early: with 80 of the 512 tokens declared EOS, rows finish at different steps, finished
    rows are padded, and the loop stops when the last row has finished, as `generate` does (same width, same
    masks)."""
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=True)
    vision = set(gen.vision_token_ids(proc))
    model.generation_config.eos_token_id = [t for t in range(100, 200) if t not in vision][:80]
    eos = gen.eos_token_ids(model, proc)
    kw = dict(group_size=G, max_new_tokens=40, seed=1, temperature=1.0)
    ref = gen.generate(model, proc, enc, decode="generate", **kw)
    new = gen.generate(model, proc, enc, decode="lean", **kw)
    _assert_same(new, ref)
    lengths = ref.response_mask.sum(1)
    assert ref.response_ids.shape[1] == int(lengths.max()) < 40  # stopped when the last row finished
    assert len(set(lengths.tolist())) >= 4  # rows finished at different steps
    ended = torch.isin(ref.response_ids[torch.arange(len(lengths)), lengths - 1], torch.tensor(eos))
    assert bool(ended.all())


def test_gen_batch_size_keeps_lean_samples(tiny_model):
    """Chunks of whole groups (8) and of partial groups (3 < G) give each row the samples of its own stream."""
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    enc = _encoding(proc, images=True)
    kw = dict(group_size=G, max_new_tokens=10, seed=2, decode="lean")
    ref = gen.generate(model, proc, enc, **kw)
    for size in (8, 3):
        r = gen.generate(model, proc, enc, gen_batch_size=size, **kw)
        assert torch.equal(r.response_ids, ref.response_ids), size


def test_checkpoint_generation_processors_are_not_applied(tiny_model):
    """A checkpoint whose generation config adds a processor (Qwen2.5-VL's released one sets repetition_penalty
    1.05) decodes without it on every decode path, with a warning naming it, as vLLM does: the same ids as the
    checkpoint without the setting, where Hugging Face `generate` applying it gives others."""
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    enc = _encoding(proc, images=False)
    kw = dict(group_size=G, max_new_tokens=8, temperature=0.0)  # greedy: the tiny model's near-ties show the penalty
    assert gen.checkpoint_processors(model) == {}
    ref = gen.generate(model, proc, enc, decode="lean", **kw)
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.no_repeat_ngram_size = 2
    assert gen.checkpoint_processors(model) == {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    for decode in ("lean", "generate", "compile"):
        with pytest.warns(UserWarning, match="repetition_penalty=1.3, no_repeat_ngram_size=2; sampling without"):
            new = gen.generate(model, proc, enc, decode=decode, **kw)
        _assert_same(new, ref)
    applied = model.generate(**enc, max_new_tokens=8, do_sample=False)  # transformers' own: the penalty applies
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.0, 0
    plain = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert not torch.equal(applied, plain)  # so the setting would have changed the samples
    with pytest.raises(ValueError, match="decode"):
        gen.generate(model, proc, enc, decode="fast", **kw)


def test_hf_decode_config_choices():
    from mmrlsd.config import ConfigError, load_config

    base = ["model.path=x", "data.train_files=[a.jsonl]"]
    assert load_config(None, base).rollout.hf_decode == "auto"
    assert load_config(None, base + ["rollout.hf_decode=lean"]).rollout.hf_decode == "lean"
    assert load_config(None, base + ["rollout.hf_decode=generate"]).rollout.hf_decode == "generate"
    assert load_config(None, base + ["rollout.hf_decode=graph"]).rollout.hf_decode == "graph"
    assert load_config(None, base + ["rollout.hf_decode=compile"]).rollout.hf_decode == "compile"
    with pytest.raises(ConfigError, match="rollout.hf_decode.*auto, lean, graph, compile, generate"):
        load_config(None, base + ["rollout.hf_decode=fast"])


def _record_rows(model, proc, enc, monkeypatch, **kw):
    """`generate` plus, per step, the global rows the sampler (or greedy argmax) scored and their log-probabilities
    `[(rows, (m, V))]`: with finished rows dropped from the batch, `m` shrinks."""
    seen = []
    sample = gen.RowSeededSampler.__call__

    def record(self, input_ids, scores):
        seen.append((list(self.rows), torch.log_softmax(scores.float(), dim=-1)))
        return sample(self, input_ids, scores)

    monkeypatch.setattr(gen.RowSeededSampler, "__call__", record)
    try:
        r = gen.generate(model, proc, enc, group_size=G, **kw)
    finally:
        monkeypatch.setattr(gen.RowSeededSampler, "__call__", sample)
    return r, seen


@pytest.mark.parametrize("share", [True, False], ids=["shared", "full"])
@pytest.mark.parametrize("images", [True, False], ids=["images", "text"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lean_drops_finished_rows_exactly(arch, images, share, tiny_model, monkeypatch):
    """Rows that finish early leave the lean loop's batch (KV cache, mask, positions and sampler streams indexed
    down); every row still unfinished gets the scores `generate` gives it in the full batch, bit for bit, and the
    same ids. 80 declared EOS tokens make rows finish at different steps; the batch must actually shrink."""
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images)
    vision = set(gen.vision_token_ids(proc))
    model.generation_config.eos_token_id = [t for t in range(100, 200) if t not in vision][:80]
    n = enc["input_ids"].shape[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # rows leave the batch only with one thread (two split the batch by its size)
    try:
        _check_drops(model, proc, enc, n, share, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _check_drops(model, proc, enc, n, share, monkeypatch):
    settings = {"plain": dict(temperature=1.0), "warped": SAMPLED["warped"], "penalty": SAMPLED["penalty"]}
    for name, kw in settings.items():
        kw = dict(kw, seed=7, max_new_tokens=40, share_prefill=share)
        ref, ref_seen = _record_rows(model, proc, enc, monkeypatch, decode="generate", **kw)
        new, new_seen = _record_rows(model, proc, enc, monkeypatch, decode="lean", **kw)
        _assert_same(new, ref)
        lengths = ref.response_mask.sum(1)
        assert len(set(lengths.tolist())) >= 4, name  # rows finished at different steps
        assert len(new_seen) == len(ref_seen) == ref.response_ids.shape[1]
        sizes = [len(rows) for rows, _ in new_seen]
        assert sizes[0] == n and min(sizes) < n, (name, sizes)  # shrank (sizes: where the CPU's kernels are row-exact)
        for step, ((rows, lp), (ref_rows, ref_lp)) in enumerate(zip(new_seen, ref_seen)):
            assert ref_rows == list(range(n))
            live = [r for r in range(n) if lengths[r] > step]  # rows that sample a token at this step
            assert set(live) <= set(rows), (name, step)
            at = [rows.index(r) for r in live]
            torch.testing.assert_close(lp[at], ref_lp[live], rtol=0, atol=0, msg=f"{name} step {step}")
        off = gen.generate(model, proc, enc, group_size=G, decode="lean", compact=False, **kw)
        _assert_same(off, ref)


def test_linear_probe_finds_exact_batch_sizes(tiny_model):
    """The probe behind dropping finished rows: the sizes it accepts really give every row of the model's own
    linear layers its full-batch bits, and the sizes it refuses really do not."""
    model, _ = load_model(str(tiny_model("qwen2_vl")))
    lin = gen._decode_linears(model)
    head = model.lm_head.weight.shape
    assert (head[0], head[1], False) in lin and len(lin) >= 4  # the LM head and the layers' projections
    mods = {}  # one of the model's layers per probed shape
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "visual" not in name:
            mods.setdefault((m.out_features, m.in_features, m.bias is not None), m)
    assert sorted(mods) == lin
    n = 12
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(1, n):
            subsets = [torch.randperm(n)[:k].sort().values for _ in range(8)]
            exact = all(torch.equal(m(x)[s], m(x[s])) for (_, d_in, _), m in mods.items()
                        for x in [torch.randn(n, 1, d_in)] for s in subsets)  # fmt: skip
            assert gen._linear_rows_invariant(lin, n, k) == exact, k
        assert gen._compact_size(lin, n, n, 10) == n  # more than 3/4 active: keep the batch
        k = gen._compact_size(lin, n, n, 2)
        assert 2 <= k < n and gen._linear_rows_invariant(lin, n, k)
        assert all(not gen._linear_rows_invariant(lin, n, j) for j in range(2, k))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_lean_drops_finished_rows_exactly_under_bf16_autocast(arch, tiny_model, monkeypatch):
    """The same under bf16 autocast (`model.dtype: bfloat16` over float32 weights): the probe runs in the matmuls'
    dtype, and the live rows' scores stay bit-identical to `generate`'s."""
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images=True)
    vision = set(gen.vision_token_ids(proc))
    model.generation_config.eos_token_id = [t for t in range(100, 200) if t not in vision][:80]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _check_drops(model, proc, enc, enc["input_ids"].shape[0], True, monkeypatch)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_lean_samples_as_generate_on_gpu(arch, tiny_model, monkeypatch):
    """On a GPU the sampler's streams live on the card; the lean loop still samples exactly what `generate` does
    (shared and full prefill, warped sampling), and the noise is drawn there, not on the host."""
    model, proc = load_model(str(tiny_model(arch)), device="cuda")
    enc = _encoding(proc, True)
    for share in (True, False):
        kw = dict(SAMPLED["warped"], seed=5, max_new_tokens=12, share_prefill=share)
        ref, ref_lp = _run(model, proc, enc, monkeypatch, decode="generate", **kw)
        new, new_lp = _run(model, proc, enc, monkeypatch, decode="lean", **kw)
        _assert_same(new, ref)
        assert len(new_lp) == len(ref_lp) > 0 and all(lp.is_cuda for lp in new_lp)
        for step, (a, b) in enumerate(zip(new_lp, ref_lp)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"share={share} step {step}")
