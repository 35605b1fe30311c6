"""The vLLM engine around a stand-in `LLM` (no vLLM needed): engine settings per platform and process layout,
request building, sampling settings, placeholder blocking, EOS masking, sleep/wake, weight sync and thread
settings. The same engine against the real vLLM: tests/real_vllm (`pytest -m vllm`, in the vLLM virtualenv)."""

import json
import sys
import types

import pytest
import torch

from mmrlsd.model.load import load_model
from mmrlsd.rollout.generate import eos_token_ids, vision_token_ids
from mmrlsd.rollout.vllm_engine import (
    BLOCK,
    VLLMEngine,
    VLLMSettings,
    checkpoint_config,
    engine_kwargs,
    hf_overrides,
    rollouts_from_ids,
)


class FakeParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeLLM:
    """Records calls; 'generates' by echoing a per-weight-version token so weight sync is observable."""

    def __init__(self, **kw):
        self.kw, self.calls, self.version, self.events = kw, [], 0, []
        self.llm_engine = types.SimpleNamespace(reset_prefix_cache=lambda: self.events.append("reset_prefix"),
                                                reset_encoder_cache=lambda: self.events.append("reset_encoder"))  # fmt: skip

    def collective_rpc(self, method, args=(), kwargs=None):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
        self._load(kwargs["weights_iterator"])

    def _load(self, weights):
        self.version = int(sum(float(t.sum()) for _, t in weights))

    def reset_mm_cache(self):
        self.events.append("reset_mm")

    def sleep(self, level):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake", tags))

    def generate(self, requests, params, use_tqdm):
        self.calls.append((requests, params))
        out = []
        for _ in requests:
            comps = [types.SimpleNamespace(token_ids=[10 + self.version, 11, params.stop_token_ids[0], 12][: 2 + k % 3])
                     for k in range(params.n)]  # fmt: skip
            out.append(types.SimpleNamespace(outputs=comps))
        return out


def fake_vllm(monkeypatch, llm=FakeLLM, cpu: bool = True):
    plat = types.SimpleNamespace(is_cpu=lambda: cpu, is_cuda_alike=lambda: not cpu, device_type="cpu")
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=FakeParams, LLM=llm))
    monkeypatch.setitem(sys.modules, "vllm.platforms", types.SimpleNamespace(current_platform=plat))


@pytest.fixture
def engine(tiny_model, monkeypatch):
    fake_vllm(monkeypatch, cpu=False)
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    return VLLMEngine("m", processor=proc, llm_factory=FakeLLM), model, proc


def kwargs_for(platform="cpu", world=1, **settings):
    return engine_kwargs("m", VLLMSettings(**settings), dtype="float32", seed=0, platform=platform, world_size=world,
                         max_images=2, positions=4096)  # fmt: skip


def test_qwen3_vl_without_interleave_flag_gets_it_from_an_override(tiny_model, tmp_path, monkeypatch,
                                                                   without_interleave_flag):
    """transformers always interleaves Qwen3-VL's rotary sections, vLLM only with `mrope_interleaved`: a checkpoint
    without the flag gets it through `hf_overrides` (its other rope parameters kept); checkpoints that set it,
    other architectures and unreadable paths get no override."""
    src = tiny_model("qwen3_vl")
    rope = json.loads((src / "config.json").read_text())["text_config"]["rope_parameters"]
    assert rope["mrope_interleaved"] is True  # the tiny config says it, as the released configs do
    bare = without_interleave_flag(src)
    assert hf_overrides(checkpoint_config(str(bare))) == {"text_config": {"rope_parameters": rope}}
    assert hf_overrides(checkpoint_config(str(src))) is None
    assert hf_overrides(checkpoint_config(str(tiny_model("qwen2_5_vl")))) is None
    assert hf_overrides(checkpoint_config(str(tmp_path / "missing"))) is None
    fake_vllm(monkeypatch)
    _, proc = load_model(str(src))
    eng = VLLMEngine(str(bare), processor=proc, llm_factory=FakeLLM)
    assert eng.llm.kw["hf_overrides"] == {"text_config": {"rope_parameters": rope}}
    assert "hf_overrides" not in VLLMEngine(str(src), processor=proc, llm_factory=FakeLLM).llm.kw


def test_engine_settings_follow_platform_and_config():
    cpu = kwargs_for("cpu")
    assert "enable_sleep_mode" not in cpu and "gpu_memory_utilization" not in cpu  # refused on CPU
    assert cpu["kv_cache_memory_bytes"] == 2**30 and cpu["distributed_executor_backend"] == "uni"
    assert "max_model_len" not in cpu and "max_num_seqs" not in cpu  # left to vLLM
    gpu = kwargs_for(
        "cuda", gpu_memory_utilization=0.6, max_model_len=4096, enforce_eager=True, max_num_seqs=64
    )
    assert gpu["enable_sleep_mode"] and gpu["gpu_memory_utilization"] == 0.6 and gpu["enforce_eager"]
    assert gpu["max_model_len"] == 4096 and gpu["max_num_seqs"] == 64 and "kv_cache_memory_bytes" not in gpu
    assert (
        "enable_sleep_mode" not in kwargs_for("cuda", sleep="off")
        and kwargs_for("cpu", sleep="on")["enable_sleep_mode"]
    )
    tp = kwargs_for("cuda", world=8, tensor_parallel_size=2)
    assert tp["distributed_executor_backend"] == "external_launcher" and tp["tensor_parallel_size"] == 2
    assert kwargs_for("cuda", in_process=False)["weight_transfer_config"] == {"backend": "ipc"}
    assert kwargs_for("cpu", in_process=False)["worker_extension_cls"].startswith(
        "mmrlsd.rollout.vllm_worker."
    )


@pytest.mark.parametrize(
    "world, settings, message",
    [(1, {"max_model_len": 8192}, "exceeds the model's 4096 positions"),
     (1, {"tensor_parallel_size": 2}, "needs torchrun"),
     (6, {"tensor_parallel_size": 4}, "must divide the number of ranks"),
     (2, {"in_process": False}, "single-process runs")],
)  # fmt: skip
def test_engine_settings_refuse_impossible_layouts(world, settings, message):
    with pytest.raises(ValueError, match=message):
        kwargs_for("cuda", world=world, **settings)


def test_requests_params_and_rollouts(engine):
    eng, model, proc = engine
    assert eng.llm.kw["enable_sleep_mode"] and eng.llm.kw["trust_remote_code"] is False
    eos = eos_token_ids(model, proc)
    params = eng.sampling_params(n=3, temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=7, seed=5, eos=eos)
    assert (
        params.top_k == -1
        and params.max_tokens == 7
        and params.stop_token_ids == eos
        and params.logprobs is None
    )
    assert params.logit_bias == {t: BLOCK for t in vision_token_ids(proc)} and len(params.logit_bias) == 5
    img = object()
    r = eng.generate(
        ["a", "b"], [[img], []], group_size=3, params=params, eos=eos, pad=proc.tokenizer.pad_token_id
    )
    ((requests, _),) = eng.llm.calls
    assert requests == [{"prompt": "a", "multi_modal_data": {"image": [img]}}, {"prompt": "b"}]
    assert r.response_ids.shape[0] == 6 and r.group_size == 3
    # completion k has tokens [10, 11, EOS, 12][: 2 + k % 3]: lengths 2, 3 (EOS kept), 3 (cut after EOS)
    assert r.response_mask.sum(1).tolist() == [2, 3, 3] * 2
    assert eng.llm.events[-1] == ("sleep", 1) and eng.asleep


def test_weight_sync_changes_outputs_and_clears_caches(engine):
    eng, model, proc = engine
    eos = eos_token_ids(model, proc)
    params = eng.sampling_params(n=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4, seed=0, eos=eos)
    before = eng.generate(["a"], [[]], group_size=1, params=params, eos=eos, pad=0).response_ids[0, 0]
    eng.llm.events.clear()
    eng.sync_weights(iter([("w", torch.full((2,), 3.0))]))  # any iterable (FSDP's is a generator)
    assert eng.llm.events == [("wake", ["weights"]), "reset_prefix", "reset_encoder", "reset_mm"]
    after = eng.generate(["a"], [[]], group_size=1, params=params, eos=eos, pad=0).response_ids[0, 0]
    assert int(before) == 10 and int(after) == 16


def test_cpu_worker_thread_override_is_undone(tiny_model, monkeypatch):
    """vLLM's CPU worker swaps torch.set_num_threads for a no-op and sets its own count; both are undone."""
    fake_vllm(monkeypatch)
    real, n = torch.set_num_threads, torch.get_num_threads()

    class GreedyLLM(FakeLLM):
        def __init__(self, **kw):
            super().__init__(**kw)
            real(1 if n > 1 else 2)
            torch.set_num_threads = lambda k: None

    _, proc = load_model(str(tiny_model("qwen2_vl")))
    try:
        eng = VLLMEngine("m", processor=proc, llm_factory=GreedyLLM)
        assert torch.set_num_threads is real and torch.get_num_threads() == n
        assert "enable_sleep_mode" not in eng.llm.kw and not eng.sleeps  # CPU: no sleep mode
    finally:
        torch.set_num_threads = real
        real(n)


def test_rollouts_from_ids_matches_hf_layout(tiny_model):
    _, proc = load_model(str(tiny_model("qwen2_vl")))
    r = rollouts_from_ids([[5, 6, 99, 7], [8]], eos=[99], pad=0, tokenizer=proc.tokenizer, group_size=2)
    assert r.response_ids.tolist() == [[5, 6, 99, 0], [8, 0, 0, 0]]
    assert r.response_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_training_loop_uses_the_engine_and_syncs_weights(tiny_model, tiny_records, tmp_path, monkeypatch):
    """`rollout.engine: vllm` routes sampling through the engine, with the rollout section's settings, and pushes
    the weights after every step."""
    from pathlib import Path

    from mmrlsd.config import load_config
    from mmrlsd.log import read_metrics
    from mmrlsd.train.loop import train

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from test_train_smoke import tiny_overrides

    created = []

    class RecordingLLM(FakeLLM):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.synced = 0
            created.append(self)

        def _load(self, weights):
            self.synced += 1
            assert any(name.startswith("lm_head") for name, _ in weights)

        def generate(self, requests, params, use_tqdm):
            g = torch.Generator().manual_seed(params.seed)
            outs = []
            for _ in requests:  # ordinary tokens (ids >= 20), no EOS: every response is max_tokens long
                comps = [types.SimpleNamespace(token_ids=torch.randint(20, 400, (params.max_tokens,), generator=g).tolist())
                         for _ in range(params.n)]  # fmt: skip
                outs.append(types.SimpleNamespace(outputs=comps))
            return outs

    fake_vllm(monkeypatch, RecordingLLM)
    over = tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **{"rollout.engine": "vllm"})
    cfg = load_config(None, over + ["rollout.vllm_max_num_seqs=64", "model.max_pixels=12544"])
    run = train(cfg, tmp_path / "run", progress=False)
    (llm,) = created
    assert llm.kw["model"] == str(tiny_model("qwen2_vl")) and llm.synced == 2  # one push per optimizer step
    assert llm.kw["max_num_seqs"] == 64 and llm.kw["mm_processor_kwargs"] == {"size": {"shortest_edge": 784, "longest_edge": 12544}}
    m = read_metrics(run)
    assert [r["step"] for r in m] == [1, 2] and all(r["response/length_mean"] == 12 for r in m)
