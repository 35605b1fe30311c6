"""Experiment trackers (TensorBoard, W&B offline, MLflow file store) get the `metrics.jsonl` scalars under the same
names and the resolved config; the run ends with a summary (printed and `summary.json`) whose next commands run."""

import glob
import json
import logging
import shlex
import struct
import sys
from pathlib import Path

import pytest

from mmrlsd.cli import main as cli_main
from mmrlsd.config import ConfigError, load_config
from mmrlsd.log import read_metrics
from mmrlsd.train.loop import train
from mmrlsd.train.trackers import scalars

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_smoke import tiny_overrides  # noqa: E402

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """Two RLSD steps with validation, one bad record, all four trackers; returns (run dir, tmp root, stdout,
    log messages)."""
    from tinydata import write_records

    root = tmp_path_factory.mktemp("trackers")
    data = write_records(root / "data")
    with open(data, "a") as f:
        f.write(json.dumps({"id": "bad", "problem": "no answer here"}) + "\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(root / "wandb_dir"))
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
    (root / "wandb_dir").mkdir()
    extra = {"trainer.logger": "[console,tensorboard,wandb,mlflow]", "data.val_files": f"[{data}]",
             "trainer.val_every": 1, "trainer.experiment_name": "tiny-trackers", "algo.lam0": 0.25}  # fmt: skip
    cfg = load_config(None, tiny_overrides(tiny_model("qwen2_5_vl"), data, **extra))
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("mmrlsd")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    try:
        with redirect_stdout(out):
            run_dir = train(cfg, root / "run", progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        mp.undo()
    return run_dir, root, out.getvalue(), records


def _expected(run_dir):
    return {m["step"]: scalars(m) for m in read_metrics(run_dir)}


def test_tensorboard_events_hold_the_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = run[0]
    expected = _expected(run_dir)
    assert sorted(expected) == [0, 1, 2] and "val/accuracy" in expected[0] and "loss" in expected[1]
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert tags == {k for vals in expected.values() for k in vals}
    for tag in tags:
        got = {e.step: e.value for e in ea.Scalars(tag)}
        want = {s: vals[tag] for s, vals in expected.items() if tag in vals}
        assert got.keys() == want.keys(), tag
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-7), (tag, s)
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lam0: 0.25" in text


def _wandb_records(path):
    """The protobuf records of an offline `.wandb` file (a LevelDB-style log: 7-byte file header, 32 KiB blocks,
    each chunk `crc32 u32 | length u16 | type u8` with FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_wandb_offline_run_holds_the_metrics_and_config(run):
    run_dir, root = run[0], run[1]
    folders = glob.glob(str(root / "wandb_dir" / "wandb" / "offline-run-*"))
    assert len(folders) == 1 and not (run_dir / "wandb").exists()  # WANDB_DIR wins over the run directory
    (wandb_file,) = glob.glob(f"{folders[0]}/run-*.wandb")
    history, config = {}, {}
    for rec in _wandb_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "run":
            config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
            assert rec.run.display_name == "tiny-trackers" and rec.run.project == "mmrlsd"
    assert history == _expected(run_dir)
    assert config["algo"]["lam0"] == 0.25 and config["trainer"]["logger"][-1] == "mlflow"
    assert json.loads((run_dir / "trackers.json").read_text())["wandb"] == Path(wandb_file).stem[4:]


def test_mlflow_file_store_holds_the_metrics_and_config(run):
    from mlflow.tracking import MlflowClient

    run_dir, root = run[0], run[1]
    client = MlflowClient((root / "mlruns").as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "mmrlsd"]
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_name == "tiny-trackers" and r.info.status == "FINISHED"
    expected = _expected(run_dir)
    keys = {k for vals in expected.values() for k in vals}
    assert set(r.data.metrics) == keys
    for key in keys:
        got = {m.step: m.value for m in client.get_metric_history(r.info.run_id, key)}
        assert got == {s: vals[key] for s, vals in expected.items() if key in vals}, key
    assert r.data.params["algo.lam0"] == "0.25" and r.data.params["model.dtype"] == "float32"
    art = Path(client.download_artifacts(r.info.run_id, "config.yaml", str(root / "dl")))
    assert "lam0: 0.25" in art.read_text()


def test_console_lines_and_the_end_of_run_summary(run, tmp_path):
    run_dir, _, stdout, messages = run
    lines = [m for m in messages if m.startswith("step ")]
    assert [m.split()[1] for m in lines] == ["0/2", "1/2", "2/2"]
    m2 = read_metrics(run_dir)[-1]
    assert (
        f"reward/mean {m2['reward/mean']:.4g}" in lines[-1]
        and f"val/accuracy {m2['val/accuracy']:.4g}" in lines[-1]
    )

    s = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir)
    assert s["val_accuracy"] == {"first": {"step": 0, "value": metrics[0]["val/accuracy"]},
                                 "last": {"step": 2, "value": metrics[-1]["val/accuracy"]}}  # fmt: skip
    skipped = (run_dir / "skipped.jsonl").read_text().splitlines()
    assert s["skipped_records"] == len(skipped) >= 2  # the bad record, in the train and the val file
    assert s["steps"] == s["total_steps"] == 2 and s["finished"] and 0 < s["wall_time_s"] < 600
    assert s["checkpoint"] == str(run_dir / "checkpoint-2") and s["hf_model"] == str(
        run_dir / "checkpoint-2" / "hf"
    )
    v = s["val_accuracy"]
    assert (
        f"validation accuracy: {v['first']['value']:.3f} (step 0) -> {v['last']['value']:.3f} (step 2)"
        in stdout
    )
    assert f"skipped records: {len(skipped)}" in stdout and str(run_dir / "summary.json") in stdout
    for cmd in s["next"]:
        assert f"  {cmd}\n" in stdout
    viz, evl, export = s["next"]
    assert evl.startswith("mmrlsd eval --bench mathvista --model " + str(run_dir / "checkpoint-2"))
    # the printed next commands run as they are
    pytest.importorskip("matplotlib")
    assert cli_main(shlex.split(viz)[1:]) == 0 and (run_dir / "view.html").is_file()
    assert cli_main(shlex.split(export)[1:]) == 0 and (run_dir / "model" / "model.safetensors").is_file()


def test_missing_tracker_package_fails_at_config_time(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    base = ["model.path=m", "data.train_files=[d.jsonl]"]
    with pytest.raises(
        ConfigError, match=r"'trainer.logger' wandb needs the 'wandb' package.*mmrlsd\[wandb\]"
    ):
        load_config(None, [*base, "trainer.logger=[console,wandb]"])
    with pytest.raises(ConfigError, match=r"'trainer.logger\[1\]' is 'tensorbord'; valid choices: console"):
        load_config(None, [*base, "trainer.logger=[console,tensorbord]"])
    assert load_config(None, [*base, "trainer.logger=[tensorboard,mlflow]"]).trainer.logger == [
        "tensorboard",
        "mlflow",
    ]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: m}\ndata: {train_files: [d.jsonl]}\ntrainer: {logger: [wandb]}\n")
    assert cli_main(["train", str(cfg), "--output-dir", str(tmp_path / "run")]) == 2
    assert "pip install 'mmrlsd[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_resume_continues_the_tracker_runs(tiny_model, tmp_path, monkeypatch):
    """`--resume` logs into the same MLflow run (ids in trackers.json), TensorBoard purges the events written after
    the checkpoint (one value per step), and the tracker list may change on resume."""
    import shutil

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tinydata import write_records

    data = write_records(tmp_path / "data")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = tiny_model("qwen2_5_vl")
    run = tmp_path / "run"
    first = {"trainer.logger": "[tensorboard,mlflow]", "trainer.save_every": 1, "trainer.total_steps": 2,
             "trainer.keep_last": 0}  # fmt: skip
    train(load_config(None, tiny_overrides(model, data, **first)), run, progress=False)
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    shutil.rmtree(run / "checkpoint-2")  # as if killed before checkpoint-2: resume from checkpoint-1
    again = {**first, "trainer.logger": "[console,tensorboard,mlflow]", "trainer.total_steps": 3}
    train(load_config(None, tiny_overrides(model, data, **again)), run, resume=True, progress=False)
    assert json.loads((run / "trackers.json").read_text())["mlflow"] == run_id
    client = MlflowClient(uri)
    (r,) = client.search_runs([client.get_experiment_by_name("mmrlsd").experiment_id])
    assert r.info.run_id == run_id and r.info.status == "FINISHED"
    final = {m["step"]: m["loss"] for m in read_metrics(run)}
    assert sorted(final) == [1, 2, 3]
    assert {h.step for h in client.get_metric_history(run_id, "loss")} == {1, 2, 3}
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    events = ea.Scalars("loss")
    assert [e.step for e in events] == [1, 2, 3]  # step 2 once: the first run's was purged
    assert {e.step: e.value for e in events} == pytest.approx(final, rel=1e-6)
