"""The flywheel over weeks: one row per week, a table, a plot, and the figures as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
    # the gate against the human-labelled test split (see flywheel.lib.evaluation.weekly.gate_error)
    eval_delta: float = float("nan")  # challenger - champion NDCG@10 on the pooled eval sets
    eval_ci_low: float = float("nan")
    eval_ci_high: float = float("nan")
    test_delta: float = float("nan")  # the same on the test split
    test_ci_low: float = float("nan")
    test_ci_high: float = float("nan")
    gate_error: str | None = None
    min_detectable_change: float = float("nan")
    pooled_judge_requests: int = 0
    label_calls: int = 0
    reranker: str = "none"  # the reranker serving after the week
    serving_ndcg10_test: float = float("nan")  # the whole serving pipeline after the week
    # the same check for the other components' decisions (keyword fusion, reranker) against their
    # first stage alone on the test split
    component_gate_errors: list[str] = field(default_factory=list)


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
        "| week | searches | labels | judge kappa | served by | challenger NDCG@10 | gate | champion after | champion NDCG@10 "
        "| reranker serving | serving NDCG@10 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gate = "promoted" if r.promoted else "blocked"
        week = f"{r.week} (poisoned)" if r.poisoned else r.week
        lines.append(
            f"| {week} | {r.searches} | {r.labels} | {r.judge_kappa:.3f} | {r.served_by} | "
            f"{r.challenger_ndcg10_test:.4f} | {gate} | {r.champion} | {r.champion_ndcg10_test:.4f} | "
            f"{r.reranker} | {r.serving_ndcg10_test:.4f} |"
        )
    errors = [r for r in rows if r.gate_error]
    lines += ["", "## Gate accuracy against the test split", "",
              f"{len(errors)} gate errors in {len(rows)} weeks (a promotion of a challenger the human-labelled test "
              "split shows significantly worse than the champion, or a block of one it shows significantly better; "
              "paired bootstrap, 95%; compared as the gate compared them, fused with BM25 while keyword fusion "
              "serves).", "",
              "| week | gate | eval change [95% CI] | test change [95% CI] | min detectable (eval) | pooled judge requests "
              "| labelling calls | error |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.week} | {'promoted' if r.promoted else 'blocked'} | {r.eval_delta:+.4f} [{r.eval_ci_low:+.4f}, "
            f"{r.eval_ci_high:+.4f}] | {r.test_delta:+.4f} [{r.test_ci_low:+.4f}, {r.test_ci_high:+.4f}] | "
            f"{r.min_detectable_change:.4f} | {r.pooled_judge_requests} | {r.label_calls} | {r.gate_error or '-'} |")
    comp = [(r.week, e) for r in rows for e in r.component_gate_errors]
    lines += ["", f"Other components (keyword fusion, reranker; each against its first stage alone on the test split): "
              f"{len(comp)} gate errors" + (":" if comp else "."), ""]
    lines += [f"- {w}: {e}" for w, e in comp]
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
