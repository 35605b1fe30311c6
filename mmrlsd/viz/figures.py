"""Matplotlib figures: coloured tokens, the image overlay, GRPO vs RLSD credit, student vs teacher probabilities,
training curves and histograms of Δ and w. Each `draw_*` fills one Axes, so the notebook's single figures and the
composite of `mmrlsd viz --out FILE.png` share the drawing code. Figures are `matplotlib.figure.Figure` objects
(no pyplot state), so any backend works and nothing is shown twice in a notebook.
"""

from __future__ import annotations

import io
import math
import textwrap

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from mmrlsd.viz.data import SIGNALS, Run, signal_values, token_label
from mmrlsd.viz.html import HIGH, LOW, MID, scale_of
from mmrlsd.viz.overlay import Overlay, grid_to_pixels

CMAP = LinearSegmentedColormap.from_list(
    "mmrlsd_rdbu", [tuple(c / 255 for c in rgb) for rgb in (LOW, MID, HIGH)]
)
FONT = 9  # points; monospace glyphs are ~0.6 em wide
LINE_IN = 0.2  # inches per line of tokens
BAR_LINES = 4  # lines of the token view taken by its colour bar, ticks and label
CURVES = [
    ("reward", ["reward/mean"]), ("accuracy", ["reward/accuracy", "val/accuracy", "val/sample_accuracy"]),
    ("entropy", ["actor/entropy"]), ("response length", ["response/length_mean"]),
    ("clipped-w fraction", ["rlsd/w_clip_frac"]), ("leakage rate", ["leakage/rate"]),
]  # fmt: skip


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def layout_tokens(tokens: list[str], columns: int) -> list[tuple[int, int, str]]:
    """`(line, column, label)` per token for a monospace grid `columns` wide: a token that does not fit starts a
    new line, and a token containing a newline ends its line.

    >>> layout_tokens(["ab", "cd", "e\\n", "f"], 4)
    [(0, 0, 'ab'), (0, 2, 'cd'), (1, 0, 'e↵'), (2, 0, 'f')]
    """
    out, line, col = [], 0, 0
    for tok in tokens:
        label = token_label(tok) or "∅"
        if col and col + len(label) > columns:
            line, col = line + 1, 0
        out.append((line, col, label))
        col += len(label)
        if "\n" in tok:
            line, col = line + 1, 0
    return out


def token_lines(row: dict, columns: int) -> int:
    placed = layout_tokens(row["tokens"], columns)
    return placed[-1][0] + 1 if placed else 1


def draw_tokens(ax, row: dict, signal: str = "w", vmax: float | None = None, columns: int = 100) -> None:
    """The response as monospace text on coloured boxes (the PNG twin of `html.token_html`), with a colour bar."""
    shown, centred, neutral = signal_values(row, signal)
    vmax = vmax or scale_of(centred)
    placed = layout_tokens(row["tokens"], columns)
    n_lines = placed[-1][0] + 1 if placed else 1
    for (line, col, label), c in zip(placed, centred):
        rgb = CMAP(0.5 + 0.5 * max(-1.0, min(1.0, c / vmax)))
        ax.add_patch(Rectangle((col, line), len(label), 1, facecolor=rgb, edgecolor="white", linewidth=0.4))
        dark = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2] < 0.45
        ax.text(col + len(label) / 2, line + 0.5, label, ha="center", va="center", family="monospace",
                fontsize=FONT, color="white" if dark else "black")  # fmt: skip
    ax.set_xlim(0, columns)
    ax.set_ylim(n_lines + BAR_LINES, 0)  # the colour bar sits in the last BAR_LINES text lines
    ax.axis("off")
    cax = ax.inset_axes((0.3 * columns, n_lines + 0.7, 0.4 * columns, 0.6), transform=ax.transData)
    bar = ax.figure.colorbar(
        ScalarMappable(norm=Normalize(-vmax, vmax), cmap=CMAP), cax=cax, orientation="horizontal"
    )
    ticks = np.linspace(-vmax, vmax, 5)
    bar.set_ticks(ticks)
    if signal == "w":
        bar.set_ticklabels([f"{math.exp(t):.3g}" for t in ticks])
    else:
        bar.set_ticklabels([f"{neutral + t:.3g}" for t in ticks])
    bar.set_label(f"{SIGNALS[signal]} (white = {neutral:.3g})", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def draw_overlay(ax, image, grid: np.ndarray, title: str = "") -> None:
    """The image with the attribution grid mapped to its pixels (min-max scaled, `inferno`, 55 % opacity) and the
    image-token cell borders."""
    rgb = np.asarray(image.convert("RGB"))
    H, W = rgb.shape[:2]
    g = grid.astype(np.float64)
    span = g.max() - g.min()
    g = (g - g.min()) / span if span > 0 else np.zeros_like(g)
    ax.imshow(rgb, extent=(0, W, H, 0))
    ax.imshow(grid_to_pixels(g, H, W), cmap="inferno", alpha=0.55, vmin=0, vmax=1, extent=(0, W, H, 0),
              interpolation="nearest")  # fmt: skip
    gh, gw = grid.shape
    for i in range(1, gh):
        ax.axhline(i * H / gh, color="white", linewidth=0.5, alpha=0.6)
    for j in range(1, gw):
        ax.axvline(j * W / gw, color="white", linewidth=0.5, alpha=0.6)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def overlay_title(row: dict, ov: Overlay) -> str:
    toks = ", ".join(repr(token_label(row["tokens"][t])) for t in ov.tokens[:6])
    more = f" +{len(ov.tokens) - 6}" if len(ov.tokens) > 6 else ""
    return textwrap.fill(
        f"{ov.method} of tokens {toks}{more} to the image (checkpoint-{ov.checkpoint_step})", 60
    )


def _token_ticks(ax, row: dict, max_labels: int = 40) -> None:
    T = len(row["tokens"])
    step = max(1, math.ceil(T / max_labels))
    idx = list(range(0, T, step))
    ax.set_xticks(idx)
    ax.set_xticklabels([token_label(row["tokens"][i])[:12] for i in idx], rotation=90, fontsize=7,
                       family="monospace")  # fmt: skip


def draw_advantages(ax, row: dict) -> None:
    """GRPO vs RLSD on the same response: the uniform A on every token (dashed) and RLSD's Â_t (dots, coloured by
    Â_t − A as in the token view). The y range fits the data, so small shifts of credit stay visible."""
    shown, centred, _ = signal_values(row, "token_adv")
    vmax = scale_of(centred)
    x = np.arange(len(shown))
    ax.plot(x, shown, color="#888", linewidth=0.8, zorder=1)
    ax.scatter(x, shown, c=[CMAP(0.5 + 0.5 * c / vmax) for c in centred], edgecolors="#333", linewidths=0.4,
               s=22, zorder=2, label="RLSD Â_t")  # fmt: skip
    ax.axhline(row["adv"], color="black", linestyle="--", linewidth=1, label=f"GRPO A = {row['adv']:.3g}")
    lo, hi = min(shown + [row["adv"]]), max(shown + [row["adv"]])
    pad = 0.15 * (hi - lo) or 0.05 * abs(row["adv"]) or 0.1
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel("token advantage")
    ax.set_title(f"GRPO (uniform A) vs RLSD (Â_t), λ = {row['lam']:.3g}", fontsize=9)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    _token_ticks(ax, row)


def draw_probs(ax, row: dict) -> None:
    """Student and teacher log-probability of each sampled token; the gap between the lines is Δ_t."""
    x = np.arange(len(row["tokens"]))
    ax.plot(x, row["student_logp"], "o-", markersize=3, linewidth=1, label="student log P_S(y_t)")
    if row.get("teacher_logp") is not None:
        ax.plot(x, row["teacher_logp"], "s-", markersize=3, linewidth=1, label="teacher log P_T(y_t)")
    else:
        ax.text(0.5, 0.5, "no teacher pass in this run (GRPO)", transform=ax.transAxes, ha="center")
    ax.set_ylabel("log-probability")
    ax.set_title("student vs teacher token log-probabilities (gap = Δ_t)", fontsize=9)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    _token_ticks(ax, row)


def draw_header(ax, row: dict, step: int, width: int = 70) -> None:
    """Question, reference answer, reward, accuracy and A as text."""
    lines = [f"step {step} · sample {row['sample']} · id {row['id']}",
             f"reward {row['reward']:.3g} · accuracy {row['accuracy']:.3g} · A {row['adv']:.3g} · λ {row['lam']:.3g}",
             "", *textwrap.wrap(f"question: {row['problem']}", width)[:8],
             *textwrap.wrap(f"reference answer: {row['answer']}", width)[:3],
             *textwrap.wrap(f"extracted: {row['extracted']}", width)[:2]]  # fmt: skip
    ax.text(
        0, 1, "\n".join(lines), va="top", ha="left", fontsize=9, family="sans-serif", transform=ax.transAxes
    )
    ax.axis("off")


def columns_for(width_in: float) -> int:
    """Monospace characters that fit `width_in` inches at `FONT` points (a glyph is ~0.6 em wide)."""
    return max(20, int(width_in * 72 / (0.6 * FONT)))


def tokens_height(row: dict, columns: int) -> float:
    """Inches for the token view: `LINE_IN` per line of tokens and of the colour bar."""
    return LINE_IN * (token_lines(row, columns) + BAR_LINES)


def token_figure(row: dict, signal: str = "w", width: float = 10.0) -> Figure:
    columns = columns_for(width - 0.2)
    fig = Figure(figsize=(width, tokens_height(row, columns)), layout="constrained")
    draw_tokens(fig.add_subplot(), row, signal, columns=columns)
    return fig


def overlay_figure(row: dict, ov: Overlay) -> Figure:
    fig = Figure(figsize=(3.6 * len(ov.images), 3.9))
    for i, (img, grid) in enumerate(zip(ov.images, ov.grids)):
        draw_overlay(
            fig.add_subplot(1, len(ov.images), i + 1), img, grid, overlay_title(row, ov) if i == 0 else ""
        )
    return fig


def comparison_figure(row: dict) -> Figure:
    """GRPO vs RLSD credit (left) and student vs teacher probabilities (right) for one response."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    a, b = fig.subplots(1, 2)
    draw_advantages(a, row)
    draw_probs(b, row)
    return fig


def curves_figure(run: Run) -> Figure:
    """Training curves from metrics.jsonl (null values skipped); panels with no data say so."""
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    for ax, (title, keys) in zip(fig.subplots(2, 3).ravel(), CURVES):
        for key in keys:
            pts = [(m["step"], m[key]) for m in run.metrics if m.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-" if len(pts) < 30 else "-", markersize=3, label=key)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", color="#888")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(str(run.path), fontsize=9)
    return fig


def histograms_figure(run: Run, steps: list[int] | None = None) -> Figure:
    """Histograms of Δ_t over all response tokens and of w_t over tokens of responses with A ≠ 0 (where the weight
    acts), over the dumps of `steps` (default: all), with the neutral value and the clip range 1 ± ε_w."""
    steps = steps or run.steps
    rows = [r for s in steps for r in run.rows(s)]
    delta = np.array([d for r in rows for d in r["delta"]], dtype=float)
    w = np.array([v for r in rows if r["adv"] != 0 for v in r["w"]], dtype=float)
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    a, b = fig.subplots(1, 2)
    for ax, vals, name, marks in (
        (a, delta, "Δ_t", [0.0]),
        (b, w, "w_t (A ≠ 0, log axis)", [1 - run.eps_w, 1.0, 1 + run.eps_w]),
    ):
        n_bins = min(60, max(10, vals.size // 5))
        if ax is b:  # w = exp(±Δ): on a log axis w = 2 and w = 1/2 sit equally far from 1
            ax.set_xscale("log")
            vals = vals[vals > 0]  # an underflowed exp(Δ) has no place on a log axis
            span = [*marks, *vals[[vals.argmin(), vals.argmax()]]] if vals.size else marks
            lo, hi = min(span), max(span)
            bins = np.geomspace(lo if lo < hi else lo / 2, hi if lo < hi else hi * 2, n_bins + 1)
        else:
            bins = n_bins
        if vals.size:
            ax.hist(vals, bins=bins, color="#4477aa")
        for m in marks:
            ax.axvline(m, color="black" if m in (0.0, 1.0) else "#cc3311", linestyle="--", linewidth=1)
        ax.set_title(
            f"{name}: {vals.size} tokens, steps {steps[0]}..{steps[-1]}" if steps else name, fontsize=9
        )
    b.set_xlabel(f"dashed red: clip range 1 ± ε_w = 1 ± {run.eps_w:g}", fontsize=8)
    return fig


def sample_figure(
    row: dict, step: int, signal: str = "w", ov: Overlay | None = None, columns: int = 110
) -> Figure:
    """One response on one page: image overlay and header, coloured tokens, GRPO vs RLSD, P_S vs P_T."""
    n_lines = token_lines(row, columns)
    tok_h = 0.9 + 0.22 * n_lines
    fig = Figure(figsize=(13, 3.6 + tok_h + 3.4))
    gs = fig.add_gridspec(
        3, 2, height_ratios=[3.6, tok_h, 3.4], width_ratios=[1, 1.6], hspace=0.45, wspace=0.1
    )
    if ov is not None and ov.images:
        sub = gs[0, 0].subgridspec(1, len(ov.images), wspace=0.05)
        for i, (img, grid) in enumerate(zip(ov.images, ov.grids)):
            draw_overlay(fig.add_subplot(sub[0, i]), img, grid, overlay_title(row, ov) if i == 0 else "")
    else:
        ax = fig.add_subplot(gs[0, 0])
        ax.text(
            0.5, 0.5, "no image" if not row["images"] else "overlay not computed", ha="center", va="center"
        )
        ax.axis("off")
    draw_header(fig.add_subplot(gs[0, 1]), row, step)
    draw_tokens(fig.add_subplot(gs[1, :]), row, signal, columns=columns)
    draw_advantages(fig.add_subplot(gs[2, 0]), row)
    draw_probs(fig.add_subplot(gs[2, 1]), row)
    return fig
