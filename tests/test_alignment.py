"""The shared embedding space's pieces: the contrastive loss, cross-modal retrieval and its chance level,
prototypes for zero-shot classification, and same-class partners."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uniperception.alignment import (SameClassPartners, chance_recall_at_k, class_prototypes, contrastive_loss,
                                     match_classes, prototype_accuracy, recall_at_k)
from uniperception.errors import UniPerceptionError


def test_paired_loss_is_textbook_infonce_and_prefers_aligned_pairs():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    b = a + 0.1 * torch.randn(8, 16)
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.1
    targets = torch.arange(8)
    textbook = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(contrastive_loss(a, b, temperature=0.1), textbook)
    # distinct labels make the labelled form the paired one
    torch.testing.assert_close(contrastive_loss(a, b, torch.arange(8), torch.arange(8), temperature=0.1), textbook)
    assert contrastive_loss(a, b) < contrastive_loss(a, b[torch.randperm(8)])


def test_gradients_reach_both_sides():
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    contrastive_loss(a, b).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_same_class_keys_are_interchangeable():
    torch.manual_seed(1)
    a, b = torch.randn(6, 8), torch.randn(5, 8)
    qa, kb = torch.tensor([0, 0, 1, 1, 2, 3]), torch.tensor([0, 1, 0, 2, 1])
    swapped = b[[2, 1, 0, 3, 4]]  # keys 0 and 2 are both class 0
    torch.testing.assert_close(contrastive_loss(a, b, qa, kb), contrastive_loss(a, swapped, qa, kb))
    # a query class without keys (3) is left out, not an error
    assert torch.isfinite(contrastive_loss(a, b, qa, kb))


def test_contrastive_loss_refuses_bad_input():
    a = torch.randn(4, 8)
    for bad, match in (((a, torch.randn(3, 8)), "as many queries as keys"), ((a, torch.randn(4, 6)), "width"),
                       ((a[0], a), r"\(N, D\)"), ((a * float("nan"), a), "NaN")):
        with pytest.raises(UniPerceptionError, match=match):
            contrastive_loss(*bad)
    with pytest.raises(UniPerceptionError, match="temperature"):
        contrastive_loss(a, a, temperature=0.0)
    with pytest.raises(UniPerceptionError, match="no positive pair"):
        contrastive_loss(a, a, torch.zeros(4), torch.ones(4))
    with pytest.raises(UniPerceptionError, match="both queries and keys"):
        contrastive_loss(a, a, torch.zeros(4))


def test_recall_at_k_by_hand():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    gallery_labels = [0, 1, 2, 1]
    queries = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, -0.2]])
    # query 0: nearest are items 0 (class 0), 3 (1): hit at 1; query 1: items 1, 3 both class 1: hit at 1;
    # query 2 (class 1): item 2 (class 2) first, item 1 (class 1) second: a hit at 2 only
    result = recall_at_k(queries, gallery, [0, 1, 1], gallery_labels, ks=(1, 2, 10))
    assert result["recall@1"] == pytest.approx(2 / 3) and result["recall@2"] == pytest.approx(1.0)
    assert result["recall@10"] == pytest.approx(1.0)
    assert recall_at_k(gallery, gallery, gallery_labels, gallery_labels)["recall@1"] == 1.0


def test_chance_recall_matches_random_rankings():
    rng = np.random.default_rng(0)
    gallery_labels = rng.integers(0, 5, 40)
    query_labels = rng.integers(0, 5, 30)
    chance = chance_recall_at_k(query_labels, gallery_labels, ks=(1, 5))
    trials = 2000
    hits = {1: 0, 5: 0}
    for _ in range(trials):
        for label in query_labels:
            order = gallery_labels[rng.permutation(40)]
            for k in hits:
                hits[k] += bool((order[:k] == label).any())
    for k in hits:
        assert hits[k] / (trials * len(query_labels)) == pytest.approx(chance[f"recall@{k}"], abs=0.01)
    # one class in ten, equally many: recall@1 is 1/10
    even = np.repeat(np.arange(10), 5)
    assert chance_recall_at_k(even, even, ks=(1,))["recall@1"] == pytest.approx(0.1)
    assert chance_recall_at_k([0], [0, 1, 1], ks=(2,))["recall@2"] == pytest.approx(1 - math.comb(2, 2) / 3)


def test_prototypes_classify_by_the_nearest_class_mean():
    embeddings = torch.tensor([[2.0, 0.0], [1.0, 0.1], [0.0, 3.0], [0.1, 1.0]])
    prototypes = class_prototypes(embeddings, [0, 0, 1, 1], num_classes=2)
    assert prototypes.shape == (2, 2) and torch.allclose(prototypes.norm(dim=1), torch.ones(2))
    queries = torch.tensor([[1.0, 0.2], [0.2, 1.0], [1.0, 0.9]])
    assert prototype_accuracy(prototypes, queries, [0, 1, 1]) == pytest.approx(2 / 3)
    with pytest.raises(UniPerceptionError, match=r"classes \[2\] have no sample"):
        class_prototypes(embeddings, [0, 0, 1, 1], num_classes=3)


def test_partners_share_the_class_and_repeat_per_step():
    labels_b = [0, 1, 2, 0, 1, 2, 0, -1]
    partners = SameClassPartners([0, 1, 2, -1], labels_b, seed=3)
    wanted = torch.tensor([0, 0, 1, 2, 2, 1])
    drawn = partners.draw(wanted, epoch=1, step=4)
    assert [labels_b[i] for i in drawn.tolist()] == wanted.tolist()
    assert torch.equal(drawn, partners.draw(wanted, epoch=1, step=4))
    draws = {tuple(partners.draw(wanted, epoch=1, step=s).tolist()) for s in range(10)}
    assert len(draws) > 1
    with pytest.raises(UniPerceptionError, match=r"no sample of the classes \[3\]"):
        SameClassPartners([3], labels_b)
    with pytest.raises(UniPerceptionError, match="no sample of class 5"):
        partners.draw([5], 0, 0)


def test_classes_are_matched_by_name():
    shared, to_a, to_b = match_classes(["cat", "dog", "owl"], ["owl", "cat", "cow"])
    assert shared == ["cat", "owl"] and to_a == {0: 0, 2: 1} and to_b == {0: 1, 1: 0}
    with pytest.raises(UniPerceptionError, match="share no class"):
        match_classes(["a"], ["b"])
