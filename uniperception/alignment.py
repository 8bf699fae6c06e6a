"""A shared embedding space across modalities: the contrastive loss that aligns them, and how to measure it.

One backbone embeds every modality (:meth:`~uniperception.model.UniPerceiver.embed`). Training can pull the embeddings
of one modality towards those of an anchor modality (as ImageBind aligns each modality to images, but with one shared
backbone instead of one encoder per modality): :func:`contrastive_loss` is InfoNCE, where the positives are either the
matching pairs of two batches or, with labels, every sample of the same class. :class:`SameClassPartners` draws those
partners from the anchor's training set, for classes matched by name with :func:`match_classes`. The results are read
as class-level retrieval across modalities (:func:`recall_at_k`, beside :func:`chance_recall_at_k`) and as zero-shot
classification of one modality by the class prototypes of another (:func:`class_prototypes`,
:func:`prototype_accuracy`).

Example::

    from uniperception.alignment import class_prototypes, prototype_accuracy, recall_at_k

    audio, images = model.embed(clips), model.embed(pictures)           # (N, D), (M, D)
    print(recall_at_k(audio, images, clip_labels, picture_labels))      # {"recall@1": ..., "recall@5": ...}
    prototypes = class_prototypes(images, picture_labels, num_classes=10)
    print(prototype_accuracy(prototypes, audio, clip_labels))           # audio classified by image prototypes
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UniPerceptionError

__all__ = ["SameClassPartners", "chance_recall_at_k", "class_prototypes", "contrastive_loss", "match_classes",
           "prototype_accuracy", "recall_at_k"]

Labels = Union[torch.Tensor, np.ndarray, Sequence[int]]

# Queries scored against the gallery at a time by recall_at_k, so an (N, M) similarity matrix is never held whole.
_QUERY_CHUNK = 1024


# ---------------------------------------------------------------------------------------------------------------------
# input checks


def _check_embeddings(name: str, vectors) -> None:
    """``vectors`` is a non-empty floating ``(N, D)`` tensor of finite values."""
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or 0 in vectors.shape:
        shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise UniPerceptionError(f"{name} must be a non-empty (N, D) tensor of embeddings, got {shape}")
    if not vectors.is_floating_point():
        raise UniPerceptionError(f"{name} must be a floating-point tensor of embeddings, got {vectors.dtype}")
    if not bool(torch.isfinite(vectors).all()):
        raise UniPerceptionError(f"{name} holds NaN or infinite values")


def _check_pair(first: torch.Tensor, second: torch.Tensor, names: Tuple[str, str]) -> None:
    """Both are embeddings ``(N, D)`` and ``(M, D)`` of the same width ``D`` on the same device."""
    _check_embeddings(names[0], first)
    _check_embeddings(names[1], second)
    if first.shape[1] != second.shape[1]:
        raise UniPerceptionError(f"{names[0]} and {names[1]} differ in width: {first.shape[1]} against "
                                 f"{second.shape[1]}")
    if first.device != second.device:
        raise UniPerceptionError(f"{names[0]} and {names[1]} are on different devices: {first.device} against "
                                 f"{second.device}")


def _labels(name: str, labels: Labels, count: Optional[int] = None) -> torch.Tensor:
    """``labels`` as a CPU ``(N,)`` int64 tensor of whole numbers, ``N == count`` where a count is given."""
    try:
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    except (TypeError, ValueError, RuntimeError) as error:
        raise UniPerceptionError(f"{name} must be a sequence of integer class labels: {error}") from None
    labels = labels.detach().cpu()
    if labels.ndim != 1:
        raise UniPerceptionError(f"{name} must be one label per item, shape (N,), got {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise UniPerceptionError(f"{name} must hold integer class labels, got {labels.dtype}")
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not bool((labels == labels.round()).all()):
            raise UniPerceptionError(f"{name} must hold integer class labels, got non-integer values")
    if count is not None and labels.numel() != count:
        raise UniPerceptionError(f"{name} has {labels.numel()} labels for {count} embeddings")
    return labels.long()


def _ks(ks: Sequence[int]) -> List[int]:
    """``ks`` as a list of positive integers."""
    if isinstance(ks, (int, np.integer)):
        ks = [ks]
    checked = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UniPerceptionError(f"every k must be a positive integer, got {k!r}")
        checked.append(int(k))
    return checked


def _natural(name: str, value) -> int:
    """``value`` as a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise UniPerceptionError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------------------------------
# the loss


def contrastive_loss(queries: torch.Tensor, keys: torch.Tensor, query_labels: Labels = None,
                     key_labels: Labels = None, temperature: Union[float, torch.Tensor] = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE between ``queries`` ``(N, D)`` and ``keys`` ``(M, D)``.

    Both are L2-normalised; the logits are their cosine similarities ``(N, M)`` divided by ``temperature``.

    * Without labels the positives are the pairs ``(i, i)``, so ``N == M``; this is the textbook InfoNCE (CLIP's
      loss): cross-entropy of each row against its diagonal entry.
    * With labels (``query_labels`` ``(N,)`` and ``key_labels`` ``(M,)``, both or neither) every key of the query's
      class is a positive, and a row's target distribution is uniform over its positives (the
      supervised-contrastive form, so two samples of one class are never pushed apart). Rows without any positive
      are left out of their direction's mean. With all labels distinct and ``N == M`` this equals the paired form.

    The result is the mean of the query-to-key loss (over the rows of the logits) and the key-to-query loss (over
    its columns): a scalar that backpropagates to both inputs (and to ``temperature`` when it is a tensor that
    requires grad). The logits are computed in float32 or the inputs' wider dtype, with autocast turned off.

    Raises:
        UniPerceptionError: inputs not floating ``(N, D)``/``(M, D)`` of one width and device, NaN or infinite
            values, ``temperature`` not finite and positive, labels for one side only, label counts that do not
            match, ``N != M`` without labels, or no query sharing a class with any key.
    """
    _check_pair(queries, keys, ("queries", "keys"))
    scale = torch.as_tensor(temperature).detach()
    if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise UniPerceptionError(f"temperature must be a finite positive number, got {temperature}")
    if query_labels is None and key_labels is None:
        if queries.shape[0] != keys.shape[0]:
            raise UniPerceptionError(f"paired embeddings need as many queries as keys, got {queries.shape[0]} and "
                                     f"{keys.shape[0]}; pass labels for same-class positives")
        positive = None
    elif query_labels is None or key_labels is None:
        raise UniPerceptionError("give labels for both queries and keys, or for neither")
    else:
        query_labels = _labels("query_labels", query_labels, queries.shape[0]).to(queries.device)
        key_labels = _labels("key_labels", key_labels, keys.shape[0]).to(queries.device)
        positive = query_labels[:, None] == key_labels[None, :]  # (N, M)
        if not bool(positive.any()):
            raise UniPerceptionError("no query shares a class with any key: the contrastive loss has no positive "
                                     "pair")

    # at least float32 and outside autocast: the logits are divided by a small temperature, and half precision
    # would blur similarities that differ in the third decimal
    dtype = torch.promote_types(torch.promote_types(queries.dtype, keys.dtype), torch.float32)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        logits = F.normalize(queries.to(dtype), dim=1) @ F.normalize(keys.to(dtype), dim=1).T / temperature  # (N, M)
        if positive is None:
            targets = torch.arange(logits.shape[0], device=logits.device)
            return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        return (_soft_cross_entropy(logits, positive) + _soft_cross_entropy(logits.T, positive.T)) / 2


def _soft_cross_entropy(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """The mean, over the rows of ``logits`` ``(N, M)`` with at least one positive in the boolean mask ``positive``
    ``(N, M)``, of the cross-entropy against the uniform distribution over the row's positives."""
    rows = positive.any(dim=1)
    target = positive[rows].to(logits.dtype)
    target = target / target.sum(dim=1, keepdim=True)
    return -(target * F.log_softmax(logits[rows], dim=1)).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------------------------------
# retrieval


def recall_at_k(queries: torch.Tensor, gallery: torch.Tensor, query_labels: Labels, gallery_labels: Labels,
                ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Class-level retrieval of ``gallery`` ``(M, D)`` items by ``queries`` ``(N, D)``, by cosine similarity.

    A query is a hit at ``k`` when any of its ``k`` nearest gallery items has the query's class (so an audio clip
    of a "3" that retrieves any image of a "3" among its top ``k`` counts); ``k`` larger than ``M`` is taken as
    ``M``. A query whose class has no gallery item is never a hit. Ties in similarity are broken arbitrarily.

    Returns:
        ``{"recall@<k>": fraction of queries that are hits at k}`` for each ``k`` in ``ks``.
    """
    ks = _ks(ks)
    _check_pair(queries, gallery, ("queries", "gallery"))
    query_labels = _labels("query_labels", query_labels, queries.shape[0])
    gallery_labels = _labels("gallery_labels", gallery_labels, gallery.shape[0])
    if not ks:
        return {}
    deepest = min(max(ks), gallery.shape[0])
    unit_gallery = F.normalize(gallery.float(), dim=1)
    nearest = []  # (N, deepest) gallery indices, nearest first
    for start in range(0, queries.shape[0], _QUERY_CHUNK):
        similarity = F.normalize(queries[start:start + _QUERY_CHUNK].float(), dim=1) @ unit_gallery.T
        nearest.append(similarity.topk(deepest, dim=1).indices.cpu())
    hits = gallery_labels[torch.cat(nearest)] == query_labels[:, None]  # (N, deepest)
    # the 0-based rank of each query's first hit; a query without one gets a rank no k reaches
    first_hit = torch.where(hits.any(dim=1), hits.float().argmax(dim=1), torch.tensor(max(ks)))
    return {f"recall@{k}": float((first_hit < k).float().mean()) for k in ks}


def chance_recall_at_k(query_labels: Labels, gallery_labels: Labels, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """The exact expected :func:`recall_at_k` of a uniformly random ranking of the gallery.

    For a query whose class has ``g`` of the ``G`` gallery items, the chance that ``k`` items drawn without
    replacement include none of them is hypergeometric, so its expected hit rate is ``1 - C(G - g, k) / C(G, k)``
    (``k`` capped at ``G``); the result averages that over the queries.

    Args:
        query_labels: ``(N,)`` the class of each query.
        gallery_labels: ``(M,)`` the class of each gallery item.

    Returns:
        ``{"recall@<k>": expected recall}`` for each ``k`` in ``ks``.
    """
    ks = _ks(ks)
    query_labels = _labels("query_labels", query_labels)
    gallery_labels = _labels("gallery_labels", gallery_labels)
    if query_labels.numel() == 0 or gallery_labels.numel() == 0:
        raise UniPerceptionError("chance_recall_at_k needs at least one query and one gallery label")
    total = gallery_labels.numel()
    in_gallery = Counter(gallery_labels.tolist())
    queries_per_class = Counter(query_labels.tolist())
    result = {}
    for k in ks:
        taken = min(k, total)
        expected_misses = sum(count * math.comb(total - in_gallery.get(label, 0), taken)
                              for label, count in queries_per_class.items())
        # one exact integer division, so large galleries lose no precision
        result[f"recall@{k}"] = 1.0 - expected_misses / (math.comb(total, taken) * query_labels.numel())
    return result


# ---------------------------------------------------------------------------------------------------------------------
# zero-shot classification by prototypes


def class_prototypes(embeddings: torch.Tensor, labels: Labels, num_classes: int) -> torch.Tensor:
    """The prototype of each class: the L2-normalised mean of its L2-normalised embeddings.

    Args:
        embeddings: ``(N, D)``.
        labels: ``(N,)`` classes in ``[0, num_classes)``.
        num_classes: ``K``, the number of prototypes.

    Returns:
        ``(K, D)`` float32 unit vectors on the embeddings' device; row ``c`` is class ``c``'s prototype.

    Raises:
        UniPerceptionError: a label outside ``[0, num_classes)``, or a class without any sample.
    """
    _check_embeddings("embeddings", embeddings)
    num_classes = _natural("num_classes", num_classes)
    if num_classes == 0:
        raise UniPerceptionError("num_classes must be at least 1")
    labels = _labels("labels", labels, embeddings.shape[0])
    outside = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
    if outside:
        raise UniPerceptionError(f"class_prototypes: labels {outside[:10]} lie outside [0, {num_classes})")
    counts = torch.bincount(labels, minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise UniPerceptionError(f"class_prototypes: classes {empty} have no sample")
    unit = F.normalize(embeddings.float(), dim=1)
    sums = torch.zeros(num_classes, unit.shape[1], device=unit.device).index_add_(0, labels.to(unit.device), unit)
    return F.normalize(sums, dim=1)  # the sum points where the mean does


def prototype_accuracy(prototypes: torch.Tensor, queries: torch.Tensor, query_labels: Labels) -> float:
    """Zero-shot classification: the fraction of ``queries`` ``(N, D)`` whose most cosine-similar row of
    ``prototypes`` ``(K, D)`` (from :func:`class_prototypes` of another modality) is their class.

    Raises:
        UniPerceptionError: a query label outside ``[0, K)``: that class has no prototype to be classified as.
    """
    _check_embeddings("prototypes", prototypes)
    _check_embeddings("queries", queries)
    if queries.shape[1] != prototypes.shape[1]:
        raise UniPerceptionError(f"queries and prototypes differ in width: {queries.shape[1]} against "
                                 f"{prototypes.shape[1]}")
    query_labels = _labels("query_labels", query_labels, queries.shape[0])
    outside = query_labels[(query_labels < 0) | (query_labels >= prototypes.shape[0])].unique().tolist()
    if outside:
        raise UniPerceptionError(f"prototype_accuracy: query labels {outside[:10]} have no prototype (there are "
                                 f"{prototypes.shape[0]})")
    unit_prototypes = F.normalize(prototypes.float(), dim=1).to(queries.device)
    nearest = (F.normalize(queries.float(), dim=1) @ unit_prototypes.T).argmax(dim=1).cpu()
    return float((nearest == query_labels).float().mean())


# ---------------------------------------------------------------------------------------------------------------------
# same-class partners across two datasets


def match_classes(names_a: Sequence[str], names_b: Sequence[str]) -> Tuple[List[str], Dict[int, int], Dict[int, int]]:
    """The classes two datasets share, matched by name (compared as strings, so ``3`` matches ``"3"``).

    Args:
        names_a: the class names of dataset A, indexed by A's labels.
        names_b: the class names of dataset B, indexed by B's labels.

    Returns:
        ``(shared, a_to_shared, b_to_shared)``: the shared names, sorted, and for each dataset the map from its
        label to the index of its class in ``shared``; labels of classes the other dataset lacks are not in the map.

    Raises:
        UniPerceptionError: a name listed twice in one dataset, or no name in common.
    """
    names_a, names_b = [str(name) for name in names_a], [str(name) for name in names_b]
    for which, names in (("A", names_a), ("B", names_b)):
        repeated = sorted(name for name, count in Counter(names).items() if count > 1)
        if repeated:
            raise UniPerceptionError(f"the class names of set {which} repeat {repeated[:10]}: each class needs "
                                     "one name")
    shared = sorted(set(names_a) & set(names_b))
    if not shared:
        raise UniPerceptionError(f"the two sets share no class name: {names_a[:10]} against {names_b[:10]}")
    index = {name: i for i, name in enumerate(shared)}
    a_to_shared = {label: index[name] for label, name in enumerate(names_a) if name in index}
    b_to_shared = {label: index[name] for label, name in enumerate(names_b) if name in index}
    return shared, a_to_shared, b_to_shared


class SameClassPartners:
    """For items of dataset A, random items of dataset B of the same class.

    Both label lists are in one label space (map them with :func:`match_classes` first); a negative label marks an
    item whose class the other dataset lacks, which is never requested. The draws of one ``(seed, epoch, step)``
    are the same every time, in every instance built from the same labels, so a resumed run pairs exactly as the
    uninterrupted one did; other steps, epochs or seeds draw independently.

    Args:
        labels_a: ``(N_A,)`` the label of every item of A.
        labels_b: ``(N_B,)`` the label of every item of B.
        seed: the run's seed, a non-negative integer.

    Raises:
        UniPerceptionError: B has no item of a class that A has.

    Example::

        shared, a_to_shared, b_to_shared = match_classes(audio_set.class_names, image_set.class_names)
        partners = SameClassPartners([a_to_shared.get(l, -1) for l in audio_labels],
                                     [b_to_shared.get(l, -1) for l in image_labels], seed=0)
        image_indices = partners.draw(batch_labels, epoch, step)  # (B,) indices into the image set
    """

    def __init__(self, labels_a: Labels, labels_b: Labels, seed: int = 0):
        self.seed = _natural("seed", seed)
        labels_a = _labels("labels_a", labels_a)
        labels_b = _labels("labels_b", labels_b).numpy()
        self.members: Dict[int, np.ndarray] = {int(c): np.flatnonzero(labels_b == c)
                                               for c in np.unique(labels_b) if c >= 0}
        missing = sorted(set(labels_a[labels_a >= 0].tolist()) - set(self.members))
        if missing:
            raise UniPerceptionError(f"set B has no sample of the classes {missing[:10]} that set A has")

    def draw(self, labels: Labels, epoch: int, step: int) -> torch.Tensor:
        """For each of ``labels`` ``(N,)``, the index into B of a uniformly drawn item of that class: ``(N,)``
        int64, deterministic in ``(seed, epoch, step)``.

        Raises:
            UniPerceptionError: B has no item of a requested class.
        """
        rng = np.random.default_rng([self.seed, _natural("epoch", epoch), _natural("step", step)])
        chosen = []
        for label in _labels("labels", labels).tolist():
            members = self.members.get(label)
            if members is None:
                raise UniPerceptionError(f"set B has no sample of class {label}")
            chosen.append(int(members[rng.integers(len(members))]))
        return torch.tensor(chosen, dtype=torch.long)
