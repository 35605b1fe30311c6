"""The dummy vision-tower call that keeps FSDP ranks in step when a micro-batch has no image
(`mmrlsd.model.vision.dummy_vision`), pass by pass.

`test_dummy_vision_is_zero_with_a_gradient_for_every_tower_parameter` (one process): the dummy is exactly 0 and
reaches every tower parameter, Qwen3-VL's deepstack mergers included (FSDP2 skips the reduce-scatter of a unit
whose parameters got no gradient, which would put the ranks out of step again).

`test_sharded_passes_equal_unsharded` (2 gloo ranks, this file run by torchrun): rank 0 holds an image prompt and a
long text-only prompt, rank 1 two short text-only prompts. On every rank an unsharded copy of the model gives the
reference; the FSDP-sharded model must give the same rollouts, the same log-probs on the plain and fast paths
(packing with a token budget under which the ranks plan different numbers of micro-batches; vision shared or
per micro-batch), and the same SGD step (lr 1) in `ppo_update` (plain, fast, fused) as the unsharded updates'
steps averaged over the ranks (FSDP averages gradients, the losses are scaled by the world size).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
G = 2


@pytest.mark.parametrize("arch", ARCHS)
def test_dummy_vision_is_zero_with_a_gradient_for_every_tower_parameter(arch, tiny_model):
    from mmrlsd.model.load import load_model
    from mmrlsd.model.vision import dummy_vision

    model, _ = load_model(str(tiny_model(arch)))
    zero = dummy_vision(model)
    assert zero.item() == 0.0
    zero.backward()
    tower = dict(model.model.visual.named_parameters())
    missing = [k for k, p in tower.items() if p.grad is None]
    assert not missing, missing
    assert all(not p.grad.any() for p in tower.values())
    assert all(p.grad is None for k, p in model.named_parameters() if ".visual." not in f".{k}")


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_passes_equal_unsharded(arch, tiny_model, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_fsdp_mixed import torchrun

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = torchrun([__file__, str(tiny_model(arch)), str(tmp_path)], env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]


# ---- the 2-rank worker (run by torchrun) ----

LONG = (
    "please look carefully, explain step by step which shapes you can see, count them, and only then answer"
)
BUDGET = (
    64  # tokens per packed micro-batch: rank 0's long rows go one at a time, rank 1's short ones in pairs
)


def _prompts(proc, rank: int):
    from PIL import Image

    from mmrlsd.data.encoding import chat_text

    if rank == 0:
        return [chat_text(proc, "how many red shapes?", 1), chat_text(proc, LONG, 0)], [
            [Image.new("RGB", (56, 56), "red")],
            [],
        ]
    return [chat_text(proc, "what is 2 + 2 ?", 0), chat_text(proc, "and 3 + 1 ?", 0)], [[], []]


def _sync_step(ref, before: dict[str, torch.Tensor]) -> None:
    """The reference's weights <- before + (its steps summed over ranks) / world: FSDP's averaged step."""
    import torch.distributed as td

    with torch.no_grad():
        for k, p in ref.named_parameters():
            step = p - before[k]
            td.all_reduce(step)
            p.copy_(before[k] + step / td.get_world_size())


def _check_weights(model, ref, what: str) -> None:
    import torch.distributed as td

    from mmrlsd.train.fsdp import full_state_dict, gathered_weights

    every = dict(gathered_weights(model))  # on every rank: what each rank's rollout engine loads
    assert every.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(
            every[k], v, rtol=0, atol=1e-5, msg=f"{what} (gathered, rank {td.get_rank()}): {k}"
        )
    full, want = full_state_dict(model), ref.state_dict()  # full: on rank 0 only (cpu_offload)
    if td.get_rank() != 0:
        assert full == {}
        return
    assert full.keys() == want.keys(), (sorted(full)[:5], sorted(want)[:5])
    for k in want:
        torch.testing.assert_close(full[k], want[k], rtol=0, atol=1e-5, msg=f"{what}: {k}")


def _check_rows_leave_batch(model, ref, proc, texts, images) -> None:
    """The sharded lean loop with rows leaving the batch (80 EOS tokens: rows, and the two ranks, finish at
    different steps; a finished rank keeps running forwards on its smaller batch) samples what the unsharded
    model's `generate` samples."""
    from mmrlsd.data.encoding import encode, repeat_encoding
    from mmrlsd.rollout import generate as gen

    eos = [t for t in range(100, 200) if t not in set(gen.vision_token_ids(proc))][:80]
    shrunk, size = [], gen._compact_size
    gen._compact_size = lambda lin, n, m, *a: shrunk.append((m, k := size(lin, n, m, *a))) or k
    saved = [m.generation_config.eos_token_id for m in (model, ref)]
    try:
        for m in (model, ref):
            m.generation_config.eos_token_id = eos
        enc = repeat_encoding(encode(proc, texts, images), 4)  # 8 rows
        kw = dict(group_size=4, max_new_tokens=24, seed=3)
        got = gen.generate(model, proc, enc, decode="lean", **kw)
        want = gen.generate(ref, proc, enc, decode="generate", **kw)
    finally:
        gen._compact_size = size
        for m, e in zip((model, ref), saved):
            m.generation_config.eos_token_id = e
    assert torch.equal(got.response_ids, want.response_ids), "rollouts with rows leaving the batch"
    assert any(k < m for m, k in shrunk), ("the batch never shrank", shrunk)


def _worker(model_dir: str, out: str) -> None:
    import torch.distributed as td

    from mmrlsd import dist
    from mmrlsd.algo.methods import TokenRule
    from mmrlsd.data.encoding import encode, repeat_encoding
    from mmrlsd.model.load import load_model
    from mmrlsd.model.logprobs import build_sequences, token_logprobs
    from mmrlsd.model.packing import FastOptions, plan
    from mmrlsd.rollout.generate import generate
    from mmrlsd.train import fsdp
    from mmrlsd.train.update import Credit, ppo_update

    td.init_process_group("gloo")
    rank = td.get_rank()
    torch.set_num_threads(1)
    ref, proc = load_model(model_dir)
    model = fsdp.shard_model(load_model(model_dir)[0])
    # optimizers before any forward (FSDP2's `parameters()` can return unsharded tensors after one)
    sgd = {m: torch.optim.SGD([p for p in m.parameters()], lr=1.0) for m in (ref, model)}

    texts, images = _prompts(proc, rank)
    enc = repeat_encoding(encode(proc, texts, images), G)
    got, want = (generate(m, proc, enc, group_size=G, max_new_tokens=6, seed=0) for m in (model, ref))
    assert torch.equal(got.response_ids, want.response_ids), "rollouts"
    _check_rows_leave_batch(model, ref, proc, texts, images)
    seq, mask = build_sequences(enc, want), want.response_mask.float()

    fast = {
        "plain": None,
        "shared": FastOptions(
            packing=True, share_vision=True, share_prefix=True, logprob_chunk=4, group_size=G
        ),
        "budget": FastOptions(packing=True, token_budget=BUDGET, group_size=G),  # vision per micro-batch
    }
    n_micro = torch.tensor([len(plan(ref, seq, list(range(seq.input_ids.shape[0])), fast["budget"], 2))])
    counts = [torch.zeros_like(n_micro) for _ in range(2)]
    td.all_gather(counts, n_micro)
    assert counts[0] != counts[1], f"the ranks should plan different numbers of micro-batches: {counts}"
    for name, f in fast.items():
        lp_got, _ = token_logprobs(model, seq, 2, fast=f)
        lp_want, _ = token_logprobs(ref, seq, 2, fast=f)
        torch.testing.assert_close(lp_got, lp_want, rtol=0, atol=1e-5, msg=f"log-probs, {name}")

    torch.manual_seed(rank)
    adv = torch.randn(mask.shape) * mask  # (N, T) token advantages
    old_logp, _ = token_logprobs(ref, seq, 2)
    kw = dict(mini_batches=1, micro_batch_size=2, clip_low=0.2, clip_high=0.2, clip_c=3.0, grad_clip=0.0)
    credit = Credit(torch.randn(mask.shape[0]), None, mask, TokenRule("grpo"))  # fused: Â_t = A formed inside
    updates = {
        "ppo_update": lambda m: ppo_update(m, sgd[m], seq, mask, old_logp=old_logp, token_adv=adv, **kw),
        "ppo_update fast shared": lambda m: ppo_update(
            m, sgd[m], seq, mask, old_logp=old_logp, token_adv=adv, fast=fast["shared"], **kw
        ),
        "ppo_update fused shared": lambda m: ppo_update(
            m, sgd[m], seq, mask, credit=credit, fast=fast["shared"], **kw
        ),
        "ppo_update fused budget": lambda m: ppo_update(
            m, sgd[m], seq, mask, credit=credit, fast=fast["budget"], **kw
        ),
    }
    for name, run in updates.items():
        before = {k: p.detach().clone() for k, p in ref.named_parameters()}
        run(model)
        run(ref)
        _sync_step(ref, before)
        moved = [k for k, p in ref.named_parameters() if ".visual." in k and not torch.equal(p, before[k])]
        assert moved, f"{name}: the image's gradient did not reach the vision tower"
        _check_weights(model, ref, name)
    Path(out, f"rank{rank}.ok").write_text("ok\n")
    dist.destroy_distributed()  # barrier first: without it rank 1 sometimes aborted in gloo's teardown


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
