"""The GPU check's reduced form on CPU: every part runs and writes its numbers (perf variants with step times,
bf16-compute training on float32 master weights that moves the weights at lr 1e-6, packed-attention parity, the
rollout A/B with equal ids, a profiled step)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mmrlsd.experiments.gpu_check import main
from mmrlsd.experiments.perf import ROLLOUT_NEAR, ROLLOUT_SETTINGS

REPO = Path(__file__).resolve().parents[1]


# what the GPU machine lacks: the check must not need any of it
ABSENT = ["datasets", "math_verify", "qwen_vl_utils", "mathruler", "Levenshtein", "rouge_score", "pylatexenc", "trl",
          "vllm", "flash_attn", "latex2sympy2_extended", "accelerate"]  # fmt: skip
RUN = "import sys\nfor m in {absent}: sys.modules[m] = None\nfrom mmrlsd.experiments.gpu_check import main\n" \
      "raise SystemExit(main(['--reduced', '--device', 'cpu', '--out', {out!r}]))"  # fmt: skip


def test_reduced_gpu_check_on_cpu_with_torch_and_transformers_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", RUN.format(absent=ABSENT, out=str(tmp_path))], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (path,) = tmp_path.glob("*-cpu.json")
    assert f"wrote {path}" in p.stdout
    result = json.loads(path.read_text())
    assert result["gpu_check"]["reduced"] is True
    assert result["gpu_check"]["errors"] == {}
    assert set(result["variants"]) == {"naive", "grpo", "rlsd"}  # no TRL here
    assert all(v["step_median_s"] > 0 for v in result["variants"].values())
    assert result["rlsd_over_grpo_step_time"] > 0 and "speedup_vs_trl" in result
    t = result["train"]
    assert (t["compute_dtype"], t["master_dtype"], t["lr"]) == ("bfloat16", "float32", 1e-6) and t["finite"]
    # float32 master weights take a 1e-6 step: nearly every entry of a weight with a gradient moves
    # (bf16 parameters would keep most of them: one bf16 ulp at these weights' scale is ~1e-4)
    assert t["moved_fraction"] > 0.9
    rollout = result["rollout"]  # generate and the lean loop sampled the same ids (it raises otherwise)
    assert set(rollout["settings"]) == set(ROLLOUT_SETTINGS)
    assert rollout["lean_over_generate_speed"] > 0 and rollout["lean_breakdown"]["decode_forwards"] > 0
    # the static step and cascade attention on a CPU, float32: the same ids as generate on every row
    assert all(rollout["agreement_with_generate"][k]["rows_identical"] == 1.0 for k in ROLLOUT_NEAR)
    prof = result["profile"]
    assert prof["step_s"] > 0 and {"rollout", "teacher", "update"} <= set(prof["phases_s"])
    assert len(prof["top"]) > 5 and all(e["own_s"] >= 0 and e["calls"] > 0 for e in prof["top"])
    assert 0.2 < sum(e["share"] for e in prof["top"]) <= 1 + 1e-9 and prof["own_time_total_s"] > 0
    assert (tmp_path / prof["table"]).read_text().count("\n") > 10
    parity = result["packed_attention_parity"]
    assert parity["response_tokens"] > 0
    assert (
        parity["varlen_sdpa_max_abs_diff"] < 1e-5 and parity["varlen_sdpa_shared_prefix_max_abs_diff"] < 1e-5
    )


def test_gpu_check_reports_a_failing_part(tmp_path, monkeypatch, capsys):
    import mmrlsd.experiments.gpu_check as gc

    def boom(*a, **k):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(gc, "check_parity", boom)
    monkeypatch.setattr(gc, "run", boom)
    assert main(["--reduced", "--device", "cpu", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "RuntimeError: no kernel" in out and "wrote" in out
    result = json.loads(next(tmp_path.glob("*-cpu.json")).read_text())
    assert (
        set(result["gpu_check"]["errors"]) == {"perf", "packed_attention_parity"}
        and result["train"]["finite"]
    )


def test_a_part_past_its_time_limit_keeps_the_steps_it_measured(tmp_path, monkeypatch, capsys):
    """`--limit perf=…` stops the perf part mid-run: the steps measured before the limit stay in the JSON (marked
    partial), the timeout is recorded under errors, and the parts after it still run."""
    import mmrlsd.experiments.perf as perf

    real_step, calls = perf.run_mmrlsd_step, []

    def step_then_stall(ctx, samples, step, seed, device):
        calls.append(step)
        if len(calls) > 2:  # the third step outlasts the limit
            time.sleep(60)
        return real_step(ctx, samples, step, seed, device)

    monkeypatch.setattr(perf, "run_mmrlsd_step", step_then_stall)
    t0 = time.perf_counter()
    code = main(["--reduced", "--device", "cpu", "--out", str(tmp_path), "--parts", "perf,train", "--limit",
                 "perf=20", "--set", "variants=[grpo,rlsd]", "--set", "repeats=2"])  # fmt: skip
    assert code == 1 and time.perf_counter() - t0 < 55
    result = json.loads(next(tmp_path.glob("*-cpu.json")).read_text())
    assert result["partial"] is True
    assert result["gpu_check"]["errors"].keys() == {"perf"}
    assert result["gpu_check"]["errors"]["perf"].startswith("PartTimeout: perf ran past its 20 s limit")
    assert len(result["variants"]["grpo"]["step_s"]) == 2 and "rlsd" not in result["variants"]
    assert result["train"]["finite"] and "packed_attention_parity" not in result


def test_unknown_part_or_limit_is_refused(tmp_path, capsys):
    for argv in (["--parts", "perf,speed"], ["--limit", "perf=soon"], ["--limit", "decode=10"]):
        try:
            main(["--reduced", "--device", "cpu", "--out", str(tmp_path), *argv])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(argv)
    err = capsys.readouterr().err
    assert "unknown part(s) ['speed']" in err and "'perf=soon': expected PART=SECONDS" in err
    assert "unknown part 'decode'" in err
    assert not list(tmp_path.iterdir())


def test_time_limit_keeps_an_outer_alarm():
    """A part's limit under an alarm already armed (as pytest-timeout arms one): the part's own timeout fires first
    when it is shorter, and the outer alarm is re-armed on exit with what is left of it."""
    import signal

    from mmrlsd.experiments.gpu_check import PartTimeout, time_limit

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append("outer"))
    signal.setitimer(signal.ITIMER_REAL, 30)
    try:
        try:
            with time_limit(0.2, "perf"):
                time.sleep(5)
        except PartTimeout as e:
            assert str(e) == "perf ran past its 0.2 s limit"
        else:
            raise AssertionError("no PartTimeout")
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 25 < left <= 30 and not fired
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with time_limit(60, "train"):  # the outer alarm comes first: its handler runs, no PartTimeout
            time.sleep(1)
        assert fired == ["outer"] and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
