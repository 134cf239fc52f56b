import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jr_jax
from jr_jax import JRParams, Prior


def test_defaults_are_jansen_rit_1995():
    p = JRParams()
    expected = dict(A_e=3.25, A_i=22.0, b_e=100.0, b_i=50.0, C=135.0, a_1=1.0, a_2=0.8, a_3=0.25, a_4=0.25,
                    mu=220.0, sigma=0.0, v0=6.0, e0=2.5, r=0.56)
    for name, value in expected.items():
        assert float(getattr(p, name)) == pytest.approx(value, rel=1e-7), name
    assert p.batch_shape == ()
    assert p.A_e.dtype == jnp.float32  # float32 by default


def test_ableidinger_sigma_gives_noise_2000_on_dy4():
    p = JRParams(sigma=jr_jax.SIGMA_ABLEIDINGER_2017)
    assert float(p.A_e * p.b_e * p.sigma) == pytest.approx(2000.0, rel=1e-6)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("A_e", -1.0, r"A_e must be > 0"),
        ("b_i", 0.0, r"b_i must be > 0"),
        ("C", np.nan, r"C must be finite"),
        ("sigma", -0.1, r"sigma must be >= 0"),
        ("mu", -5.0, r"mu must be >= 0"),
        ("a_3", np.array([0.2, -0.2]), r"a_3 must be > 0"),
        ("r", np.inf, r"r must be finite"),
    ],
)
def test_invalid_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        JRParams(**{field: value})


def test_batch_shapes_must_broadcast():
    with pytest.raises(ValueError, match="broadcast"):
        JRParams(A_e=np.ones(3) * 3, A_i=np.ones(4) * 20)
    p = JRParams(A_e=np.array([3.0, 4.0, 5.0]))
    assert p.batch_shape == (3,) and len(p) == 3
    assert float(p[1].A_e) == 4.0 and p[1].batch_shape == ()
    assert p.broadcast().C.shape == (3,)


def test_integer_input_is_converted_to_float():
    assert JRParams(C=np.array([100, 200])).C.dtype == jnp.float32


def test_tvb_round_trip_and_units():
    p = JRParams(b_e=80.0, mu=150.0, v0=5.52)
    tvb = p.to_tvb()
    assert tvb["a"] == pytest.approx(0.08) and tvb["mu"] == pytest.approx(0.15) and tvb["nu_max"] == pytest.approx(0.0025)
    assert tvb["v0"] == pytest.approx(5.52) and tvb["J"] == pytest.approx(135.0)
    q = JRParams.from_tvb(**tvb)
    for name in JRParams.names:
        if name != "sigma":
            assert float(getattr(q, name)) == pytest.approx(float(getattr(p, name)), rel=1e-6), name


def test_from_tvb_refuses_to_guess_missing_values():
    tvb = JRParams().to_tvb()
    del tvb["v0"]
    with pytest.raises(ValueError, match=r"missing \['v0'\]"):
        JRParams.from_tvb(**tvb)


def test_uniform_prior_matches_scipy_uniform():
    prior = Prior()
    theta = np.asarray(prior.sample_array(jax.random.key(0), 4000))
    assert theta.shape == (4000, 9)
    for j, name in enumerate(prior.names):
        lo, hi = prior.lows[j], prior.highs[j]
        # KS test at alpha = 1e-3: a wrong scale or offset of 2 % of the range is detected with
        # power > 0.99 at n = 4000 (KS critical value 1.95/sqrt(n) = 0.031).
        assert stats.kstest(theta[:, j], stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3, name


def test_normal_prior_is_the_study_normal_truncated_to_its_range():
    prior = Prior(kind="normal")
    theta = np.asarray(prior.sample_array(jax.random.key(1), 4000))
    for j, name in enumerate(prior.names):
        lo, hi = prior.lows[j], prior.highs[j]
        assert np.all((theta[:, j] >= lo) & (theta[:, j] <= hi)), name
        ref = stats.truncnorm(-2, 2, loc=(lo + hi) / 2, scale=(hi - lo) / 4)
        assert stats.kstest(theta[:, j], ref.cdf).pvalue > 1e-3, name


def test_prior_draw_i_does_not_depend_on_n():
    prior = Prior()
    a = prior.sample_array(jax.random.key(3), 10)
    b = prior.sample_array(jax.random.key(3), 4)
    np.testing.assert_array_equal(np.asarray(a[:4]), np.asarray(b))


def test_prior_sample_is_batched_params_with_base_values():
    prior = Prior(names=("A_i", "b_i"), base=JRParams(sigma=2.0))
    p = prior.sample(jax.random.key(0), 5)
    assert p.batch_shape == (5,) and p.sigma.shape == (5,) and np.all(np.asarray(p.sigma) == 2.0)
    np.testing.assert_allclose(np.asarray(prior.to_array(p)), np.stack([p.A_i, p.b_i], -1))
    assert prior.units == ("mV", "1/s")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="beta"), "kind must be 'uniform' or 'normal'"),
        (dict(names=("A_e", "nope")), "unknown parameter 'nope'"),
        (dict(names=("A_e",), bounds={"A_e": (5.0, 1.0)}), "need finite low < high"),
        (dict(names=("b_e",), bounds={"b_e": (-10.0, 100.0)}), "low bound must be > 0"),
        (dict(names=("sigma",)), "sigma has no default range"),
        (dict(names=("A_e",), bounds={"A_i": (1.0, 2.0)}), "not in names"),
    ],
)
def test_bad_priors_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Prior(**kwargs)


def test_bad_sample_size():
    with pytest.raises(ValueError, match="n must be a positive integer"):
        Prior().sample(jax.random.key(0), 0)
