"""The vLLM engine around a stand-in `LLM` (vLLM cannot run Qwen-VL on these CPU machines): request building,
sampling settings, placeholder blocking, EOS masking, sleep/wake and in-memory weight sync."""

import sys
import types

import pytest
import torch

from mmrlsd.model.load import load_model
from mmrlsd.rollout.generate import eos_token_ids, vision_token_ids
from mmrlsd.rollout.vllm_engine import BLOCK, VLLMEngine, rollouts_from_ids


class FakeParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeLLM:
    """Records calls; 'generates' by echoing a per-weight-version token so weight sync is observable."""

    def __init__(self, **kw):
        self.kw, self.calls, self.version, self.events = kw, [], 0, []
        self.model = types.SimpleNamespace(load_weights=self._load)

    def _load(self, weights):
        self.version = int(sum(float(t.sum()) for _, t in weights))

    def apply_model(self, fn):
        return fn(self.model)

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


@pytest.fixture
def engine(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=FakeParams, LLM=FakeLLM))
    model, proc = load_model(str(tiny_model("qwen2_vl")))
    return VLLMEngine("m", processor=proc, llm_factory=FakeLLM), model, proc


def test_requests_params_and_rollouts(engine):
    eng, model, proc = engine
    assert eng.llm.kw["enable_sleep_mode"] and eng.llm.kw["trust_remote_code"] is False
    eos = eos_token_ids(model, proc)
    params = eng.sampling_params(n=3, temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=7, seed=5, eos=eos)
    assert params.top_k == -1 and params.max_tokens == 7 and params.stop_token_ids == eos
    assert params.logit_bias == {t: BLOCK for t in vision_token_ids(proc)} and len(params.logit_bias) == 5
    img = object()
    r = eng.generate(["a", "b"], [[img], []], group_size=3, params=params, eos=eos, pad=proc.tokenizer.pad_token_id)
    (requests, _), = eng.llm.calls
    assert requests == [{"prompt": "a", "multi_modal_data": {"image": [img]}}, {"prompt": "b"}]
    assert r.response_ids.shape[0] == 6 and r.group_size == 3
    # completion k has tokens [10, 11, EOS, 12][: 2 + k % 3]: lengths 2, 3 (EOS kept), 3 (cut after EOS)
    assert r.response_mask.sum(1).tolist() == [2, 3, 3] * 2
    assert eng.llm.events[-1] == ("sleep", 1) and eng.asleep


def test_weight_sync_changes_outputs(engine):
    eng, model, proc = engine
    eos = eos_token_ids(model, proc)
    params = eng.sampling_params(n=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4, seed=0, eos=eos)
    before = eng.generate(["a"], [[]], group_size=1, params=params, eos=eos, pad=0).response_ids[0, 0]
    eng.sync_weights([("w", torch.full((2,), 3.0))])
    assert eng.llm.events[-1] == ("wake", ["weights"])
    after = eng.generate(["a"], [[]], group_size=1, params=params, eos=eos, pad=0).response_ids[0, 0]
    assert int(before) == 10 and int(after) == 16


def test_rollouts_from_ids_matches_hf_layout(tiny_model):
    _, proc = load_model(str(tiny_model("qwen2_vl")))
    r = rollouts_from_ids([[5, 6, 99, 7], [8]], eos=[99], pad=0, tokenizer=proc.tokenizer, group_size=2)
    assert r.response_ids.tolist() == [[5, 6, 99, 0], [8, 0, 0, 0]]
    assert r.response_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_training_loop_uses_the_engine_and_syncs_weights(tiny_model, tiny_records, tmp_path, monkeypatch):
    """`rollout.engine: vllm` routes sampling through the engine and pushes the weights after every step."""
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

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=FakeParams, LLM=RecordingLLM))
    cfg = load_config(None, tiny_overrides(tiny_model("qwen2_vl"), tiny_records, **{"rollout.engine": "vllm"}))
    run = train(cfg, tmp_path / "run", progress=False)
    (llm,) = created
    assert llm.kw["model"] == str(tiny_model("qwen2_vl")) and llm.synced == 2  # one push per optimizer step
    m = read_metrics(run)
    assert [r["step"] for r in m] == [1, 2] and all(r["response/length_mean"] == 12 for r in m)
