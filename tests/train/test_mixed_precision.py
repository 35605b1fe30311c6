"""Mixed precision: `model.dtype` is the compute dtype; parameters, gradients and AdamW states stay float32.

At the paper's lr 1e-6 an AdamW step moves a weight by about 1e-6, far below bf16's resolution at the weights'
scale (~1e-4 at 0.02), so bf16 parameters updated in place barely move: measured here, one step moves ~2% of the
tiny model's bf16 entries. With float32 master weights and bf16 compute every parameter that gets a gradient
moves. The token embedding is the exception by construction: rows of tokens absent from the batch get no
gradient (and weight decay 0.01 x 1e-6 is below float32's resolution).
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mmrlsd.config import load_config
from mmrlsd.train.checkpoint import load_policy_weights
from mmrlsd.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_smoke import tiny_overrides  # noqa: E402

EMBED = "model.language_model.embed_tokens.weight"
BF16_LR = {"model.dtype": "bfloat16", "optim.lr": 1e-6, "trainer.total_steps": 1, "trainer.threads": 1}
FAST = {"model.packing": "true", "model.share_prefix": "true", "model.share_vision": "true",
        "model.logprob_chunk": 8}  # fmt: skip


def checkpoint_dtypes(ckpt: Path) -> dict[str, torch.dtype]:
    """dtype of every tensor stored in a checkpoint's `state/` (model, optimizer states, teacher)."""
    meta = dcp.FileSystemReader(str(ckpt / "state")).read_metadata()
    return {k: v.properties.dtype for k, v in meta.state_dict_metadata.items() if hasattr(v, "properties")}


def moved(init: dict, trained: dict) -> tuple[float, float]:
    """(fraction of all entries that changed, smallest fraction of any tensor but the token embedding), compared
    in the trained weights' dtype (the initial float32 weights rounded to it)."""
    changed = {k: (trained[k].float() != init[k].to(trained[k].dtype).float()) for k in init}
    total = sum(c.sum().item() for c in changed.values()) / sum(c.numel() for c in changed.values())
    return total, min(c.float().mean().item() for k, c in changed.items() if k != EMBED)


@pytest.fixture(scope="module")
def init_weights(tiny_model):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model("qwen2_vl")).state_dict()


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_bf16_compute_updates_float32_master_weights(path, tiny_model, tiny_records, tmp_path, init_weights):
    extra = FAST if path == "fast" else {}
    cfg = load_config(None, tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **BF16_LR, **extra))
    assert cfg.dist.mixed_precision  # the default
    run = train(cfg, tmp_path / "run", progress=False)
    dtypes = checkpoint_dtypes(run / "checkpoint-1")
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in dtypes)
    wrong = {k: v for k, v in dtypes.items() if not k.startswith("teacher.") and v != torch.float32}
    assert not wrong, f"policy weights and AdamW states must be float32: {list(wrong.items())[:5]}"
    teacher = {v for k, v in dtypes.items() if k.startswith("teacher.")}
    assert teacher == {torch.bfloat16}  # the frozen snapshot is kept in the compute dtype
    total, least = moved(init_weights, load_policy_weights(run / "checkpoint-1"))
    assert least > 0.95, least  # every weight with a gradient moves at lr 1e-6 (a bias entry may have none)
    assert total > 0.85, total  # measured 0.88: unused embedding rows get no gradient


def test_bf16_parameters_without_master_weights_barely_move(tiny_model, tiny_records, tmp_path, init_weights):
    """`dist.mixed_precision: false` keeps the parameters themselves in bf16: most lr-1e-6 updates round away."""
    args = tiny_overrides(
        tiny_model("qwen2_vl"), tiny_records, **BF16_LR, **{"dist.mixed_precision": "false"}
    )
    run = train(load_config(None, args), tmp_path / "run", progress=False)
    dtypes = checkpoint_dtypes(run / "checkpoint-1")
    assert {v for k, v in dtypes.items() if not k.endswith(".step")} == {torch.bfloat16}  # Adam's step: fp32
    total, _ = moved(init_weights, load_policy_weights(run / "checkpoint-1"))
    assert total < 0.05, total  # measured 0.022


def test_float32_compute_has_no_autocast():
    from mmrlsd.model.load import compute_autocast

    with compute_autocast("cpu", "float32", "float32"):
        assert not torch.is_autocast_enabled("cpu")
    with compute_autocast("cpu", "bfloat16", "float32"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        x = torch.ones(2, 2) @ torch.ones(2, 2)
        assert x.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_fsdp_build_uses_the_mixed_precision_policy(tiny_model, tiny_records, monkeypatch):
    """`build` under a (one-rank) process group: the policy's FSDP units all-gather bf16 parameters for the
    forward and keep float32 shards and gradients; the teacher snapshot is stored in bf16."""
    import torch.distributed as td

    from mmrlsd.model.logprobs import forward_logprobs
    from mmrlsd.train.loop import build
    from mmrlsd.types import SeqBatch

    monkeypatch.setenv("WORLD_SIZE", "1")
    td.init_process_group("gloo", store=td.HashStore(), rank=0, world_size=1)
    try:
        args = tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **BF16_LR, **{"dist.fsdp": "'on'"})
        ctx = build(load_config(None, args))
        layer = ctx.policy.model.language_model.layers[0]
        assert layer._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16
        assert layer._get_fsdp_state()._mp_policy.reduce_dtype == torch.float32
        seen = []
        hook = layer.mlp.down_proj.register_forward_hook(
            lambda m, a, out: seen.append((m.weight.dtype, out.dtype))
        )
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        seq = SeqBatch(ids, torch.ones_like(ids), None, None, None, [0], prompt_len=3)
        logp, _ = forward_logprobs(ctx.policy, seq)  # no autocast here: FSDP casts
        hook.remove()
        assert seen == [(torch.bfloat16, torch.bfloat16)]
        logp.sum().backward()
        params = list(ctx.policy.parameters())
        assert {p.dtype for p in params} == {torch.float32}
        assert {p.grad.dtype for p in params if p.grad is not None} == {torch.float32}
        assert {p.dtype for p in ctx.teacher.parameters()} == {torch.bfloat16}
    finally:
        td.destroy_process_group()


def test_two_ranks_train_float32_master_weights(tiny_model, tiny_records, tmp_path, init_weights):
    """2 gloo ranks, bf16 compute, lr 1e-6: the checkpoint holds float32 weights and AdamW states that moved."""
    from test_fsdp import PLUGINS
    from test_fsdp_mixed import run_two_ranks

    args = tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **BF16_LR, **{"algo.teacher_refresh": 1})
    env = {**os.environ, "PYTHONPATH": PLUGINS + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    run = tmp_path / "two"
    r = run_two_ranks(args, run, env)
    assert r.returncode == 0, r.stderr[-4000:]
    dtypes = checkpoint_dtypes(run / "checkpoint-1")
    assert {v for k, v in dtypes.items() if not k.startswith("teacher.")} == {torch.float32}
    assert {v for k, v in dtypes.items() if k.startswith("teacher.")} == {torch.bfloat16}
    total, least = moved(init_weights, load_policy_weights(run / "checkpoint-1"))
    assert least > 0.95 and total > 0.85, (least, total)


def test_sft_keeps_float32_master_weights(tmp_path):
    """`mmrlsd sft` with bf16 compute: the saved model is float32 and an lr-1e-6 step moved it."""
    from safetensors.torch import load_file

    from mmrlsd.experiments.lab.data import write_lab_data
    from mmrlsd.recipes.sft import load_sft_config, sft

    repo = Path(__file__).resolve().parents[2]
    write_lab_data(tmp_path / "data", n_train=16, n_val=4, seed=5)
    cfg = load_sft_config(repo / "configs" / "tiny_sft.yaml", [
        f"model.path={repo / 'data' / 'tiny' / 'sft-qwen2vl'}", f"data.train_files=[{tmp_path / 'data' / 'train.jsonl'}]",
        "data.val_files=[]", "trainer.val_every=0", "model.dtype=bfloat16", "optim.lr=1e-6", "optim.warmup_steps=0",
        "trainer.total_steps=1", "trainer.save_every=0", "sft.batch_size=8", "trainer.threads=1",
    ])  # fmt: skip
    out = sft(cfg, tmp_path / "run", progress=False)
    init = load_file(repo / "data" / "tiny" / "sft-qwen2vl" / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    assert {v.dtype for v in trained.values()} == {torch.float32}
    layers = [k for k in init if ".layers." in k and k.endswith("proj.weight")]
    changed = sum((trained[k] != init[k]).sum().item() for k in layers) / sum(init[k].numel() for k in layers)
    assert changed > 0.95, changed
