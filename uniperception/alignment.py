"""A shared embedding space across modalities: the contrastive loss that aligns them, and how to measure it.

One backbone embeds every modality (:meth:`~uniperception.model.UniPerceiver.embed`). Training can pull the embeddings
of one modality towards those of an anchor modality (as ImageBind aligns each modality to images, but with one shared
backbone instead of one encoder per modality): :func:`contrastive_loss` is InfoNCE, where the positives are either the
matching pairs of two batches or, with labels, every sample of the same class. :class:`SameClassPartners` draws those
partners from the anchor's training set. The results are read as class-level retrieval across modalities
(:func:`recall_at_k`, beside :func:`chance_recall_at_k`) and as zero-shot classification of one modality by the class
prototypes of another (:func:`class_prototypes`, :func:`prototype_accuracy`).

Example::

    from uniperception.alignment import class_prototypes, prototype_accuracy, recall_at_k

    audio, images = model.embed(clips), model.embed(pictures)           # (N, C), (M, C)
    print(recall_at_k(audio, images, clip_labels, picture_labels))      # {"recall@1": ..., "recall@5": ...}
    prototypes = class_prototypes(images, picture_labels, num_classes=10)
    print(prototype_accuracy(prototypes, audio, clip_labels))           # audio classified by image prototypes
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UniPerceptionError

__all__ = ["SameClassPartners", "chance_recall_at_k", "class_prototypes", "contrastive_loss", "match_classes",
           "prototype_accuracy", "recall_at_k"]


def _check_embeddings(name: str, vectors: torch.Tensor) -> None:
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[0] == 0:
        shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise UniPerceptionError(f"{name} must be a non-empty (N, D) tensor of embeddings, got {shape}")
    if not torch.isfinite(vectors).all():
        raise UniPerceptionError(f"{name} holds NaN or infinite values")


def _check_pair(queries: torch.Tensor, keys: torch.Tensor, names=("queries", "keys")) -> None:
    _check_embeddings(names[0], queries)
    _check_embeddings(names[1], keys)
    if queries.shape[1] != keys.shape[1]:
        raise UniPerceptionError(f"{names[0]} and {names[1]} differ in width: {queries.shape[1]} against "
                                 f"{keys.shape[1]}")


def _labels(name: str, labels, count: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.numel() != count:
        raise UniPerceptionError(f"{name} has {labels.numel()} labels for {count} embeddings")
    return labels


def contrastive_loss(queries: torch.Tensor, keys: torch.Tensor, query_labels=None, key_labels=None,
                     temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE between ``queries`` ``(N, D)`` and ``keys`` ``(M, D)`` (cosine similarities divided by
    ``temperature``).

    Without labels the positives are the pairs ``(i, i)`` (``N == M``). With labels every key of the query's class
    is a positive, and a row's target is spread evenly over its positives (the supervised-contrastive form, so two
    samples of one class are never pushed apart); rows without any positive are left out of their direction's mean.
    The result is the mean of the query-to-key and key-to-query losses.
    """
    _check_pair(queries, keys)
    if not temperature > 0:
        raise UniPerceptionError(f"temperature must be positive, got {temperature}")
    logits = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T / temperature  # (N, M)
    if query_labels is None and key_labels is None:
        if queries.shape[0] != keys.shape[0]:
            raise UniPerceptionError(f"paired embeddings need as many queries as keys, got {queries.shape[0]} and "
                                     f"{keys.shape[0]}; pass labels for same-class positives")
        targets = torch.arange(queries.shape[0], device=queries.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    if query_labels is None or key_labels is None:
        raise UniPerceptionError("give labels for both queries and keys, or for neither")
    positive = (_labels("query_labels", query_labels, queries.shape[0]).to(logits.device)[:, None]
                == _labels("key_labels", key_labels, keys.shape[0]).to(logits.device)[None, :]).float()

    def direction(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = mask.sum(1) > 0
        target = mask[rows] / mask[rows].sum(1, keepdim=True)
        return -(target * F.log_softmax(scores[rows], dim=1)).sum(1).mean()

    if not bool(positive.any()):
        raise UniPerceptionError("no query shares a class with any key: the contrastive loss has no positive pair")
    return (direction(logits, positive) + direction(logits.T, positive.T)) / 2


def recall_at_k(queries: torch.Tensor, gallery: torch.Tensor, query_labels, gallery_labels,
                ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Class-level retrieval: the fraction of queries ``(N, D)`` among whose ``k`` nearest gallery items ``(M, D)``
    (cosine similarity) is one of their class, for each ``k`` (capped at ``M``): ``{"recall@1": ..., ...}``."""
    _check_pair(queries, gallery, ("queries", "gallery"))
    query_labels = _labels("query_labels", query_labels, queries.shape[0])
    gallery_labels = _labels("gallery_labels", gallery_labels, gallery.shape[0])
    similarity = F.normalize(queries.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    ranked = gallery_labels[similarity.argsort(dim=1, descending=True).cpu()]  # (N, M) labels by rank
    hits = ranked == query_labels[:, None]
    result = {}
    for k in ks:
        if k < 1:
            raise UniPerceptionError(f"k must be at least 1, got {k}")
        result[f"recall@{k}"] = float(hits[:, :min(k, hits.shape[1])].any(dim=1).float().mean())
    return result


def chance_recall_at_k(query_labels, gallery_labels, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """The expected :func:`recall_at_k` of a random ranking: for a query whose class has ``g`` of the ``M`` gallery
    items, ``1 - C(M - g, k) / C(M, k)``, averaged over the queries."""
    query_labels = torch.as_tensor(query_labels).reshape(-1).long()
    gallery_labels = torch.as_tensor(gallery_labels).reshape(-1).long()
    if query_labels.numel() == 0 or gallery_labels.numel() == 0:
        raise UniPerceptionError("chance_recall_at_k needs at least one query and one gallery label")
    total = gallery_labels.numel()
    per_class = {int(c): int(n) for c, n in zip(*torch.unique(gallery_labels, return_counts=True), strict=True)}
    result = {}
    for k in ks:
        taken = min(k, total)
        misses = [math.comb(total - per_class.get(int(c), 0), taken) / math.comb(total, taken) for c in query_labels]
        result[f"recall@{k}"] = 1.0 - sum(misses) / len(misses)
    return result


def class_prototypes(embeddings: torch.Tensor, labels, num_classes: int) -> torch.Tensor:
    """``(num_classes, D)``: the normalised mean of each class's normalised embeddings."""
    _check_embeddings("embeddings", embeddings)
    labels = _labels("labels", labels, embeddings.shape[0])
    unit = F.normalize(embeddings.float(), dim=1)
    prototypes = torch.zeros(num_classes, unit.shape[1]).index_add_(0, labels.cpu(), unit.cpu())
    empty = [c for c in range(num_classes) if not bool((labels == c).any())]
    if empty:
        raise UniPerceptionError(f"class_prototypes: classes {empty} have no sample")
    return F.normalize(prototypes, dim=1)


def prototype_accuracy(prototypes: torch.Tensor, queries: torch.Tensor, query_labels) -> float:
    """Zero-shot classification: the fraction of queries ``(N, D)`` whose nearest prototype ``(K, D)`` (cosine) is
    their class."""
    _check_pair(queries, prototypes, ("queries", "prototypes"))
    query_labels = _labels("query_labels", query_labels, queries.shape[0])
    nearest = (F.normalize(queries.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).T).argmax(dim=1)
    return float((nearest.cpu() == query_labels.cpu()).float().mean())


def match_classes(names_a: Sequence[str], names_b: Sequence[str]) -> Tuple[List[str], Dict[int, int], Dict[int, int]]:
    """The class names two label sets share (sorted), and for each set the map from its label to the shared
    label; labels of classes the other set lacks are not in the maps."""
    shared = sorted(set(map(str, names_a)) & set(map(str, names_b)))
    if not shared:
        raise UniPerceptionError(f"the two sets share no class name: {list(names_a)[:10]} against "
                                 f"{list(names_b)[:10]}")
    index = {name: i for i, name in enumerate(shared)}
    to_a = {i: index[str(n)] for i, n in enumerate(names_a) if str(n) in index}
    to_b = {i: index[str(n)] for i, n in enumerate(names_b) if str(n) in index}
    return shared, to_a, to_b


class SameClassPartners:
    """For samples of set A, random samples of set B of the same class, drawn the same way again for the same
    ``(seed, epoch, step)`` (so a resumed run pairs as the uninterrupted one did).

    Args:
        labels_a: the label of every item of A (negative: a class B lacks; never requested).
        labels_b: the label of every item of B, in the same label space (negative: a class A lacks).
        seed: the run's seed.
    """

    def __init__(self, labels_a: Sequence[int], labels_b: Sequence[int], seed: int = 0):
        self.seed = int(seed)
        labels_b = np.asarray(list(labels_b), dtype=np.int64)
        self.members = {int(c): np.flatnonzero(labels_b == c) for c in np.unique(labels_b) if c >= 0}
        wanted = {int(c) for c in labels_a if c >= 0}
        missing = sorted(wanted - set(self.members))
        if missing:
            raise UniPerceptionError(f"set B has no sample of the classes {missing} that set A has")

    def draw(self, labels, epoch: int, step: int) -> torch.Tensor:
        """An index into B of a sample of each label's class, ``(N,)``."""
        rng = np.random.default_rng([self.seed, int(epoch), int(step)])
        chosen = []
        for label in torch.as_tensor(labels).reshape(-1).tolist():
            members = self.members.get(int(label))
            if members is None:
                raise UniPerceptionError(f"set B has no sample of class {label}")
            chosen.append(int(members[rng.integers(len(members))]))
        return torch.tensor(chosen, dtype=torch.long)
