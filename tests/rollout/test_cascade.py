"""Cascade attention over the shared prefill (`rollout.cascade_attention`, `mmrlsd.rollout.cascade`).

The prompts' keys and values stay once per prompt and every decode step attends to them for a group's rows in one
matrix multiply, plus to each row's own positions. That is attention computed another way (explicit softmax, the
prefix's dot products in a larger batch), so the scores equal the plain lean loop's to float rounding (1e-5 in
log-probability) and on these seeds the sampled ids are identical. Dropping finished rows must not change a
cascade rollout at all (bit for bit), and a wrong prefix (another prompt's, or its padding attended) moves the
scores by far more than the tolerance.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_lean_decode import SAMPLED, _assert_same, _record_rows, _run
from test_shared_prefill import ARCHS, G, _encoding

from mmrlsd.config import load_config
from mmrlsd.model.load import load_model
from mmrlsd.rollout import cascade
from mmrlsd.rollout import generate as gen


@pytest.fixture
def prefixes(record_instances):
    """The `SharedPrefix`es the shared prefill builds, in order."""
    return record_instances(gen, "SharedPrefix")


def _close(new_lp, ref_lp, atol=1e-5):
    assert len(new_lp) == len(ref_lp)
    for step, (a, b) in enumerate(zip(new_lp, ref_lp)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=f"step {step}")


@pytest.mark.parametrize("decode", ["lean", "graph"])
@pytest.mark.parametrize("images", [True, False], ids=["images", "text"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cascade_samples_as_lean(arch, images, decode, tiny_model, monkeypatch, prefixes):
    """Against the plain lean loop (every row kept in the batch): the same ids and masks, log-probs within 1e-5;
    the prefix really is held once per prompt (3 prompts, not 12 rows)."""
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images)
    for kw in SAMPLED.values():
        kw = dict(kw, seed=5, max_new_tokens=12)
        ref, ref_lp = _run(model, proc, enc, monkeypatch, decode="lean", compact=False, **kw)
        prefixes.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fall-back
            new, new_lp = _run(model, proc, enc, monkeypatch, decode=decode, cascade=True, **kw)
        assert len(prefixes) == 1 and prefixes[0].keys[0].shape[0] == 3 and prefixes[0].group_size == G
        _assert_same(new, ref)
        _close(new_lp, ref_lp)
    ref = gen.generate(model, proc, enc, group_size=G, max_new_tokens=12, temperature=0.0, decode="lean")
    new = gen.generate(model, proc, enc, group_size=G, max_new_tokens=12, temperature=0.0, decode=decode,
                       cascade=True)  # fmt: skip
    _assert_same(new, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_cascade_drops_finished_rows_exactly(arch, tiny_model, monkeypatch):
    """Finished rows leave a cascade rollout's batch (one thread) and every row still decoding keeps the scores it
    has with all rows kept, bit for bit; the batch really shrinks. Against the plain lean loop: near."""
    model, proc = load_model(str(tiny_model(arch)))
    enc = _encoding(proc, images=True)
    vision = set(gen.vision_token_ids(proc))
    model.generation_config.eos_token_id = [t for t in range(100, 200) if t not in vision][:80]
    n = enc["input_ids"].shape[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = dict(SAMPLED["warped"], seed=7, max_new_tokens=40, decode="lean", cascade=True)
        ref, ref_seen = _record_rows(model, proc, enc, monkeypatch, compact=False, **kw)
        new, new_seen = _record_rows(model, proc, enc, monkeypatch, **kw)
        lean, lean_lp = _run(model, proc, enc, monkeypatch, **dict(kw, cascade=False, compact=False))
    finally:
        torch.set_num_threads(threads)
    _assert_same(new, ref)
    _assert_same(new, lean)
    _close([lp for _, lp in ref_seen], lean_lp)
    lengths = ref.response_mask.sum(1)
    sizes = [len(rows) for rows, _ in new_seen]
    # the batch shrank (to which sizes depends on where the CPU's matrix-multiply kernels are row-exact)
    assert len(set(lengths.tolist())) >= 4 and sizes[0] == n and min(sizes) < n, sizes
    for step, ((rows, lp), (_, ref_lp)) in enumerate(zip(new_seen, ref_seen)):
        live = [r for r in range(n) if lengths[r] > step]
        at = [rows.index(r) for r in live]
        torch.testing.assert_close(lp[at], ref_lp[live], rtol=0, atol=0, msg=f"step {step}")


def _expanded(query, kp, vp, own_k, own_v, prefix_mask, G):
    """Reference: sdpa with every row's own copy of its prompt's prefix and the grouped heads repeated."""
    rows = torch.arange(query.shape[0]) // G
    k = torch.cat([kp[rows], own_k], dim=2)
    v = torch.cat([vp[rows], own_v], dim=2)
    groups = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    mask = torch.cat([prefix_mask[rows].bool(), torch.ones(query.shape[0], own_k.shape[2], dtype=torch.bool)], 1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=mask[:, None, None, :]).transpose(1, 2)


class _Layer(torch.nn.Module):
    layer_idx = 0


def test_cascade_kernel_matches_expanded_attention():
    """The kernel alone against sdpa over expanded caches (3 prompts x 4 rows, 8 query heads on 2 key/value heads,
    left padding): within 1e-6; a row subset (`select`) gives those rows' full-batch outputs bit for bit; the
    prompts' padding and the mapping of rows to prompts matter (breaking either moves the output)."""
    gen_ = torch.Generator().manual_seed(0)
    P, kv, heads, Lp, t, d = 3, 2, 8, 7, 5, 16
    n = P * G
    kp, vp = torch.randn(P, kv, Lp, d, generator=gen_), torch.randn(P, kv, Lp, d, generator=gen_)
    own_k, own_v = torch.randn(n, kv, t, d, generator=gen_), torch.randn(n, kv, t, d, generator=gen_)
    query = torch.randn(n, 1, heads, d, generator=gen_).transpose(1, 2)  # (n, heads, 1, d), strided as in a model
    mask = torch.ones(P, Lp)
    mask[0, :3], mask[2, :1] = 0, 0
    cache = type("C", (), {"layers": [type("L", (), {"keys": kp, "values": vp})()]})()
    prefix = cascade.SharedPrefix(cache, mask, G)
    out, _ = cascade.cascade_attention_forward(_Layer(), query, own_k, own_v, None, mmrlsd_prefix=prefix)
    ref = _expanded(query, kp, vp, own_k, own_v, mask, G)
    assert out.shape == (n, 1, heads, d)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    keep = torch.tensor([0, 3, 5, 6, 11])
    sub, _ = cascade.cascade_attention_forward(_Layer(), query[keep], own_k[keep], own_v[keep], None,
                                               mmrlsd_prefix=prefix.select(keep))  # fmt: skip
    assert torch.equal(sub, out[keep])
    two = prefix.select(keep).select(torch.tensor([1, 4]))  # rows 3 and 11
    sub2, _ = cascade.cascade_attention_forward(_Layer(), query[[3, 11]], own_k[[3, 11]], own_v[[3, 11]], None,
                                                mmrlsd_prefix=two)  # fmt: skip
    assert torch.equal(sub2, out[[3, 11]])
    own_mask = torch.ones(n, 1, 1, t, dtype=torch.bool)
    own_mask[:, ..., -2:] = False  # the last two own positions not attended: as if they were not there
    masked, _ = cascade.cascade_attention_forward(_Layer(), query, own_k, own_v, own_mask, mmrlsd_prefix=prefix)
    torch.testing.assert_close(masked, _expanded(query, kp, vp, own_k[:, :, :-2], own_v[:, :, :-2], mask, G),
                               rtol=0, atol=1e-6)  # fmt: skip
    unpadded = cascade.SharedPrefix(cache, torch.ones(P, Lp), G)
    wrong, _ = cascade.cascade_attention_forward(_Layer(), query, own_k, own_v, None, mmrlsd_prefix=unpadded)
    assert (wrong - ref)[: G].abs().max() > 1e-2  # prompt 0's padding attended
    swapped = cascade.SharedPrefix(cache, mask, 2 * G)
    with pytest.raises(ValueError, match="rows for 3 prompts"):
        cascade.cascade_attention_forward(_Layer(), query, own_k, own_v, None, mmrlsd_prefix=swapped)
    with pytest.raises(ValueError, match="one query token"):
        cascade.cascade_attention_forward(_Layer(), query, own_k, own_v, None)


def test_groups_split_across_chunks_fall_back_to_copies(tiny_model, prefixes):
    """`gen_batch_size` below G cuts groups: where a chunk's rows are not whole groups of one size the prefill
    copies the prompts' cache to the rows as without cascade attention, and the samples still follow lean's."""
    model, proc = load_model(str(tiny_model("qwen2_5_vl")))
    enc = _encoding(proc, images=True)
    kw = dict(group_size=G, seed=3, max_new_tokens=8, temperature=1.0, decode="lean")
    ref = gen.generate(model, proc, enc, **kw)
    new = gen.generate(model, proc, enc, gen_batch_size=3, cascade=True, **kw)
    _assert_same(new, ref)
    assert [p.group_size for p in prefixes] == [3, 3]  # rows 0-2 and 9-11; rows 3-5 and 6-8 span two prompts


def test_engine_passes_the_setting(tiny_model, monkeypatch):
    """`rollout.cascade_attention` reaches `generate` (default on)."""
    from mmrlsd.rollout.engine import HFEngine

    seen = []
    monkeypatch.setattr(gen, "generate", lambda *a, **k: seen.append(k["cascade"]))
    required = ["model.path=m", "data.train_files=[d.jsonl]"]
    for value in (True, False):
        cfg = load_config(None, required + [f"rollout.cascade_attention={value}"]).rollout
        HFEngine(None, None).sample([], [], group_size=G, seed=0, cfg=cfg, encoding={})
    assert seen == [True, False] and load_config(None, required).rollout.cascade_attention is True
