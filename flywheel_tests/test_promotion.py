"""The promotion gate's decision rule and the registry moves, without Dagster."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flywheel.lib.registry.promotion import CHALLENGER, CHAMPION, PREVIOUS, gate_decision, promote, serving_model
from flywheel.lib.registry.tracking import Tracker


def long_form(values: dict[str, np.ndarray], suite: str = "eval") -> pd.DataFrame:
    return pd.concat(
        [pd.DataFrame({"model": m, "suite": suite, "query_id": [f"q{i}" for i in range(len(v))], "ndcg@10": v})
         for m, v in values.items()],
        ignore_index=True,
    )


def test_gate_promotes_a_clear_improvement():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 200)
    pq = long_form({"base": base, "champion": base, "challenger": np.clip(base + 0.05 + rng.normal(0, 0.05, 200), 0, 1)})
    d = gate_decision(pq, "eval", margin=0.01, champion_label="base")
    assert d.promote and d.vs_champion["ci_low"] > 0 and "excludes a regression" in d.reason


def test_gate_blocks_a_regression_and_names_the_champion():
    rng = np.random.default_rng(1)
    champ = rng.uniform(0.3, 0.9, 200)
    pq = long_form({"base": champ - 0.1, "champion": champ, "challenger": champ - 0.08})
    d = gate_decision(pq, "eval", margin=0.01, champion_label="v2")
    assert not d.promote and d.vs_champion["ci_high"] < 0 and "v2" in d.reason


def test_gate_allows_a_tie_within_the_margin_but_not_below_base():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.3, 0.9, 400)
    noise = rng.normal(0, 0.02, 400)
    tie = long_form({"base": base, "champion": base, "challenger": base + noise - noise.mean()})
    assert gate_decision(tie, "eval", margin=0.02, champion_label="base").promote
    assert not gate_decision(tie, "eval", margin=0.0, champion_label="base").promote  # CI straddles 0
    # a challenger that beats a bad champion but is below the base is still refused
    worse_than_base = long_form({"base": base, "champion": base - 0.3, "challenger": base - 0.1})
    d = gate_decision(worse_than_base, "eval", margin=0.01, champion_label="v1")
    assert not d.promote and "base" in d.reason


@pytest.fixture
def tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), "flywheel-test")


def test_promotion_moves_champion_keeps_previous_and_serving_model_follows(tracker, tmp_path, base_model_path):
    from flywheel.lib.registry import index

    assert serving_model(tracker, "emb", base_model_path) == (base_model_path, "base")  # no champion yet
    versions = []
    for i in range(2):
        folder = tmp_path / f"m{i}"
        index.load_embedder(base_model_path).save_pretrained(str(folder))
        with tracker.run(f"r{i}", {"partition": "w"}):
            versions.append(tracker.log_embedder(folder, "emb"))
    assert tracker.alias_version("emb", CHALLENGER) == versions[1]
    assert promote(tracker, "emb", versions[0])["previous_champion"] is None
    assert serving_model(tracker, "emb", base_model_path) == (str((tmp_path / "m0").resolve()), f"v{versions[0]}")
    moved = promote(tracker, "emb", versions[1])
    assert moved["previous_champion"] == versions[0]
    assert tracker.alias_version("emb", CHAMPION) == versions[1]
    assert tracker.alias_version("emb", PREVIOUS) == versions[0]
    # the trained folder is gone: the MLflow copy serves
    import shutil

    shutil.rmtree(tmp_path / "m1")
    path, label = serving_model(tracker, "emb", base_model_path)
    assert label == f"v{versions[1]}" and index.load_embedder(path).encode(["x"]).shape == (1, 384)
