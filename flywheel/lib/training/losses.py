"""The bi-encoder's losses: a softmax over the whole frozen corpus, or in-batch negatives.

``CorpusSoftmaxLoss`` (the ``corpus`` recipe) trains only the query encoder of a query/document
``Router`` model: each query's scores against *every* chunk of the corpus (a fixed matrix, the
base's embeddings as served) go through a cross-entropy whose target is the row's positive.
Chunks judged relevant or related to the same query are masked out of the softmax rather than
pushed away. It is the "full softmax" end of contrastive retrieval training: in-batch negatives
(MultipleNegativesRankingLoss, Henderson et al. 2017; van den Oord et al. 2018, InfoNCE) sample
the denominator, this computes it exactly because the document side does not move.

``bi_encoder_loss`` picks the loss a :class:`~flywheel.lib.training.embedder.TrainConfig` names:
``corpus``, ``mnrl`` (in-batch negatives plus each row's hard negative) or ``gist`` (the same,
guided by the frozen base: GISTEmbedLoss, Solatorio 2024, masks negatives the base scores above
the positive, likely unlabelled relevant chunks).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

MASKED_LOGIT = -1e4  # a masked chunk's score: exp() of it is 0 next to any real score


class CorpusSoftmaxLoss(nn.Module):
    """Cross-entropy of each query over every chunk of a fixed corpus matrix.

    Args:
        model: a SentenceTransformer whose forward gives the (query) ``sentence_embedding``.
        corpus: (chunks, dim) L2-normalised corpus embeddings (copied: the loss never changes them).
        targets: per training row, the corpus index of its positive.
        masked: per training row, corpus indices left out of its softmax (other relevant chunks).
        scale: inverse temperature applied to the cosine scores.
        soft: per training row, (corpus indices, weights summing to 1): a graded target
            distribution (``corpus.graded_targets``) in place of the one positive; None: one positive.

    Inputs: the dataset's ``anchor`` column (query text) and ``label`` column holding the *row
    number*; the loss looks up that row's target and masked chunks, so one column carries all it
    needs.
    """

    def __init__(self, model, corpus: np.ndarray, targets: Sequence[int], masked: Sequence[Sequence[int]],
                 scale: float, soft: Sequence[tuple[Sequence[int], Sequence[float]]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.corpus = torch.from_numpy(np.array(corpus, dtype=np.float32))  # a writable copy
        self.targets = list(targets)
        self.masked = [list(m) for m in masked]
        self.scale = scale
        self.soft = list(soft) if soft is not None else None

    def forward(self, sentence_features, labels: torch.Tensor) -> torch.Tensor:
        queries = self.model(sentence_features[0])["sentence_embedding"]
        with torch.autocast(device_type=queries.device.type, enabled=False):  # bf16 training: score in fp32
            return self._loss(nn.functional.normalize(queries.float(), dim=-1), labels)

    def _loss(self, queries: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scores = queries @ self.corpus.to(queries.device).T * self.scale
        rows = labels.long().tolist()
        target = torch.tensor([self.targets[r] for r in rows], device=queries.device)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for i, r in enumerate(rows):
            if self.masked[r]:
                mask[i, self.masked[r]] = True
        scores = scores.masked_fill(mask, MASKED_LOGIT)
        if self.soft is None:
            return nn.functional.cross_entropy(scores, target)
        dist = torch.zeros_like(scores)
        for i, r in enumerate(rows):
            where, weights = self.soft[r]
            dist[i, list(where)] = torch.tensor(list(weights), dtype=scores.dtype, device=scores.device)
        return -(dist * nn.functional.log_softmax(scores, dim=-1)).sum(dim=-1).mean()

    def get_config_dict(self) -> dict:
        return {"scale": self.scale, "corpus_chunks": int(self.corpus.shape[0]), "graded_targets": self.soft is not None}

    @property
    def citation(self) -> str:
        return "Full-softmax retrieval loss over a frozen corpus (InfoNCE without sampling; van den Oord et al., 2018)."


def bi_encoder_loss(model, cfg, *, corpus: np.ndarray | None = None, targets=None, masked=None, soft=None) -> nn.Module:
    """The loss ``cfg.settings.loss`` names, for ``model`` (``cfg`` is a TrainConfig).

    ``corpus``, ``targets``, ``masked`` (and the graded ``soft`` targets) are for the ``corpus`` loss only."""
    from sentence_transformers.sentence_transformer import losses

    from flywheel.lib.registry import index

    name = cfg.settings.loss
    if name == "corpus":
        if corpus is None or targets is None or masked is None:
            raise ValueError("loss 'corpus' needs the corpus matrix and each row's target and masked chunks")
        return CorpusSoftmaxLoss(model, corpus, targets, masked, cfg.settings.corpus_scale, soft=soft)
    if name == "mnrl":
        return losses.MultipleNegativesRankingLoss(model)
    if name == "gist":
        guide = index.load_embedder(cfg.base_model, device=cfg.settings.device, max_seq_length=cfg.settings.max_seq_length)
        return losses.GISTEmbedLoss(model, guide=guide)
    raise ValueError(f"unknown loss {name!r}: use 'corpus', 'mnrl' or 'gist'")
