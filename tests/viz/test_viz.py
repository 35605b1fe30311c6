"""`mmrlsd.viz`: the pure pieces against hand-computed values, then one real 2-step tiny run that the notebook
(executed headlessly with nbclient) and `mmrlsd viz` (HTML and PNG) must render without errors."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrlsd.viz import data as D
from mmrlsd.viz.html import diverging, token_html
from mmrlsd.viz.overlay import attention_to_image, grid_to_pixels, merged_grids, split_image_scores

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "token_credit.ipynb"
sys.path.insert(0, str(REPO / "tests" / "plugins"))


def _row(**kw) -> dict:
    row = {"step": 1, "sample": 0, "group": 0, "id": "r0", "images": [], "problem": "q", "answer": "3",
           "response": "ab", "token_ids": [1, 2], "tokens": ["a", "b"], "reward": 1.0, "accuracy": 1.0,
           "format": 1.0, "extracted": "3", "adv": 1.0, "lam": 0.5, "delta": [math.log(2), -math.log(2)],
           "w": [2.0, 0.5], "token_adv": [1.1, 0.9], "student_logp": [-1.0, -2.0],
           "teacher_logp": [-1.0 + math.log(2), -2.0 - math.log(2)]}  # fmt: skip
    row.update(kw)
    return row


# ----- pure pieces -----


def test_signals_are_centred_on_their_neutral_value():
    row = _row()
    shown, centred, neutral = D.signal_values(row, "w")
    assert (shown, neutral) == ([2.0, 0.5], 1.0)
    assert centred == pytest.approx(
        [math.log(2), -math.log(2)], abs=1e-12
    )  # log w: w=2 and w=1/2 equally strong
    # Â centred on A=1: 1.1 - 1 = +0.1 (credit moved onto the token), 0.9 - 1 = -0.1
    assert D.signal_values(row, "token_adv")[1] == pytest.approx([0.1, -0.1], abs=1e-12)
    assert D.signal_values(row, "token_adv")[2] == 1.0
    assert D.signal_values(row, "delta")[1:] == ([math.log(2), -math.log(2)], 0.0)
    assert D.top_tokens(_row(delta=[0.1, -0.5, 0.3], tokens=list("abc")), "delta", k=2) == [
        1,
        2,
    ]  # |−.5|, |.3|
    with pytest.raises(KeyError, match="known: w, token_adv, delta"):
        D.signal_values(row, "W")


def test_diverging_map_is_white_at_neutral_and_symmetric():
    assert diverging(0.0) == (247, 247, 247)
    assert diverging(1.0) == (33, 102, 172) and diverging(-1.0) == (178, 24, 43)
    assert diverging(5.0) == diverging(1.0)  # clamped
    # halfway to blue: 247 + 0.5·(33 − 247) = 140, 247 + 0.5·(102 − 247) = 174.5 -> 174, 247 + 0.5·(172-247) = 209.5 -> 210
    assert diverging(0.5) == (140, 174, 210)


def test_token_html_escapes_colours_and_explains_each_token():
    row = _row(tokens=["<script>", "x\n"], token_ids=[5, 6])
    page = token_html(row, "w")
    assert "<script>" not in page and "&lt;script&gt;" in page
    spans = re.findall(
        r'<span class="tok" style="background:rgb\((\d+), (\d+), (\d+)\)[^"]*" title="([^"]*)"', page
    )
    assert len(spans) == 2
    # |log w| = log 2 on both tokens is the colour half-range, so they get the two end colours
    assert tuple(map(int, spans[0][:3])) == (33, 102, 172) and tuple(map(int, spans[1][:3])) == (178, 24, 43)
    assert "w = 2" in spans[0][3] and "P_T = 0.7358" in spans[0][3]  # e^(−1 + log 2) = 2/e = 0.7358
    assert "x↵" in page and "<br>" in page
    assert "white = 1" in page  # legend names the neutral value
    assert "P_T = n/a" in token_html(_row(teacher_logp=None), "delta")  # GRPO run: no teacher pass


def test_image_tokens_map_back_to_pixels():
    # two images: grid_thw (1, 4, 6) and (2, 2, 2) with merge 2 -> (1, 2, 3) and (2, 1, 1): 6 + 2 image tokens
    grids = merged_grids(torch.tensor([[1, 4, 6], [2, 2, 2]]), 2)
    assert grids == [(1, 2, 3), (2, 1, 1)]
    a, b = split_image_scores(torch.arange(8.0), grids)
    np.testing.assert_array_equal(a, [[0, 1, 2], [3, 4, 5]])  # row-major over (h/m, w/m)
    np.testing.assert_array_equal(b, [[6.5]])  # mean of the two frames' tokens 6 and 7
    with pytest.raises(ValueError, match="7 image-token scores"):
        split_image_scores(torch.zeros(7), grids)
    # a 2x3 grid over a 4x6-pixel image: each cell covers 2x2 pixels
    px = grid_to_pixels(np.array([[0, 1, 2], [3, 4, 5]]), 4, 6)
    np.testing.assert_array_equal(px[:, :2], [[0, 0], [0, 0], [3, 3], [3, 3]])
    assert px[1, 5] == 2 and px[3, 4] == 5 and px.shape == (4, 6)


def test_grid_layout_matches_the_processor(tiny_model):
    """Image token k covers merge x merge patches k·m²..(k+1)·m²−1 of pixel_values; `split_image_scores` must put
    it where those patches are in the image. A red 28x28 block at x 56..84, y 28..56 of a 112x56 image (no resize:
    multiples of 28) is merged-token cell (row 1, column 2) of the 2x4 grid."""
    from PIL import Image, ImageDraw
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model("qwen2_5_vl"))
    img = Image.new("RGB", (112, 56), "white")
    ImageDraw.Draw(img).rectangle([56, 28, 83, 55], fill="red")
    enc = processor.image_processor(images=[img], return_tensors="pt")
    m = processor.image_processor.merge_size
    grids = merged_grids(enc["image_grid_thw"], m)
    assert grids == [(1, 2, 4)]
    patches = enc["pixel_values"].reshape(enc["pixel_values"].shape[0], 3, -1)  # (patches, C, t·p·p)
    redness = (patches[:, 0] - patches[:, 1]).mean(-1)  # R − G per patch, normalised units
    per_token = redness.reshape(-1, m * m).mean(-1)  # (image tokens,)
    (grid,) = split_image_scores(per_token, grids)
    assert np.unravel_index(grid.argmax(), grid.shape) == (1, 2)
    px = grid_to_pixels(grid, 56, 112)
    hot = np.argwhere(px == px.max())
    assert hot.min(0).tolist() == [28, 56] and hot.max(0).tolist() == [55, 83]  # exactly the red block


def test_attention_to_image_averages_layers_heads_and_queries():
    S = 4
    att = [torch.zeros(1, 2, S, S), torch.zeros(1, 2, S, S)]
    att[0][0, 0, 3, 1] = 0.8  # layer 0, head 0, query 3 -> key 1
    att[1][0, 1, 2, 2] = 0.4  # layer 1, head 1, query 2 -> key 2
    image = torch.tensor([False, True, True, False])
    # mean over 2 layers x 2 heads x 2 queries = 8 entries: key 1 -> 0.8/8 = 0.1, key 2 -> 0.4/8 = 0.05
    torch.testing.assert_close(
        attention_to_image(att, [2, 3], image), torch.tensor([0.1, 0.05]), rtol=0, atol=1e-7
    )


def test_layout_wraps_and_breaks_lines():
    from mmrlsd.viz.figures import layout_tokens

    assert layout_tokens(["abc", "de", "f\n", "gh"], 5) == [
        (0, 0, "abc"),
        (0, 3, "de"),
        (1, 0, "f↵"),
        (2, 0, "gh"),
    ]
    assert layout_tokens(["\x1f"], 10) == [(0, 0, "\\x1f")]


def test_run_discovery_and_checkpoint_choice(tmp_path, monkeypatch):
    for name, mtime in (("old", 100), ("new", 200)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.jsonl").write_text("")
        os.utime(tmp_path / "runs" / name / "metrics.jsonl", (mtime, mtime))
    assert D.newest_run(tmp_path / "runs").name == "new"
    monkeypatch.setenv("MMRLSD_RUN_DIR", str(tmp_path / "runs" / "old"))
    assert D.default_run_dir().name == "old"
    run = D.Run(tmp_path, checkpoints={2: tmp_path / "c2", 4: tmp_path / "c4"})
    # step s was sampled by the weights after step s−1
    assert (
        D.checkpoint_for(run, 5)[0] == 4
        and D.checkpoint_for(run, 4)[0] == 2
        and D.checkpoint_for(run, 1)[0] == 2
    )
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        D.checkpoint_for(D.Run(tmp_path), 1)
    assert D.default_sample([_row(sample=0), _row(sample=1, images=["x.png"], adv=0.0),
                             _row(sample=2, images=["x.png"])]) == 2  # fmt: skip


def test_cli_help_and_usage_errors(tmp_path, capsys):
    from mmrlsd.cli import main

    src = (REPO / "mmrlsd" / "cli" / "viz.py").read_text()
    assert not re.search(r"^(import|from) (torch|matplotlib|mmrlsd\.viz)", src, re.M)
    with pytest.raises(SystemExit):
        main(["viz", "--help"])
    assert "examples:" in capsys.readouterr().out
    assert main(["viz", str(tmp_path), "--out", "x.pdf"]) == 2
    assert main(["viz", str(tmp_path / "nope"), "--out", "x.png"]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert all("mmrlsd" in "".join(c["source"]) or "viz." in "".join(c["source"]) for c in code)


# ----- a real tiny run -----


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    """Two RLSD steps of a tiny Qwen2.5-VL on records that all have an image; returns the run directory."""
    from tinydata import write_records

    from mmrlsd.config import load_config
    from mmrlsd.train.loop import train

    root = tmp_path_factory.mktemp("viz")
    data = write_records(root / "data", n=4, text_only_every=0)
    overrides = {
        "model.path": str(tiny_model("qwen2_5_vl")), "data.train_files": f"[{data}]", "reward.name": "charcount",
        "reward.plugins": "[charcount_reward]", "rollout.n": 4, "rollout.batch_size": 1,
        "rollout.max_new_tokens": 16, "optim.micro_batch_size": 4, "algo.teacher_refresh": 1,
        "trainer.total_steps": 2, "trainer.save_every": 0, "trainer.dump_max": 4,
    }  # fmt: skip
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    return train(cfg, root / "run", progress=False)


def _png(b64: str):
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def test_notebook_executes_against_a_tiny_run(tiny_run, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("MMRLSD_RUN_DIR", str(tiny_run))
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports mmrlsd from this checkout
    # Widgets in a headless kernel sometimes hold the execute reply until nbclient's timeout (jupyter/nbclient#312),
    # so the browse cell takes its static path here; test_browse_widgets covers the widget wiring in-process.
    monkeypatch.setenv("MMRLSD_VIZ_STATIC", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # fmt: skip
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    views = {o.metadata["mmrlsd"]: o for o in outputs if o.get("metadata", {}).get("mmrlsd")}
    assert {"tokens", "overlay", "comparison", "curves", "histograms"} <= set(views)
    for name in ("tokens", "overlay"):
        img = _png(views[name].data["image/png"])
        assert img.width > 200 and img.height > 50, (name, img.size)
        assert np.asarray(img.convert("L")).std() > 5, f"{name} image is blank"
    assert 'class="tok"' in views["tokens"].data["text/html"]  # the hoverable twin
    assert any("MMRLSD_VIZ_STATIC=1: static view" in o.get("text", "") for o in outputs)  # browse degraded
    nbformat.validate(nb)


def test_viz_command_renders_html_and_png(tiny_run, tmp_path):
    from PIL import Image

    from mmrlsd.cli import main
    from mmrlsd.log import read_dump

    html_out, png_out = tmp_path / "v.html", tmp_path / "v.png"
    assert main(["viz", str(tiny_run), "--step", "2", "--sample", "1", "--out", str(html_out)]) == 0
    row = read_dump(tiny_run, 2)[1]
    page = html_out.read_text()
    assert page.count('class="tok"') == len(row["tokens"]) > 0
    assert page.count("data:image/png;base64,") == 2  # overlay + comparison
    assert "image overlay" in page and f"Â = {row['token_adv'][0]:.4g}" in page
    args = [str(tiny_run), "--step", "2", "--sample", "1", "--out", str(png_out), "--signal", "token_adv",
            "--method", "grad"]  # fmt: skip
    assert main(["viz", *args]) == 0
    bad = [str(tiny_run), "--step", "2", "--sample", "1", "--out", str(png_out), "--tokens", "0,999"]
    assert main(["viz", *bad]) == 2
    img = Image.open(png_out)
    assert img.format == "PNG" and img.width > 1000 and img.height > 600
    assert np.asarray(img.convert("L")).std() > 5


def test_browse_widgets_redraw_once_per_change(tiny_run, monkeypatch):
    pytest.importorskip("ipywidgets")
    from mmrlsd.viz import report

    calls = []
    monkeypatch.setattr(report, "show_sample", lambda run, *a: calls.append(a))
    monkeypatch.delenv("MMRLSD_VIZ_STATIC", raising=False)
    run = D.open_run(tiny_run)
    first = [D.default_sample(run.rows(s)) for s in (1, 2)]
    box = report.browse(run, overlay=False)
    (step, sample, _), signal = box.children[0].children, box.children[1]
    assert calls == [(2, first[1], "w", False)]  # the newest step with an image, drawn once
    step.value = 1
    assert calls[1:] == [(1, first[0], "w", False)]  # one redraw for a new step, not one per replaced option
    assert [v for _, v in sample.options] == [0, 1, 2, 3]
    signal.value = "delta"
    other = next(v for _, v in sample.options if v != sample.value)
    sample.value = other
    assert calls[2:] == [(1, first[0], "delta", False), (1, other, "delta", False)]


def test_w_histogram_has_a_log_axis(tiny_run):
    from mmrlsd.viz.figures import histograms_figure

    run = D.open_run(tiny_run)
    delta_ax, w_ax = histograms_figure(run).axes
    assert delta_ax.get_xscale() == "linear" and w_ax.get_xscale() == "log"
    w = [v for s in run.steps for r in run.rows(s) if r["adv"] != 0 for v in r["w"]]
    counts = sum(p.get_height() for p in w_ax.patches)
    assert counts == len(w) > 0  # every w_t is in a bin
    lo, hi = w_ax.get_xlim()
    assert lo <= min(w) and hi >= max(w) and lo < 1 < hi
