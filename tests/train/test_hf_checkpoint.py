"""Every checkpoint carries `hf/`, a plain Hugging Face folder: `from_pretrained` on it gives the trained policy's
logits exactly, and `mmrlsd eval --model RUN/checkpoint-N` (or `--model RUN`) evaluates it directly."""

import copy
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmrlsd.cli import main as cli_main
from mmrlsd.config import load_config
from mmrlsd.data.encoding import chat_text, encode
from mmrlsd.errors import ModelError
from mmrlsd.model.load import resolve_model_path
from mmrlsd.train import checkpoint as ckpt
from mmrlsd.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from test_bench_e2e import mathvista_data  # noqa: E402
from test_train_smoke import tiny_overrides  # noqa: E402

HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json"}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """Two RLSD steps with a checkpoint after each; returns (run dir, {step: deep copy of the policy when it was
    saved})."""
    from tinydata import write_records

    root = tmp_path_factory.mktemp("hfckpt")
    data = write_records(root / "data")
    cfg = load_config(None, tiny_overrides(tiny_model("qwen2_5_vl"), data, **{"trainer.save_every": 1,
                                                                             "trainer.keep_last": 0}))  # fmt: skip
    policies, real_save = {}, ckpt.save_checkpoint

    def spy(run_dir, step, policy, *args, **kw):
        policies[step] = copy.deepcopy(policy).eval()
        return real_save(run_dir, step, policy, *args, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(ckpt, "save_checkpoint", spy)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = train(cfg, root / "run", progress=False)
    finally:
        mp.undo()
    policies["warnings"] = [str(w.message) for w in caught]
    return run, policies


def _inputs(processor):
    img = Image.new("RGB", (56, 56), "white")
    img.paste((255, 0, 0), (10, 20, 24, 34))
    return encode(processor, [chat_text(processor, "how many red squares?", 1)], [[img]])


def test_hf_folder_gives_the_trained_policys_logits(trained):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run, policies = trained
    assert sorted(k for k in policies if k != "warnings") == [1, 2]
    # single-process saves and loads do not warn that torch.distributed is not initialised
    assert not [w for w in policies["warnings"] if "torch.distributed is disabled" in w]
    for step in (1, 2):
        policy = policies[step]
        hf = run / f"checkpoint-{step}" / "hf"
        assert HF_FILES <= {f.name for f in hf.iterdir()}, sorted(f.name for f in hf.iterdir())
        assert json.loads((hf / "config.json").read_text())["dtype"] == "float32"
        model = AutoModelForImageTextToText.from_pretrained(hf).eval()
        processor = AutoProcessor.from_pretrained(hf)
        assert processor.apply_chat_template is not None and processor.tokenizer.chat_template
        enc = _inputs(processor)
        with torch.no_grad():
            ref = policy(**enc).logits
            got = model(**enc).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # the two checkpoints really hold different weights (the test would pass trivially otherwise)
    a, b = (ckpt.load_policy_weights(run / f"checkpoint-{s}") for s in (1, 2))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_hf_folder_in_a_chosen_dtype(tiny_model, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    src = tiny_model("qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(src)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    out = ckpt.write_hf_folder(
        model, full, AutoProcessor.from_pretrained(src), tmp_path / "hf", dtype="bfloat16"
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForImageTextToText.from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k].to(torch.bfloat16), rtol=0, atol=0)


def test_model_path_resolution(trained, tmp_path):
    run, _ = trained
    assert resolve_model_path(str(run / "checkpoint-1")) == str(run / "checkpoint-1" / "hf")
    assert resolve_model_path(str(run)) == str(run / "checkpoint-2" / "hf")  # the newest complete one
    assert resolve_model_path("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert resolve_model_path(str(run / "checkpoint-1" / "hf")) == str(run / "checkpoint-1" / "hf")
    bare = tmp_path / "checkpoint-3"  # saved with trainer.save_hf: false
    (bare / "state").mkdir(parents=True)
    (bare / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="mmrlsd export"):
        resolve_model_path(str(bare))


def test_eval_runs_on_a_checkpoint_folder(trained, tmp_path, capsys):
    run, _ = trained
    data, split = mathvista_data(tmp_path / "mv")
    for model in (run / "checkpoint-2", run):
        out = tmp_path / f"eval_{model.name}"
        argv = ["eval", "--bench", "mathvista", "--model", str(model), "--data", str(data), "--split", split,
                "--max-new-tokens", "4", "--output-dir", str(out), "--device", "cpu", "--no-progress"]  # fmt: skip
        assert cli_main(argv) == 0, capsys.readouterr().err
        scores = json.loads((out / "scores.json").read_text())
        assert scores["n"] == 3 and len((out / "predictions.jsonl").read_text().splitlines()) == 3
    bare = tmp_path / "checkpoint-9"
    (bare / "state").mkdir(parents=True)
    (bare / "config.json").write_text("{}")
    argv = ["eval", "--bench", "mathvista", "--model", str(bare), "--data", str(data), "--output-dir",
            str(tmp_path / "x"), "--device", "cpu"]  # fmt: skip
    assert cli_main(argv) == 2
    assert "mmrlsd export" in capsys.readouterr().err


def test_viz_runs_on_a_checkpoint_folder(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from mmrlsd.viz import checkpoint_for, open_run

    run, _ = trained
    view = open_run(run / "checkpoint-1")  # the run, with that checkpoint for the overlay
    assert view.path == run and view.checkpoints == {1: run / "checkpoint-1"} and view.steps == [1, 2]
    assert checkpoint_for(view, 2) == (1, run / "checkpoint-1")
    assert checkpoint_for(open_run(run), 1) == (1, run / "checkpoint-1")  # the nearest one otherwise
    out = tmp_path / "v.html"
    step, sample = next((s, r["sample"]) for s in view.steps for r in view.rows(s) if r["images"])
    argv = ["viz", str(run / "checkpoint-1"), "--step", str(step), "--sample", str(sample), "--out", str(out)]
    assert cli_main(argv) == 0
    page = out.read_text()
    assert "image overlay" in page, page.split("<i>")[1:2]  # drawn with checkpoint-1 (checkpoint_for above)
