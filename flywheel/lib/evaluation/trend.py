"""The flywheel over weeks: one row per week, a table, a plot, and the figures as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from flywheel.lib.evaluation import plots
from flywheel.lib.store import atomic_write_bytes


@dataclass
class WeekRow:
    week: str
    searches: int
    labels: int
    judge_kappa: float
    served_by: str  # the champion that retrieved this week's traffic
    challenger_ndcg10_test: float
    champion_ndcg10_test: float  # the champion after this week's gate
    promoted: bool
    champion: str
    gate: str  # the gate's reason, one line
    poisoned: bool = False
    seconds: float = 0.0


def render_trend(rows: list[WeekRow], *, base_ndcg10_test: float, config_note: str) -> str:
    weeks = [r.week for r in rows]
    png = plots.trend_plot(
        weeks,
        {
            "champion after the week": [r.champion_ndcg10_test for r in rows],
            "challenger trained that week": [r.challenger_ndcg10_test for r in rows],
            "base": [base_ndcg10_test] * len(rows),
        },
        [r.promoted for r in rows],
        "NDCG@10 on the held-out test split, week by week",
    )
    changes = sum(r.promoted for r in rows)
    last = rows[-1] if rows else None
    lines = [
        "# flywheel trend",
        "",
        f"**{len(rows)} weeks, {changes} champion changes; champion NDCG@10 on the test split "
        f"{base_ndcg10_test:.4f} (base) -> {last.champion_ndcg10_test:.4f} ({last.champion}).**" if last else "**no weeks**",
        "",
        config_note,
        "",
        plots.markdown_image(png, "NDCG@10 per week"),
        "",
        "| week | searches | labels | judge kappa | served by | challenger NDCG@10 | gate | champion after | champion NDCG@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gate = "promoted" if r.promoted else "blocked"
        week = f"{r.week} (poisoned)" if r.poisoned else r.week
        lines.append(
            f"| {week} | {r.searches} | {r.labels} | {r.judge_kappa:.3f} | {r.served_by} | "
            f"{r.challenger_ndcg10_test:.4f} | {gate} | {r.champion} | {r.champion_ndcg10_test:.4f} |"
        )
    lines += ["", "## Gate decisions", ""]
    lines += [f"- {r.week}: {'promoted' if r.promoted else 'blocked'}: {r.gate}" for r in rows]
    return "\n".join(lines)


def write_trend(rows: list[WeekRow], out_dir: Path, *, base_ndcg10_test: float, config_note: str) -> dict[str, Path]:
    md = render_trend(rows, base_ndcg10_test=base_ndcg10_test, config_note=config_note)
    paths = {"md": Path(out_dir) / "trend.md", "html": Path(out_dir) / "trend.html", "json": Path(out_dir) / "trend.json"}
    atomic_write_bytes(paths["md"], md.encode("utf-8"))
    atomic_write_bytes(paths["html"], plots.markdown_to_html(md, "flywheel trend").encode("utf-8"))
    payload = {"base_ndcg10_test": base_ndcg10_test, "weeks": [asdict(r) for r in rows]}
    atomic_write_bytes(paths["json"], json.dumps(payload, indent=2).encode("utf-8"))
    return paths
