"""jr_jax.c2st against analytic accuracies of two Gaussians."""

import jax
import numpy as np
import pytest
from scipy.stats import norm

import jr_jax


def test_c2st_matches_the_bayes_accuracy_of_two_gaussians():
    """N(0, I) against N(mu e1, I) in 2-D, 1000 draws each: the Bayes-optimal accuracy is
    Phi(|mu| / 2) (0.691 for mu = 1). The held-out accuracy over 2000 points has SD
    sqrt(0.69 * 0.31 / 2000) = 0.010; a fitted classifier can only fall short of the optimum, by
    little for a boundary this simple: bound 0.04 (4 SD). Equal distributions give 0.5 (same SD,
    bound 0.04) and well-separated ones (mu = 10, Bayes accuracy 1 - 3e-7) above 0.99."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal((1000, 2))
    q_same = rng.standard_normal((1000, 2))
    q_shift = rng.standard_normal((1000, 2)) + np.array([1.0, 0.0])
    q_far = rng.standard_normal((1000, 2)) + np.array([10.0, 0.0])
    key = jax.random.key(0)
    assert abs(jr_jax.c2st(p, q_shift, key=key) - norm.cdf(0.5)) < 0.04
    assert abs(jr_jax.c2st(p, q_same, key=key) - 0.5) < 0.04
    assert jr_jax.c2st(p, q_far, key=key) > 0.99


def test_c2st_bad_input_names_the_argument():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="samples_q"):
        jr_jax.c2st(np.zeros((100, 2)), np.zeros((100, 3)) + np.nan, key=key)
    with pytest.raises(ValueError, match="same dimension"):
        jr_jax.c2st(np.zeros((100, 2)), np.zeros((100, 3)), key=key)
    with pytest.raises(ValueError, match="folds"):
        jr_jax.c2st(np.zeros((100, 2)), np.zeros((100, 2)), key=key, folds=1)
