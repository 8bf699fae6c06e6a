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


def textbook_infonce(queries, keys, temperature):
    logits = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T / temperature
    targets = torch.arange(queries.shape[0])
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


# ---------------------------------------------------------------------------------------------------------------------
# contrastive_loss


def test_paired_loss_is_textbook_infonce_and_prefers_aligned_pairs():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    b = a + 0.1 * torch.randn(8, 16)
    textbook = textbook_infonce(a, b, 0.1)
    torch.testing.assert_close(contrastive_loss(a, b, temperature=0.1), textbook)
    # distinct labels make the labelled form the paired one, whatever the label values
    torch.testing.assert_close(contrastive_loss(a, b, torch.arange(8), torch.arange(8), temperature=0.1), textbook)
    names = [7, 3, 11, 0, 5, 2, 9, 4]
    torch.testing.assert_close(contrastive_loss(a, b, names, names, temperature=0.1), textbook)
    # the loss ignores the embeddings' lengths
    torch.testing.assert_close(contrastive_loss(3 * a, 0.5 * b, temperature=0.1), textbook)
    shuffled = b[torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])]
    assert contrastive_loss(a, b) < contrastive_loss(a, shuffled)
    assert contrastive_loss(a, b, torch.arange(8), torch.arange(8)) < contrastive_loss(a, shuffled, torch.arange(8),
                                                                                      torch.arange(8))


def test_the_loss_is_symmetric_in_its_two_directions():
    torch.manual_seed(2)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    torch.testing.assert_close(contrastive_loss(a, b), contrastive_loss(b, a))
    qa, kb = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1, 0, 2, 0, 1, 1])
    torch.testing.assert_close(contrastive_loss(a, b, qa, kb), contrastive_loss(b, a, kb, qa))


def test_labelled_loss_by_hand():
    # two queries of class 0 against keys of classes (0, 0, 1): each class-0 row's target is (1/2, 1/2, 0)
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])
    temperature = 0.5
    logits = queries @ keys.T / temperature
    rows = -(0.5 * F.log_softmax(logits, 1)[:, :2]).sum(1).mean()
    columns = -(0.5 * F.log_softmax(logits.T[:2], 1)).sum(1).mean()  # key 2 (class 1) has no positive: left out
    expected = (rows + columns) / 2
    torch.testing.assert_close(contrastive_loss(queries, keys, [0, 0], [0, 0, 1], temperature=temperature), expected)


def test_gradients_reach_both_sides():
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    loss = contrastive_loss(a, b)
    assert loss.ndim == 0
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    a.grad, b.grad = None, None
    contrastive_loss(a, b[:3], [0, 1, 1, 2], [1, 0, 2]).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    temperature = torch.tensor(0.1, requires_grad=True)
    contrastive_loss(a, b, temperature=temperature).backward()
    assert temperature.grad is not None and temperature.grad != 0


def test_same_class_keys_are_interchangeable():
    torch.manual_seed(1)
    a, b = torch.randn(6, 8), torch.randn(5, 8)
    qa, kb = torch.tensor([0, 0, 1, 1, 2, 3]), torch.tensor([0, 1, 0, 2, 1])
    swapped = b[[2, 1, 0, 3, 4]]  # keys 0 and 2 are both class 0
    torch.testing.assert_close(contrastive_loss(a, b, qa, kb), contrastive_loss(a, swapped, qa, kb))
    # a query class without keys (3) is left out of the query-to-key mean, not an error; that query still counts
    # as a negative for the keys
    assert torch.isfinite(contrastive_loss(a, b, qa, kb))
    assert contrastive_loss(a, b, qa, kb) != contrastive_loss(a[:5], b, qa[:5], kb)


def test_the_loss_runs_in_float32_under_autocast_and_for_half_inputs():
    torch.manual_seed(3)
    a, b = torch.randn(8, 32), torch.randn(8, 32)
    exact = contrastive_loss(a, b, temperature=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = contrastive_loss(a, b, temperature=0.05)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact)
    mixed = contrastive_loss(a.half(), b, temperature=0.05)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-2, atol=1e-2)


def test_contrastive_loss_refuses_bad_input():
    a = torch.randn(4, 8)
    cases = [((a, torch.randn(3, 8)), "as many queries as keys"), ((a, torch.randn(4, 6)), "width"),
             ((a[0], a), r"\(N, D\)"), ((a, a[None]), r"\(N, D\)"), ((a[:0], a[:0]), "non-empty"),
             ((a * float("nan"), a), "NaN"), ((a, a / 0), "infinite"), (([[1.0] * 8], a), r"\(N, D\)"),
             ((a.long(), a), "floating-point")]
    for bad, match in cases:
        with pytest.raises(UniPerceptionError, match=match):
            contrastive_loss(*bad)
    for temperature in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(UniPerceptionError, match="temperature"):
            contrastive_loss(a, a, temperature=temperature)
    with pytest.raises(UniPerceptionError, match="no positive pair"):
        contrastive_loss(a, a, torch.zeros(4), torch.ones(4))
    with pytest.raises(UniPerceptionError, match="both queries and keys"):
        contrastive_loss(a, a, torch.zeros(4))
    with pytest.raises(UniPerceptionError, match="3 labels for 4"):
        contrastive_loss(a, a, [0, 1, 2], [0, 1, 2, 3])
    with pytest.raises(UniPerceptionError, match="integer class labels"):
        contrastive_loss(a, a, [0.5, 1, 2, 3], [0, 1, 2, 3])
    with pytest.raises(UniPerceptionError, match=r"shape \(N,\)"):
        contrastive_loss(a, a, [[0, 1], [2, 3]], [0, 1, 2, 3])


# ---------------------------------------------------------------------------------------------------------------------
# recall@k and its chance level


def test_recall_at_k_by_hand():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    gallery_labels = [0, 1, 2, 1]
    queries = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, -0.2], [0.0, -1.0]])
    # query 0 (class 0): nearest are items 0 (class 0), 3 (1): a hit at 1
    # query 1 (class 1): items 1, 3 are both class 1: a hit at 1
    # query 2 (class 1): item 2 (class 2) first, item 1 (class 1) second: a hit from 2 on
    # query 3 (class 3): no gallery item has its class: never a hit
    result = recall_at_k(queries, gallery, [0, 1, 1, 3], gallery_labels, ks=(1, 2, 10))
    assert result == pytest.approx({"recall@1": 2 / 4, "recall@2": 3 / 4, "recall@10": 3 / 4})
    assert set(recall_at_k(queries, gallery, [0, 1, 1, 3], gallery_labels)) == {"recall@1", "recall@5"}


def test_perfect_embeddings_recall_everything():
    torch.manual_seed(4)
    centres = F.normalize(torch.randn(5, 12), dim=1)
    gallery_labels = torch.arange(30) % 5
    query_labels = torch.randint(0, 5, (17,))
    gallery = 2.0 * centres[gallery_labels] + 0.01 * torch.randn(30, 12)
    queries = centres[query_labels] + 0.01 * torch.randn(17, 12)
    assert recall_at_k(queries, gallery, query_labels, gallery_labels, ks=(1, 5)) == {"recall@1": 1.0,
                                                                                      "recall@5": 1.0}
    # the wrong class everywhere: no hit at 1
    assert recall_at_k(queries, gallery, (query_labels + 1) % 5, gallery_labels, ks=(1,))["recall@1"] == 0.0


def test_recall_refuses_bad_input():
    e = torch.randn(4, 3)
    for ks in ((0,), (1.5,), (-1,)):
        with pytest.raises(UniPerceptionError, match="positive integer"):
            recall_at_k(e, e, [0, 1, 2, 3], [0, 1, 2, 3], ks=ks)
    with pytest.raises(UniPerceptionError, match="width"):
        recall_at_k(e, torch.randn(4, 2), [0, 1, 2, 3], [0, 1, 2, 3])
    with pytest.raises(UniPerceptionError, match="2 labels for 4"):
        recall_at_k(e, e, [0, 1], [0, 1, 2, 3])


def test_chance_recall_matches_random_rankings():
    rng = np.random.default_rng(0)
    gallery_labels = rng.integers(0, 5, 40)
    query_labels = rng.integers(0, 5, 30)
    chance = chance_recall_at_k(query_labels, gallery_labels, ks=(1, 5, 40, 100))
    trials = 4000
    orders = np.argsort(rng.random((trials, len(query_labels), len(gallery_labels))), axis=2)  # random rankings
    ranked = gallery_labels[orders]  # (trials, queries, gallery)
    for k in (1, 5, 40):
        estimate = (ranked[:, :, :k] == query_labels[None, :, None]).any(axis=2).mean()
        assert estimate == pytest.approx(chance[f"recall@{k}"], abs=0.01)
    assert chance["recall@40"] == chance["recall@100"]  # k is capped at the gallery's size
    # one class in ten, equally many: recall@1 is 1/10
    even = np.repeat(np.arange(10), 5)
    assert chance_recall_at_k(even, even, ks=(1,))["recall@1"] == pytest.approx(0.1)
    assert chance_recall_at_k([0], [0, 1, 1], ks=(2,))["recall@2"] == pytest.approx(1 - math.comb(2, 2) / 3)
    assert chance_recall_at_k([7], [0, 1, 1], ks=(3,))["recall@3"] == 0.0  # its class is not in the gallery
    with pytest.raises(UniPerceptionError, match="positive integer"):
        chance_recall_at_k([0], [0], ks=(0,))
    with pytest.raises(UniPerceptionError, match="at least one"):
        chance_recall_at_k([], [0])


def test_chance_recall_is_exact_for_large_galleries():
    gallery = np.repeat(np.arange(100), 200)  # 20000 items, 200 per class
    chance = chance_recall_at_k([3, 4], gallery, ks=(1, 1000))
    assert chance["recall@1"] == pytest.approx(0.01)
    assert chance["recall@1000"] == pytest.approx(1 - math.prod((19800 - i) / (20000 - i) for i in range(1000)))


# ---------------------------------------------------------------------------------------------------------------------
# prototypes


def test_prototypes_classify_by_the_nearest_class_mean():
    embeddings = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [0.0, 1.0]])
    prototypes = class_prototypes(embeddings, [0, 0, 1, 1], num_classes=2)
    # class 0: the mean of (1, 0) and (0.707, 0.707), normalised; class 1: (0, 1)
    half = math.sqrt(0.5)
    expected = F.normalize(torch.tensor([[1.0 + half, half], [0.0, 1.0]]), dim=1)
    torch.testing.assert_close(prototypes, expected)
    queries = torch.tensor([[1.0, 0.2], [0.2, 1.0], [1.0, 0.9]])
    assert prototype_accuracy(prototypes, queries, [0, 1, 1]) == pytest.approx(2 / 3)
    assert prototype_accuracy(prototypes, queries, [0, 1, 0]) == 1.0


def test_prototypes_refuse_bad_input():
    embeddings = torch.randn(4, 2)
    with pytest.raises(UniPerceptionError, match=r"classes \[2\] have no sample"):
        class_prototypes(embeddings, [0, 0, 1, 1], num_classes=3)
    with pytest.raises(UniPerceptionError, match=r"labels \[-1, 5\] lie outside \[0, 3\)"):
        class_prototypes(embeddings, [0, 1, -1, 5], num_classes=3)
    with pytest.raises(UniPerceptionError, match="num_classes"):
        class_prototypes(embeddings, [0, 0, 0, 0], num_classes=0)
    prototypes = class_prototypes(embeddings, [0, 0, 1, 1], num_classes=2)
    with pytest.raises(UniPerceptionError, match=r"labels \[2\] have no prototype"):
        prototype_accuracy(prototypes, embeddings, [0, 1, 2, 1])
    with pytest.raises(UniPerceptionError, match="width"):
        prototype_accuracy(prototypes, torch.randn(4, 3), [0, 1, 0, 1])


# ---------------------------------------------------------------------------------------------------------------------
# same-class partners


def test_partners_share_the_class_and_repeat_per_step():
    labels_b = [0, 1, 2, 0, 1, 2, 0, -1, 2, 1]
    partners = SameClassPartners([0, 1, 2, -1], labels_b, seed=3)
    wanted = torch.tensor([0, 0, 1, 2, 2, 1, 0, 0])
    drawn = partners.draw(wanted, epoch=1, step=4)
    assert drawn.dtype == torch.long and drawn.shape == wanted.shape
    assert [labels_b[i] for i in drawn.tolist()] == wanted.tolist()
    # the same (seed, epoch, step) draws the same partners, also in a new instance (a resumed run)
    assert torch.equal(drawn, partners.draw(wanted, epoch=1, step=4))
    assert torch.equal(drawn, SameClassPartners(np.array([0, 1, 2]), torch.tensor(labels_b), seed=3).draw(
        wanted.numpy(), 1, 4))
    by_step = {tuple(partners.draw(wanted, epoch=1, step=s).tolist()) for s in range(10)}
    by_epoch = {tuple(partners.draw(wanted, epoch=e, step=4).tolist()) for e in range(10)}
    by_seed = {tuple(SameClassPartners([0], labels_b, seed=s).draw(wanted, 1, 4).tolist()) for s in range(10)}
    assert min(len(by_step), len(by_epoch), len(by_seed)) > 1
    for draws in (by_step, by_epoch, by_seed):
        for draw in draws:
            assert [labels_b[i] for i in draw] == wanted.tolist()
    assert partners.draw([], 0, 0).shape == (0,)


def test_partners_cover_every_item_of_a_class():
    labels_b = [5] * 4 + [6] * 2
    partners = SameClassPartners([5, 6], labels_b)
    seen = set()
    for step in range(50):
        seen.update(partners.draw([5, 5, 6], epoch=0, step=step).tolist())
    assert seen == set(range(6))


def test_partners_refuse_missing_classes_and_bad_arguments():
    labels_b = [0, 1, 2, 0]
    with pytest.raises(UniPerceptionError, match=r"no sample of the classes \[3\]"):
        SameClassPartners([3, 0], labels_b)
    partners = SameClassPartners([0, 1], labels_b)
    with pytest.raises(UniPerceptionError, match="no sample of class 5"):
        partners.draw([0, 5], 0, 0)
    with pytest.raises(UniPerceptionError, match="seed"):
        SameClassPartners([0], labels_b, seed=-1)
    with pytest.raises(UniPerceptionError, match="step"):
        partners.draw([0], 0, -1)
    with pytest.raises(UniPerceptionError, match="epoch"):
        partners.draw([0], 0.5, 0)


def test_classes_are_matched_by_name():
    shared, to_a, to_b = match_classes(["cat", "dog", "owl"], ["owl", "cat", "cow"])
    assert shared == ["cat", "owl"] and to_a == {0: 0, 2: 1} and to_b == {0: 1, 1: 0}
    shared, to_a, to_b = match_classes([0, 1, 2], ["2", "1"])  # names compare as text
    assert shared == ["1", "2"] and to_a == {1: 0, 2: 1} and to_b == {0: 1, 1: 0}
    with pytest.raises(UniPerceptionError, match="share no class"):
        match_classes(["a"], ["b"])
    with pytest.raises(UniPerceptionError, match=r"set B repeat \['b'\]"):
        match_classes(["a", "b"], ["b", "b"])


def test_matched_classes_feed_the_partners():
    names_a, names_b = ["dog", "cat", "bird"], ["cat", "dog", "cow"]
    labels_a, labels_b = [0, 1, 2, 1, 0], [2, 0, 1, 0, 1, 2]
    _, a_to_shared, b_to_shared = match_classes(names_a, names_b)
    shared_a = [a_to_shared.get(label, -1) for label in labels_a]  # bird is not in B: -1
    shared_b = [b_to_shared.get(label, -1) for label in labels_b]
    partners = SameClassPartners(shared_a, shared_b, seed=7)
    requested = [label for label in shared_a if label >= 0]
    drawn = partners.draw(requested, epoch=0, step=0).tolist()
    assert [names_b[labels_b[i]] for i in drawn] == [names_a[label] for label in labels_a if label != 2]
