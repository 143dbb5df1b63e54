"""The classification evaluate module against hand-computed values and a plain numpy reference."""

import numpy as np
import pytest
from conftest import load_metric


@pytest.fixture(scope="module")
def metric():
    return load_metric("classification")


def test_hand_computed(metric):
    # true:  a a a b b c ; predicted: a a b b c c
    r = metric.compute(predictions=[0, 0, 1, 1, 2, 2], references=[0, 0, 0, 1, 1, 2], labels=["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    a, b, c = (r["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert a["f1"] == pytest.approx(0.8)
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == (0.5, 0.5, 0.5, 2)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_absent_class_is_listed_but_not_averaged(metric):
    r = metric.compute(predictions=[0, 1], references=[0, 1], labels=["a", "b", "never"])
    assert r["macro_f1"] == 1.0 and r["per_class"]["never"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_matches_numpy_reference_on_random_data(metric):
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, 500)
    pred = np.where(rng.random(500) < 0.6, true, rng.integers(0, 5, 500))
    r = metric.compute(predictions=pred.tolist(), references=true.tolist(), labels=list("vwxyz"))
    f1s = []
    for k, name in enumerate("vwxyz"):
        tp = np.sum((pred == k) & (true == k))
        precision, recall = tp / np.sum(pred == k), tp / np.sum(true == k)
        f1s.append(2 * precision * recall / (precision + recall))
        assert r["per_class"][name]["precision"] == pytest.approx(precision)
        assert r["per_class"][name]["recall"] == pytest.approx(recall)
        assert r["confusion_matrix"][k] == [int(np.sum((true == k) & (pred == j))) for j in range(5)]
    assert r["accuracy"] == pytest.approx(np.mean(pred == true))
    assert r["macro_f1"] == pytest.approx(np.mean(f1s))
