"""Under torchrun with FSDP only rank 0 reads the weights; the other ranks build the model on the meta device and
receive their shards from rank 0 after sharding (`load_model(empty=True)`, `fsdp.shard_model(from_rank0=True)`).

`test_only_rank0_reads_the_weights` (2 gloo ranks, this file run by torchrun): `mmrlsd.train.loop.build` with
float32 master weights under bf16 compute, a frozen vision tower and a teacher snapshot, on an untied Qwen2-VL and
a Qwen3-VL whose output embedding is tied to the input one (teacher offloaded to the CPU there). On every rank:
- rank 0 read the weight files twice (policy, teacher), rank 1 never, and the model each rank handed to
  `shard_model` was on the CPU on rank 0 and entirely on the meta device on rank 1;
- the gathered policy equals the checkpoint's tensors (as `from_pretrained` reads them) exactly in float32, the
  gathered teacher equals them in bf16, each rank's shards are float32 (all-gathered in bf16) / bf16, tied weights
  stay one parameter;
- every buffer (rotary `inv_freq`, outside the state dict) equals rank 0's in value, dtype and shape, and rank
  0's equal those of a plain `from_pretrained`;
- config, generation config, eval mode and `requires_grad` are the same on both ranks;
- a teacher refresh (`copy_weights`) after the policy moved gives the moved policy in bf16.
The training equivalence of 2 ranks and 1 process is tested in test_fsdp.py and test_fsdp_mixed.py.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _tied_copy(model_dir: Path, out: Path) -> Path:
    """`model_dir` (its tokenizer, processor, generation config) with new random weights whose lm_head is the
    input embedding (`tie_word_embeddings`)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    shutil.copytree(model_dir, out)
    for f in out.glob("*.safetensors"):
        f.unlink()
    config = AutoConfig.from_pretrained(out)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    model.save_pretrained(out)
    return out


def test_only_rank0_reads_the_weights(tiny_model, tmp_path):
    from test_fsdp import PLUGINS
    from test_fsdp_mixed import torchrun
    from tinydata import write_records

    data = write_records(tmp_path / "data", n=2)
    tied = _tied_copy(tiny_model("qwen3_vl"), tmp_path / "tied_qwen3_vl")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": PLUGINS + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    argv = [__file__, str(data), str(out), f"{tiny_model('qwen2_vl')}:untied", f"{tied}:tied"]
    r = torchrun(argv, env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["rank0.ok", "rank1.ok"]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "tied"])
def test_empty_model_is_from_pretrained_without_weights(arch, tiny_model, tmp_path):
    """`load_model(empty=True)`: every parameter and buffer on the meta device, with the names, shapes and dtypes
    of `from_pretrained`'s model, its config, generation config, eval mode and tied weights."""
    from mmrlsd.model.load import load_model

    path = _tied_copy(tiny_model("qwen3_vl"), tmp_path / "tied") if arch == "tied" else tiny_model(arch)
    for dtype in ("float32", "bfloat16"):
        empty, _ = load_model(str(path), dtype=dtype, empty=True)
        real, _ = load_model(str(path), dtype=dtype)
        assert {t.device.type for t in [*empty.parameters(), *empty.buffers()]} == {"meta"}
        for got, want in (
            (empty.state_dict(), real.state_dict()),
            (dict(empty.named_buffers()), dict(real.named_buffers())),
        ):
            assert got.keys() == want.keys()
            assert all((got[k].shape, got[k].dtype) == (want[k].shape, want[k].dtype) for k in want), (
                arch,
                dtype,
            )
        assert empty.config.to_dict() == real.config.to_dict()
        assert empty.generation_config.to_dict() == real.generation_config.to_dict()
        assert not empty.training and not real.training
        tied = empty.lm_head.weight is empty.model.language_model.embed_tokens.weight
        assert (
            tied == (arch == "tied") == (real.lm_head.weight is real.model.language_model.embed_tokens.weight)
        )


# ---- the 2-rank worker (run by torchrun) ----


def _same_on_rank0(obj, what: str) -> None:
    import torch.distributed as td

    got = [obj]
    td.broadcast_object_list(got, src=0)
    assert got[0] == obj, f"{what} differs from rank 0's on rank {td.get_rank()}"


def _check_buffers(model, ref, what: str) -> None:
    """Every buffer equals rank 0's (value, dtype, shape); rank 0's equal `ref`'s (a plain from_pretrained)."""
    import torch.distributed as td

    mine = dict(model.named_buffers())
    want = dict(ref.named_buffers())
    assert mine.keys() == want.keys() and mine, (what, sorted(mine), sorted(want))
    if td.get_rank() == 0:
        for k, b in want.items():
            assert b.dtype == mine[k].dtype and torch.equal(mine[k], b), f"{what}: rank 0 buffer {k}"
    _same_on_rank0({k: (tuple(b.shape), b.dtype) for k, b in mine.items()}, f"{what}: buffer shapes/dtypes")
    for k, b in mine.items():
        theirs = b.clone()
        td.broadcast(theirs, src=0)
        assert torch.equal(b, theirs), f"{what}: buffer {k} on rank {td.get_rank()} is not rank 0's"


def _check_model(model_dir: str, kind: str, data: str) -> None:
    import torch.distributed as td
    from test_train_smoke import tiny_overrides
    from transformers import AutoModelForImageTextToText, PreTrainedModel

    from mmrlsd.config import load_config
    from mmrlsd.train import fsdp
    from mmrlsd.train.loop import build

    rank = td.get_rank()
    reads, entering = [], []
    load_weights = PreTrainedModel._load_pretrained_model  # reads the weight files inside from_pretrained
    shard_model = fsdp.shard_model

    def spy_load(*a, **kw):
        reads.append(1)
        return load_weights(*a, **kw)

    def spy_shard(model, *a, **kw):
        entering.append({p.device.type for p in model.parameters()})
        return shard_model(model, *a, **kw)

    PreTrainedModel._load_pretrained_model = staticmethod(spy_load)
    fsdp.shard_model = spy_shard
    offload = "true" if kind == "tied" else "false"
    args = tiny_overrides(model_dir, data, **{
        "model.dtype": "bfloat16", "dist.mixed_precision": "true", "optim.freeze_vision": "true",
        "algo.teacher_refresh": 1, "dist.teacher_offload": offload, "trainer.threads": 1,
    })  # fmt: skip
    try:
        ctx = build(load_config(None, args))
    finally:
        PreTrainedModel._load_pretrained_model = staticmethod(load_weights)
        fsdp.shard_model = shard_model
    policy, teacher = ctx.policy, ctx.teacher
    assert len(reads) == (2 if rank == 0 else 0), (kind, rank, "weight-file reads", len(reads))
    assert entering == ([{"cpu"}] * 2 if rank == 0 else [{"meta"}] * 2), (kind, rank, entering)

    # the checkpoint's tensors, as a plain from_pretrained reads them (on disk the keys are in the older layout)
    refs = {
        d: AutoModelForImageTextToText.from_pretrained(model_dir, dtype=d)
        for d in (torch.float32, torch.bfloat16)
    }
    for model, dtype, what in ((policy, torch.float32, "policy"), (teacher, torch.bfloat16, "teacher")):
        local = {p.to_local().dtype for p in model.parameters()}
        assert local == {dtype}, (kind, what, local)
        layer = model.model.language_model.layers[0]
        gather = torch.bfloat16 if what == "policy" else None  # the bf16 teacher needs no cast
        assert layer._get_fsdp_state()._mp_policy.param_dtype == gather, (kind, what)
        full, want = dict(fsdp.gathered_weights(model)), refs[dtype].state_dict()
        assert full.keys() == want.keys(), (kind, what, sorted(set(full) ^ set(want))[:5])
        for k, v in want.items():
            assert v.dtype == dtype and torch.equal(full[k], v), f"{kind} {what} rank {rank}: {k}"
        tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
        assert tied == (kind == "tied"), (kind, what, rank)
        _same_on_rank0(
            (model.config.to_dict(), model.generation_config.to_dict(), model.training),
            f"{kind} {what} config",
        )
        grads = {k: p.requires_grad for k, p in model.named_parameters()}
        _same_on_rank0(grads, f"{kind} {what} requires_grad")
        want_grad = {k: what == "policy" and ".visual." not in f".{k}" for k in grads}
        assert grads == want_grad, (kind, what)
    assert {p.device.type for p in teacher.parameters()} == {"cpu"}
    assert [b.device.type for b in teacher.buffers()] == [b.device.type for b in policy.buffers()]

    _check_buffers(policy, refs[torch.float32], f"{kind} policy")
    _check_buffers(teacher, refs[torch.bfloat16], f"{kind} teacher")

    # the teacher snapshot refresh after the policy moved
    with torch.no_grad():
        for i, p in enumerate(policy.parameters()):
            p.add_(0.001 * (i + 1))
    fsdp.copy_weights(teacher, policy)
    moved, snap = dict(fsdp.gathered_weights(policy)), dict(fsdp.gathered_weights(teacher))
    assert all(not torch.equal(moved[k], v) for k, v in refs[torch.float32].state_dict().items())
    for k, v in moved.items():
        assert torch.equal(snap[k], v.to(torch.bfloat16)), f"{kind} refreshed teacher rank {rank}: {k}"


def _worker(data: str, out: str, *models: str) -> None:
    import torch.distributed as td

    from mmrlsd import dist

    dist.init_distributed("gloo")
    torch.set_num_threads(1)
    for spec in models:
        model_dir, kind = spec.rsplit(":", 1)
        _check_model(model_dir, kind, data)
    Path(out, f"rank{td.get_rank()}.ok").write_text("ok\n")
    dist.destroy_distributed()  # barrier first: a rank tearing gloo down while its peer still exits can abort


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tinydata
    _worker(*sys.argv[1:])
