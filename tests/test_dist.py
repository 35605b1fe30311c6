"""mmrlsd.dist: process-group set-up decisions (checked without launching ranks)."""

import torch
import torch.distributed as td

from mmrlsd import dist


def _capture(monkeypatch, world_size: str, cuda: bool):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(td, "is_initialized", lambda: False)
    monkeypatch.setattr(td, "init_process_group", lambda backend: seen.setdefault("backend", backend))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("device", i))
    return seen


def test_nccl_group_also_carries_cpu_tensors(monkeypatch):
    # CPU bookkeeping collectives (any_rank, validation sums) need a gloo side beside NCCL
    seen = _capture(monkeypatch, "2", cuda=True)
    assert dist.init_distributed("auto") is True
    assert seen == {"backend": "cpu:gloo,cuda:nccl", "device": 1}


def test_gloo_without_cuda_and_no_group_for_one_process(monkeypatch):
    seen = _capture(monkeypatch, "2", cuda=False)
    assert dist.init_distributed("auto") is True
    assert seen == {"backend": "gloo"}
    seen = _capture(monkeypatch, "1", cuda=True)
    assert dist.init_distributed("auto") is False
    assert seen == {}
