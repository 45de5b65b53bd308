"""Report plots are real PNGs and the standalone HTML page renders tables and images."""

import math

from flywheel.lib.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rank_bins_count_every_query_once():
    counts = plots.bin_ranks([1, 2, 5, 7, 20, 35, 100, 101, math.nan])
    assert sum(counts) == 9
    assert counts[0] == 1 and counts[-1] == 2  # rank 1; and 101 + NaN are "not in the top 100"


def test_plots_are_pngs():
    ranks = plots.rank_distribution_plot({"base": [1, 20, 3], "trained": [1, 5, 2]}, "first relevant")
    curve = plots.recall_curve_plot({"base": {1: 0.3, 10: 0.7, 40: 0.9}}, "recall")
    trend = plots.trend_plot(["w1", "w2"], {"champion": [0.6, 0.65]}, [False, True], "trend")
    assert all(p.startswith(PNG_MAGIC) and len(p) > 2000 for p in (ranks, curve, trend))


def test_markdown_to_html_keeps_tables_images_and_escapes_text():
    png = plots.recall_curve_plot({"m": {1: 0.1, 5: 0.5}}, "r")
    md = "# Title\n\n**Promoted**: <yes>\n\n| metric | a |\n|---|---|\n| ndcg@10 | 0.5 |\n\n" + plots.markdown_image(png, "curve")
    page = plots.markdown_to_html(md, "report")
    assert "<h1>Title</h1>" in page and "<b>Promoted</b>: &lt;yes&gt;" in page
    assert "<td>ndcg@10</td><td>0.5</td>" in page
    assert '<img alt="curve" src="data:image/png;base64,' in page
