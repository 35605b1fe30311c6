"""The static decode step of `rollout.hf_decode: graph` (`mmrlsd.rollout.graph`) against the lean loop.

On a CPU the step runs eagerly (no capture): the same forwards as the lean loop's, except that attention runs over
the whole preallocated cache with the unwritten positions masked, and the mask, positions and write position are
device tensors advanced inside the step. The scores the sampler sees therefore agree with the lean loop's to float
rounding (1e-5 in log-probability), and on these seeds the sampled ids are identical. A wrong write position or an
off-by-one in the mask or the positions moves the scores by far more (checked by breaking the step once).

A CUDA graph also forbids host synchronisation inside the step; running it on the meta device, where any `.item()`
or `bool()` of a tensor raises, checks that on a CPU.
"""

import copy
import warnings

import pytest
import torch
from test_lean_decode import SAMPLED, _assert_same, _run
from test_shared_prefill import ARCHS, G, _encoding

from mmrlsd.model.load import load_model
from mmrlsd.rollout import generate as gen
from mmrlsd.rollout import graph


@pytest.fixture
def steps(record_instances):
    """The `GraphStep`s the decode loop builds, in order."""
    return record_instances(graph, "GraphStep")


def _compare(model, proc, enc, monkeypatch, steps, **kw):
    """Graph against lean keeping every row in the batch (on a CPU running one thread the lean loop drops finished
    rows, and the sampler then sees fewer rows)."""
    ref, ref_lp = _run(model, proc, enc, monkeypatch, decode="lean", compact=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back to the lean loop
        new, new_lp = _run(model, proc, enc, monkeypatch, decode="graph", **kw)
    assert steps and all(s.calls == new.response_ids.shape[1] - 1 for s in steps)  # every forward after the first
    _assert_same(new, ref)
    assert len(new_lp) == len(ref_lp)
    for step, (a, b) in enumerate(zip(new_lp, ref_lp)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")
    return new


@pytest.mark.parametrize("share", [True, False], ids=["shared", "full"])
@pytest.mark.parametrize("images", [True, False], ids=["images", "text"])
@pytest.mark.parametrize("arch", ARCHS)
def test_graph_step_samples_as_lean(arch, images, share, tiny_model, monkeypatch, steps):
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images)
    for kw in SAMPLED.values():
        steps.clear()
        _compare(model, proc, enc, monkeypatch, steps, seed=5, max_new_tokens=12, share_prefill=share, **kw)
    ref = gen.generate(model, proc, enc, group_size=G, max_new_tokens=12, temperature=0.0, decode="lean")
    new = gen.generate(model, proc, enc, group_size=G, max_new_tokens=12, temperature=0.0, decode="graph")
    _assert_same(new, ref)


def test_graph_step_stops_at_eos_like_lean(tiny_model, monkeypatch, steps):
    """Rows that end at different steps: the same widths and masks as the lean loop."""
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=True)
    vision = set(gen.vision_token_ids(proc))
    model.generation_config.eos_token_id = [t for t in range(100, 200) if t not in vision][:80]
    new = _compare(model, proc, enc, monkeypatch, steps, seed=1, temperature=1.0, max_new_tokens=40)
    lengths = new.response_mask.sum(1)
    assert new.response_ids.shape[1] == int(lengths.max()) < 40 and len(set(lengths.tolist())) >= 4


def test_a_wrong_write_position_moves_the_scores(tiny_model, monkeypatch, steps):
    """The comparison above can fail: a step that writes each new key one position late (the mask then lets the
    query see a zero key and hides its own) gives other scores than the lean loop's."""
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=True)
    update = graph._static_kv().update

    def late(self, k, v, *a, **kw):
        self.pos.add_(1)
        try:
            return update(self, k, v, *a, **kw)
        finally:
            self.pos.sub_(1)

    monkeypatch.setattr(graph._static_kv(), "update", late)
    with pytest.raises(AssertionError):
        _compare(model, proc, enc, monkeypatch, steps, seed=5, max_new_tokens=8, temperature=1.0)


@pytest.mark.parametrize("cascade", [False, True], ids=["copies", "cascade"])
@pytest.mark.parametrize("arch", ARCHS)
def test_graph_step_runs_without_host_sync(arch, cascade, tiny_model):
    """The step on the meta device (model, cache, mask and positions; with cascade attention also the prompts'
    prefix): a host synchronisation, which a CUDA graph cannot record, would raise there."""
    from transformers import DynamicCache

    from mmrlsd.rollout.cascade import SharedPrefix

    model, _ = load_model(str(tiny_model(arch)))
    meta = copy.deepcopy(model).eval().to("meta")
    cfg = model.config.get_text_config()
    n, written, room = 4, 7, 5
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def filled(rows: int, length: int):
        cache = DynamicCache(config=model.config)
        for i in range(cfg.num_hidden_layers):
            kv = torch.empty(rows, cfg.num_key_value_heads, length, head_dim, device="meta")
            cache.update(kv, kv.clone(), i)
        return cache

    prefix = SharedPrefix(filled(2, 6), torch.ones(2, 6, device="meta"), 2) if cascade else None
    cache = filled(n, 1 if cascade else written)
    written = 1 if cascade else written
    zeros = torch.zeros(n, 1, dtype=torch.long, device="meta")
    step = graph.GraphStep(meta, cache, gen._cache_kwarg(meta), written=written, room=room,
                           mask=torch.ones(n, written + room, dtype=torch.long, device="meta"), text_pos=zeros,
                           deltas=zeros, capture=False, prefix=prefix)  # fmt: skip
    with torch.no_grad():
        logits = step(zeros)
    assert logits.shape == (n, cfg.vocab_size) and logits.is_meta
    with pytest.raises(RuntimeError, match="meta"):
        bool(logits.sum() > 0)  # what a synchronisation inside the step would do


def test_graph_falls_back_to_lean_where_the_step_cannot_run(tiny_model, monkeypatch, steps):
    """Eager attention (the step builds an sdpa mask): a warning, and the lean loop's samples."""
    model, proc = load_model(str(tiny_model("qwen2_vl")), attn_implementation="eager")
    enc = _encoding(proc, images=False)
    kw = dict(group_size=G, max_new_tokens=8, seed=0)
    ref = gen.generate(model, proc, enc, decode="lean", **kw)
    with pytest.warns(UserWarning, match="hf_decode graph: attention implementation 'eager'"):
        new = gen.generate(model, proc, enc, decode="graph", **kw)
    assert not steps
    _assert_same(new, ref)


class _FakeCuda:
    """Enough of `torch.cuda` for `GraphStep`'s capture path on a CPU, with a capture that fails as an op that
    synchronises with the host would."""

    class Stream:
        def wait_stream(self, other):
            pass

    @staticmethod
    def current_stream():
        return _FakeCuda.Stream()

    @staticmethod
    def stream(s):
        from contextlib import nullcontext

        return nullcontext()

    class CUDAGraph:
        pass

    @staticmethod
    def graph(g, capture_error_mode="global"):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def test_a_failed_capture_keeps_decoding_eagerly(tiny_model, monkeypatch, steps):
    """When recording the step fails, the rollout warns, keeps the reason, and samples what the eager step does."""
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=True)
    kw = dict(group_size=G, max_new_tokens=8, seed=0, decode="graph")
    ref = gen.generate(model, proc, enc, **kw)
    init = graph.GraphStep.__init__

    def capturing(self, *a, **k):
        init(self, *a, **dict(k, capture=True))

    monkeypatch.setattr(graph.GraphStep, "__init__", capturing)
    monkeypatch.setattr(graph, "cuda", _FakeCuda)
    steps.clear()
    with pytest.warns(UserWarning, match="capturing the decode step failed"):
        new = gen.generate(model, proc, enc, **kw)
    monkeypatch.undo()
    _assert_same(new, ref)
    assert steps[0].error.startswith("RuntimeError: CUDA error") and not steps[0].captured


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_graph_step_is_captured_and_samples_as_lean_on_gpu(arch, tiny_model, monkeypatch, steps):
    """On a GPU the step is recorded once per rollout and replayed; float32, the scores as the lean loop's within
    1e-5 and the same ids."""
    model, proc = load_model(str(tiny_model(arch)), device="cuda")
    enc = _encoding(proc, True)
    for share in (True, False):
        steps.clear()
        _compare(model, proc, enc, monkeypatch, steps, **SAMPLED["warped"], seed=5, max_new_tokens=12,
                 share_prefill=share)  # fmt: skip
        assert all(s.captured and s.error is None for s in steps)


def test_decode_attention_reads_grouped_heads_as_repeated_ones():
    """The step's attention (query heads folded onto their key/value head) against transformers' sdpa, which repeats
    the key/value heads: one query token, 16 heads on 2 key/value heads, a padded mask; float64."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 8, True

    gen_ = torch.Generator().manual_seed(0)
    n, kv, L, d = 3, 2, 11, 16
    q = torch.randn(n, kv * 8, 1, d, generator=gen_, dtype=torch.float64)
    k, v = (torch.randn(n, kv, L, d, generator=gen_, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(n, 1, 1, L, generator=gen_) > 0.3
    mask[..., -1] = True
    want, _ = sdpa_attention_forward(Attn(), q, k, v, mask, scaling=d**-0.5)
    got, _ = graph.decode_sdpa_forward(Attn(), q, k, v, mask, scaling=d**-0.5)
    assert got.shape == want.shape == (n, 1, kv * 8, d)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    several = torch.randn(n, kv * 8, 4, d, generator=gen_, dtype=torch.float64)  # not one token: transformers' own
    torch.testing.assert_close(graph.decode_sdpa_forward(Attn(), several, k, v, None, scaling=0.25)[0],
                               sdpa_attention_forward(Attn(), several, k, v, None, scaling=0.25)[0], rtol=0, atol=0)  # fmt: skip


def test_graph_step_attends_with_the_decode_kernel(tiny_model):
    """Inside the step every layer's attention is `decode_sdpa_forward`; the model's own kernel again after."""
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=False)
    seen = []
    layers = model.model.language_model.layers
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
             for layer in layers]  # fmt: skip
    try:
        gen.generate(model, proc, enc, group_size=G, max_new_tokens=4, seed=0, decode="graph")
    finally:
        for h in hooks:
            h.remove()
    per_forward = len(layers)
    # the shared prefill and the first forward on sdpa, then 3 steps on the decode kernel
    assert seen == ["sdpa"] * 2 * per_forward + [graph.DECODE_SDPA] * 3 * per_forward
    assert model.model.language_model.config._attn_implementation == "sdpa"


def test_auto_decodes_with_the_lean_loop_on_a_cpu(tiny_model, steps):
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    enc = _encoding(proc, images=True)
    kw = dict(group_size=G, max_new_tokens=8, seed=3)
    _assert_same(gen.generate(model, proc, enc, decode="auto", **kw), gen.generate(model, proc, enc, **kw))
    assert not steps


def test_graph_falls_back_to_lean_on_an_fsdp_model(tiny_model, steps):
    """A model sharded by FSDP2 in a one-rank group (`dist.fsdp: on` without torchrun): a recorded forward would
    keep the addresses of parameters that FSDP gathers and frees around every forward, so the loop stays lean."""
    import torch.distributed as td
    from torch.distributed.fsdp import fully_shard

    model, proc = load_model(str(tiny_model("qwen2_vl")))
    enc = _encoding(proc, images=False)
    kw = dict(group_size=G, max_new_tokens=6, seed=0)
    ref = gen.generate(model, proc, enc, decode="lean", **kw)
    td.init_process_group("gloo", store=td.HashStore(), rank=0, world_size=1)
    try:
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        with pytest.warns(UserWarning, match="hf_decode graph: an FSDP-sharded model"):
            new = gen.generate(model, proc, enc, decode="graph", **kw)
    finally:
        td.destroy_process_group()
    assert not steps
    _assert_same(new, ref)


def test_graph_casts_each_weight_once_per_rollout_under_autocast(tiny_model, monkeypatch, steps):
    """Under bf16 autocast with its weight cache off (float32 master weights, as training runs a step), the graph
    rollout casts each float32 weight once (`cached_casts`), where the lean loop casts it at every forward; the
    same casts, so the scores match the lean loop's as in float32. The cache is cleared afterwards."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=False)
    weights = {p.data_ptr() for p in model.parameters()}

    class CountCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                self.n += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with CountCasts() as c, torch.no_grad():  # the weights one forward of the language model casts
            model(input_ids=enc["input_ids"][:1], attention_mask=enc["attention_mask"][:1])
        one = c.n
        for decode in ("lean", "graph"):
            steps.clear()
            with CountCasts() as c:
                r, lp = _run(model, proc, enc, monkeypatch, decode=decode, compact=False, seed=4, max_new_tokens=10,
                             temperature=1.0)  # fmt: skip
            counts[decode] = (c.n, r, lp)
        assert not torch.is_autocast_cache_enabled()  # the caller's setting is back
    (lean_n, ref, ref_lp), (graph_n, new, new_lp) = counts["lean"], counts["graph"]
    assert one > 10 and lean_n >= 10 * one  # every forward casts every weight
    assert graph_n == 2 * one  # the shared prefill's forward, then once for the whole decode
    _assert_same(new, ref)
    for a, b in zip(new_lp, ref_lp):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "cascade"), [(a, True) for a in ARCHS] + [("qwen2_5_vl", False)],
                         ids=[f"{a}-cascade" for a in ARCHS] + ["qwen2_5_vl-copies"])  # fmt: skip
def test_compiled_step_samples_as_lean(arch, cascade, tiny_model, monkeypatch, steps):
    """`hf_decode: compile` on a CPU: the static step compiled by inductor as one graph (its cache, or the cascade
    prefix, rounded up to `BUCKET` positions) samples the lean loop's ids with log-probs within 1e-5, without
    falling back to eager (a graph break would)."""
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images=True)
    kw = dict(seed=5, max_new_tokens=12, temperature=1.0)
    ref, ref_lp = _run(model, proc, enc, monkeypatch, decode="lean", compact=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new, new_lp = _run(model, proc, enc, monkeypatch, decode="compile", cascade=cascade, **kw)
    assert len(steps) == 1 and steps[0].compile and steps[0].error is None
    assert steps[0].cache.layers[0].keys.shape[2] % graph.BUCKET == 0 or cascade
    _assert_same(new, ref)
    for step, (a, b) in enumerate(zip(new_lp, ref_lp)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "copies"])
def test_compiled_step_reads_no_unwritten_position(cascade, tiny_model, monkeypatch, steps):
    """The compiled step attends only to the positions written so far: with every unwritten key and value of the
    static cache set to NaN it still samples the lean loop's ids with log-probs within 1e-5 (one compilation for
    all its lengths). The eager step, which attends over the whole buffer with those positions masked, is broken
    by the same NaNs (0 x NaN in the value product), so the poison reaches attention."""
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=True)
    kw = dict(seed=6, max_new_tokens=12, temperature=1.0)
    ref, ref_lp = _run(model, proc, enc, monkeypatch, decode="lean", compact=False, **kw)
    convert = graph.static_cache

    def poisoned(cache, length, pos):
        convert(cache, length, pos)
        for layer in cache.layers:
            layer.keys[..., int(pos) :, :] = float("nan")
            layer.values[..., int(pos) :, :] = float("nan")

    monkeypatch.setattr(graph, "static_cache", poisoned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new, new_lp = _run(model, proc, enc, monkeypatch, decode="compile", cascade=cascade, **kw)
    assert len(steps) == 1 and steps[0].compile and steps[0].error is None
    _assert_same(new, ref)
    for step, (a, b) in enumerate(zip(new_lp, ref_lp)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")
    _, eager_lp = _run(model, proc, enc, monkeypatch, decode="graph", cascade=cascade, **kw)
    assert not all(torch.isfinite(lp).all() for lp in eager_lp[1:])


def test_compiled_steps_of_other_shapes_in_one_process(tiny_model, monkeypatch, steps):
    """A compiled step skips dynamo's guards after its first call (`skip_guard_eval_unsafe`), so the first call must
    still pick the graph of its own shapes: decodes of other lengths (another own-cache size), another row count
    and the first shape again, in turn in one process, each sample the lean loop's ids with log-probs within 1e-5.
    Skipping the guards on the first call too runs the previous decode's graph on these tensors and fails here."""
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=True)
    fewer = {k: v[:G] for k, v in _encoding(proc, images=False).items()}  # one text prompt's G rows
    runs = [(enc, 12), (enc, 7), (fewer, 12), (enc, 12)]
    for i, (e, new_tokens) in enumerate(runs):
        kw = dict(seed=i, max_new_tokens=new_tokens, temperature=1.0)
        ref, ref_lp = _run(model, proc, e, monkeypatch, decode="lean", compact=False, **kw)
        steps.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            new, new_lp = _run(model, proc, e, monkeypatch, decode="compile", cascade=True, **kw)
        assert len(steps) == 1 and steps[0].compile and steps[0].calls == new_tokens - 1, f"run {i}"
        _assert_same(new, ref)
        for step, (a, b) in enumerate(zip(new_lp, ref_lp)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"run {i}, step {step}")


def test_compiled_step_past_the_recompile_limit_decodes_eagerly(tiny_model, monkeypatch, steps):
    """A new shape past the recompile limit: the step's first call fails instead of running uncompiled (which its
    later calls, skipping guards, would take for a compilation of its shapes and run another shape's graph); the
    step warns and decodes eagerly, sampling the lean loop's ids."""
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=True)
    kw = dict(seed=7, max_new_tokens=11, temperature=1.0)  # a length no other test compiles
    ref, _ = _run(model, proc, enc, monkeypatch, decode="lean", compact=False, **kw)
    monkeypatch.setattr(graph, "RECOMPILE_LIMIT", 0)
    with torch._dynamo.config.patch(recompile_limit=0), pytest.warns(UserWarning, match="compiling the decode step"):
        new, _ = _run(model, proc, enc, monkeypatch, decode="compile", cascade=True, **kw)
    assert not steps[0].compile and "RecompileLimit" in steps[0].error
    _assert_same(new, ref)


def test_compile_failure_decodes_eagerly(tiny_model, monkeypatch, steps):
    """A step inductor cannot compile (here: a compiler that raises): a warning, the reason kept, and the same
    samples from the eager static step."""
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=False)
    kw = dict(group_size=G, max_new_tokens=8, seed=0)

    def broken(step, valid, arange):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(graph, "_compiled_forward", lambda: broken)
    ref = gen.generate(model, proc, enc, decode="graph", **kw)
    steps.clear()
    with pytest.warns(UserWarning, match="hf_decode compile: compiling the decode step failed"):
        new = gen.generate(model, proc, enc, decode="compile", **kw)
    assert not steps[0].compile and "no C++ compiler" in steps[0].error
    _assert_same(new, ref)
