import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from fmnist_cluster import metrics
from fmnist_cluster.metrics import acc, acc_majority, ari, mapped_confusion, nmi

STUDY_DIAGONAL = [594, 890, 0, 0, 619, 663, 359, 774, 762, 942]  # KMeans on test, study.md


def random_labels(seed, n=500, k=10):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    noisy = np.where(rng.random(n) < 0.4, rng.integers(0, k, n), y)
    return y, rng.permutation(k)[noisy]  # clusters are a shuffled, noisy copy of the labels


def test_hand_worked_example():
    y = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    c = [5, 5, 7, 7, 7, 7, 9, 9, 9, 5]
    # one-to-one: 5->0 (2), 7->1 (3), 9->2 (3) = 8/10; majority: same mapping here
    assert acc(y, c) == pytest.approx(0.8)
    assert acc_majority(y, c) == pytest.approx(0.8)
    # two clusters that both hold mostly label 0: majority maps both to 0, Hungarian cannot
    y2 = [0, 0, 0, 0, 1, 1]
    c2 = [0, 0, 1, 1, 1, 2]
    assert acc_majority(y2, c2) == pytest.approx(5 / 6)  # 0->0 (2), 1->0 (2), 2->1 (1)
    assert acc(y2, c2) == pytest.approx(3 / 6)  # one cluster per label: 0 or 1 -> 0 (2), 1 or 2 -> 1 (1)
    assert isinstance(acc(y, c), float) and isinstance(nmi(y, c), float)


@pytest.mark.parametrize("seed", range(5))
def test_invariant_to_relabelling_clusters(seed):
    y, c = random_labels(seed)
    perm = np.random.default_rng(seed + 100).permutation(10) + 20  # new cluster ids, other range
    for fn in metrics.SCORES.values():
        assert fn(y, perm[c]) == pytest.approx(fn(y, c))


@pytest.mark.parametrize("seed", range(5))
def test_bounds_and_order(seed):
    y, c = random_labels(seed)
    assert 0 <= acc(y, c) <= acc_majority(y, c) <= 1
    assert 0 <= nmi(y, c) <= 1
    assert -0.5 <= ari(y, c) <= 1


def test_perfect_and_agreement_with_sklearn():
    y, c = random_labels(7)
    assert acc(y, y) == acc_majority(y, y) == nmi(y, y) == ari(y, y) == 1.0
    assert nmi(y, c) == pytest.approx(normalized_mutual_info_score(y, c))
    assert ari(y, c) == pytest.approx(adjusted_rand_score(y, c))


def test_bad_input():
    with pytest.raises(ValueError):
        acc([0, 1], [0])
    with pytest.raises(ValueError):
        acc_majority([], [])


def study_clustering():
    """Labels whose majority-mapped confusion has the study's KMeans-on-test diagonal.

    Ten clusters over 10 x 1,000 images; labels 2 (Pullover) and 3 (Dress) get no cluster, labels
    4 and 6 get two each. Off-diagonal images are spread evenly, so every cluster keeps its majority.
    """
    owners = [0, 1, 4, 4, 5, 6, 6, 7, 8, 9]  # cluster j is "owned" by label owners[j]
    y, c = [], []
    for label in range(10):
        own = [j for j, o in enumerate(owners) if o == label]
        hits = np.array_split(np.arange(STUDY_DIAGONAL[label]), max(len(own), 1)) if own else []
        for j, part in zip(own, hits):
            y += [label] * len(part)
            c += [j] * len(part)
        others = [j for j in range(10) if j not in own]
        for j, part in zip(others, np.array_split(np.arange(1000 - STUDY_DIAGONAL[label]), len(others))):
            y += [label] * len(part)
            c += [j] * len(part)
    return np.array(y), np.array(c)


def test_study_kmeans_on_test_confusion_gives_0_5603():
    y, c = study_clustering()
    assert len(y) == 10000
    assert acc_majority(y, c) == pytest.approx(0.5603, abs=1e-12)
    confusion = mapped_confusion(y, c, mapping="majority")
    assert confusion.diagonal().tolist() == STUDY_DIAGONAL
    assert confusion[:, 2].sum() == 0 and confusion[:, 3].sum() == 0  # empty columns, as in the study
    assert acc(y, c) < acc_majority(y, c)


def test_hungarian_confusion_is_one_to_one():
    y, c = random_labels(3)
    confusion = mapped_confusion(y, c, mapping="hungarian")
    assert confusion.shape == (10, 10)
    assert confusion.trace() / confusion.sum() == pytest.approx(acc(y, c))
    with pytest.raises(ValueError):
        mapped_confusion(y, c, mapping="best")
