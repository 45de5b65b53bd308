"""Plots for the reports (PNG, matplotlib's headless backend) and a standalone HTML page.

PNGs are embedded as data URIs so one Markdown string shows them in the Dagster UI, in the
MLflow run and in a file a person opens, with nothing else to keep next to it.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Mapping, Sequence

RANK_BINS = [(1, 1), (2, 2), (3, 3), (4, 5), (6, 10), (11, 20), (21, 40), (41, 100)]


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _figure().close(fig)
    return buf.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def rank_bin_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def bin_ranks(ranks: Sequence[float]) -> list[int]:
    """Counts per RANK_BINS plus a last bin for 'not in the top 100' (NaN or > 100)."""
    counts = [0] * (len(RANK_BINS) + 1)
    for r in ranks:
        if r is None or (isinstance(r, float) and math.isnan(r)) or r > RANK_BINS[-1][1]:
            counts[-1] += 1
            continue
        for i, (lo, hi) in enumerate(RANK_BINS):
            if lo <= r <= hi:
                counts[i] += 1
                break
    return counts


def rank_distribution_plot(ranks_by_model: Mapping[str, Sequence[float]], title: str) -> bytes:
    """Where the first relevant chunk lands, per model: the 'position 20 to position 5' picture."""
    plt = _figure()
    labels = [rank_bin_label(lo, hi) for lo, hi in RANK_BINS] + [">100"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(ranks_by_model), 1)
    for i, (name, ranks) in enumerate(ranks_by_model.items()):
        counts = bin_ranks(list(ranks))
        ax.bar([x + i * width for x in range(len(labels))], counts, width=width, label=name)
    ax.set_xticks([x + width * (len(ranks_by_model) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_xlabel("rank of the first relevant chunk")
    ax.set_ylabel("queries")
    ax.set_title(title)
    ax.legend()
    return _png(fig)


def recall_curve_plot(curves: Mapping[str, Mapping[int, float]], title: str) -> bytes:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, curve in curves.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(sorted({k for c in curves.values() for k in c}), [str(k) for k in sorted({k for c in curves.values() for k in c})])
    ax.set_xlabel("k")
    ax.set_ylabel("Recall@k")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    return _png(fig)


def trend_plot(weeks: Sequence[str], series: Mapping[str, Sequence[float]], promoted: Sequence[bool], title: str) -> bytes:
    """NDCG@10 per week; a marker where the champion changed."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for name, values in series.items():
        ax.plot(range(len(weeks)), values, marker="o", label=name)
    first = next(iter(series.values()), [])
    for i, p in enumerate(promoted):
        if p and i < len(first):
            ax.annotate("promoted", (i, first[i]), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xticks(range(len(weeks)), weeks, rotation=30, ha="right")
    ax.set_ylabel("NDCG@10 (test split)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    return _png(fig)


_IMAGE = re.compile(r"!\[([^\]]*)\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline(text: str) -> str:
    out, last = [], 0
    for m in _IMAGE.finditer(text):
        out.append(_BOLD.sub(r"<b>\1</b>", html.escape(text[last:m.start()])))
        out.append(f'<img alt="{html.escape(m.group(1))}" src="{m.group(2)}">')
        last = m.end()
    out.append(_BOLD.sub(r"<b>\1</b>", html.escape(text[last:])))
    return "".join(out)


def markdown_to_html(markdown: str, title: str) -> str:
    """A standalone page for the Markdown this project writes: headings, tables, images, text."""
    body, table = [], []

    def flush_table():
        if not table:
            return
        rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table if not set(r.strip()) <= set("|-: ")]
        head, *rest = rows
        body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                    + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rest)
                    + "</tbody></table>")
        table.clear()

    for line in markdown.splitlines():
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        flush_table()
        if not line.strip():
            continue
        level = len(line) - len(line.lstrip("#"))
        if 0 < level <= 6 and line[level:level + 1] == " ":
            body.append(f"<h{level}>{_inline(line[level + 1:])}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        else:
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th:first-child,td:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>")
