"""A run directory is data, not code, and a damaged one is handled.

* a pickle planted in `checkpoint-N/state/.metadata` (or in a shard's non-tensor entry) is refused by
  `--resume`, `mmrlsd export` and the viz overlay with an error naming the file, and never runs: the marker
  file its `__reduce__` would create does not appear;
* a damaged newest checkpoint (truncated shard, empty `trainer_state.json`, garbage RNG file) is passed over
  with a warning naming it and why; the resume from the previous one reproduces the uninterrupted run exactly.

One module-scoped reference run (tiny Qwen2-VL, 2 steps, a checkpoint after each) is copied for every case.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import resource
import shutil
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmrlsd.config import load_config
from mmrlsd.errors import CheckpointError, UnsafeCheckpointError
from mmrlsd.log import read_metrics
from mmrlsd.train import checkpoint as ckpt
from mmrlsd.train.loop import train

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS / "train"))
sys.path.insert(0, str(TESTS / "plugins"))
from test_train_smoke import _weights, tiny_overrides  # noqa: E402

SETTINGS = {"trainer.total_steps": 2, "trainer.save_every": 1, "trainer.keep_last": 3, "trainer.threads": 1,
            "rollout.n": 2, "rollout.batch_size": 2, "rollout.max_new_tokens": 6, "optim.micro_batch_size": 2,
            "data.shuffle": "false"}  # fmt: skip


class _Planted:
    """Unpickling this runs `os.system("touch MARKER")`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ref(tiny_model, tmp_path_factory):
    from tinydata import write_records

    root = tmp_path_factory.mktemp("rundir")
    data = write_records(root / "data")
    args = tiny_overrides(tiny_model("qwen2_vl"), data, **SETTINGS)
    run = train(load_config(None, args), root / "reference", progress=False)
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    return SimpleNamespace(root=root, args=args, run=run, weights=_weights(run, 2), metrics=read_metrics(run))


def _copy(ref, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ref.run, tmp_path / "run"))


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Planted(marker)))


def test_planted_metadata_is_refused_by_resume(ref, tmp_path):
    run, marker = _copy(ref, tmp_path), tmp_path / "PWNED"
    meta = run / "checkpoint-2" / "state" / ".metadata"
    _plant(meta, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"{meta}: refusing to load it: it names posix\.system"):
        train(load_config(None, ref.args + ["trainer.total_steps=3"]), run, resume=True, progress=False)
    assert not marker.exists()


def test_planted_metadata_is_refused_by_export_and_viz(ref, tmp_path, capsys):
    from mmrlsd.cli import main

    run, marker = _copy(ref, tmp_path), tmp_path / "PWNED"
    for n in (1, 2):  # viz uses the checkpoint nearest the dumped step
        _plant(run / f"checkpoint-{n}" / "state" / ".metadata", marker)
    assert main(["export", str(run / "checkpoint-2"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"error: {run}/checkpoint-2/state/.metadata: refusing to load it" in err and "Traceback" not in err
    # viz loads a checkpoint's hf/ folder (safetensors) when it has one, never reading state/: nothing runs
    assert main(["viz", str(run), "--step", "2", "--out", str(tmp_path / "v.html")]) == 0 and not marker.exists()
    for n in (1, 2):  # checkpoints saved without hf/ (trainer.save_hf: false): viz reads state/ and refuses
        shutil.rmtree(run / f"checkpoint-{n}" / "hf")
    from mmrlsd.viz import overlay

    overlay._load.cache_clear()  # the model viz just loaded from hf/ is cached per checkpoint path
    assert main(["viz", str(run), "--step", "2", "--out", str(tmp_path / "v.html")]) == 2
    err = capsys.readouterr().err
    assert "state/.metadata: refusing to load it: it names posix.system" in err, err
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_planted_shard_entry_is_refused(tmp_path):
    """The optimizer's non-tensor entries are pickles inside the shard files; torch's own planner reads them
    with `weights_only=False`."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "PWNED"
    dcp.save(
        {"w": torch.ones(2), "lr": _Planted(marker)}, checkpoint_id=str(tmp_path / "state"), no_dist=True
    )
    state = {"w": torch.zeros(2), "lr": 0.0}
    with pytest.raises(UnsafeCheckpointError, match="refusing to load the entry 'lr'"):
        ckpt._dcp_load(state, tmp_path / "state")
    assert not marker.exists()
    dcp.save({"w": torch.ones(2), "lr": 0.5}, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    ckpt._dcp_load(state, tmp_path / "ok")
    assert state["lr"] == 0.5 and torch.equal(state["w"], torch.ones(2))


def test_safe_metadata_reader_matches_pickle(ref):
    """The restricted reader returns what plain pickle would for a real checkpoint (nothing is lost)."""
    path = ref.run / "checkpoint-2" / "state" / ".metadata"
    with open(path, "rb") as f:
        plain = pickle.load(f)  # our own file, written by the reference run above
    safe = ckpt.read_metadata(path)
    assert safe.state_dict_metadata == plain.state_dict_metadata
    assert safe.storage_data == plain.storage_data and len(safe.storage_data) > 10


@pytest.mark.parametrize("garbage", [b"", b"\x80\x04K", b"not a pickle at all", pickle.dumps({"a": 1})])
def test_damaged_metadata_is_a_checkpoint_error(tmp_path, garbage):
    path = tmp_path / ".metadata"
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError, match=rf"{path}: (unreadable|not checkpoint metadata)") as e:
        ckpt.read_metadata(path)
    assert not isinstance(e.value, UnsafeCheckpointError)


def _truncate_shard(c: Path) -> str:
    shard = next((c / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return rf"{shard.name}: truncated"


def _empty_state(c: Path) -> str:
    (c / "trainer_state.json").write_text("")
    return r"trainer_state.json: unreadable"


def _garbage_rng(c: Path) -> str:
    (c / "rng_rank0.pt").write_bytes(os.urandom(300))
    return r"rng_rank0.pt: unreadable"


def _no_metadata(c: Path) -> str:
    (c / "state" / ".metadata").unlink()
    return r"\.metadata: missing"


@pytest.mark.parametrize("damage", [_truncate_shard, _empty_state, _garbage_rng, _no_metadata],
                         ids=lambda f: f.__name__.strip("_"))  # fmt: skip
def test_damaged_newest_checkpoint_falls_back(ref, tmp_path, caplog, damage):
    run = _copy(ref, tmp_path)
    reason = damage(run / "checkpoint-2")
    with pytest.raises(CheckpointError, match=reason):
        ckpt.verify_checkpoint(run / "checkpoint-2")
    with caplog.at_level(logging.INFO, logger="mmrlsd.train"):
        train(load_config(None, ref.args), run, resume=True, progress=False)
    warned = [r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint-2" in warned[0], warned
    assert re.search(reason, warned[0]), warned
    assert any("resumed from" in r.getMessage() and "checkpoint-1" in r.getMessage() for r in caplog.records)
    # step 2 is re-run from checkpoint-1: the same weights and metrics as the uninterrupted run
    weights = _weights(run, 2)
    assert [k for k in weights if not torch.equal(weights[k], ref.weights[k])] == []
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(read_metrics(run)) == strip(ref.metrics)


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(ref, tmp_path):
    run = _copy(ref, tmp_path)
    for n in (1, 2):
        _empty_state(run / f"checkpoint-{n}")
    with pytest.raises(
        CheckpointError, match=r"no intact checkpoint to resume from: .*checkpoint-2.*checkpoint-1"
    ):
        train(load_config(None, ref.args), run, resume=True, progress=False)


# ------------------------------------------------------------------------------------ one writer, no mixing


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from mmrlsd.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def _cfg_file(tmp_path: Path) -> str:
    (tmp_path / "empty.yaml").write_text("{}\n")
    return str(tmp_path / "empty.yaml")


def test_second_trainer_on_a_locked_run_dir_is_refused(ref, tmp_path, capsys):
    from mmrlsd.train.rundir import RunLock

    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        code, err = _cli(["train", _cfg_file(tmp_path), *ref.args, "--output-dir", str(run)], capsys)
    assert code == 2 and f"error: {run}: another trainer (pid {os.getpid()}) is writing to this run" in err
    assert "Traceback" not in err and not (run / "metrics.jsonl").exists()


def test_lock_of_a_killed_trainer_does_not_block(tmp_path):
    import signal
    import time

    from mmrlsd.train.rundir import RunDirError, RunLock

    pid = os.fork()
    if pid == 0:
        try:
            with RunLock(tmp_path):
                (tmp_path / "held").touch()
                time.sleep(60)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while not (tmp_path / "held").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(RunDirError, match=rf"another trainer \(pid {pid}\)"):
        RunLock(tmp_path).__enter__()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    with RunLock(tmp_path) as lock:  # the kernel released the dead process's lock; the file stays
        assert lock.fd is not None and (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_rerun_into_a_run_without_resume_is_refused_then_overwrite_clears_it(ref, tmp_path, capsys):
    run = _copy(ref, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()
    args = ["train", _cfg_file(tmp_path), *ref.args, "trainer.total_steps=1", "--output-dir", str(run)]
    code, err = _cli(args, capsys)
    assert code == 2 and f"error: --output-dir {run}: already holds a run (" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_bytes() == before and (run / "checkpoint-2").is_dir()
    code, err = _cli([*args, "--overwrite", "--no-progress"], capsys)
    assert code == 0, err
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert [p.name for p in ckpt.complete_checkpoints(run)] == [
        "checkpoint-1"
    ]  # the old checkpoint-2 is gone


def test_non_run_folder_is_never_cleared(ref, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("x")
    for extra in ([], ["--overwrite"]):
        code, err = _cli(
            ["train", _cfg_file(tmp_path), *ref.args, "--output-dir", str(folder), *extra], capsys
        )
        assert code == 2 and "not empty and not a run directory (thesis.tex)" in err
    assert (folder / "thesis.tex").read_text() == "x"


def test_resume_with_a_different_experiment_is_refused(ref, tmp_path, capsys, tiny_model):
    run = _copy(ref, tmp_path)
    base = ["train", _cfg_file(tmp_path), *ref.args, "--output-dir", str(run), "--resume", "--no-progress"]
    other = tiny_model("qwen2_5_vl")  # another model: before, a raw size-mismatch traceback
    code, err = _cli([*base, "optim.lr=0.5", "algo.lam0=0", f"model.path={other}"], capsys)
    assert code == 2, err
    assert "the config differs from the run's saved config.yaml" in err
    for change in ("optim.lr: 0.001 -> 0.5", "algo.lam0: 0.5 -> 0.0", f"-> '{other}'"):
        assert change in err, err
    assert "Traceback" not in err
    # harmless keys (length, cadence, threads) are accepted, and the run continues
    harmless = ["trainer.total_steps=3", "trainer.dump_every=2", "trainer.keep_last=0", "trainer.logger=[]"]
    code, err = _cli([*base, *harmless], capsys)
    assert code == 0, err
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_allow_config_change_accepts_and_logs_the_changes(ref, tmp_path, capsys, caplog):
    run = _copy(ref, tmp_path)
    base = ["train", _cfg_file(tmp_path), *ref.args, "--output-dir", str(run), "--resume", "--no-progress"]
    with caplog.at_level(logging.WARNING, logger="mmrlsd.train"):
        code, err = _cli([*base, "trainer.total_steps=3", "algo.eps_w=0.3", "--allow-config-change"], capsys)
    assert code == 0, err
    assert any("algo.eps_w: 0.2 -> 0.3" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ torn lines


def test_torn_last_metrics_line_is_dropped_on_resume_and_by_readers(ref, tmp_path, caplog):
    from mmrlsd.log import RunFileError

    run = _copy(ref, tmp_path)
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 3, "loss": 0.1')  # a write cut short
    with caplog.at_level(logging.WARNING, logger="mmrlsd.log"):
        assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert any(f"{metrics}:3: dropping a torn last line" in r.getMessage() for r in caplog.records)
    train(load_config(None, ref.args + ["trainer.total_steps=3"]), run, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert metrics.read_bytes().endswith(b"}\n") and metrics.read_bytes().count(b"\n") == 3
    # a damaged line that is not the last one is not a torn write: an error naming the file and line
    lines = metrics.read_bytes().split(b"\n")
    metrics.write_bytes(b"\n".join([lines[0], b"\x00\x00garbage", *lines[1:]]))
    with pytest.raises(RunFileError, match=rf"{metrics}:2: not a JSON object"):
        read_metrics(run)


def test_viz_on_a_torn_dump_names_the_file(ref, tmp_path, capsys, caplog):
    run = _copy(ref, tmp_path)
    dump = run / "rollouts" / "step_000002.jsonl"
    rows = dump.read_bytes().split(b"\n")
    dump.write_bytes(b"\n".join(rows[:2]) + b"\n" + rows[2][:40])  # two rows and a torn third
    out = tmp_path / "v.html"
    with caplog.at_level(logging.WARNING, logger="mmrlsd.log"):
        code, err = _cli(
            ["viz", str(run), "--step", "2", "--sample", "1", "--no-overlay", "--out", str(out)], capsys
        )
    assert code == 0 and out.is_file(), err
    assert any(f"{dump}:3: dropping a torn last line" in r.getMessage() for r in caplog.records)
    dump.write_bytes(b"{not json\n" + b"\n".join(rows[:2]) + b"\n")
    code, err = _cli(["viz", str(run), "--step", "2", "--no-overlay", "--out", str(out)], capsys)
    assert code == 2 and f"error: {dump}:1: not a JSON object" in err and "Traceback" not in err


def test_metrics_and_dumps_are_written_whole(ref):
    """Every line ends with a newline and parses; no temporary file is left beside a dump."""
    for path in [ref.run / "metrics.jsonl", *sorted((ref.run / "rollouts").iterdir())]:
        data = path.read_bytes()
        assert data.endswith(b"\n") and not path.name.startswith("."), path
        assert all(line for line in data.split(b"\n")[:-1])


# ------------------------------------------------------------------------------ non-finite weights, signals, disk


def test_non_finite_weights_abort_before_a_checkpoint(ref, tmp_path, monkeypatch):
    from mmrlsd.errors import TrainingError
    from mmrlsd.train import loop

    real = loop.rlsd_step

    def poisoned(ctx, samples, step, **kw):
        result = real(ctx, samples, step, **kw)
        if step == 2:  # what an absurd lr does to the weights
            with torch.no_grad():
                next(ctx.policy.parameters()).view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(loop, "rlsd_step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(
        TrainingError, match=r"step 2: the policy weights are no longer finite .*optim\.lr=0\.001"
    ):
        train(load_config(None, ref.args + ["trainer.total_steps=3"]), run, progress=False)
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["checkpoint-1"]
    assert not list(run.glob(".checkpoint-*")) and [r["step"] for r in read_metrics(run)] == [1]


def _signal_on_generate(monkeypatch, calls: dict[int, list]) -> None:
    """When validation's n-th `generate` call starts, send the signals of `calls[n]` (a number: sleep that long)."""
    import time

    from mmrlsd.train import validate as val

    real, count = val.generate, [0]

    def gen(*a, **kw):
        count[0] += 1
        for sig in calls.get(count[0], []):
            if isinstance(sig, float):
                time.sleep(sig)
            else:
                os.kill(os.getpid(), sig)
        return real(*a, **kw)

    monkeypatch.setattr(val, "generate", gen)


def _with_val(ref, tmp_path: Path) -> list[str]:
    data = next(a for a in ref.args if a.startswith("data.train_files=")).split("=", 1)[1]
    return ["train", _cfg_file(tmp_path), *ref.args, f"data.val_files={data}", "trainer.val_every=1",
            "--output-dir", str(tmp_path / "run"), "--no-progress"]  # fmt: skip


def test_sigterm_during_the_first_validation_exits_cleanly(ref, tmp_path, monkeypatch, capsys, caplog):
    _signal_on_generate(monkeypatch, {1: [signal.SIGTERM]})  # greedy pass of the validation before step 1
    with caplog.at_level(logging.WARNING, logger="mmrlsd.train"):
        code, err = _cli(_with_val(ref, tmp_path), capsys)
    assert code == 0 and "Traceback" not in err, err
    assert any("stopped before step 1; nothing new to checkpoint" in r.getMessage() for r in caplog.records)
    run = tmp_path / "run"
    assert read_metrics(run) == [] and not ckpt.complete_checkpoints(run)


def test_sigterm_during_a_later_validation_still_checkpoints(ref, tmp_path, monkeypatch, capsys, caplog):
    _signal_on_generate(
        monkeypatch, {3: [signal.SIGTERM]}
    )  # calls 1-2: the first validation; 3: step 1's greedy
    with caplog.at_level(logging.WARNING, logger="mmrlsd.train"):
        code, err = _cli(_with_val(ref, tmp_path), capsys)
    assert code == 0, err
    run = tmp_path / "run"
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["checkpoint-1"]
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1] and "val/accuracy" in rows[0] and "val/accuracy" not in rows[1]
    assert any("validation of step 1 cut short" in r.getMessage() for r in caplog.records)


def test_second_ctrl_c_exits_at_once(ref, tmp_path, monkeypatch, capsys):
    _signal_on_generate(monkeypatch, {1: [signal.SIGINT, 0.6, signal.SIGINT]})
    code, err = _cli(_with_val(ref, tmp_path), capsys)
    assert code == 130 and "error: interrupted" in err and "Traceback" not in err
    assert not ckpt.complete_checkpoints(tmp_path / "run")


def test_repeated_sigterm_and_a_doubled_sigint_still_stop_cleanly(ref, tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM reaches a torchrun worker twice (directly and forwarded), and so may one Ctrl-C."""
    _signal_on_generate(monkeypatch, {3: [signal.SIGTERM, signal.SIGTERM, signal.SIGINT]})
    code, err = _cli(_with_val(ref, tmp_path), capsys)
    assert code == 0, err
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run")] == ["checkpoint-1"]


def test_full_disk_while_saving_is_an_error_line(ref, tmp_path):
    """A write that fails mid-checkpoint (here: a 1 MB file-size limit, EFBIG, the same path as ENOSPC)."""
    import signal

    run, err_path = tmp_path / "run", tmp_path / "stderr"
    argv = ["train", _cfg_file(tmp_path), *ref.args, "trainer.total_steps=1", "trainer.dump_every=0",
            "--output-dir", str(run), "--no-progress"]  # fmt: skip
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            sys.stderr = open(err_path, "w", buffering=1)  # noqa: SIM115 - the child exits with os._exit
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
            from mmrlsd.cli import main

            code = main(argv)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    err = err_path.read_text()
    assert os.waitstatus_to_exitcode(status) == 2, err[-3000:]
    assert f"error: {run}: writing checkpoint-1 failed (" in err and "then --resume" in err, err[-3000:]
    assert (
        "Traceback" not in err and not list(run.glob(".checkpoint-*")) and not ckpt.complete_checkpoints(run)
    )


def test_export_into_a_file_is_an_error_line(ref, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = _cli(["export", str(ref.run / "checkpoint-2"), "--out", str(tmp_path / "afile")], capsys)
    assert code == 2 and f"error: --out {tmp_path / 'afile'}: exists and is not a folder" in err
    assert (tmp_path / "afile").read_text() == "x"


def test_sft_on_a_locked_run_dir_is_refused(tmp_path, capsys):
    from mmrlsd.train.rundir import RunLock

    run = tmp_path / "sft"
    run.mkdir()
    cfg = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_sft.yaml")
    with RunLock(run):
        code, err = _cli(["sft", cfg, "--output-dir", str(run)], capsys)
    assert code == 2 and f"error: {run}: another trainer (pid {os.getpid()}) is writing" in err
    assert list(run.iterdir()) == [run / ".lock"]
