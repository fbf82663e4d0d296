"""ferflow.metrics against independent implementations: scikit-learn's F1 and a float64 CCC."""

import numpy as np
import pytest
import sklearn.metrics as sklearn_metrics  # a test dependency (pyproject.toml): never skipped

from ferflow import metrics


def reference_ccc(x, y) -> float:
    """Lin's CCC written out in float64 with population statistics (the ABAW formula)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    mx = x.sum() / n
    my = y.sum() / n
    vx = ((x - mx) ** 2).sum() / n
    vy = ((y - my) ** 2).sum() / n
    cov = ((x - mx) * (y - my)).sum() / n
    return 2 * cov / (vx + vy + (mx - my) ** 2)


@pytest.mark.parametrize("seed", range(8))
def test_f1_matches_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    # some classes absent from the truth, some from the predictions, some from both
    true_classes = rng.choice(8, size=int(rng.integers(1, 9)), replace=False)
    pred_classes = rng.choice(8, size=int(rng.integers(1, 9)), replace=False)
    y_true = rng.choice(true_classes, size=n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.choice(pred_classes, size=n))
    expected = sklearn_metrics.f1_score(y_true, y_pred, average="macro", labels=range(8), zero_division=0)
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx(expected, abs=1e-12)
    per_class = sklearn_metrics.f1_score(y_true, y_pred, average=None, labels=range(8), zero_division=0)
    np.testing.assert_allclose(metrics.per_class_f1(y_true, y_pred), per_class, atol=1e-12)
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    np.testing.assert_array_equal(
        metrics.confusion_matrix(y_true, y_pred), sklearn_metrics.confusion_matrix(y_true, y_pred, labels=range(8))
    )


def test_macro_f1_counts_absent_classes_as_zero():
    # perfect on the two classes present: the six absent classes still count, as 0, in the mean
    y = np.array([0, 0, 4, 4, 4])
    assert metrics.macro_f1(y, y) == pytest.approx(2 / 8)
    assert sklearn_metrics.f1_score(y, y, average="macro", labels=range(8), zero_division=0) == pytest.approx(2 / 8)


@pytest.mark.parametrize("seed", range(8))
def test_ccc_matches_float64_reference(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 5000))
    x = rng.uniform(-1, 1, n).astype(np.float32)
    y = (0.6 * x + rng.normal(0.1 * seed, 0.4, n)).astype(np.float32)  # biased and correlated
    assert metrics.ccc(x, y) == pytest.approx(reference_ccc(x, y), abs=1e-12)
    assert metrics.ccc(y, x) == pytest.approx(metrics.ccc(x, y), abs=1e-12)


def test_ccc_is_not_pearson_and_penalises_bias_and_scale():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 1000)
    x -= x.mean()
    assert metrics.ccc(x, x) == pytest.approx(1.0)
    assert metrics.ccc(x, x + 0.5) < 0.8  # perfectly correlated, shifted
    assert metrics.ccc(x, 0.5 * x) < 0.9  # perfectly correlated, scaled
    assert metrics.ccc(x, -x) == pytest.approx(-1.0)
    assert np.isnan(metrics.ccc([], []))
    assert metrics.ccc([0.3, 0.3], [0.3, 0.3]) == 1.0
    with pytest.raises(ValueError):
        metrics.ccc([1, 2], [1, 2, 3])


def test_va_ccc_is_the_mean_of_the_two_dimensions():
    rng = np.random.default_rng(5)
    t = rng.uniform(-1, 1, (500, 2))
    p = t + rng.normal(0, [0.2, 0.6], (500, 2))
    v, a, m = metrics.va_ccc(t, p)
    assert v == pytest.approx(reference_ccc(t[:, 0], p[:, 0]))
    assert a == pytest.approx(reference_ccc(t[:, 1], p[:, 1]))
    assert m == pytest.approx((v + a) / 2)
    # not the CCC of the flattened (N, 2) arrays (a mistake of the method's published code)
    assert m != pytest.approx(reference_ccc(t.ravel(), p.ravel()), abs=1e-3)
    with pytest.raises(ValueError):
        metrics.va_ccc(t[:, 0], p[:, 0])
