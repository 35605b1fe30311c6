"""Fixtures of the vLLM suite: tiny models whose head sizes vLLM's CPU attention accepts, and in-process engines
shared by the tests (an engine takes 5-30 s to start on a small CPU).

Run in the vLLM virtualenv (`bash .ci/install_vllm_cpu.sh`): `python -m pytest -m vllm tests/real_vllm`."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory):
    """Factory: `vllm_model("qwen2_vl")` -> a tiny checkpoint with head size 32 (built once per session)."""
    from mmrlsd.model.tiny import VLLM_SIZE, make_tiny

    cache = {}

    def build(arch: str):
        if arch not in cache:
            cache[arch] = make_tiny(arch, tmp_path_factory.mktemp(f"vllm_{arch}"), seed=0, size=VLLM_SIZE)
        return cache[arch]

    return build


@pytest.fixture(scope="session")
def vllm_engine(vllm_model):
    """Factory: `vllm_engine(arch)` -> `(engine, hf_model, processor)`, an in-process engine per architecture;
    `vllm_engine(arch, path=..., budget=(min_pixels, max_pixels))` one for another checkpoint or pixel budget
    (passed to vLLM as training does). Engines live until the session ends: an in-process engine that is shut
    down takes vLLM's process-wide parallel state with it, and the other engines then fail ("pipeline model
    parallel group is not initialized")."""
    from helpers import ENGINE_SETTINGS

    from mmrlsd.model.load import load_model, set_pixel_budget
    from mmrlsd.rollout.vllm_engine import VLLMEngine, VLLMSettings
    from mmrlsd.train.loop import image_budget

    cache = {}

    def build(arch: str, path=None, budget: tuple[int, int] = (0, 0)):
        key = (arch, str(path), budget)
        if key not in cache:
            path = str(path or vllm_model(arch))
            model, proc = load_model(path, dtype="float32", device="cpu")
            model.eval()
            set_pixel_budget(proc, *budget)  # model.min_pixels / max_pixels, as training loads them
            eng = VLLMEngine(path, processor=proc, dtype="float32", seed=0, settings=VLLMSettings(**ENGINE_SETTINGS),
                             mm_processor_kwargs=image_budget(proc, *budget))  # fmt: skip
            cache[key] = (eng, model, proc)
        return cache[key]

    return build
