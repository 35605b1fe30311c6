"""Putting the views together: a standalone HTML page or PNG for `mmrlsd viz`, and the notebook's `show_*` and
`browse` helpers (IPython display; ipywidgets when installed, static output otherwise).

Every image the notebook shows carries output metadata `{"mmrlsd": "<view>"}` (`tokens`, `overlay`,
`comparison`, `curves`, `histograms`), so a test or a script can find each view in an executed notebook.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from pathlib import Path

from mmrlsd.errors import UnsafeCheckpointError
from mmrlsd.viz import figures as F
from mmrlsd.viz.data import SIGNALS, Run, default_sample, default_step
from mmrlsd.viz.html import header_html, token_html
from mmrlsd.viz.overlay import Overlay, image_overlay

log = logging.getLogger("mmrlsd.viz")


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" style="max-width:100%" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def try_overlay(run: Run, step: int, row: dict, signal: str = "w", **kw) -> tuple[Overlay | None, str]:
    """`(overlay, note)`: the overlay, or None and the reason (text-only sample, no checkpoint, missing image)."""
    if not row["images"]:
        return None, "text-only sample: no image to overlay"
    try:
        return image_overlay(run, step, row, signal=signal, **kw), ""
    except UnsafeCheckpointError:  # an altered run directory: refuse, do not quietly draw without it
        raise
    except (FileNotFoundError, ValueError) as e:
        log.warning("no image overlay: %s", e)
        return None, f"no image overlay: {e}"


def sample_html(run: Run, step: int, sample: int, signal: str = "w", overlay: bool = True, **kw) -> str:
    """A standalone HTML page: header, image overlay, hoverable coloured tokens, GRPO vs RLSD and P_S vs P_T."""
    row = run.row(step, sample)
    ov, note = try_overlay(run, step, row, signal, **kw) if overlay else (None, "overlay not requested")
    parts = [f"<h3>{html.escape(str(run.path))}</h3>", header_html(row, step)]
    parts.append(
        _img_tag(F.to_png(F.overlay_figure(row, ov)), "image overlay")
        if ov
        else f"<p><i>{html.escape(note)}</i></p>"
    )
    parts += [f"<h4>response coloured by {html.escape(SIGNALS[signal])}</h4>", token_html(row, signal)]
    parts.append(_img_tag(F.to_png(F.comparison_figure(row)), "GRPO vs RLSD; student vs teacher"))
    body = "\n".join(parts)
    return f'<!doctype html>\n<html><head><meta charset="utf-8"><title>mmrlsd viz step {step} sample {sample}</title></head>\n<body>\n{body}\n</body></html>\n'


def render(
    run: Run, step: int, sample: int, out: str | Path, signal: str = "w", overlay: bool = True, **kw
) -> Path:
    """Write the view of one response to `out`: `.html` (hoverable page) or `.png` (one composite figure).
    `kw` go to `image_overlay` (method, tokens, k, device)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".html":
        out.write_text(sample_html(run, step, sample, signal, overlay, **kw), encoding="utf-8")
    elif out.suffix.lower() == ".png":
        row = run.row(step, sample)
        ov = try_overlay(run, step, row, signal, **kw)[0] if overlay else None
        F.sample_figure(row, step, signal, ov).savefig(out, dpi=110, bbox_inches="tight")
    else:
        raise ValueError(f"{out}: output must end in .html or .png")
    return out


# ----- notebook helpers -----


def _show_png(png: bytes, view: str, html_alt: str | None = None) -> None:
    from IPython.display import display

    bundle = {"image/png": base64.b64encode(png).decode()}
    if html_alt is not None:
        bundle["text/html"] = html_alt  # frontends show the HTML (hover values); static readers get the PNG
    display(bundle, raw=True, metadata={"mmrlsd": view})


def show_sample(
    run: Run, step: int, sample: int | None = None, signal: str = "w", overlay: bool = True, **kw
) -> None:
    """Header, hoverable token view (with a PNG twin), image overlay, GRPO vs RLSD and P_S vs P_T of one response."""
    from IPython.display import HTML, display

    sample = default_sample(run.rows(step)) if sample is None else sample
    row = run.row(step, sample)
    display(HTML(header_html(row, step)))
    _show_png(F.to_png(F.token_figure(row, signal)), "tokens", token_html(row, signal))
    ov, note = try_overlay(run, step, row, signal, **kw) if overlay else (None, "overlay off")
    if ov is not None:
        _show_png(F.to_png(F.overlay_figure(row, ov)), "overlay")
    else:
        display(HTML(f"<i>{html.escape(note)}</i>"))
    _show_png(F.to_png(F.comparison_figure(row)), "comparison")


def show_curves(run: Run) -> None:
    _show_png(F.to_png(F.curves_figure(run)), "curves")


def show_histograms(run: Run, steps: list[int] | None = None) -> None:
    _show_png(F.to_png(F.histograms_figure(run, steps)), "histograms")


def browse(run: Run, overlay: bool = True):
    """Step, sample and signal pickers (ipywidgets) over `show_sample`. Without ipywidgets, or with
    `MMRLSD_VIZ_STATIC=1` (headless runs such as nbconvert/nbclient, where no frontend draws widgets), it shows the
    default step and sample statically instead. Returns the widget box (None when static)."""
    try:
        import ipywidgets as W
    except ImportError:
        W = None
    if W is None or os.environ.get("MMRLSD_VIZ_STATIC") == "1":
        why = "ipywidgets is not installed" if W is None else "MMRLSD_VIZ_STATIC=1"
        print(
            f"{why}: static view of the default step and sample (use show_sample(run, step, sample) for others)"
        )
        show_sample(run, default_step(run), signal="w", overlay=overlay)
        return None
    from IPython.display import display

    step = W.Dropdown(options=run.steps, value=default_step(run), description="step")
    sample = W.Dropdown(description="sample")
    signal = W.ToggleButtons(options=list(SIGNALS), value="w", description="signal")
    show_ov = W.Checkbox(value=overlay, description="image overlay")
    out = W.Output()
    hold = [False]  # no redraw while the sample list is being replaced

    def samples(change=None):
        rows = run.rows(step.value)
        hold[0] = True
        sample.options = [(f"{r['sample']} · {r['id']} · A={r['adv']:+.2f}", r["sample"]) for r in rows]
        sample.value = default_sample(rows)
        hold[0] = False
        if change is not None:
            redraw()

    def redraw(change=None):
        if hold[0]:
            return
        out.clear_output(wait=True)
        with out:
            show_sample(run, step.value, sample.value, signal.value, show_ov.value)

    samples()
    step.observe(samples, "value")
    for w in (sample, signal, show_ov):
        w.observe(redraw, "value")
    box = W.VBox([W.HBox([step, sample, show_ov]), signal, out])
    display(box)
    redraw()
    return box
