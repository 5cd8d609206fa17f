"""`argen report`: one self-contained HTML page — sample grids per class, the metric table, and a
speed-vs-quality plot across sampler settings (inline SVG, so no plotting library is needed)."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

from PIL import Image


@dataclass
class Point:
    label: str
    x: float  # seconds per image (or NFE)
    y: float  # Fréchet distance
    y_err: float = 0.0


def png_data_uri(image: Image.Image, scale: int = 2) -> str:
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = (hi - lo) / count
    magnitude = 10 ** int(f"{step:e}".split("e")[1])
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=step)
    start = (lo // step) * step
    ticks, t = [start], start
    while ticks[-1] < hi - 1e-12:  # the last tick reaches past the largest value, so no point is cut off
        t += step
        ticks.append(round(t, 10))
    return ticks


def scatter_svg(
    points: list[Point], x_label: str, y_label: str, width: int = 640, height: int = 400, y_from_zero: bool = True
) -> str:
    """A labelled scatter plot with error bars, as an SVG string. `y_from_zero=False` zooms the y axis onto the
    points (for values that differ by little)."""
    if not points:
        return "<p>no points</p>"
    left, right, top, bottom = 70, 150, 20, 50  # room on the right for the point labels
    xs = [p.x for p in points]
    ys = [p.y - p.y_err for p in points] + [p.y + p.y_err for p in points]
    xt = _nice_ticks(min(0.0, min(xs)), max(xs) * 1.1)
    if y_from_zero:
        yt = _nice_ticks(min(0.0, min(ys)), max(ys) * 1.1)
    else:
        margin = 0.1 * (max(ys) - min(ys) or abs(max(ys)) or 1.0)
        yt = _nice_ticks(min(ys) - margin, max(ys) + margin)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def sy(v: float) -> float:
        return height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12" role="img" aria-label="{html.escape(y_label)} vs {html.escape(x_label)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
    ]
    for t in xt:
        parts.append(
            f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{height - bottom}" stroke="#eee"/>'
            f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{t:g}</text>'
        )
    for t in yt:
        parts.append(
            f'<line x1="{left}" y1="{sy(t):.1f}" x2="{width - right}" y2="{sy(t):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
        )
    parts.append(
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
        f'stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>'
    )
    parts.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">{html.escape(x_label)}</text>'
    )
    parts.append(
        f'<text transform="translate(16,{(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">'
        f"{html.escape(y_label)}</text>"
    )
    for p in points:
        cx, cy = sx(p.x), sy(p.y)
        if p.y_err:
            parts.append(
                f'<line x1="{cx:.1f}" y1="{sy(p.y - p.y_err):.1f}" x2="{cx:.1f}" '
                f'y2="{sy(p.y + p.y_err):.1f}" stroke="#1f77b4"/>'
            )
        parts.append(
            f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="#1f77b4">'
            f"<title>{html.escape(p.label)}: x={p.x:.4g}, y={p.y:.4g}</title></circle>"
            f'<text x="{cx + 7:.1f}" y="{cy - 7:.1f}" font-size="11">{html.escape(p.label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_page(title: str, sections: list[tuple[str, str]]) -> str:
    """sections: (heading, inner HTML) pairs."""
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
        "text-align:left}th{background:#f4f4f4}img{image-rendering:pixelated}figure{margin:1em 0}"
    )
    body = "".join(f"<section><h2>{html.escape(h)}</h2>{inner}</section>" for h, inner in sections)
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
