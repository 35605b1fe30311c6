"""See the credit: RLSD's per-token signals (w_t, Â_t, Δ_t) on the response text and, through one extra forward
pass, on the image. Read by `notebooks/token_credit.ipynb` and `mmrlsd viz`; everything is read from a run
directory (metrics.jsonl, rollouts/step_NNNNNN.jsonl, checkpoint-N/), nothing is recomputed except the overlay.

    from mmrlsd import viz
    run = viz.open_run("runs/tiny")
    viz.show_sample(run, step=run.steps[-1])        # in a notebook
    viz.render(run, 2, 0, "view.png", signal="w")   # anywhere

Modules: `data` (run, rows, signals; no torch), `html` (coloured tokens), `overlay` (attention / gradient x input
to the image tokens, mapped to pixels), `figures` (matplotlib), `report` (HTML/PNG pages, notebook helpers).
"""

from mmrlsd.viz.data import (
    SIGNALS,
    Run,
    checkpoint_for,
    default_run_dir,
    default_sample,
    default_step,
    newest_run,
    open_run,
    signal_values,
    top_tokens,
)
from mmrlsd.viz.figures import (
    comparison_figure,
    curves_figure,
    histograms_figure,
    overlay_figure,
    sample_figure,
    to_png,
    token_figure,
)
from mmrlsd.viz.html import token_html
from mmrlsd.viz.overlay import METHODS, Overlay, grid_to_pixels, image_overlay
from mmrlsd.viz.report import browse, render, sample_html, show_curves, show_histograms, show_sample

__all__ = [
    "METHODS", "SIGNALS", "Overlay", "Run", "browse", "checkpoint_for", "comparison_figure", "curves_figure",
    "default_run_dir", "default_sample", "default_step", "grid_to_pixels", "histograms_figure", "image_overlay", "newest_run",
    "open_run", "overlay_figure", "render", "sample_figure", "sample_html", "show_curves", "show_histograms",
    "show_sample", "signal_values", "to_png", "token_figure", "token_html", "top_tokens",
]  # fmt: skip
