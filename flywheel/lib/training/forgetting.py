"""Merging with the base: WiSE-FT after training, and a guard against forgetting.

Merging (``wise_ft``): after training, every floating-point weight becomes
``alpha * fine_tuned + (1 - alpha) * base`` (linear interpolation of the two checkpoints: WiSE-FT,
Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"), ``alpha`` the setting
``wise_ft_alpha`` (1 never merges). Fine-tuned on a couple of thousand judged queries, a model
moves the right chunks up for queries like its training ones and loses some of what the base got
right; the interpolation keeps most of the first and recovers much of the second. A fixed weight,
not one chosen each week on the validation slice: that slice's few dozen queries are too noisy to
choose it (README, "Merging with the base").

The guard (``guard``): the slice (``data/general/pairs.jsonl``, see its README) is 99 query -> passage
pairs from Python standard-library docstrings: offline, licensed, far from the fine-tuning domain.
A fine-tuned model that scores below the base there by more than ``forgetting_margin`` NDCG@10 is
merged (again) with the base at ``merge_alpha``: 1.0 keeps the fine-tuned model, 0.0 the base.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from flywheel.config import REPO_ROOT

GENERAL_PAIRS = REPO_ROOT / "data" / "general" / "pairs.jsonl"


def load_general_pairs(path: str | Path = GENERAL_PAIRS) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def general_evaluator(pairs: list[dict], name: str = "general"):
    """sentence-transformers' InformationRetrievalEvaluator over the slice (corpus = all passages)."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    if not pairs:
        return None
    return InformationRetrievalEvaluator(
        queries={p["_id"]: p["query"] for p in pairs},
        corpus={p["_id"]: p["text"] for p in pairs},
        relevant_docs={p["_id"]: {p["_id"]} for p in pairs},
        name=name, ndcg_at_k=[10], mrr_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[10], map_at_k=[10],
        show_progress_bar=False, write_csv=False,
    )


def general_slice_sha256(path: str | Path = GENERAL_PAIRS) -> str:
    """The slice's content hash (recorded with each run; empty when the file is absent)."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def ndcg10(evaluator, model) -> float:
    if evaluator is None:
        return float("nan")
    return float(evaluator(model)[evaluator.primary_metric])


def forgets(before: float, finetuned: float, margin: float) -> bool:
    """True when the general-slice NDCG@10 fell by more than ``margin`` (NaN: unknown, never)."""
    return before == before and finetuned == finetuned and finetuned < before - margin


@dataclass(frozen=True)
class GuardOutcome:
    finetuned: float  # general-slice NDCG@10 of the fine-tuned model (after wise_ft)
    after: float  # ... of the model kept (merged or not)
    merged: bool
    tensors_merged: int = 0


def guard(model, base_model_path: str | Path, evaluator, before: float, *, margin: float, alpha: float,
          say: Optional[Callable[[str], None]] = None) -> GuardOutcome:
    """Merge ``model`` (in place) with the base when it forgot the general slice; else leave it."""
    finetuned = ndcg10(evaluator, model)
    if not forgets(before, finetuned, margin):
        return GuardOutcome(finetuned, finetuned, False)
    n = merge_with_base(model, base_model_path, alpha)
    after = ndcg10(evaluator, model)
    if say:
        say(f"forgetting: general NDCG@10 {before:.4f} -> {finetuned:.4f}; merged {n} tensors with the base "
            f"(alpha {alpha}): {after:.4f}")
    return GuardOutcome(finetuned, after, True, n)


@dataclass(frozen=True)
class Merge:
    alpha: float  # the fine-tuned weight kept (1.0: not merged)
    validation_finetuned: float  # validation NDCG@10 before the merge (NaN: nothing held out)
    validation_merged: float  # ... after it
    tensors_merged: int = 0


def merge_with_base(model, base_model_path: str | Path, alpha: float) -> int:
    """In place: weights <- alpha * model + (1 - alpha) * base. Returns the number of tensors merged."""
    import torch

    from flywheel.lib.registry.index import load_embedder

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"merge_alpha must be in [0, 1], got {alpha}")
    base = load_embedder(base_model_path, device=str(model.device))
    base_state = base.state_dict()
    merged = 0
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            # a Router model's routes ("0.sub_modules.query.0.model...") each mirror the base ("0.model...")
            key = re.sub(r"^\d+\.sub_modules\.[^.]+\.", "", name)
            if key in base_state and tensor.is_floating_point() and base_state[key].shape == tensor.shape:
                tensor.copy_(alpha * tensor + (1.0 - alpha) * base_state[key].to(tensor.device))
                merged += 1
    return merged


def wise_ft(model, base_model_path: str | Path, alpha: float, score: Optional[Callable[[object], float]] = None, *,
            say: Optional[Callable[[str], None]] = None) -> Merge:
    """In place: merge the fine-tuned ``model`` with the base at ``alpha`` (WiSE-FT); ``score``
    (validation NDCG@10 of a model, if anything is held out) is recorded before and after."""
    if alpha >= 1.0:
        return Merge(1.0, float("nan"), float("nan"))
    before = float(score(model)) if score else float("nan")
    n = merge_with_base(model, base_model_path, alpha)
    after = float(score(model)) if score else float("nan")
    if say:
        say(f"merged with the base (WiSE-FT, fine-tuned weight {alpha:g}): validation NDCG@10 {before:.4f} -> {after:.4f}")
    return Merge(alpha, before, after, n)
