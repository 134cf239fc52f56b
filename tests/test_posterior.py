"""Posterior inference: the flow's density and support, sampling and summaries, the exact
likelihood and prior against SciPy, PSIS against known Pareto tails, the likelihood correction
against a grid posterior, and the calibration diagnostics against exact posteriors."""

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st

import jr_jax
from jr_jax._estimator import scale_input
from jr_jax._flow import ConditionalAffine, PosteriorNet, from_unbounded, log_jacobian, noise_feature, to_unbounded

# the module fixtures are built once: every test here runs on the same xdist worker
pytestmark = pytest.mark.xdist_group("posterior")

# a two-parameter JR problem small enough for the tests: 81 samples at 200 Hz, 1 ms Heun steps
PRIOR = jr_jax.Prior(names=("A_i", "b_i"))
PROTOCOL = jr_jax.Protocol(tmin=-0.1, tmax=0.3, fs=200.0, burn_in=0.5, dt=1e-3, n_trials=1)
SNR = 10.0


@pytest.fixture(scope="module")
def toy_posterior():
    """A posterior estimator trained briefly on the toy problem (an imperfect NPE on purpose: the
    likelihood correction must repair it)."""
    data = jr_jax.TrainingData.on_the_fly(PRIOR, PROTOCOL, key=jax.random.key(0), n_val=128, batches_per_epoch=20)
    est, history = jr_jax.train(data, snr_db=(0.0, 10.0), encoder=dict(hidden=8, conv_channels=0),
                                posterior=dict(flow_layers=3),
                                epochs=4, batch_size=64, progress=False)
    return est, history


@pytest.fixture(scope="module")
def observation():
    """One toy ERP at 10 dB and its posterior on a 161 x 161 grid over the prior box (exact
    likelihood, uniform prior): the reference (the ERP, the posterior mean, SD and covariance)."""
    theta0 = np.array([[30.0, 45.0]])
    clean = np.asarray(jr_jax.simulate(PRIOR.to_params(theta0), PROTOCOL))[0]
    x = np.asarray(jr_jax.add_measurement_noise(clean, SNR, key=jax.random.key(5)))
    g1 = np.linspace(PRIOR.lows[0], PRIOR.highs[0], 161)
    g2 = np.linspace(PRIOR.lows[1], PRIOR.highs[1], 161)
    grid = np.stack(np.meshgrid(g1, g2, indexing="ij"), -1).reshape(-1, 2)
    ll = jr_jax.log_likelihood(grid, x, protocol=PROTOCOL, prior=PRIOR, snr_db=SNR)
    w = np.exp(ll - ll.max())
    w /= w.sum()
    mean = w @ grid
    cov = (grid - mean).T @ ((grid - mean) * w[:, None])
    return x, mean, np.sqrt(np.diag(cov)), cov


def test_noise_feature_of_white_noise_and_of_a_sinusoid():
    """Analytic values: white noise has var(second differences) = 6 var, so the feature is
    log(6) / 2 (tolerance 0.02: 20 000 samples give the variance ratio to about 1 %); a noise-free
    sinusoid of frequency f sampled at fs has second differences -4 sin^2(pi f / fs) times itself, so
    the feature is log(4 sin^2(pi f / fs)) up to the two lost end samples and the window (2e-3)."""
    noise = jax.random.normal(jax.random.key(0), (2, 20_000, 3))
    np.testing.assert_allclose(noise_feature(noise), 0.5 * np.log(6.0), atol=0.02)
    fs, f = 1000.0, 7.0
    t = np.arange(4001) / fs
    x = np.sin(2 * np.pi * f * t)[None, :, None]
    np.testing.assert_allclose(noise_feature(jnp.asarray(x)), np.log(4 * np.sin(np.pi * f / fs) ** 2), atol=2e-3)
    # scale-free: the same for the signal in volts or in mV
    np.testing.assert_allclose(noise_feature(jnp.asarray(1e3 * x)), noise_feature(jnp.asarray(x)), atol=1e-5)


def _assert_reload_draws_the_same(est, folder, drop_keys=()):
    """Save ``est``, delete ``drop_keys`` from its manifest's encoder config, load it: the draws of
    one ERP are the same bit for bit."""
    est.save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for k in drop_keys:
        del manifest["encoder"][k]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    back = jr_jax.Estimator.load(folder)
    erp = np.sin(np.linspace(0, 6, 41)).astype(np.float32)
    key = jax.random.key(0)
    np.testing.assert_array_equal(back.sample(erp, 20, key=key), est.sample(erp, 20, key=key))


def test_estimators_saved_before_the_noise_feature_and_regression_head_still_load(tmp_path):
    """A manifest without ``noise_feature`` / ``regression_weight`` (estimators saved before they
    existed) builds the architecture it was saved with, so the weights load and draw as before."""
    est = _untrained_estimator()
    assert est.encoder.regression_head is None and not est.encoder.config["noise_feature"]
    _assert_reload_draws_the_same(est, tmp_path / "old",
                                  drop_keys=("noise_feature", "regression_weight", "conditional_affine"))


def test_estimator_with_the_noise_feature_and_regression_head_saves_and_loads(tmp_path):
    """The manifest's config rebuilds the flow's wider condition (embedding + noise feature) and the
    head, so the weights load and the draws are the same bit for bit."""
    est = _untrained_estimator(noise_feature=True, regression_weight=10.0)
    assert est.encoder.regression_head is not None
    _assert_reload_draws_the_same(est, tmp_path / "m")


def test_logit_map_and_its_jacobian():
    """from_unbounded inverts to_unbounded, and log_jacobian is log|det d theta/d z| (by jax.jacfwd)."""
    lows, highs = jnp.array([2.0, 17.6, 50.0]), jnp.array([9.75, 110.0, 150.0])
    z = jnp.array([-3.0, 0.4, 5.0])
    theta = from_unbounded(z, lows, highs)
    np.testing.assert_allclose(to_unbounded(theta, lows, highs), z, rtol=1e-5)
    jac = jax.jacfwd(lambda v: from_unbounded(v, lows, highs))(z)
    np.testing.assert_allclose(log_jacobian(z, lows, highs), jnp.log(jnp.abs(jnp.linalg.det(jac))), rtol=1e-5)


def _randomised_affine(net, key):
    """``net`` with its conditional affine layer's output weights drawn at random (it starts as the
    identity), so that the tests see a layer that moves and scales."""
    last = lambda n: n.flow.bijection.bijections[-1].mlp.layers[-1]  # noqa: E731
    k1, k2 = jax.random.split(key)
    w, b = last(net).weight, last(net).bias
    return eqx.tree_at(lambda n: (last(n).weight, last(n).bias), net,
                       (0.3 * jax.random.normal(k1, w.shape), 0.5 * jax.random.normal(k2, b.shape)))


def test_conditional_affine_inverts_and_its_log_det_is_the_jacobians():
    """ConditionalAffine starts as the identity; with random weights its inverse undoes it and its
    log-det equals log|det| of the Jacobian by jax.jacfwd, for each condition."""
    bij = ConditionalAffine(3, 5, width=16, key=jax.random.key(0))
    x, c = jnp.array([0.3, -1.2, 2.0]), jnp.linspace(-1.0, 1.0, 5)
    y, ld = bij.transform_and_log_det(x, c)
    np.testing.assert_array_equal(y, x)
    assert float(ld) == 0.0
    mlp = bij.mlp
    bij = eqx.tree_at(lambda b: (b.mlp.layers[-1].weight, b.mlp.layers[-1].bias), bij,
                      (jax.random.normal(jax.random.key(1), mlp.layers[-1].weight.shape),
                       jax.random.normal(jax.random.key(2), mlp.layers[-1].bias.shape)))
    for cond in (c, -2.0 * c):
        y, ld = bij.transform_and_log_det(x, cond)
        assert not np.allclose(y, x)
        back, ld_inv = bij.inverse_and_log_det(y, cond)
        np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-6)
        jac = jax.jacfwd(lambda v: bij.transform_and_log_det(v, cond)[0])(x)
        np.testing.assert_allclose(ld, jnp.log(jnp.abs(jnp.linalg.det(jac))), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ld_inv, -ld, rtol=1e-6)


def test_flow_with_a_conditional_affine_layer_integrates_to_one_and_reloads(tmp_path):
    """With the conditional affine layer (random weights), exp(log_prob) in parameter units still
    integrates to 1 over the prior box (midpoint rule, 250 x 250 cells, tolerance 3e-3 as for the
    plain flow), and the saved estimator rebuilds the layer and draws the same bit for bit."""
    est = _untrained_estimator(conditional_affine=True)
    est = eqx.tree_at(lambda e: e.encoder, est, _randomised_affine(est.encoder, jax.random.key(4)))
    erp = np.sin(np.linspace(0, 6, 41)).astype(np.float32)
    total, grid = _box_integral(est, erp)
    assert abs(total - 1.0) < 3e-3
    plain = _untrained_estimator()
    assert not np.allclose(est.log_prob(grid[:50], erp), plain.log_prob(grid[:50], erp))
    _assert_reload_draws_the_same(est, tmp_path / "affine")


def _box_integral(est, erp, n=250):
    """The integral of exp(est.log_prob) over the estimator's prior box [50, 150] x [25, 75] of
    :func:`_untrained_estimator`, by the midpoint rule on ``n`` x ``n`` cells; and the cells' centres."""
    e1 = 50.0 + (np.arange(n) + 0.5) * 100.0 / n
    e2 = 25.0 + (np.arange(n) + 0.5) * 50.0 / n
    grid = np.stack(np.meshgrid(e1, e2, indexing="ij"), -1).reshape(-1, 2)
    return np.exp(est.log_prob(grid, erp)).sum() * (100.0 / n) * (50.0 / n), grid


def _untrained_estimator(n_times=41, **options):
    net = PosteriorNet(1, 2, encoder=dict(hidden=8), embed_dim=4, flow_layers=2, knots=4, nn_width=16,
                       key=jax.random.key(3), **options)
    manifest = dict(kind="posterior", encoder=net.config, names=["b_e", "b_i"], units=["1/s", "1/s"],
                    lows=[50.0, 25.0], highs=[150.0, 75.0], fs=100.0, tmin=0.0, tmax=(n_times - 1) / 100.0,
                    n_times=n_times, n_channels=1, n_trials=1, baseline=False, rms_range_mv=[0.1, 100.0])
    return jr_jax.Estimator(net, jnp.zeros(1), jnp.ones(1), manifest)


def test_posterior_density_integrates_to_one_over_the_prior_box():
    """exp(Estimator.log_prob) in parameter units (Jacobian included) integrates to 1 over the box:
    midpoint rule on 250 x 250 cells; the density is smooth and vanishes at the edges, so the rule's
    error is far below the 3e-3 tolerance."""
    est = _untrained_estimator()
    erp = np.sin(np.linspace(0, 6, 41)).astype(np.float32)
    total, _ = _box_integral(est, erp)
    assert abs(total - 1.0) < 3e-3
    assert est.log_prob(np.array([[49.0, 30.0], [100.0, 80.0]]), erp).tolist() == [-np.inf, -np.inf]


def test_sample_shapes_support_and_log_prob_agree():
    est = _untrained_estimator()
    erp = np.stack([np.sin(np.linspace(0, f, 41)) for f in (3, 6, 9)]).astype(np.float32)
    one = est.sample(erp[0], 500, key=jax.random.key(1))
    many = est.sample(erp, 200, key=jax.random.key(1))
    assert one.shape == (500, 2) and many.shape == (3, 200, 2)
    assert np.all((many > est.lows) & (many < est.highs))
    # draws of ERP i depend on i and the key only: the first ERP's draws in a batch equal its own
    np.testing.assert_allclose(est.sample(erp[:1], 200, key=jax.random.key(1))[0], many[0], rtol=1e-5)  # float32 batching
    lp = est.log_prob(many, erp)
    assert lp.shape == (3, 200) and np.all(np.isfinite(lp))
    # predict is the mean of 1000 draws with a fixed key: deterministic
    np.testing.assert_allclose(est.predict_array(erp), est.predict_array(erp))


def test_summary_of_identifiable_combinations():
    rng = np.random.default_rng(0)
    draws = np.stack([rng.uniform(65, 1350, 4000), rng.uniform(0.5, 1.5, 4000), rng.uniform(0.4, 1.2, 4000)], -1)
    s = jr_jax.PosteriorSummary.from_draws(draws, ("C", "a_1", "a_2"), ("1", "1", "1"), level=0.8,
                                           prior_sd=np.ones(5))
    assert s.names == ("C", "a_1", "a_2", "log(C*a_1)", "log(C*a_2)")
    log_c_a2 = np.log(draws[:, 0] * draws[:, 2])
    np.testing.assert_allclose([s.lower[4], s.upper[4]], np.quantile(log_c_a2, [0.1, 0.9]))
    np.testing.assert_allclose(s.median[3], np.median(np.log(draws[:, 0] * draws[:, 1])))
    assert len(s.rows()) == 5 and "log(C*a_2)" in s.table()


def test_bad_input_to_sample_and_correction(toy_posterior):
    est, _ = toy_posterior
    erp = np.zeros(PROTOCOL.n_times, np.float32) + 1.0
    with pytest.raises(ValueError, match="n .*>= 1"):
        est.sample(erp, 0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="key must be a JAX PRNG key"):
        est.sample(erp, 10, key=3)
    with pytest.raises(ValueError, match="noise_sd must be a finite number > 0"):
        jr_jax.correct_posterior(est, erp, key=jax.random.key(0), noise_sd=-1.0)
    with pytest.raises(ValueError, match="exactly one of noise_sd"):
        jr_jax.correct_posterior(est, erp, key=jax.random.key(0))
    point = _untrained_estimator()
    point = jr_jax.Estimator(point.encoder, point.x_mean, point.x_std, dict(point.manifest, kind="point"))
    with pytest.raises(TypeError, match="needs a posterior estimator"):
        point.sample(np.zeros(41), 10, key=jax.random.key(0))


def test_posterior_estimator_saves_and_loads(toy_posterior, tmp_path):
    est, history = toy_posterior
    assert est.kind == "posterior" and est.manifest["prior"]["names"] == ["A_i", "b_i"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    est.save(tmp_path / "m")
    back = jr_jax.Estimator.load(tmp_path / "m")
    erp = np.asarray(jr_jax.simulate(PRIOR.to_params(np.array([[40.0, 50.0]])), PROTOCOL))[0]
    np.testing.assert_array_equal(back.sample(erp, 50, key=jax.random.key(2)), est.sample(erp, 50, key=jax.random.key(2)))


def test_log_likelihood_matches_scipy():
    theta = np.array([[30.0, 45.0], [60.0, 30.0]])
    sim = np.asarray(jr_jax.simulate(PRIOR.to_params(theta), PROTOCOL), np.float64)
    x = sim[0] + 0.3 * np.random.default_rng(0).normal(size=sim.shape[1])
    got = jr_jax.log_likelihood(theta, x, protocol=PROTOCOL, prior=PRIOR, noise_sd=0.3)
    want = st.norm.logpdf(x, loc=sim, scale=0.3).sum(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got = jr_jax.log_likelihood(theta, x, protocol=PROTOCOL, prior=PRIOR, snr_db=20.0)
    sd = np.sqrt((sim**2).mean(axis=1) / 100.0)
    np.testing.assert_allclose(got, st.norm.logpdf(x, loc=sim, scale=sd[:, None]).sum(axis=1), rtol=1e-5)


def test_log_prior_matches_scipy():
    normal = jr_jax.Prior(names=("A_e", "C"), kind="normal")
    theta = np.array([[3.0, 200.0], [9.0, 1200.0], [2.0, 200.0]])
    lo, hi = normal.lows, normal.highs
    mid, sd = (lo + hi) / 2, (hi - lo) / 4
    want = st.truncnorm.logpdf(theta[:2], -2, 2, loc=mid, scale=sd).sum(axis=1)
    got = jr_jax.log_prior(normal, theta)
    np.testing.assert_allclose(got[:2], want, rtol=1e-10)
    assert got[2] == -np.inf  # A_e = 2 is below the box
    np.testing.assert_allclose(jr_jax.log_prior(jr_jax.Prior(names=("A_e",)), np.array([[3.0]])),
                               [-math.log(9.75 - 2.6)])


@pytest.mark.parametrize("shape", [0.3, 0.6, 0.9])
def test_psis_khat_recovers_the_tail_shape(shape):
    """Weights with a generalized-Pareto tail of shape k: k-hat of 4000 weights, averaged over 10
    sets, lies within 0.08 of k (one estimate's SD is about 0.1-0.17 here, so the mean's is <= 0.055;
    the shrinkage towards 0.5 moves it by at most 0.02)."""
    rng = np.random.default_rng(1)
    k_hats = [jr_jax.psis(np.log(st.genpareto.rvs(shape, size=4000, random_state=rng)))[1] for _ in range(10)]
    assert abs(np.mean(k_hats) - shape) < 0.08
    lw, _ = jr_jax.psis(np.log(st.genpareto.rvs(shape, size=4000, random_state=rng)))
    np.testing.assert_allclose(np.logaddexp.reduce(lw), 0.0, atol=1e-9)


def test_gpd_fit_agrees_with_scipy_maximum_likelihood():
    from jr_jax._likelihood import _gpd_fit

    x = np.sort(st.genpareto.rvs(0.5, scale=2.0, size=3000, random_state=np.random.default_rng(2)))
    k, scale = _gpd_fit(x)
    k_ml, _, scale_ml = st.genpareto.fit(x, floc=0)
    assert abs(k - k_ml) < 0.03 and abs(scale / scale_ml - 1) < 0.05


def test_smc_correction_recovers_the_grid_posterior(toy_posterior, observation):
    """Tempered SMC from the (deliberately undertrained) NPE reaches the grid posterior: means within
    0.25 posterior SD and SDs within 20 % (600 particles, after resampling and moves an ESS of a
    few hundred: Monte Carlo SD of a mean about 0.06 SD, of an SD about 5 %)."""
    est, _ = toy_posterior
    x, mean, sd, _ = observation
    res = jr_jax.correct_posterior(est, x, key=jax.random.key(3), snr_db=SNR, n=500, khat_threshold=-1.0,
                                   smc_particles=600, smc_mcmc_steps=6)
    assert res.method == "smc" and res.converged, res.diagnostics
    assert np.all(np.abs(res.samples.mean(0) - mean) < 0.25 * sd)
    assert np.all(np.abs(res.samples.std(0) / sd - 1) < 0.2)
    assert np.all((res.samples > PRIOR.lows) & (res.samples < PRIOR.highs))


def test_calibration_error_of_exactly_three_percent_reads_as_three_percent():
    """Every test case has the same draws, 201 evenly spaced on [0, 1], so the central x % interval
    is [(1 - x)/2, (1 + x)/2] exactly; the 1000 truths are placed so that the interval at each level
    x = 0.05 k holds 1000 (x + 0.03) of them. Every |coverage - level| is 0.03, hence the median, and
    it must compare as <= 0.03 (in binary floating point it came out as 0.030000000000000027)."""
    n = 1000
    half_width = np.maximum((np.arange(n) + 0.5) / n - 0.03, 0.0)  # truth's |t - 0.5| * 2
    theta = (0.5 + half_width / 2)[:, None]
    draws = np.broadcast_to(np.linspace(0.0, 1.0, 201)[None, :, None], (n, 201, 1))
    cal = jr_jax.calibration_from_draws(draws, theta, ("p",), prior_sd=np.ones(1), lows=np.zeros(1), highs=np.ones(1))
    np.testing.assert_allclose(cal.coverage[:, 0], np.asarray(cal.levels) + 0.03, rtol=0, atol=1e-12)
    assert cal.calibration_error[0] == 0.03


def test_calibration_accepts_exact_and_rejects_overconfident_posteriors():
    """Conjugate normal model (theta ~ N(0, 1), x ~ N(theta, 1), posterior N(x/2, 1/2)). With exact
    draws, N = 1000 and 199 draws, coverage errors are about 0.016 (binomial SD at 0.5), so the
    calibration error stays below 0.03 and SBC p > 0.001. Draws 0.8 x too narrow shift coverage by
    about 0.1 at 90 %: the chi-square test (20 bins) rejects with power ~1 and the band check fails."""
    rng = np.random.default_rng(0)
    n, draws_per = 1000, 199
    theta = rng.normal(size=(n, 2))
    x = theta + rng.normal(size=(n, 2))
    kw = dict(prior_sd=np.ones(2), lows=-3 * np.ones(2), highs=3 * np.ones(2))
    exact = x[:, None, :] / 2 + np.sqrt(0.5) * rng.normal(size=(n, draws_per, 2))
    good = jr_jax.calibration_from_draws(exact, theta, ("p", "q"), **kw)
    assert np.all(good.calibration_error < 0.03) and np.all(good.sbc_pvalue > 1e-3) and good.in_band.all()
    np.testing.assert_allclose(np.median(good.contraction, axis=0), 0.5, atol=0.05)
    np.testing.assert_allclose(good.z_score.std(axis=0), 1.0, atol=0.1)
    narrow = x[:, None, :] / 2 + 0.8 * np.sqrt(0.5) * rng.normal(size=(n, draws_per, 2))
    bad = jr_jax.calibration_from_draws(narrow, theta, ("p", "q"), **kw)
    assert np.all(bad.sbc_pvalue < 0.01) and not bad.in_band.any()
    assert np.all(bad.coverage[list(bad.levels).index(0.9)] < 0.85)


def test_ecdf_band_has_its_simultaneous_level():
    """Fresh uniform samples leave the 95 % simultaneous band in 5 % of cases (400 trials: SD 1.1 %,
    so the rate must lie in 1.5 %..9 %)."""
    from jr_jax._calibration import ecdf_band

    n = 200
    z, lo, hi = ecdf_band(n, n_sim=2000, seed=1)
    rng = np.random.default_rng(7)
    outside = 0
    for _ in range(400):
        diff = (rng.random(n)[:, None] <= z[None, :]).mean(axis=0) - z
        outside += bool(np.any((diff < lo - 1e-12) | (diff > hi + 1e-12)))
    assert 0.015 <= outside / 400 <= 0.09


def test_unlike_training_erps_are_flagged(toy_posterior):
    """sample() refuses a DC offset on a baseline-corrected model; its embedding check stays
    silent for training-like ERPs (fixed seeds) and warns (MisspecificationWarning) once an ERP's
    distance passes the threshold (shown here by lowering the threshold: the embedding distance is
    a screen, the likelihood check of correct_posterior is the test, see below)."""
    import warnings

    est, _ = toy_posterior
    assert est.manifest["embedding_check"]["n"] == 64  # the held-out half of the 128 validation ERPs
    theta = PRIOR.sample_array(jax.random.key(11), 8)
    like = np.asarray(jr_jax.simulate(PRIOR.to_params(theta), PROTOCOL.replace(snr_db=5.0), key=jax.random.key(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", jr_jax.MisspecificationWarning)
        est.sample(like, 5, key=jax.random.key(0))
    d2 = est.embedding_distance(like)
    check = dict(est.manifest["embedding_check"], threshold=float(np.sort(d2)[-2]))
    strict = jr_jax.Estimator(est.encoder, est.x_mean, est.x_std, dict(est.manifest, embedding_check=check))
    with pytest.warns(jr_jax.MisspecificationWarning, match=f"1 of 8 ERP.*sample {int(np.argmax(d2))}"):
        strict.sample(like, 5, key=jax.random.key(0))
    with pytest.raises(ValueError, match="pre-stimulus mean of 100 mV"):
        est.sample(like[0] + 100.0, 5, key=jax.random.key(0))


class _GaussianProposal:
    """Stands in for a posterior estimator in ``correct_posterior``: multivariate normal draws in the
    parameters' units and their exact log-density."""

    kind, names, units, manifest = "posterior", PRIOR.names, PRIOR.units, {}

    def __init__(self, mean, cov):
        self.mean, self.cov = np.asarray(mean), np.asarray(cov)

    def sample(self, erp, n, *, key, check_distribution=True):
        return np.asarray(jax.random.multivariate_normal(key, self.mean, self.cov, (n,)))

    def log_prob(self, theta, erp):
        return st.multivariate_normal(self.mean, self.cov).logpdf(theta)


def test_importance_correction_adds_draws_until_its_ess_and_recovers_the_grid_posterior(observation):
    """Importance sampling from a normal proposal with 1.5 times the grid posterior's covariance
    (the posterior is a ridge, correlation 0.997; about 45 % of the draws are effective): the first
    500 draws have an ESS below 500, so batches of 500 more join them until the ESS reaches 500.
    The 500 resampled draws then have more distinct values and match the grid posterior as the
    SMC does (means within 0.25 SD, SDs within 20 %: with ESS >= 500 the Monte Carlo SD of a mean
    is about 0.05 SD). With min_ess=0 the first batch is resampled as it is."""
    x, mean, sd, cov = observation
    proposal = _GaussianProposal(mean, 1.5 * cov)
    kw = dict(key=jax.random.key(6), snr_db=SNR, n=500, protocol=PROTOCOL, prior=PRIOR)
    first = jr_jax.correct_posterior(proposal, x, min_ess=0, **kw)
    assert first.method == "importance" and first.diagnostics["n_proposal"] == 500 and first.ess < 500
    res = jr_jax.correct_posterior(proposal, x, **kw)
    assert res.method == "importance" and res.ess >= 500 and res.pareto_k < 0.7, (res.ess, res.pareto_k)
    assert res.diagnostics["n_proposal"] in (1000, 1500, 2000)
    assert res.proposal.shape == (res.diagnostics["n_proposal"], 2)
    assert res.diagnostics["distinct_draws"] > first.diagnostics["distinct_draws"]
    assert np.all(np.abs(res.samples.mean(0) - mean) < 0.25 * sd)
    assert np.all(np.abs(res.samples.std(0) / sd - 1) < 0.2)


def test_likelihood_check_flags_an_erp_the_model_cannot_make(toy_posterior, observation):
    """correct_posterior's posterior predictive check: for the toy observation the corrected draws'
    median reduced chi-square is within 1 + 5 sqrt(2/m) (m = 81 samples: <= 1.79); an ERP made
    with another stimulus (10x stronger, 20 ms) is not reachable by any (A_i, b_i) of the model and
    is flagged with a MisspecificationWarning naming its chi-square."""
    est, _ = toy_posterior
    x, _, _, _ = observation
    ok = jr_jax.correct_posterior(est, x, key=jax.random.key(4), snr_db=SNR, n=400, khat_threshold=np.inf, min_ess=0)
    assert not ok.misfit and ok.chi2_reduced < 1 + 5 * math.sqrt(2 / PROTOCOL.n_times)
    other = PROTOCOL.replace(stimulus=jr_jax.Stimulus(amplitude=600.0, duration=0.02), snr_db=SNR)
    odd = np.asarray(jr_jax.simulate(PRIOR.to_params(np.array([[30.0, 45.0]])), other, key=jax.random.key(2)))[0]
    with pytest.warns(jr_jax.MisspecificationWarning, match="reduced chi-square"):
        bad = jr_jax.correct_posterior(est, odd, key=jax.random.key(4), snr_db=SNR, n=400, khat_threshold=np.inf,
                                       min_ess=0)
    assert bad.misfit and bad.chi2_reduced > 2.0


@pytest.fixture(scope="module")
def toy_data_and_point():
    """Toy training data and a point regressor trained briefly on them."""
    data = jr_jax.TrainingData.on_the_fly(PRIOR, PROTOCOL, key=jax.random.key(1), n_val=64, batches_per_epoch=6)
    point, _ = jr_jax.train(data, kind="point", snr_db=(0.0, 10.0), encoder=dict(hidden=8, conv_channels=0),
                            epochs=1, batch_size=32, progress=False)
    return data, point


def test_flow_on_a_frozen_point_estimator(toy_data_and_point):
    """``train(..., embedding=point)``: the posterior's encoder is the point estimator's network, bit
    for bit after training (no gradient reached it), so the flow is conditioned on the point
    estimates (and the noise feature); the flow itself trained: with the embedding fixed, only the
    flow can lower the validation loss (the same noisy validation ERPs every epoch), and over three
    epochs, at the frozen embedding's default learning rate (4e-3), it fell by 0.16-0.48 nats for
    seeds 0-2 (threshold 0.05)."""
    data, point = toy_data_and_point
    est, history = jr_jax.train(data, kind="posterior", embedding=point, snr_db=(0.0, 10.0),
                                posterior=dict(flow_layers=2, noise_feature=True), epochs=3, batch_size=32,
                                progress=False)
    assert est.manifest["training"]["frozen_embedding"] and est.encoder.config["embed_dim"] == 2
    assert est.manifest["training"]["learning_rate"] == jr_jax._train.FROZEN_EMBEDDING_LEARNING_RATE == 4e-3
    assert point.manifest["training"]["learning_rate"] == jr_jax._train.LEARNING_RATE == 1e-3
    assert len(history) == 3 and np.all(np.isfinite([h["val_loss"] for h in history]))
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.05
    arrays = lambda m: jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_array))  # noqa: E731
    for a, b in zip(arrays(est.encoder.embedding), arrays(point.encoder), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.asarray(data.erp_val[:8])
    emb = est.encoder.embed(scale_input(x, est.x_mean, est.x_std), inference=True)
    np.testing.assert_allclose(emb[:, :2], point.encoder.batch(scale_input(x, point.x_mean, point.x_std),
                                                               inference=True), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(emb[:, 2:], noise_feature(scale_input(x, est.x_mean, est.x_std)), rtol=1e-6)


def test_frozen_embedding_refuses_what_does_not_fit(toy_data_and_point, toy_posterior):
    """The embedding must be a point estimator of the same data, without encoder options or a head."""
    data, point = toy_data_and_point
    kw = dict(snr_db=(0.0, 10.0), epochs=1, batch_size=32, progress=False)
    with pytest.raises(ValueError, match="embedding must be a point Estimator"):
        jr_jax.train(data, embedding=toy_posterior[0], **kw)
    with pytest.raises(ValueError, match="either encoder or embedding"):
        jr_jax.train(data, embedding=point, encoder=dict(hidden=8), **kw)
    with pytest.raises(ValueError, match="regression_weight"):
        jr_jax.train(data, embedding=point, posterior=dict(regression_weight=1.0), **kw)
    with pytest.raises(ValueError, match="only for kind='posterior'"):
        jr_jax.train(data, kind="point", embedding=point, **kw)
    other = jr_jax.TrainingData.on_the_fly(PRIOR, PROTOCOL, key=jax.random.key(2), n_val=64, batches_per_epoch=6)
    with pytest.raises(ValueError, match="other data"):
        jr_jax.train(other, embedding=point, **kw)
