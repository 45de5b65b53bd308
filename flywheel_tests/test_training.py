"""Training pieces on their own, with tiny configs: mining with a false-negative filter, the
negative mix, near-duplicate exclusion, the bi-encoder with early stopping, the forgetting guard
and weight merging (properties that hold by construction, never the outcome of a noisy run), the
cross-encoder reranker, and the progress lines that replace the libraries' bars."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd
import pytest
import torch

from flywheel.config import RerankerSettings, TrainingSettings
from flywheel.lib.beir import load_beir
from flywheel.lib.datasets.mining import MiningConfig, build_training_rows, training_rows
from flywheel.lib.datasets.tiers import build_finetune_set, jaccard, near_duplicate_queries, query_tokens
from flywheel.lib.labels.judges import normalize_query
from flywheel.lib.progress import Progress
from flywheel.lib.registry import index
from flywheel.lib.training import forgetting
from flywheel.lib.training.cross_encoder import RerankerConfig, head_optimizer, labelled_pairs, train_reranker
from flywheel.lib.training.embedder import TrainConfig, split_validation, train_bi_encoder
from flywheel.lib.training.reranker import load_reranker, rerank

NO_BUDGET = 1e9  # a time budget no test run reaches: the planned steps are the steps run


def train_cfg(base_model, out, *, seed: int = 0, run: dict | None = None, **settings) -> TrainConfig:
    """A TrainConfig from the default settings with a few changed (shared-tower MNRL unless asked)."""
    s = TrainingSettings().with_(**{"loss": "mnrl", "time_budget_s": NO_BUDGET, **settings})
    return TrainConfig(settings=s, base_model=str(base_model), output_dir=out, seed=seed, **(run or {}))


def reranker_cfg(base_model, out, *, init_model=None, **settings) -> RerankerConfig:
    return RerankerConfig(settings=RerankerSettings().with_(**{"loss": "bce", **settings}), training=TrainingSettings(),
                          base_model=str(base_model), output_dir=out, seed=0, init_model=init_model)


def mining_cfg(**changes) -> MiningConfig:
    return MiningConfig.from_settings(TrainingSettings().with_(max_seq_length=64), **changes)


@pytest.fixture(scope="module")
def rows(small_beir):
    """Triplets from the small SciFact slice's human labels (positives) and random negatives."""
    ds = load_beir(small_beir)
    texts = ds.corpus.text_by_id
    rng = np.random.default_rng(0)
    ids = list(ds.corpus.ids)
    out = []
    for qid, docs in ds.qrels["train"].items():
        for did in docs:
            for _ in range(2):
                neg = ids[int(rng.integers(len(ids)))]
                out.append({
                    "query": ds.queries[qid], "query_key": normalize_query(ds.queries[qid]),
                    "positive_id": did, "positive": texts[did], "negative_id": neg, "negative": texts[neg],
                    "negative_rank": 1, "week": "2026-09-28",
                })
    return pd.DataFrame(out)


def test_near_duplicates_are_caught_by_token_jaccard():
    assert jaccard(query_tokens("Aspirin lowers the risk of stroke"), query_tokens("aspirin lowers risk of stroke")) >= 0.8
    held = ["Aspirin lowers the risk of stroke.", "Vitamin D prevents fractures"]
    found = near_duplicate_queries(
        ["aspirin lowers the risk of stroke", "Aspirin lowers the risk of a stroke", "Statins reduce LDL"], held,
    )
    assert found == {"aspirin lowers the risk of stroke", "Aspirin lowers the risk of a stroke"}


def test_finetune_set_drops_near_duplicates_of_held_out_queries():
    labels = pd.DataFrame([
        {"week": "w", "request_id": 1, "query": q, "query_key": normalize_query(q), "chunk_id": c,
         "chunk_text": c, "rank": r, "grade": g}
        for q in ("Aspirin lowers the risk of a stroke", "Statins reduce LDL cholesterol")
        for c, r, g in (("pos", 1, 3), ("neg", 2, 0))
    ])
    out, stats = build_finetune_set(
        labels, n_examples=10, seed=0, exclude_queries=set(),
        near_duplicate_of=["aspirin lowers the risk of stroke"], near_duplicate_jaccard=0.8,
    )
    assert set(out["query"]) == {"Statins reduce LDL cholesterol"}
    assert stats.near_duplicates_excluded == 1


def test_mined_negatives_alternate_with_judged_and_skip_judged_relevant(rows, small_beir, base_model_path):
    ds = load_beir(small_beir)
    ft = rows.head(40)
    # judge "related" for every chunk the base ranks 1st for each query: none of them may be mined
    model = index.load_embedder(base_model_path, max_seq_length=64)
    qv = index.encode(model, ft["query"].unique().tolist())
    dv = index.encode(model, list(ds.corpus.texts))
    top = {q: ds.corpus.ids[int(np.argmax(dv @ v))] for q, v in zip(ft["query"].unique(), qv)}
    judged = pd.DataFrame([{"query_key": normalize_query(q), "chunk_id": c, "grade": 1} for q, c in top.items()])
    out, stats = build_training_rows(
        ft, judged, base_model_path, list(ds.corpus.ids), list(ds.corpus.texts),
        mining_cfg(range_max=10, num_negatives=3),
    )
    assert len(out) == len(ft)  # mining never adds rows: the example count stays what finetune_set says
    assert stats["mined_negatives"] > 0 and stats["judged_negatives"] > 0
    assert stats["mined_negatives"] + stats["judged_negatives"] == len(ft)
    mined = out[out["negative_source"] == "mined"]
    forbidden = set(zip(judged["query_key"], judged["chunk_id"]))
    assert not any((k, n) in forbidden for k, n in zip(mined["query_key"], mined["negative_id"]))
    assert (mined["negative_id"] != mined["positive_id"]).all()
    # the first row of each (query, positive) keeps its judged negative
    first = out.groupby(["query_key", "positive_id"]).head(1)
    assert (first["negative_source"] == "judged").all()


def test_mining_cache_is_per_model_not_per_base_name(rows, small_beir, base_model_path, tmp_path):
    # a fine-tuned champion carries the base's name in its model card; sentence-transformers' cache
    # is keyed by that name, so a shared folder would hand the champion the base's embeddings
    ds = load_beir(small_beir)
    tuned = index.load_embedder(base_model_path)
    import torch

    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(1.01)
    tuned.save_pretrained(str(tmp_path / "champion"))
    cache = tmp_path / "cache"
    args = (rows.head(10), None)
    corpus = (list(ds.corpus.ids), list(ds.corpus.texts))
    build_training_rows(*args, base_model_path, *corpus, mining_cfg(range_max=5), cache_folder=str(cache))
    build_training_rows(*args, str(tmp_path / "champion"), *corpus, mining_cfg(range_max=5), cache_folder=str(cache))
    folders = sorted(p.name for p in cache.iterdir())
    assert len(folders) == 2 and all(list((cache / f).glob("corpus_embeddings_*.npy")) for f in folders)


def test_training_rows_without_mining_are_the_finetune_set(rows):
    out, stats = training_rows(rows, None)
    assert stats.mined_negatives == 0 and stats.judged_negatives == len(rows)
    assert (out["negative_id"] == rows["negative_id"]).all()


def test_bi_encoder_trains_with_validation_estimate_and_general_slice(rows, tmp_path, base_model_path, capsys):
    cfg = train_cfg(base_model_path, tmp_path / "emb", batch_size=16, max_seq_length=64, max_steps=8,
                    validation_fraction=0.2, run={"evaluations": 2, "validation_distractors": 50})
    said: list[str] = []
    res = train_bi_encoder(rows, cfg, progress=said.append)
    assert res.steps == 8 and res.estimated_seconds > 0
    assert "validation_cosine_ndcg@10" in res.validation_before and "validation_cosine_ndcg@10" in res.validation_after
    assert [h["step"] for h in res.eval_history] == [4, 8]  # validated during training (early stopping)
    assert 0 < res.general_before <= 1 and 0 <= res.general_after <= 1
    assert (res.model_dir / "modules.json").exists() and not list(res.model_dir.glob("*.pkl"))
    saved = json.loads((res.model_dir / "flywheel_training.json").read_text())
    assert saved["train_rows"] + saved["validation_rows"] == len(rows)
    assert saved["config"]["loss"] == "mnrl" and saved["config"]["seed"] == 0
    # progress comes as the project's own lines, never as the trainer's raw {'loss': ...} dicts
    assert any(line.startswith("train: 8/8 steps (100%)") and "loss " in line for line in said), said
    assert "{'loss'" not in capsys.readouterr().out
    # then merged with the base (WiSE-FT) at the default weight, validated before and after
    assert saved["merge_alpha"] == res.merge_alpha == TrainingSettings().wise_ft_alpha < 1
    assert 0 <= saved["validation_unmerged"] <= 1
    assert any(line.startswith("merged with the base (WiSE-FT") for line in said), said
    # validation queries are whole training queries: none of them trains
    tr, va = split_validation(rows, 0.2, 0)
    assert not set(tr["query_key"]) & set(va["query_key"])


class _Slice:
    """A stand-in general-slice evaluator that reports fixed NDCG@10 values, one per call."""

    primary_metric = "general_cosine_ndcg@10"

    def __init__(self, *values: float):
        self.values = list(values)
        self.calls = 0

    def __call__(self, model):
        self.calls += 1
        return {self.primary_metric: self.values.pop(0)}


def _shifted(base_model_path, by: float = 0.5):
    model = index.load_embedder(base_model_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)
    return model


def _floats(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def test_merging_with_alpha_0_gives_the_base_and_alpha_1_the_fine_tuned_weights(base_model_path):
    base = _floats(index.load_embedder(base_model_path))
    tuned = _shifted(base_model_path)
    before = _floats(tuned)
    assert forgetting.merge_with_base(tuned, base_model_path, 1.0) == len(base)
    assert all(torch.equal(v, before[k]) for k, v in _floats(tuned).items())  # alpha 1: the fine-tuned model
    forgetting.merge_with_base(tuned, base_model_path, 0.0)
    assert all(torch.equal(v, base[k]) for k, v in _floats(tuned).items())  # alpha 0: exactly the base
    half = _shifted(base_model_path)
    forgetting.merge_with_base(half, base_model_path, 0.5)
    assert all(torch.allclose(v, base[k] + 0.25, atol=1e-6) for k, v in _floats(half).items())  # the midpoint
    with pytest.raises(ValueError, match="merge_alpha"):
        forgetting.merge_with_base(half, base_model_path, 1.5)


def test_wise_ft_merges_at_its_weight_and_records_validation_before_and_after(base_model_path):
    base = _floats(index.load_embedder(base_model_path))
    name = next(iter(base))

    def offset(model) -> float:  # how far the weights sit from the base (0.5 for _shifted)
        return float((_floats(model)[name] - base[name]).mean())

    tuned, said = _shifted(base_model_path), []
    out = forgetting.wise_ft(tuned, base_model_path, 0.6, offset, say=said.append)
    assert out.alpha == 0.6 and out.tensors_merged == len(base)
    assert out.validation_finetuned == pytest.approx(0.5, abs=1e-6) and out.validation_merged == pytest.approx(0.3, abs=1e-6)
    assert all(torch.allclose(v, base[k] + 0.3, atol=1e-6) for k, v in _floats(tuned).items())
    assert said and "fine-tuned weight 0.6" in said[0]
    # nothing held out: merged all the same, with no validation figures
    quiet = _shifted(base_model_path)
    out = forgetting.wise_ft(quiet, base_model_path, 0.5)
    assert out.tensors_merged == len(base) and out.validation_finetuned != out.validation_finetuned
    assert all(torch.allclose(v, base[k] + 0.25, atol=1e-6) for k, v in _floats(quiet).items())
    # weight 1: the model as trained, not even scored
    kept = _shifted(base_model_path)
    before = _floats(kept)
    out = forgetting.wise_ft(kept, base_model_path, 1.0, lambda m: 1 / 0)
    assert out.alpha == 1.0 and out.tensors_merged == 0
    assert all(torch.equal(v, before[k]) for k, v in _floats(kept).items())


def test_forgetting_guard_merges_when_the_drop_exceeds_the_margin_and_not_otherwise(base_model_path):
    assert forgetting.forgets(0.80, 0.77, margin=0.02) and not forgetting.forgets(0.80, 0.79, margin=0.02)
    assert not forgetting.forgets(0.80, 0.78, margin=0.02)  # a drop of exactly the margin is allowed
    assert not forgetting.forgets(float("nan"), 0.1, margin=0.02) and not forgetting.forgets(0.8, float("nan"), 0.02)
    base = _floats(index.load_embedder(base_model_path))

    kept = _shifted(base_model_path)
    before = _floats(kept)
    out = forgetting.guard(kept, base_model_path, _Slice(0.79), 0.80, margin=0.02, alpha=0.5)
    assert (out.merged, out.finetuned, out.after) == (False, 0.79, 0.79)
    assert all(torch.equal(v, before[k]) for k, v in _floats(kept).items())  # untouched

    merged = _shifted(base_model_path)
    said: list[str] = []
    out = forgetting.guard(merged, base_model_path, _Slice(0.50, 0.75), 0.80, margin=0.02, alpha=0.5, say=said.append)
    assert (out.merged, out.finetuned, out.after, out.tensors_merged) == (True, 0.50, 0.75, len(base))
    assert all(torch.allclose(v, base[k] + 0.25, atol=1e-6) for k, v in _floats(merged).items())
    assert said and "merged" in said[0]


def test_bi_encoder_records_what_the_guard_decided(rows, tmp_path, base_model_path, monkeypatch):
    # the general slice reports 0.80 for the base, then a fixed value for the fine-tuned model:
    # the run merges exactly when that value is more than the margin below 0.80
    for finetuned, merged in ((0.50, True), (0.79, False)):
        stub = _Slice(0.80, finetuned, 0.70)
        monkeypatch.setattr(forgetting, "general_evaluator", lambda pairs, stub=stub: stub)
        cfg = train_cfg(base_model_path, tmp_path / f"g{merged}", batch_size=16, max_seq_length=64, max_steps=2,
                        validation_fraction=0.0, merge_alpha=0.5)
        res = train_bi_encoder(rows, cfg)
        assert (res.general_before, res.general_finetuned, res.merged) == (0.80, finetuned, merged)
        assert res.general_after == (0.70 if merged else finetuned)
        assert json.loads((res.model_dir / "flywheel_training.json").read_text())["merged"] is merged


def test_reranker_trains_saves_and_reranks(rows, tmp_path, base_model_path, small_beir):
    pairs = labelled_pairs(rows, seed=0)
    assert set(pairs["label"]) == {0.0, 1.0}
    assert not pairs.duplicated(["query", "chunk_id"]).any()
    cfg = reranker_cfg(base_model_path, tmp_path / "rr", batch_size=16, max_length=64, max_steps=8)
    said: list[str] = []
    res = train_reranker(rows, cfg, progress=said.append)
    assert res.steps == 8 and (res.model_dir / "config.json").exists()
    assert any(line.startswith("reranker: 8/8 steps (100%)") for line in said), said
    ce = load_reranker(res.model_dir, max_length=64)
    ds = load_beir(small_beir)
    texts = ds.corpus.text_by_id
    qid = next(iter(ds.qrels["train"]))
    ranking = list(ds.corpus.ids[:50])
    out, ms = rerank(ce, {qid: ds.queries[qid]}, {qid: ranking}, texts, depth=10)
    assert sorted(out[qid][:10]) == sorted(ranking[:10]) and out[qid][10:] == ranking[10:]
    assert len(ms) == 1 and ms[0] > 0


def test_listwise_reranker_from_another_init_and_rrf_fusion(rows, tmp_path, base_model_path):
    cfg = reranker_cfg("/nonexistent/base", tmp_path / "rr2", init_model=base_model_path,
                       batch_size=8, max_length=64, max_steps=3, loss="listwise", num_negatives=1)
    res = train_reranker(rows, cfg)  # starts from init_model, never touches base_model
    assert res.steps == 3 and json.loads((res.model_dir / "flywheel_reranker.json").read_text())["config"]["loss"] == "listwise"
    with pytest.raises(ValueError, match="loss"):  # the settings refuse an unknown loss at load
        RerankerSettings().with_(loss="pointwise")
    unchecked = RerankerConfig(settings=cfg.settings.model_copy(update={"loss": "pointwise"}), training=cfg.training,
                               base_model=base_model_path, output_dir=tmp_path / "x", seed=0)
    with pytest.raises(ValueError, match="unknown reranker loss"):  # and so does the trainer
        train_reranker(rows, unchecked)


class _Scores:
    """A stand-in cross-encoder that scores by a fixed table (to check the fusion arithmetic)."""

    def __init__(self, scores):
        self.scores = scores

    def predict(self, pairs, **_):
        return [self.scores[text] for _, text in pairs]


def test_rrf_fusion_keeps_the_bi_encoder_order_when_the_cross_encoder_agrees_and_splits_ties():
    ranking = ["a", "b", "c", "d"]
    texts = {d: d for d in ranking}
    agree = _Scores({"a": 4, "b": 3, "c": 2, "d": 1})
    out, _ = rerank(agree, {"q": "q"}, {"q": ranking}, texts, depth=4, fusion="rrf")
    assert out["q"] == ranking
    # the cross-encoder alone reverses the list
    reverse = _Scores({"a": 1, "b": 2, "c": 3, "d": 4})
    assert rerank(reverse, {"q": "q"}, {"q": ranking}, texts, depth=4, fusion="none")[0]["q"] == ranking[::-1]
    # a chunk both rank near the top beats one only the cross-encoder likes
    mixed = _Scores({"a": 1, "b": 4, "c": 3, "d": 2})  # CE order b, c, d, a
    fused = rerank(mixed, {"q": "q"}, {"q": ranking}, texts, depth=4, fusion="rrf")[0]["q"]
    assert fused[0] == "b" and fused.index("c") < fused.index("d")
    with pytest.raises(ValueError, match="unknown fusion"):
        rerank(agree, {"q": "q"}, {"q": ranking}, texts, depth=4, fusion="max")


def test_zscore_fusion_weighs_how_sure_each_model_is():
    ranking = ["a", "b", "c", "d"]
    texts = {d: d for d in ranking}
    # the bi-encoder barely prefers a over b (0.80 vs 0.79) and is sure about c and d; the
    # cross-encoder is sure b beats a: b moves up, while c and d stay below
    bi = {"q": [0.80, 0.79, 0.40, 0.10]}
    ce = _Scores({"a": 0.0, "b": 3.0, "c": 0.5, "d": 0.4})
    out, _ = rerank(ce, {"q": "q"}, {"q": ranking}, texts, depth=4, fusion="zscore", bi_scores=bi)
    assert out["q"] == ["b", "a", "c", "d"]
    # weight 0 is the bi-encoder alone; weight 1 the cross-encoder alone
    assert rerank(ce, {"q": "q"}, {"q": ranking}, texts, depth=4, fusion="zscore", bi_scores=bi,
                  fusion_weight=0.0)[0]["q"] == ranking
    assert rerank(ce, {"q": "q"}, {"q": ranking}, texts, depth=4, fusion="zscore", bi_scores=bi,
                  fusion_weight=1.0)[0]["q"] == ["b", "c", "d", "a"]
    with pytest.raises(ValueError, match="bi_scores"):
        rerank(ce, {"q": "q"}, {"q": ranking}, texts, depth=4, fusion="zscore")


def test_gist_loss_is_guided_by_the_base(rows, tmp_path, base_model_path):
    from flywheel.lib.training.losses import bi_encoder_loss

    cfg = train_cfg(base_model_path, tmp_path / "g", loss="gist", max_seq_length=64)
    model = index.load_embedder(base_model_path, max_seq_length=64)
    loss = bi_encoder_loss(model, cfg)
    assert type(loss).__name__ == "GISTEmbedLoss" and loss.guide is not model
    triplet = train_cfg(base_model_path, tmp_path / "h")
    triplet.settings = triplet.settings.model_copy(update={"loss": "triplet"})  # past the settings' own check
    with pytest.raises(ValueError, match="unknown loss"):
        bi_encoder_loss(model, triplet)
    with pytest.raises(ValueError, match="corpus"):
        bi_encoder_loss(model, train_cfg(base_model_path, tmp_path / "c", loss="corpus"))


def test_reranker_head_learns_at_its_own_rate(base_model_path, tmp_path):
    from sentence_transformers.cross_encoder import CrossEncoder

    ce = CrossEncoder(base_model_path, num_labels=1, max_length=64, local_files_only=True)
    cfg = reranker_cfg(base_model_path, tmp_path / "h", max_steps=10, head_learning_rate=2e-3)
    optimizer, scheduler = head_optimizer(ce, cfg, 100)["optimizers"]
    body, head = optimizer.param_groups
    assert (body["initial_lr"], head["initial_lr"]) == (cfg.settings.learning_rate, 2e-3)
    head_ids = {id(p) for p in head["params"]}
    assert {id(p) for n, p in ce.model.named_parameters() if "classifier" in n} <= head_ids
    assert len(body["params"]) > 10 * len(head["params"])  # the encoder stays in the slow group


def _corpus_embeddings(small_beir, base_model_path, tmp_path):
    from flywheel.lib.training.corpus import CorpusEmbeddings

    ds = load_beir(small_beir)
    base = index.load_embedder(base_model_path, max_seq_length=64)
    table = index.ensure_corpus_table(tmp_path / "lancedb", base, index.model_fingerprint(base_model_path), ds.corpus)
    ids, vectors = index.table_vectors(tmp_path / "lancedb", table)
    return ds, table, CorpusEmbeddings(ids, vectors)


def test_corpus_loss_trains_only_the_query_encoder_and_keeps_the_corpus_table(
    rows, small_beir, base_model_path, tmp_path
):
    ds, table, corpus = _corpus_embeddings(small_beir, base_model_path, tmp_path)
    cfg = train_cfg(base_model_path, tmp_path / "q", batch_size=16, max_seq_length=64, max_steps=8,
                    validation_fraction=0.2, loss="corpus", learning_rate=2e-4,
                    run={"evaluations": 2, "validation_distractors": 50})
    res = train_bi_encoder(rows, cfg, corpus=corpus)
    assert res.steps == 8 and [h["step"] for h in res.eval_history] == [4, 8]
    losses = [h["loss"] for h in res.loss_history]
    assert losses and all(np.isfinite(losses))

    # the saved model routes queries and documents: documents are still the base's embeddings,
    # queries are not, and the corpus table it searches is the base's (no re-embedding)
    trained = index.load_embedder(res.model_dir, max_seq_length=64)
    base = index.load_embedder(base_model_path, max_seq_length=64)
    texts = list(ds.corpus.texts[:3])
    assert np.allclose(index.encode(trained, texts), index.encode(base, texts), atol=1e-5)
    queries = list(rows["query"].unique()[:3])
    # (any optimizer step moves the query route: its embeddings differ; by how much is not asserted)
    assert not np.allclose(index.encode(trained, queries, task="query"), index.encode(base, queries, task="query"),
                           rtol=0, atol=1e-6)
    assert index.corpus_encoder_id(res.model_dir) == index.model_fingerprint(base_model_path)
    assert index.corpus_table_name(index.corpus_encoder_id(res.model_dir), ds.corpus, 64) == table
    assert index.transformer_dir(res.model_dir).name.startswith("query_")

    # merging toward the base reaches the query route too (alpha 0: the base again)
    forgetting.merge_with_base(trained, base_model_path, 0.0)
    assert np.allclose(index.encode(trained, queries, task="query"), index.encode(base, queries, task="query"), atol=1e-5)


def test_corpus_targets_mask_the_querys_other_relevant_chunks():
    from flywheel.lib.training.corpus import corpus_targets

    rows = pd.DataFrame({
        "query_key": ["a", "a", "b", "c"], "positive_id": ["d1", "d2", "d3", "missing"],
    })
    targets, masked, missing = corpus_targets(rows, ["d1", "d2", "d3", "d4", "d5"], {"a": {"d4"}, "b": {"d3"}})
    assert targets == [0, 1, 2, -1] and missing == 1
    assert masked == [[1, 3], [0, 3], [], []]  # a's other positive and its related chunk; never the row's own


def test_corpus_loss_needs_the_corpus(rows, base_model_path, tmp_path):
    cfg = train_cfg(base_model_path, tmp_path / "x", loss="corpus", max_steps=1)
    with pytest.raises(ValueError, match="corpus embeddings"):
        train_bi_encoder(rows, cfg)


def test_corpus_validation_skips_chunks_nobody_judged():
    from flywheel.lib.training.evaluators import CorpusValidationEvaluator

    class _Fixed:  # a "model" whose query vector is fixed: the ranking is d0 (unjudged), d1, d2
        model_card_data = type("C", (), {"set_evaluation_metrics": lambda *a, **k: None})()

        def encode_query(self, texts, **kw):
            return np.tile(np.array([1.0, 0.0], dtype=np.float32), (len(texts), 1))

    ids, vectors = ["d0", "d1", "d2"], np.array([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5]], dtype=np.float32)
    val = pd.DataFrame({"query": ["q"], "query_key": ["q"], "positive_id": ["d1"], "negative_id": ["d2"]})
    condensed = CorpusValidationEvaluator.from_rows(val, ids, vectors)(_Fixed())
    assert condensed["validation_cosine_ndcg@10"] == pytest.approx(1.0)  # d0 was never judged: skipped
    judged_d0 = CorpusValidationEvaluator.from_rows(val, ids, vectors, {"q": {"d0"}})(_Fixed())  # judged related: a miss
    assert judged_d0["validation_cosine_ndcg@10"] == pytest.approx(1 / np.log2(3))


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_are_throttled_and_say_rate_and_time_left():
    clock, said = _Clock(), []
    meter = Progress("encode", 100, said.append, every_s=10.0, clock=clock)
    clock.now += 2.0
    assert meter.update(10) == "encode: 10/100 (10%), 5.0/s, ~18s left"  # the first update always shows
    clock.now += 3.0
    assert meter.update(20) is None  # 3 s after the last line: held back
    clock.now += 10.0
    assert meter.update(40, detail="loss 0.5000") == "encode: 40/100 (40%), 2.7/s, ~22s left, loss 0.5000"
    assert meter.finish() == "encode: 100/100 (100%), 6.7/s, ~0s left"  # the last line always shows
    assert said == ["encode: 10/100 (10%), 5.0/s, ~18s left", "encode: 40/100 (40%), 2.7/s, ~22s left, loss 0.5000",
                    "encode: 100/100 (100%), 6.7/s, ~0s left"]
    slow = Progress("train", 8, said.append, unit="steps", clock=clock)
    clock.now += 5.0
    assert slow.update(2) == "train: 2/8 steps (25%), 0.4/s, ~15s left"
    assert Progress("quiet", 3, None).update(1, force=True) is None  # no say: silent
    costly = Progress("embed", 100, said.append, clock=clock)  # the costliest items first
    clock.now += 6.0
    assert costly.update(10, work=0.6) == "embed: 10/100 (10%), 1.7/s, ~4s left"  # 60% of the work in 6 s


def test_quiet_libraries_silences_load_reports_and_weight_bars(base_model_path, tmp_path, capfd):
    from huggingface_hub.utils import are_progress_bars_disabled
    from sentence_transformers.cross_encoder import CrossEncoder
    from transformers.utils import logging as hf_logging

    from flywheel.lib.quiet import quiet_libraries

    quiet_libraries()
    assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    capfd.readouterr()
    ce = CrossEncoder(base_model_path, num_labels=1, max_length=64, local_files_only=True)  # a new head: a load report
    ce.save_pretrained(str(tmp_path / "ce"))
    out = capfd.readouterr()
    text = out.out + out.err
    assert "LOAD REPORT" not in text and "Loading weights" not in text and "Writing model shards" not in text, text


def test_the_mining_decision_is_made_once_from_the_settings():
    from flywheel.lib.training.week import mines_negatives

    s = TrainingSettings()
    assert not mines_negatives(s.with_(loss="corpus", mine_negatives=True))  # every chunk is a negative already
    assert mines_negatives(s.with_(loss="gist", mine_negatives=True)) and mines_negatives(s.with_(loss="mnrl"))
    assert not mines_negatives(s.with_(loss="mnrl", mine_negatives=False))


def test_reranker_week_from_the_embedder_needs_the_embedder(rows, tmp_path, base_model_path):
    from flywheel.lib.training.week import train_reranker_week

    with pytest.raises(ValueError, match="FLYWHEEL_RERANKER_INIT=embedder"):
        train_reranker_week(rows, RerankerSettings().with_(init="embedder"), TrainingSettings(),
                            base_model=base_model_path, seed=0, output_dir=tmp_path / "r", embedder_dir=None)


def _judged(rows_):
    """Every row's query, chunk and grade as relevance_labels holds them."""
    return pd.DataFrame(rows_, columns=["week", "query", "query_key", "chunk_id", "chunk_text", "grade", "rank"])


def test_graded_lists_rank_each_training_querys_judged_chunks_by_grade():
    from flywheel.lib.training.cross_encoder import graded_lists

    train = pd.DataFrame([
        {"query": "Q a", "query_key": "q a", "positive_id": "p3", "positive": "t p3", "negative_id": "mined",
         "negative": "t mined", "negative_rank": 1, "week": "w2"},
        {"query": "Q c", "query_key": "q c", "positive_id": "c2", "positive": "t c2", "negative_id": "c2",
         "negative": "t c2", "negative_rank": 1, "week": "w2"},
    ])
    judged = _judged([
        ("w1", "Q a", "q a", "p3", "t p3", 1, 4),  # an older week's grade: the later one wins
        ("w2", "Q a", "q a", "p3", "t p3", 3, 4),
        ("w2", "Q a", "q a", "p2", "t p2", 2, 1),
        ("w2", "Q a", "q a", "r1", "t r1", 1, 2),
        ("w2", "Q a", "q a", "n0", "t n0", 0, 3),
        ("w2", "Q a", "q a", "n5", "t n5", 0, 5),
        ("w2", "Q a", "q a", "u", "t u", None, 6),  # unlabelled: never a list member
        ("w2", "Q b", "q b", "b2", "t b2", 2, 1),  # not a training query (held out): never enters
        ("w2", "Q b", "q b", "b0", "t b0", 0, 2),
        ("w2", "Q c", "q c", "c2", "t c2", 2, 1),  # one grade only: nothing to rank
    ])
    lists, skipped = graded_lists(train, judged, list_size=16, seed=0)
    assert skipped == 1 and lists["query"].tolist() == ["Q a"]
    a = lists.iloc[0]
    # grades high to low; zeros best-ranked first, then the rows' mined negative (grade 0)
    assert a["docs"] == ["t p3", "t p2", "t r1", "t n0", "t n5", "t mined"]
    assert a["labels"] == [3.0, 2.0, 1.0, 0.0, 0.0, 0.0]
    # a short list keeps the graded chunks and the hardest negative
    short, _ = graded_lists(train, judged, list_size=4, seed=0)
    assert short.iloc[0]["docs"] == ["t p3", "t p2", "t r1", "t n0"]
    # an injection-flagged pair never teaches
    flagged = judged.assign(injection_flag=judged["chunk_id"].eq("p2"))
    assert "t p2" not in graded_lists(train, flagged, list_size=16, seed=0)[0].iloc[0]["docs"]
    # shuffled labels (the control run) keep the grades, not their places
    shuffled, _ = graded_lists(train, judged, list_size=16, seed=3, shuffle_labels=True)
    assert sorted(shuffled.iloc[0]["labels"]) == sorted(a["labels"])


def test_graded_loss_scores_a_steps_pairs_in_one_forward_pass(tmp_path, base_model_path):
    """A step's query lists go through the network as one batch. (ListNetLoss reads
    mini_batch_size=0 as unset and then splits a step into forward passes of as many pairs as the
    step has queries, many small passes on a CPU; -1 is its documented "the whole batch at once".)"""
    import torch

    from flywheel.lib.training.cross_encoder import dataset_and_loss, labelled_pairs, load_model

    train = pd.DataFrame([
        {"query": f"Q {q}", "query_key": f"q {q}", "positive_id": f"{q}1", "positive": f"text {q}1",
         "negative_id": f"{q}0", "negative": f"text {q}0", "negative_rank": 1, "week": "w1"} for q in "ab"])
    judged = _judged([("w1", f"Q {q}", f"q {q}", f"{q}{g}", f"text {q}{g}", g, 4 - g) for q in "ab" for g in (3, 1, 0)])
    cfg = reranker_cfg(base_model_path, tmp_path / "rr1", loss="graded", list_size=3, graded_queries_per_step=2,
                       max_length=32)
    model = load_model(cfg)
    ds, loss = dataset_and_loss(model, train, labelled_pairs(train, 0), cfg, judged)
    passes = []
    next(model.children()).register_forward_hook(lambda *_: passes.append(1))  # the Transformer module
    step = ds[:2]
    assert sum(len(d) for d in step["docs"]) == 6
    loss([step["query"], step["docs"]], [torch.tensor(labels) for labels in step["labels"]]).backward()
    assert len(passes) == 1


def test_reranker_trains_with_the_eager_attention_on_a_cpu(tmp_path, base_model_path):
    """On a CPU the cross-encoder trains with the eager attention, which scores as the default
    (sdpa) does; the encoder keeps its own dropout."""
    import torch

    from flywheel.lib.training.cross_encoder import load_model

    model = load_model(reranker_cfg(base_model_path, tmp_path / "e", max_length=32))
    net = model.model.eval()
    assert net.config._attn_implementation == "eager"
    assert net.config.hidden_dropout_prob == net.config.attention_probs_dropout_prob == 0.1
    batch = model.tokenizer(["what lowers blood pressure"] * 3, ["salt raises it", "exercise lowers it", "rain"],
                            padding=True, return_tensors="pt")
    with torch.no_grad():
        eager = net(**batch).logits
        net.set_attn_implementation("sdpa")
        assert torch.allclose(net(**batch).logits, eager, atol=1e-5)


def test_graded_reranker_trains_on_one_list_per_query(rows, tmp_path, base_model_path):
    judged = _judged(
        [("2026-09-28", r.query, r.query_key, r.positive_id, r.positive, 3 if i % 2 else 2, 1)
         for i, r in enumerate(rows.itertuples())]
        + [("2026-09-28", r.query, r.query_key, r.negative_id, r.negative, 0, 2) for r in rows.itertuples()])
    cfg = reranker_cfg(base_model_path, tmp_path / "rrg", loss="graded", list_size=4, graded_queries_per_step=2,
                       max_length=64, max_steps=3)
    res = train_reranker(rows, cfg, judged=judged)
    assert res.steps == 3 and res.examples == rows["query_key"].nunique()
    assert json.loads((res.model_dir / "flywheel_reranker.json").read_text())["config"]["loss"] == "graded"
    with pytest.raises(ValueError, match="needs the judged labels"):
        train_reranker(rows, cfg)


def test_inverse_cloze_lists_come_from_the_corpus_alone():
    """A sentence of a chunk (never its first, never a short one) is the query, the rest of the chunk
    its positive; BM25's hits its negatives, never the chunk itself or a copy of it."""
    from flywheel.lib.beir import Corpus
    from flywheel.lib.training.cross_encoder import InverseClozeLists

    from flywheel.lib.registry.index import split_sentences

    long = "This sentence has more than eight words in it, {}."
    texts = {
        "a": "Title A. " + long.format("alpha") + " " + long.format("beta"),
        "b": "Title B. " + long.format("gamma"),
        "c": "Title C. Too short here.",  # no eligible sentence: passed over
        "d": "Title D. " + long.format("delta"),
        "a-copy": "Title A. " + long.format("alpha") + " " + long.format("beta"),
    }
    corpus = Corpus(ids=tuple(texts), texts=tuple(texts.values()), sha256="x")
    asked = []

    def search(queries, k):  # every chunk, in a fixed order, as BM25 would return its hits
        asked.append((list(queries), k))
        return [[(i, 1.0) for i in texts] for _ in queries]

    lists = InverseClozeLists(corpus, search, list_size=3)
    built = lists.build(10, seed=0)
    assert asked[0][1] == 3 + 4 and len(built) == 4  # a, b, d and the copy of a; c has no eligible sentence
    sources = []
    for query, docs, labels in built.itertuples(index=False):
        assert labels == [3.0, 0.0, 0.0] and len(docs) == 3
        source = {i for i, t in texts.items()
                  if query in t and " ".join(s for s in split_sentences(t) if s != query) == docs[0]}
        sources.append(tuple(sorted(source)))
        assert query.startswith("This sentence") and query not in docs[0] and docs[0].startswith("Title")
        # BM25's order, less the chunk itself and its copy
        assert docs[1:] == [t for i, t in texts.items() if t != texts[min(source)]][:2]
    assert sorted(sources) == [("a", "a-copy"), ("a", "a-copy"), ("b",), ("d",)]
    assert built.equals(lists.build(10, seed=0)) and not built.equals(lists.build(10, seed=1))
    assert len(lists.build(2, seed=0)) == 2 and lists.build(0, seed=0).empty
    short = Corpus(ids=("c",), texts=(texts["c"],), sha256="y")  # nothing to make a list of: no lists, no error
    assert InverseClozeLists(short, search, list_size=3).build(10, seed=0).empty


def test_reranker_warms_up_on_inverse_cloze_lists_before_the_judged_rows(rows, tmp_path, base_model_path, small_beir):
    from flywheel.lib.training.week import train_reranker_week

    ds = load_beir(small_beir)
    settings = RerankerSettings().with_(loss="listwise", init="base", batch_size=8, max_length=64, max_steps=3,
                                        ict_lists=40, graded_queries_per_step=2, list_size=4)
    said: list[str] = []
    kw = dict(base_model=base_model_path, seed=0, corpus=ds.corpus, lancedb_uri=tmp_path / "lancedb")
    out = train_reranker_week(rows, settings, TrainingSettings(), output_dir=tmp_path / "w", progress=said.append, **kw)
    r = out.result
    # no more lists than its steps take (3 steps of 2 lists), and no more steps than the judged rows get
    assert (r.warmup_lists, r.warmup_steps, r.steps) == (6, 3, 3)
    assert any(line.startswith("reranker warm-up: 3/3 steps (100%)") for line in said), said
    saved = json.loads((r.model_dir / "flywheel_reranker.json").read_text())
    assert (saved["warmup_lists"], saved["warmup_steps"]) == (6, 3) and out.metadata()["warmup_steps"] == 3
    plain = train_reranker_week(rows, settings.with_(ict_lists=0), TrainingSettings(), output_dir=tmp_path / "p",
                                **kw).result
    assert (plain.warmup_lists, plain.warmup_steps) == (0, 0)
    pair = [("what lowers blood pressure", ds.corpus.texts[0])]
    warm, cold = (load_reranker(m.model_dir, max_length=64).predict(pair) for m in (r, plain))
    assert not np.allclose(warm, cold)  # the same seed and rows; only the warm-up differs
    with pytest.raises(ValueError, match="ICT_LISTS > 0 needs the corpus"):
        train_reranker_week(rows, settings, TrainingSettings(), base_model=base_model_path, seed=0,
                            output_dir=tmp_path / "x")


def test_graded_corpus_targets_weigh_each_judged_chunk_by_its_gain():
    from flywheel.lib.training.corpus import graded_targets, judged_grades

    labels = pd.DataFrame({
        "week": ["w1", "w2", "w2", "w2", "w2", "w2"],
        "query_key": ["a", "a", "a", "a", "a", "b"],
        "chunk_id": ["d2", "d2", "d1", "d3", "d4", "d5"],
        "grade": [0, 3, 2, 1, 0, None],  # d2: its latest grade counts; d4 irrelevant; d5 unlabelled
    })
    grades = judged_grades(labels)
    assert grades == {"a": {"d2": 3, "d1": 2, "d3": 1}}
    rows = pd.DataFrame({"query_key": ["a", "b"], "positive_id": ["d1", "d5"]})
    (a_idx, a_w), (b_idx, b_w) = graded_targets(rows, ["d1", "d2", "d3", "d4", "d5"], grades)
    assert a_idx == [0, 1, 2] and a_w == pytest.approx([3 / 11, 7 / 11, 1 / 11])  # gains 2^g - 1
    assert (b_idx, b_w) == ([4], [1.0])  # no judged chunks: the row's positive alone


def test_a_one_chunk_graded_target_is_the_plain_corpus_loss_and_grades_move_it():
    import torch

    from flywheel.lib.training.losses import CorpusSoftmaxLoss

    class _Model:  # a "query encoder" whose embedding is the feature tensor itself
        def __call__(self, features):
            return {"sentence_embedding": features["x"]}

    corpus = np.eye(3, dtype=np.float32)
    x = torch.tensor([[0.9, 0.3, 0.1]])
    plain = CorpusSoftmaxLoss(_Model(), corpus, [0], [[]], scale=5.0)([{"x": x}], torch.tensor([0]))
    one = CorpusSoftmaxLoss(_Model(), corpus, [0], [[]], scale=5.0, soft=[([0], [1.0])])([{"x": x}], torch.tensor([0]))
    assert float(one) == pytest.approx(float(plain), rel=1e-6)
    # weight on the second chunk: a query nearer the first one pays more
    spread = CorpusSoftmaxLoss(_Model(), corpus, [0], [[]], scale=5.0, soft=[([0, 1], [0.5, 0.5])])([{"x": x}], torch.tensor([0]))
    assert float(spread) > float(one)


def test_the_corpus_loss_scores_in_fp32_under_bf16_autocast():
    # bf16 has 8 bits of mantissa: at scale 50, near neighbours' logits would blur; the loss
    # turns autocast off for its scores, so mixed-precision training gives the fp32 loss
    import torch

    from flywheel.lib.training.losses import CorpusSoftmaxLoss

    class _Model:
        def __call__(self, features):
            return {"sentence_embedding": features["x"]}

    rng = np.random.default_rng(0)
    corpus = (rng.normal(size=(1, 32)) + 0.05 * rng.normal(size=(200, 32))).astype(np.float32)  # near neighbours
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    x = torch.from_numpy(corpus[:4] + 0.01 * rng.normal(size=(4, 32)).astype(np.float32))
    x = x / x.norm(dim=1, keepdim=True)
    loss = CorpusSoftmaxLoss(_Model(), corpus, [0, 1, 2, 3], [[], [], [], []], scale=50.0)
    fp32 = loss([{"x": x}], torch.arange(4))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = loss([{"x": x}], torch.arange(4))
        blurred = torch.nn.functional.cross_entropy((x @ torch.from_numpy(corpus).T) * 50.0, torch.arange(4))
    assert mixed.dtype == torch.float32 and float(mixed) == pytest.approx(float(fp32), rel=1e-6)
    assert abs(float(blurred) - float(fp32)) > 1e-4  # what autocast alone would have computed


def test_training_arguments_follow_the_training_precision(tmp_path, base_model_path):
    from flywheel.config import RerankerSettings, TrainingSettings
    from flywheel.lib.training import cross_encoder
    from flywheel.lib.training.embedder import TrainConfig, training_args

    for precision, bf16 in (("bf16", True), ("fp32", False)):
        s = TrainingSettings(device="cpu", precision=precision)
        assert training_args(TrainConfig(s, base_model_path, tmp_path / "m", 0), 10, 10).bf16 is bf16
        cfg = cross_encoder.RerankerConfig(settings=RerankerSettings(), training=s, base_model=base_model_path,
                                           output_dir=tmp_path / "r", seed=0)
        assert cross_encoder.training_args(cfg, 16).bf16 is bf16


def test_graded_corpus_targets_train_and_need_the_grades(rows, small_beir, base_model_path, tmp_path):
    _, _, corpus = _corpus_embeddings(small_beir, base_model_path, tmp_path)
    cfg = train_cfg(base_model_path, tmp_path / "g", batch_size=16, max_seq_length=64, max_steps=2,
                    validation_fraction=0.0, loss="corpus", corpus_targets="graded")
    with pytest.raises(ValueError, match="needs the judged grades"):
        train_bi_encoder(rows, cfg, corpus=corpus)
    grades = {k: {p: 3} for k, p in zip(rows["query_key"], rows["positive_id"])}
    res = train_bi_encoder(rows, cfg, corpus=corpus, grades=grades)
    assert res.steps == 2 and all(np.isfinite([h["loss"] for h in res.loss_history]))


def _filler(n: int, start: int = 0) -> str:
    return " ".join(f"Background sentence {start + i} describes an unrelated cohort and its methods." for i in range(n))


def test_focused_passages_keep_the_title_and_the_run_of_sentences_holding_the_querys_terms(base_model_path):
    """A chunk longer than the pair's tokens is read as its first sentence, "...", then the run of
    sentences that fits and holds the most of the query's terms; that run survives the truncation.
    A chunk that fits, shares no term with the query past its first sentence, or has its best run
    right after it, is read as it is."""
    from transformers import AutoTokenizer

    from flywheel.lib.training.reranker import focused_passages

    tok = AutoTokenizer.from_pretrained(base_model_path)
    query = "do statins lower cholesterol in adults"
    key = "Statins lowered cholesterol in most adults."
    long = f"Lipid trial. {_filler(10)} {key} {_filler(6, 10)}"
    short = "Lipid trial. Statins lowered cholesterol."
    unrelated = f"Weather report. {_filler(16)}"
    early = f"Lipid trial. {key} {_filler(16)}"
    out = focused_passages(query, [long, short, unrelated, early], tok, 64)
    assert out[0].startswith("Lipid trial. ... ") and key in out[0] and "Background sentence 0 " not in out[0]
    assert out[1:] == [short, unrelated, early]
    pair = tok(query, out[0], truncation=True, max_length=64)["input_ids"]
    assert "statins lowered cholesterol in most adults" in tok.decode(pair)
    # the head alone never reaches the sentence: that is what the focus is for
    assert "statins" not in tok.decode(tok(query, long, truncation=True, max_length=64)["input_ids"][-40:])


def test_a_query_term_every_candidate_holds_weighs_less_than_a_rare_one(base_model_path):
    """Terms are weighed by how few of the candidates hold them: the run with the rare term wins
    over the run with the term every candidate shares (each run fits, not both)."""
    from transformers import AutoTokenizer

    from flywheel.lib.training.reranker import focused_passages

    tok = AutoTokenizer.from_pretrained(base_model_path)
    common, rare = "Alpha waves were recorded overnight.", "Zeta potential was measured twice."
    target = f"Sleep study. {_filler(8)} {common} {_filler(8, 8)} {rare} {_filler(8, 16)}"
    other = f"Another study. {common} Nothing else here at all."
    out = focused_passages("alpha zeta", [target, other], tok, 48)
    assert rare in out[0] and common not in out[0]
    # alone, the two terms weigh the same and the earlier run wins
    alone = focused_passages("alpha zeta", [target], tok, 48)
    assert common in alone[0] and rare not in alone[0]


def test_a_chunks_sentences_are_split_once_and_counted_per_tokenizer(base_model_path, monkeypatch):
    """focused_passages keeps each chunk's sentences between queries (split once, however many
    queries rerank it) and its token counts per tokenizer: a tokenizer that counts otherwise gets
    its own counts, so every selection is what it would be with nothing kept."""
    from transformers import AutoTokenizer

    from flywheel.lib.registry import index
    from flywheel.lib.training import reranker

    tok = AutoTokenizer.from_pretrained(base_model_path)

    def one_per_word(texts, add_special_tokens=False):  # a tokenizer with other (fewer) counts
        texts = [texts] if isinstance(texts, str) else texts
        return {"input_ids": [[0] * len(t.split()) for t in texts]}

    chunk = f"Lipid trial. {_filler(10)} Statins lowered cholesterol in most adults. {_filler(6, 10)} Ref {uuid.uuid4().hex}."
    queries = ["do statins lower cholesterol in adults", "statins and cholesterol"]
    splits = []
    real_split = index.split_sentences
    monkeypatch.setattr(index, "split_sentences", lambda text: splits.append(text) or real_split(text))
    kept = {(q, name): reranker.focused_passages(q, [chunk], t, 64)[0]
            for name, t in (("tok", tok), ("words", one_per_word)) for q in queries}
    assert splits.count(chunk) == 1
    reranker.forget_sentences()
    fresh = {(q, name): reranker.focused_passages(q, [chunk], t, 64)[0]
             for name, t in (("tok", tok), ("words", one_per_word)) for q in queries}
    assert kept == fresh and splits.count(chunk) == 2
    assert kept[(queries[0], "tok")] != kept[(queries[0], "words")]  # the counts decide the run
    with pytest.raises(ValueError, match="unknown passages 'tail'"):
        reranker.score_pairs(None, queries[0], [chunk], read="tail")


def test_a_focused_reranker_trains_and_reranks_on_the_same_passages(tmp_path, base_model_path):
    """Training (each graded list) and reranking (score_pairs) read a long chunk through the same
    focused_passages; the run records what it read, and a run from before the setting reads heads."""
    import dataclasses

    from flywheel.lib.evaluation.weekly import _reranker_spec
    from flywheel.lib.training.cross_encoder import RerankerResult, dataset_and_loss, labelled_pairs, load_model
    from flywheel.lib.training.reranker import focused_passages, score_pairs
    from flywheel.lib.training.week import RerankerWeek

    query = "do statins lower cholesterol in adults"
    texts = {g: f"Lipid trial {g}. {_filler(10)} Statins lowered cholesterol in {g} adults. {_filler(6, 10)}"
             for g in (3, 1, 0)}
    train = pd.DataFrame([{"query": query, "query_key": "q", "positive_id": "3", "positive": texts[3],
                           "negative_id": "0", "negative": texts[0], "negative_rank": 1, "week": "w1"}])
    judged = _judged([("w1", query, "q", str(g), texts[g], g, 4 - g) for g in (3, 1, 0)])
    cfg = reranker_cfg(base_model_path, tmp_path / "f", loss="graded", list_size=3, max_length=64, passages="focused")
    model = load_model(cfg)
    ds, _ = dataset_and_loss(model, train, labelled_pairs(train, 0), cfg, judged)
    expected = focused_passages(query, [texts[3], texts[1], texts[0]], model.tokenizer, 64)
    assert ds[0]["docs"] == expected and all(" ... " in d for d in expected)
    pairs = labelled_pairs(train, 0)
    bce, _ = dataset_and_loss(model, train, pairs, dataclasses.replace(cfg, settings=cfg.settings.with_(loss="bce")))
    focused_pairs = dict(zip(pairs["text"], focused_passages(query, pairs["text"].tolist(), model.tokenizer, 64)))
    assert bce["text"] == [focused_pairs[t] for t in pairs["text"]] and bce["label"] == pairs["label"].tolist()
    head_cfg = reranker_cfg(base_model_path, tmp_path / "h", loss="graded", list_size=3, max_length=64)
    assert dataset_and_loss(model, train, labelled_pairs(train, 0), head_cfg, judged)[0][0]["docs"] == \
        [texts[3], texts[1], texts[0]]
    model.model.eval()
    assert np.allclose(score_pairs(model, query, list(texts.values()), read="focused"),
                       model.predict([(query, d) for d in expected], show_progress_bar=False))
    result = RerankerResult(model_dir=tmp_path / "f", train_pairs=0, positives=0, negatives=0, steps=0, train_seconds=0)
    info = RerankerWeek(config=cfg, result=result, training_rows_sha256="x").run_info("w1", "r", "m", "1")
    assert info["passages"] == "focused"
    assert _reranker_spec("new", info, "hybrid", RerankerSettings()).passages == "focused"
    assert _reranker_spec("old", {"model_dir": "m"}, "hybrid", RerankerSettings(passages="focused")).passages == "head"
