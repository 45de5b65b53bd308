"""Shared fixtures: an offline environment and a small real slice of SciFact.

The slice keeps the real texts and human labels (60 train queries, 15 test queries, their
relevant abstracts and a few hundred others) so that every stage runs for real in seconds.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# Nothing may reach a model hub: models load from local folders only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO / "data" / "scifact"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_qrels(path: Path) -> list[tuple[str, str, str]]:
    rows = [line.rstrip("\r\n").split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    return [tuple(r) for r in rows if len(r) == 3]


def make_small_beir(dest: Path, *, train_queries: int = 60, test_queries: int = 15, extra_docs: int = 240, seed: int = 0) -> Path:
    """A BEIR folder cut from SciFact: same format, real labels, a few hundred documents."""
    rng = random.Random(seed)
    train = _read_qrels(SCIFACT / "qrels" / "train.tsv")
    test = _read_qrels(SCIFACT / "qrels" / "test.tsv")
    train_q = sorted({q for q, _, _ in train})
    test_q = sorted({q for q, _, _ in test})
    keep_train = set(rng.sample(train_q, train_queries))
    keep_test = set(rng.sample(test_q, test_queries))
    train = [r for r in train if r[0] in keep_train]
    test = [r for r in test if r[0] in keep_test]
    needed = {d for _, d, _ in train + test}
    corpus = _read_jsonl(SCIFACT / "corpus.jsonl")
    others = [d for d in corpus if d["_id"] not in needed]
    keep_docs = needed | {d["_id"] for d in rng.sample(others, extra_docs)}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "qrels").mkdir(exist_ok=True)
    with (dest / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for d in corpus:
            if d["_id"] in keep_docs:
                f.write(json.dumps(d) + "\n")
    with (dest / "queries.jsonl").open("w", encoding="utf-8") as f:
        for q in _read_jsonl(SCIFACT / "queries.jsonl"):
            if q["_id"] in keep_train | keep_test:
                f.write(json.dumps({"_id": q["_id"], "text": q["text"], "metadata": {}}) + "\n")
    for name, rows in (("train", train), ("test", test)):
        with (dest / "qrels" / f"{name}.tsv").open("w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for r in rows:
                f.write("\t".join(r) + "\n")
    return dest


@pytest.fixture(scope="session")
def small_beir(tmp_path_factory) -> Path:
    return make_small_beir(tmp_path_factory.mktemp("beir") / "scifact-small")


@pytest.fixture(scope="session")
def base_model_path() -> str:
    from flywheel.config import default_base_model

    return default_base_model()


def config_for(home: Path, dataset: Path, base_model: str, **sections):
    """A validated configuration for a test home, independent of the caller's environment:
    ``sections`` override fields, e.g. ``training={"max_steps": 8}``."""
    from flywheel.config import load_config

    paths = {"home": str(home), "dataset": str(dataset), "base_model": base_model, **sections.pop("paths", {})}
    return load_config({}, paths=paths, **sections)


def small_config(home: Path, dataset: Path, base_model: str, **sections):
    """Tiny training and datasets: every stage runs for real in seconds on the small slice."""
    from flywheel.lib.registry.inference import cpu_has_native_bf16

    # PyTorch rather than the default openvino-int8: each newly trained model would pay an OpenVINO
    # conversion and quantization (test_inference.py tests the OpenVINO precisions). bf16 where the
    # CPU runs it natively; elsewhere PyTorch emulates bf16, several times slower than fp32.
    precision = "bf16" if cpu_has_native_bf16() else "fp32"
    tiny = {
        "tiers": {"start_date": "2026-09-28", "eval_queries": 3, "first_week_eval_queries": 6, "fewshot_examples": 30,
                  "finetune_examples": 120},
        "training": {"batch_size": 16, "max_seq_length": 64, "max_steps": 8, "learning_rate": 5e-5,
                     "encode_max_seq_length": 128, "mine_range_max": 10, "inference_precision": precision},
        "reranker": {"max_steps": 8, "max_length": 64, "depth": 20, "inference_precision": precision},
    }
    for name, fields in sections.items():
        tiny[name] = {**tiny.get(name, {}), **fields}
    return config_for(home, dataset, base_model, **tiny)
