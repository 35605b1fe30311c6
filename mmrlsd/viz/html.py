"""Token colouring as HTML: each response token on a diverging colour map centred on its signal's neutral value,
the numbers in a hover tooltip (`title`), and a legend. No matplotlib or torch (the PNG twin is in `figures`).

The colour map runs red (below neutral) - near-white (neutral) - blue (above neutral), the end points of
ColorBrewer's RdBu, so it reads the same in the HTML, the figures and their colour bars.
"""

from __future__ import annotations

import html
import math

from mmrlsd.viz.data import SIGNALS, signal_values, token_label

LOW, MID, HIGH = (178, 24, 43), (247, 247, 247), (33, 102, 172)  # RdBu end points and centre


def diverging(x: float) -> tuple[int, int, int]:
    """RGB of `x` in [-1, 1] (clamped): -1 red, 0 near-white, +1 blue, linear in between.

    >>> diverging(0.0), diverging(-1.0), diverging(2.0)
    ((247, 247, 247), (178, 24, 43), (33, 102, 172))
    >>> diverging(0.5)  # halfway from (247, 247, 247) to (33, 102, 172)
    (140, 174, 210)
    """
    x = max(-1.0, min(1.0, x))
    end = HIGH if x > 0 else LOW
    a = abs(x)
    return tuple(round(m + a * (e - m)) for m, e in zip(MID, end))


def text_colour(rgb: tuple[int, int, int]) -> str:
    """Black on light backgrounds, white on dark ones (relative luminance threshold 0.45)."""
    lum = (0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]) / 255
    return "#000" if lum > 0.45 else "#fff"


def scale_of(centred: list[float], floor: float = 1e-6) -> float:
    """Half-width of the colour range: the largest |centred value| (at least `floor`, so all-neutral stays white)."""
    return max([abs(v) for v in centred] + [floor])


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def token_html(row: dict, signal: str = "w", vmax: float | None = None) -> str:
    """The response as coloured `<span>`s; hovering a token shows its index, text, the signal and Δ, w, Â, A,
    P_S, P_T. `vmax` fixes the colour half-range (in the centred units) to compare responses; default: this
    response's largest deviation."""
    shown, centred, _ = signal_values(row, signal)
    vmax = vmax or scale_of(centred)
    teacher = row.get("teacher_logp") or [None] * len(shown)
    spans = []
    for t, tok in enumerate(row["tokens"]):
        rgb = diverging(centred[t] / vmax)
        p_t = None if teacher[t] is None else math.exp(teacher[t])
        tip = (f"#{t} {token_label(tok)!r}\n{signal} = {shown[t]:.4g}\nΔ = {row['delta'][t]:.4g}  "
               f"w = {row['w'][t]:.4g}\nÂ = {row['token_adv'][t]:.4g}  A = {row['adv']:.4g}\n"
               f"P_S = {math.exp(row['student_logp'][t]):.4g}  P_T = {_fmt(p_t)}")  # fmt: skip
        style = f"background:rgb{rgb};color:{text_colour(rgb)};padding:1px 0;border-radius:2px"
        spans.append(f'<span class="tok" style="{style}" title="{html.escape(tip)}">'
                     f"{html.escape(token_label(tok))}</span>")  # fmt: skip
        if "\n" in tok:
            spans.append("<br>")
    body = "".join(spans)
    return (f'<div class="mmrlsd-tokens" style="font-family:monospace;white-space:pre-wrap;line-height:1.7;'
            f'border:1px solid #ddd;padding:6px">{body}</div>{legend_html(signal, vmax, row)}')  # fmt: skip


def legend_html(signal: str, vmax: float, row: dict | None = None) -> str:
    """A colour bar with its end values in the shown units (for w: e^±vmax; for Â: A ± vmax)."""
    neutral = 0.0
    lo, hi = -vmax, vmax
    if signal == "w":
        neutral, lo, hi = 1.0, math.exp(-vmax), math.exp(vmax)
    elif signal == "token_adv" and row is not None:
        neutral, lo, hi = row["adv"], row["adv"] - vmax, row["adv"] + vmax
    stops = ",".join(f"rgb{diverging(x / 4)}" for x in range(-4, 5))
    bar = f'<span style="display:inline-block;width:180px;height:12px;background:linear-gradient(to right,{stops})"></span>'
    return (f'<div style="font-family:sans-serif;font-size:12px;margin-top:4px">{html.escape(SIGNALS[signal])}: '
            f"{lo:.3g} {bar} {hi:.3g} (white = {neutral:.3g}; hover a token for its values)</div>")  # fmt: skip


def header_html(row: dict, step: int, extra: str = "") -> str:
    """Question, reference answer, reward, accuracy, extracted answer, A and λ of one response."""
    fields = [("step", step), ("sample", row["sample"]), ("id", row["id"]), ("reward", _fmt(row["reward"])),
              ("accuracy", _fmt(row["accuracy"])), ("A", _fmt(row["adv"])), ("λ", _fmt(row["lam"]))]  # fmt: skip
    cells = " · ".join(f"<b>{k}</b> {html.escape(str(v))}" for k, v in fields)
    return (f'<div style="font-family:sans-serif;font-size:13px">{cells}<br><b>question</b> '
            f"{html.escape(row['problem'])}<br><b>reference answer</b> {html.escape(str(row['answer']))} · "
            f"<b>extracted</b> {html.escape(str(row['extracted']))}{extra}</div>")  # fmt: skip
