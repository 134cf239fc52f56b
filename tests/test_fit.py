"""jr_jax.fit: the MAP against SciPy's least squares on the same objective, the posterior against a
grid posterior, gain and latency recovered, the recording's signal against NumPy, and bad input."""

import math

import jax
import jax.numpy as jnp
import mne
import numpy as np
import pytest
import scipy.optimize

import jr_jax
from jr_jax import _fit
from jr_jax.eeg import Recording, baseline_noise_sd, sample_recording, signal_from_evoked

# the module fixtures are built once: every test here runs on the same xdist worker
pytestmark = pytest.mark.xdist_group("fit")

# the toy problem of the posterior tests: two parameters, 81 samples at 200 Hz, 1 ms Heun steps
PRIOR = jr_jax.Prior(names=("A_i", "b_i"))
PROTOCOL = jr_jax.Protocol(tmin=-0.1, tmax=0.3, fs=200.0, burn_in=0.5, dt=1e-3, n_trials=1)
THETA0 = np.array([[30.0, 45.0]])
SNR = 10.0


@pytest.fixture(scope="module")
def observation():
    """One toy ERP at 10 dB (known noise SD) and its posterior on a grid (exact likelihood, uniform
    prior): the reference. A 161 x 161 grid over the prior box locates the mass; a second one over
    its mean +- 8 SD (clipped to the box) integrates it at 0.1 SD spacing."""
    clean = np.asarray(jr_jax.simulate(PRIOR.to_params(THETA0), PROTOCOL), np.float64)[0]
    sd = float(np.sqrt(np.mean(clean**2)) / 10 ** (SNR / 20))
    x = clean + sd * np.random.default_rng(5).standard_normal(clean.shape)

    def moments(lo, hi):
        g1, g2 = np.linspace(lo[0], hi[0], 161), np.linspace(lo[1], hi[1], 161)
        grid = np.stack(np.meshgrid(g1, g2, indexing="ij"), -1).reshape(-1, 2)
        ll = jr_jax.log_likelihood(grid, x, protocol=PROTOCOL, prior=PRIOR, noise_sd=sd)
        w = np.exp(ll - ll.max())
        w /= w.sum()
        mean = w @ grid
        return mean, np.sqrt(w @ (grid - mean) ** 2), (hi - lo) / 160

    mean, sd_post, _ = moments(PRIOR.lows, PRIOR.highs)
    mean, sd_post, spacing = moments(np.maximum(mean - 8 * sd_post, PRIOR.lows), np.minimum(mean + 8 * sd_post,
                                                                                              PRIOR.highs))
    assert np.all(spacing < 0.11 * sd_post)
    return x, sd, mean, sd_post


@pytest.fixture(scope="module")
def result(observation):
    x, sd, _, _ = observation
    return jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=PRIOR, key=jax.random.key(0), n_starts=4, n_samples=2000)


def test_map_matches_scipy_least_squares(observation, result):
    """From the best start's optimum, SciPy's trust-region least squares on the same residuals
    (finite-difference Jacobian) moves the objective by < 1e-3 of itself and z by < 0.02:
    the LM solve stopped at a stationary point (its tolerance is 1e-3 on steps)."""
    x, sd, _, _ = observation
    space = _fit._Space(PRIOR, None, None, 1.0)
    comp = _fit._compiled(space, PROTOCOL, 100)
    best = int(np.argmin(np.where(result.converged, result.start_neg_log_post, np.inf)))
    z_map = np.asarray(jax.numpy.asarray(_fit.to_unbounded(result.start_params[best], PRIOR.lows, PRIOR.highs)))
    resid = jax.jit(lambda z: _fit._residual_fn(space, comp["model"], comp["lows"], comp["highs"])(
        z, jax.numpy.ones(()), jax.numpy.asarray(x, jax.numpy.float32), sd))
    f = lambda z: np.asarray(resid(jax.numpy.asarray(z, jax.numpy.float32)), np.float64)  # noqa: E731
    ref = scipy.optimize.least_squares(f, z_map, diff_step=1e-3, xtol=1e-10, ftol=1e-10)
    nlp_fit = 0.5 * np.sum(f(z_map) ** 2)
    assert result.converged.any()
    assert ref.cost <= nlp_fit + 1e-9
    assert nlp_fit - ref.cost < 1e-3 * nlp_fit
    assert np.max(np.abs(ref.x - z_map)) < 0.02


def test_posterior_matches_the_grid_posterior(observation, result):
    """Posterior mean within 0.15 posterior SD of the grid's, and SD within 15 %: with an ESS of at
    least 300 the Monte Carlo SE is <= 0.06 SD for the mean and <= 4 % for the SD, so the bounds
    are >= 2.5 SE; the grid spacing is about a tenth of the posterior SDs."""
    _, _, mean, sd_post = observation
    assert result.ess >= 300
    s = result.samples
    assert np.all(np.abs(s.mean(0) - mean) < 0.15 * sd_post), (s.mean(0), mean, sd_post)
    assert np.all(np.abs(s.std(0) / sd_post - 1) < 0.15), (s.std(0), sd_post)
    assert result.samples.shape == (2000, 2)
    assert np.all((s >= PRIOR.lows) & (s <= PRIOR.highs))


def test_smc_fallback_matches_the_grid_posterior(observation):
    """The tempered-SMC fallback (forced: sampler="smc"), which moves in log(theta): posterior
    mean within 0.25 posterior SD of the grid's and SD within 20 % (600 particles; after the final
    resampling and moves an ESS of a few hundred: Monte Carlo SE about 0.06 SD for a mean, 5 % for
    an SD, so the bounds are >= 4 SE)."""
    x, sd, mean, sd_post = observation
    res = jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=PRIOR, key=jax.random.key(1), n_starts=4, n_samples=1000,
                     sampler="smc", smc_particles=600, smc_mcmc_steps=6)
    assert res.sampler == "smc" and res.diagnostics["smc_reached_posterior"], res.diagnostics
    s = res.samples
    assert np.all(np.abs(s.mean(0) - mean) < 0.25 * sd_post), (s.mean(0), mean, sd_post)
    assert np.all(np.abs(s.std(0) / sd_post - 1) < 0.2), (s.std(0), sd_post)
    assert np.all((s > PRIOR.lows) & (s < PRIOR.highs))


def test_smc_coordinates_and_their_jacobian():
    """The SMC's coordinates w (log theta for the model's parameters, z for the rest): the map back
    to z inverts the map from z (to float32 rounding), and log |dz/dw| equals the log-determinant of
    jax.jacfwd of the map (the same derivative, computed another way: 1e-4 absolute)."""
    lows = jax.numpy.asarray([17.6, 25.0, -16.0], jax.numpy.float32)
    highs = jax.numpy.asarray([110.0, 75.0, -2.0], jax.numpy.float32)
    z = jax.random.normal(jax.random.key(0), (5, 3)) * 1.5
    w = _fit._w_from_z(z, lows, highs, 2)
    back, ldj, inside = _fit._z_from_w(w, lows, highs, 2)
    assert bool(inside.all())
    np.testing.assert_allclose(np.asarray(back), np.asarray(z), atol=2e-3)
    for i in range(5):
        jac = jax.jacfwd(lambda v: _fit._z_from_w(v[None], lows, highs, 2)[0][0])(w[i])
        np.testing.assert_allclose(float(ldj[i]), float(np.linalg.slogdet(np.asarray(jac, np.float64))[1]), atol=1e-4)
    outside = w.at[0, 0].set(jax.numpy.log(200.0))
    assert not bool(_fit._z_from_w(outside, lows, highs, 2)[2][0])


def test_the_next_temperature_keeps_half_the_effective_sample():
    """The tempered SMC's next temperature: on log ratios with a spread of many nats, the reweighting
    by (beta' - beta) * ratio leaves an ESS of half the particles (bisection to 1e-6 relative; the
    ESS is computed here directly from its definition), and it goes to 1 at once when the whole rest
    keeps more than half; a -inf ratio weighs nothing."""
    from jr_jax._likelihood import _next_temperature

    def ess_fraction(lw):
        w = np.exp(lw - lw.max())
        return w.sum() ** 2 / (w**2).sum() / len(lw)

    rng = np.random.default_rng(0)
    ratio = rng.normal(0.0, 40.0, 1000)
    beta = _next_temperature(ratio, 0.2)
    assert 0.2 < beta < 1.0
    assert abs(ess_fraction((beta - 0.2) * ratio) - 0.5) < 1e-6
    flat = rng.normal(0.0, 0.1, 1000)
    assert _next_temperature(flat, 0.3) == 1.0
    with_inf = np.where(np.arange(1000) < 100, -np.inf, ratio)
    beta = _next_temperature(with_inf, 0.0)
    lw = np.where(np.isfinite(with_inf), beta * with_inf, -np.inf)
    w = np.exp(lw - lw[np.isfinite(lw)].max())
    assert abs(w.sum() ** 2 / (w**2).sum() / 1000 - 0.5) < 1e-6


def test_tempered_smc_counts_copies_of_a_particle_once_in_its_ess():
    """From N(0, I) to N(3, 0.05^2 I) in 4-D with one Metropolis step per temperature, whose moves
    seldom succeed, so resampled copies of one point remain at the last reweighting: its ESS counts
    each distinct point once (at most their number, fewer than the 400 particles here; counted copy
    by copy it would be at least 200, as each temperature keeps half), and the SMC still reaches the
    target (mean within 0.1 of 3: 2 SD of the target)."""
    from jr_jax._likelihood import particle_batched, tempered_smc

    target = particle_batched(lambda wb: -0.5 * jax.numpy.sum((wb - 3.0) ** 2, axis=1) / 0.05**2)
    draws, _, diag = tempered_smc(lambda w: -0.5 * jax.numpy.sum(w**2), lambda k, n: jax.random.normal(k, (n, 4)),
                                  target, jax.random.key(0), 4, 400, 1, 100)
    assert diag["reached_posterior"]
    distinct = diag["distinct_before_last_reweighting"]
    assert distinct < 400 and 1.0 <= diag["final_ess"] <= distinct, (distinct, diag["final_ess"])
    assert np.all(np.abs(draws.mean(0) - 3.0) < 0.1), draws.mean(0)


def test_ridge_moves_sample_the_prior_along_the_exact_ridge():
    """Moves along the exact ridge accepted on the prior and the Jacobian alone (no simulation): from
    4000 particles at the middle of the study prior's box, after 150 sweeps the position t along the
    unit ridge r follows its exact density there, exp(t sum(r)) (the uniform prior in theta is
    exp(sum w) in w = log theta) truncated to the box. KS test against that CDF at p > 0.001: with
    4000 independent chains the critical distance is 0.031, so a wrong Jacobian (exp(-t sum(r)))
    or a missed bound, which move the CDF by more than 0.2, fail with power ~1. Nothing moves
    across r, and the returned change of the log density is the recomputed one."""
    from scipy import stats

    prior = jr_jax.Prior()
    r = _fit.ridge_direction(prior.names)[0]
    w0 = np.log(0.5 * (prior.lows + prior.highs))
    w, dlp, acc = _fit._ridge_moves(np.random.default_rng(0), np.tile(w0, (4000, 1)), r, prior, 9, sweeps=150)
    t = (w - w0) @ r
    across = (w - w0) - t[:, None] * r[None]
    assert np.max(np.abs(across)) < 1e-9
    nz = r != 0
    a, b = (np.log(prior.lows[nz]) - w0[nz]) / r[nz], (np.log(prior.highs[nz]) - w0[nz]) / r[nz]
    lo, hi = np.max(np.minimum(a, b)), np.min(np.maximum(a, b))
    beta = r.sum()

    def cdf(x):
        x = np.clip(x, lo, hi)
        return np.expm1(beta * (x - lo)) / np.expm1(beta * (hi - lo))

    assert stats.kstest(t, cdf).pvalue > 1e-3, stats.kstest(t, cdf)
    from jr_jax._likelihood import _ridge_log_density

    np.testing.assert_allclose(dlp, _ridge_log_density(prior, w, 9) - _ridge_log_density(prior, w0[None], 9),
                               atol=1e-9)
    assert 0.2 < acc < 1.0


def test_importance_draws_are_extended_while_only_the_ess_fails(observation):
    """With k-hat accepted (threshold 1 here) but fewer than 100 effective draws among 100, further
    batches of 100 draws from the same proposal come until the ESS reaches 100 (at most three):
    the diagnostics count them, and an importance result has ESS >= 100."""
    x, sd, _, _ = observation
    res = jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=PRIOR, key=jax.random.key(0), n_starts=4, n_proposal=100,
                     khat_threshold=1.0)
    assert res.diagnostics["n_proposal"] in (200, 300, 400), res.diagnostics["n_proposal"]
    if res.sampler == "laplace-importance":
        assert res.ess >= 100 and res.ess == res.diagnostics["importance_ess"]
    else:
        assert res.diagnostics["n_proposal"] == 400


def test_tempered_smc_local_kernel_samples_two_modes_far_narrower_than_q():
    """From q = N(0, I) in d = 4 to two correlated Gaussian modes at +-1.5 on the first axis, each
    with SDs 0.004 to 0.03 (the scale of a real recording's posterior in log theta against its
    prior). The particles' covariance spans both modes, far wider than either: moves on it alone
    leave an ESS of 4 and within-mode SDs of 0.3-0.9 of the truth here. With the local kernel (the
    modes' exact precision as P_data, q's as P_rest), 1000 particles, 3 moves per round, up to 4
    rounds per temperature and 2 final rounds: the ESS is >= 300; in the mode that holds more
    particles, the mean is within 0.3 SD of the truth and each SD within 15 % (at that ESS the SEs
    are about 0.06 SD and 4 %; the SMC's weights between the modes, fixed early in the tempering,
    are not checked); the final rounds are accepted 5-90 % of the time and leave >= 80 % of the
    particles distinct."""
    from jr_jax._likelihood import tempered_smc

    sds = np.array([0.004, 0.01, 0.02, 0.03])
    corr = np.full((4, 4), 0.6) + 0.4 * np.eye(4)
    prec = np.linalg.inv(sds[:, None] * corr * sds[None, :])
    mu = np.array([1.5, 0.2, -0.3, 0.1])
    prec_j = jnp.asarray(prec, jnp.float32)
    modes = [jnp.asarray(mu, jnp.float32), jnp.asarray(mu * np.array([-1, 1, 1, 1]), jnp.float32)]

    def target(w):
        return jnp.logaddexp(*[-0.5 * (w - m) @ prec_j @ (w - m) for m in modes])

    draws, _, diag = tempered_smc(lambda w: -0.5 * jnp.sum(w**2), lambda k, n: jax.random.normal(k, (n, 4)), target,
                                  jax.random.key(4), 4, 1000, 3, 60, max_move_factor=4, local_precision=(prec, np.eye(4)),
                                  final_rounds=2)
    assert diag["reached_posterior"] and diag["final_ess"] >= 300, diag["final_ess"]
    side = draws[:, 0] > 0
    main = draws[side] if side.mean() >= 0.5 else draws[~side] * np.array([-1, 1, 1, 1])
    assert np.all(np.abs(main.mean(0) - mu) < 0.3 * sds), (main.mean(0) - mu) / sds
    assert np.all(np.abs(main.std(0) / sds - 1) < 0.15), main.std(0) / sds
    assert 0.05 < diag["final_acceptance"] < 0.9, diag["final_acceptance"]
    assert len(np.unique(draws, axis=0)) >= 800


def test_ridge_mixture_density_and_sampler_against_scipy():
    """The ridge-shaped proposal in d = 2 (one direction across the ridge, one along it): its log
    density equals SciPy's Student-t (5 df) across times SciPy's 0.9 truncated exponential + 0.1
    normal along (1e-9), and 20 000 draws pass KS tests against the same two laws (p > 0.001; at
    this size a KS test detects a CDF error of 0.02 with power > 0.99)."""
    from scipy import stats

    r = np.array([1.0, -1.0]) / np.sqrt(2)
    basis = np.array([[1.0], [1.0]]) / np.sqrt(2)
    beta, seg, scale = 1.0, (-0.4, 1.3), 0.07  # beta != 0: the exponential part is not flat
    mix = dict(centres=np.array([[0.3, -0.2]]), chols=np.array([[[scale]]]), segments=np.array([seg]), basis=basis,
               ridge=r, beta=beta, weights=np.array([1.0]))
    w, which = _fit._ridge_mixture_sample(jax.random.key(3), mix, 20000)
    assert np.all(which == 0)
    dw = w - mix["centres"][0]
    across, along = dw @ basis[:, 0], dw @ r
    width = seg[1] - seg[0]
    trunc = stats.truncexpon(b=beta * width, loc=seg[0], scale=1 / beta)  # exp(-(t - lo) beta): flipped below
    # exp(+beta t) on [lo, hi] is the reflection of truncexpon about the segment's midpoint
    flipped = lambda t: trunc.pdf(seg[0] + seg[1] - t)  # noqa: E731
    along_pdf = lambda t: 0.9 * flipped(t) + 0.1 * stats.norm(0.5 * (seg[0] + seg[1]), width).pdf(t)  # noqa: E731
    expected = stats.t(5, scale=scale).logpdf(across) + np.log(along_pdf(along))
    np.testing.assert_allclose(_fit._ridge_mixture_logpdf(w, mix), expected, rtol=0, atol=1e-9)
    assert stats.kstest(across, stats.t(5, scale=scale).cdf).pvalue > 1e-3
    along_cdf = lambda t: 0.9 * trunc.sf(seg[0] + seg[1] - t) + 0.1 * stats.norm(0.5 * sum(seg), width).cdf(t)  # noqa: E731
    assert stats.kstest(along, along_cdf).pvalue > 1e-3


def test_independence_metropolis_keeps_the_tempered_target():
    """The SMC's independence moves at beta = 0.3 from q = N(0, 1) towards target N(2, 0.5^2) (1-D):
    their invariant law is q^0.7 target^0.3 = N(1.2632, 1.9^-1) (precisions add: 0.7 + 0.3 * 4).
    4000 particles drawn from it stay distributed so after 5 steps, and 4000 started from q reach it
    in 30; KS tests against its CDF at p > 0.001 (critical distance 0.031 at this size; without the
    beta in the acceptance the law would be the target itself, at a distance > 0.4)."""
    from scipy import stats

    from jr_jax._likelihood import independence_metropolis

    beta, prec = 0.3, 0.7 + 0.3 * 4.0
    law = stats.norm(beta * 4.0 * 2.0 / prec, prec**-0.5)
    sample_q = lambda k, n: jax.random.normal(k, (n, 1))  # noqa: E731
    log_ratio = lambda z: np.asarray(-0.5 * ((z[:, 0] - 2.0) / 0.5) ** 2 + 0.5 * z[:, 0] ** 2)  # noqa: E731
    start = law.rvs(size=(4000, 1), random_state=np.random.default_rng(0))
    for z0, steps, key in ((start, 5, 0), (np.asarray(sample_q(jax.random.key(9), 4000)), 30, 1)):
        z, ratio, moved, acc = independence_metropolis(jax.random.key(key), jnp.asarray(z0, jnp.float32),
                                                       log_ratio(jnp.asarray(z0)), beta, sample_q, log_ratio, steps)
        z = np.asarray(z, np.float64)[:, 0]
        assert len(acc) == steps and 0.3 < np.mean(acc) < 1.0, acc
        np.testing.assert_allclose(ratio, log_ratio(z[:, None]), rtol=1e-5, atol=1e-5)
        assert stats.kstest(z, law.cdf).pvalue > 1e-3, stats.kstest(z, law.cdf)


def test_ridge_mixture_arrays_give_the_host_density():
    """The SMC's ridge mixture in jax.numpy (float32, padded to 4 components of weight 0) equals the
    host's float64 density :func:`_fit._ridge_mixture_logpdf` (checked against SciPy above) at draws
    of a 2-component mixture in d = 3, to 2e-4 nats (float32 rounding of terms of size <= 1e2);
    without the ridge every component weighs nothing (-inf)."""
    from scipy.linalg import null_space

    r = np.array([1.0, -1.0, -1.0]) / np.sqrt(3)
    basis = null_space(r[None])
    chols = np.array([[[0.1, 0.0], [0.03, 0.05]], [[0.2, 0.0], [-0.05, 0.08]]])
    mix = dict(centres=np.array([[0.3, -0.2, 0.1], [0.5, 0.0, -0.4]]), chols=chols,
               segments=np.array([[-0.4, 1.3], [-1.0, 0.2]]), basis=basis, ridge=r, beta=float(r.sum()),
               weights=np.array([0.7, 0.3]))
    w, _ = _fit._ridge_mixture_sample(jax.random.key(0), mix, 500)
    got = np.asarray(_fit._ridge_mixture_logpdf_arrays(jnp.asarray(w, jnp.float32), _fit._ridge_mixture_arrays(mix, 3, 4)))
    np.testing.assert_allclose(got, _fit._ridge_mixture_logpdf(w, mix), rtol=0, atol=2e-4)
    none = np.asarray(_fit._ridge_mixture_logpdf_arrays(jnp.asarray(w, jnp.float32), _fit._ridge_mixture_arrays(None, 3, 4)))
    assert np.all(none == -np.inf)


def test_importance_sampling_follows_the_exact_ridge():
    """Five parameters (C, a_1..a_4) where only the products C*a_k enter the model, at 30 dB: the
    importance draws from the ridge-shaped proposal are accepted (k-hat <= 0.5; the t mixture in z
    alone gave 0.76-0.86 on this ERP and fell back to SMC), and C follows the law the prior sets on
    the ridge. With the products pinned (their posterior SDs are < 1 %), p(C | data) is
    proportional to C^-4 (uniform prior, a_k = c_k / C) on the C where every a_k lies in its box;
    the fitted draws' quantiles 5-95 % have CDF values under that law within 0.08 of their levels
    (an ESS >= 500 gives SEs <= 0.022, so 0.08 is > 3.5 SE, with room for the blur of the
    interval's ends by the products' spread)."""
    prior, x, sd = _ridge_observation()
    res = jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=prior, key=jax.random.key(0), n_screen=64, n_starts=4,
                     n_samples=2000)
    assert res.sampler == "laplace-importance" and res.pareto_k <= 0.5 and res.ess >= 500, (res.pareto_k, res.ess)
    _assert_c_follows_the_ridge(prior, res.samples)


def test_smc_from_the_importance_proposal_follows_the_exact_ridge():
    """The SMC (forced) on the same ERP, tempered from the importance proposal (the ridge mixture,
    the t mixture and 10 % prior) with independence and random-walk moves: ESS >= 300 and C's law
    on the ridge as above (SE <= 0.03 at that ESS, so 0.08 is > 2.6 SE); the moves at the first
    temperature are mostly independence draws (acceptance > 0.2: far from the target q's draws
    would be rejected)."""
    prior, x, sd = _ridge_observation()
    res = jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=prior, key=jax.random.key(0), n_screen=64, n_starts=4,
                     n_samples=2000, sampler="smc", smc_particles=600, smc_mcmc_steps=6)
    diag = res.diagnostics
    assert res.sampler == "smc" and diag["smc_reached_posterior"] and res.ess >= 300, res.ess
    assert np.mean(diag["smc_independence_acceptance_per_step"][0]) > 0.2, diag["smc_independence_acceptance_per_step"]
    _assert_c_follows_the_ridge(prior, res.samples)


def _ridge_observation():
    prior = jr_jax.Prior(names=("C", "a_1", "a_2", "a_3", "a_4"))
    theta0 = np.array([[400.0, 1.0, 0.8, 0.25, 0.25]])
    clean = np.asarray(jr_jax.simulate(prior.to_params(theta0), PROTOCOL), np.float64)[0]
    sd = float(np.sqrt(np.mean(clean**2)) / 10 ** (30 / 20))
    return prior, clean + sd * np.random.default_rng(5).standard_normal(clean.shape), sd


def _assert_c_follows_the_ridge(prior, samples):
    """C's quantiles 5-95 % under the law p(C | data) ~ C^-4 on the C where every a_k = c_k / C lies
    in its box (the products c_k at the draws' medians), within 0.08 of their levels."""
    C = samples[:, 0]
    products = np.median(samples[:, 1:] * C[:, None], axis=0)
    lo = max(prior.lows[0], *(products / prior.highs[1:]))
    hi = min(prior.highs[0], *(products / prior.lows[1:]))
    cdf = lambda c: (lo**-3 - np.clip(c, lo, hi) ** -3) / (lo**-3 - hi**-3)  # noqa: E731
    levels = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    assert np.all(np.abs(cdf(np.quantile(C, levels)) - levels) < 0.08), (cdf(np.quantile(C, levels)), levels)


def test_checks_of_fit(observation, result):
    """The truth is in the model and the noise SD is right: reduced chi-square of the predictive mean
    within 5 SD (sqrt(2 / 79)) of 1, R² matches its definition, and the band contains the mean."""
    x, sd, _, _ = observation
    assert abs(result.chi2_reduced - 1) < 5 * math.sqrt(2 / 79)
    assert not result.misfit
    r2 = 1 - np.sum((x - result.erp_fit) ** 2) / np.sum((x - x.mean()) ** 2)
    assert result.r2 == pytest.approx(r2, rel=1e-9)
    assert np.all(result.band[0] <= result.erp_fit + 1e-9) and np.all(result.erp_fit <= result.band[1] + 1e-9)
    assert result.n_modes >= 1 and result.params["noise_sd"] == sd
    assert result.diagnostics["n_screen"] == 20000  # the default without an estimator: prior draws
    text = result.table()
    assert "A_i" in text and "reduced chi2" in text


def test_gain_sign_and_latency_are_recovered():
    """A scaled, inverted and delayed ERP: the fitted gain's sign is the data's and the 99 %
    intervals of |gain| and latency contain the truth (one fixed seed; deterministic)."""
    gain, latency = -2e-3, 0.03
    # the fit simulates from latency's upper bound (0.06 s) before tmin after the 0.5 s burn-in: the same
    # 0.66 s from the zero state to the stimulus here, with the epoch starting `latency` before tmin
    pad = jr_jax.Protocol(tmin=-0.1 - latency, tmax=0.3, fs=200.0, burn_in=0.53, dt=1e-3, n_trials=1, baseline=False)
    src = np.asarray(jr_jax.simulate(PRIOR.to_params(THETA0), pad), np.float64)[0]
    m = src[: PROTOCOL.n_times]  # the epoch starting `latency` earlier: m(t - latency) on the grid
    m = m - m[:20].mean()
    sd = float(np.sqrt(np.mean((gain * m) ** 2)) / 10 ** (20 / 20))
    x = gain * m + sd * np.random.default_rng(1).standard_normal(m.shape)
    res = jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=PRIOR, gain=(1e-5, 1e-1), latency=(0.0, 0.06),
                     key=jax.random.key(2), n_starts=4, n_samples=1000)
    assert res.names == ("A_i", "b_i", "gain", "latency")
    s = res.summary(level=0.99)
    assert res.params["gain"] < 0 and np.all(res.samples[:, 2] < 0)
    j = s.names.index("gain")
    assert s.lower[j] <= gain <= s.upper[j]
    j = s.names.index("latency")
    assert s.lower[j] <= latency <= s.upper[j]
    assert res.chi2_reduced < 1 + 5 * math.sqrt(2 / 77)


@pytest.fixture(scope="module")
def evoked():
    return mne.read_evokeds(sample_recording(), condition="Left Auditory", verbose=False)


def test_recording_mode_is_the_leading_principal_component(evoked):
    """Mode 1 against NumPy's SVD of the same average-referenced, resampled, baseline-corrected EEG
    (from_evoked), and the noise SD against np.std of its baseline."""
    rec = signal_from_evoked(evoked, mode=1)
    assert isinstance(rec, Recording) and rec.protocol.fs == 500.0 and rec.protocol.tmin == -0.198
    x = jr_jax.eeg.from_evoked(evoked, protocol=rec.protocol).T  # (60, n_times) mV
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    assert np.linalg.norm(rec.weights) == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(np.abs(rec.erp), np.abs(s[0] * vt[0]), rtol=1e-6, atol=1e-9)
    assert rec.explained_variance == pytest.approx(s[0] ** 2 / np.sum(s**2), rel=1e-9)
    n_pre = int(round(0.198 * 500))
    assert rec.noise_sd == pytest.approx(np.std(rec.erp[:n_pre], ddof=1), rel=1e-12)
    ch = signal_from_evoked(evoked, channel="EEG 021")
    assert ch.signal == "channel EEG 021" and ch.erp.shape == (rec.protocol.n_times,)


def test_bad_input_is_named(evoked, observation):
    x, sd, _, _ = observation
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="noise_sd must be a finite number > 0"):
        jr_jax.fit(x, PROTOCOL, noise_sd=0.0, prior=PRIOR, key=key)
    with pytest.raises(ValueError, match="noise_sd must be a finite number > 0"):
        jr_jax.fit(x, PROTOCOL, noise_sd=-1.0, prior=PRIOR, key=key)
    with pytest.raises(ValueError, match="erp is flat"):
        jr_jax.fit(np.ones_like(x), PROTOCOL, noise_sd=sd, prior=PRIOR, key=key)
    with pytest.raises(ValueError, match="sampler must be one of 'auto', 'laplace-importance', 'smc'"):
        jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=PRIOR, key=key, sampler="mcmc")
    with pytest.raises(ValueError, match="NaN"):
        jr_jax.fit(np.full_like(x, np.nan), PROTOCOL, noise_sd=sd, prior=PRIOR, key=key)
    with pytest.raises(ValueError, match=r"erp must have shape \(81,\)"):
        jr_jax.fit(x[:50], PROTOCOL, noise_sd=sd, prior=PRIOR, key=key)
    with pytest.raises(ValueError, match="protocol is required"):
        jr_jax.fit(x, noise_sd=sd, prior=PRIOR, key=key)
    with pytest.raises(ValueError, match="gain needs finite low < high with low > 0"):
        jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=PRIOR, gain=(0.0, 1.0), key=key)
    with pytest.raises(ValueError, match="latency must be >= 0"):
        jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=PRIOR, latency=(-0.01, 0.05), key=key)
    with pytest.raises(ValueError, match="n_starts must be an integer >= 1"):
        jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=PRIOR, n_starts=0, key=key)
    with pytest.raises(ValueError, match="sigma must be fixed at 0"):
        jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=jr_jax.Prior(names=("A_i", "sigma"), bounds={"sigma": (0, 1)}),
                   key=key)
    short = jr_jax.Protocol(tmin=-0.05, tmax=0.3, fs=200.0, burn_in=0.5, dt=1e-3, n_trials=1)
    with pytest.raises(ValueError, match="needs at least 20"):
        baseline_noise_sd(np.random.default_rng(0).standard_normal(short.n_times), short)
    with pytest.raises(ValueError, match="needs at least 20"):
        jr_jax.fit(np.random.default_rng(0).standard_normal(short.n_times), short, prior=PRIOR, key=key)
    # the recording
    with pytest.raises(ValueError, match="'NOPE' is not in the recording"):
        signal_from_evoked(evoked, channel="NOPE")
    with pytest.raises(ValueError, match="is a grad channel"):
        signal_from_evoked(evoked, channel="MEG 0113")
    with pytest.raises(ValueError, match="mode must be an integer from 1 to"):
        signal_from_evoked(evoked, mode=0)
    with pytest.raises(ValueError, match="does not cover the model's window"):
        signal_from_evoked(evoked, protocol=jr_jax.Protocol(fs=500.0, tmin=-0.198, tmax=0.8))
    flat = evoked.copy()
    flat.data[flat.ch_names.index("EEG 021")] = 0.0
    with pytest.raises(ValueError, match="EEG 021 is flat"):
        signal_from_evoked(flat, channel="EEG 021", reference=None)
    nan = evoked.copy()
    nan.data[nan.ch_names.index("EEG 021")] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        signal_from_evoked(nan, channel="EEG 021", reference=None)


def test_screen_profiles_each_candidates_latency():
    """The screen's latency per candidate (one simulation, every shift on the grid scored with the
    least-squares gain) is the argmin, over the same grid, of the residual sum of squares computed
    from the model's own shifted ERPs (`_Model.source` at each latency, jnp.interp): equal up to
    float32 ties (the chosen latency's SS within 1e-4 relative of the grid minimum); and on a
    noise-free ERP delayed by a grid latency it returns that latency for the true parameters."""
    space = _fit._Space(PRIOR, (1e-5, 1e-1), (0.0, 0.06), 1.0)
    model = _fit._Model(space, PROTOCOL)
    theta = np.asarray(PRIOR.sample_array(jax.random.key(3), 6), np.float64)
    theta = np.concatenate([THETA0, theta])
    latency = 0.03  # 6 samples at 200 Hz
    x = -2e-3 * np.asarray(model.source(jnp.asarray(THETA0, jnp.float32), jnp.asarray([latency], jnp.float32)),
                           np.float64)[0]
    best, gain = _fit._profile_latency(space, model, x, theta)
    assert best[0] == pytest.approx(latency, abs=1e-9)
    grid = np.arange(0, 13) / PROTOCOL.fs
    ss = np.empty((len(grid), len(theta)))
    for j, tau in enumerate(grid):
        m = np.asarray(model.source(jnp.asarray(theta, jnp.float32), jnp.full(len(theta), tau, jnp.float32)), np.float64)
        ss[j] = np.sum(x**2) - (m @ x) ** 2 / np.sum(m**2, axis=1)
    chosen = ss[np.round(best * PROTOCOL.fs).astype(int), np.arange(len(theta))]
    assert np.all(chosen <= ss.min(axis=0) * (1 + 1e-4) + 1e-12), (chosen, ss.min(axis=0))
    assert gain[0] == pytest.approx(-2e-3, rel=1e-5)  # the least-squares gain at the true latency


def test_a_map_on_the_prior_bound_is_reported(observation, result):
    """An ERP made with b_i = 15 s^-1, below the prior's range of 25-75: no point of the box explains
    it (reduced chi-square about 3), and the MAP ends within 2 % of the range from a bound of b_i
    (74.4 here: the A_i-b_i trade-off takes it to the other end); the fit says so, with a
    RuntimeWarning naming b_i and ``diagnostics['map_at_bound']``. The module's ERP, made inside
    the box, reports no bound."""
    assert result.diagnostics["map_at_bound"] == []
    clean = np.asarray(jr_jax.simulate(PRIOR.to_params(np.array([[30.0, 15.0]])), PROTOCOL), np.float64)[0]
    sd = float(np.sqrt(np.mean(clean**2)) / 10 ** (SNR / 20))
    x = clean + sd * np.random.default_rng(6).standard_normal(clean.shape)
    with pytest.warns(RuntimeWarning, match=r"from a bound of b_i"):
        res = jr_jax.fit(x, PROTOCOL, noise_sd=sd, prior=PRIOR, key=jax.random.key(0), n_starts=4, n_samples=500)
    assert res.diagnostics["map_at_bound"] == ["b_i"]
    frac = (res.params["b_i"] - 25.0) / 50.0
    assert min(frac, 1 - frac) < _fit._BOUND_FRACTION


def test_an_estimator_of_another_protocol_or_kind_is_refused(observation):
    """fit compares the estimator's recorded protocol with the ERP's and names the difference; a
    point estimator cannot give the starts' draws. Both are refused before anything is computed."""
    from jr_jax._flow import PosteriorNet

    x, sd, _, _ = observation
    net = PosteriorNet(1, 2, encoder=dict(hidden=8), embed_dim=4, flow_layers=2, knots=4, nn_width=16,
                       key=jax.random.key(3))
    other = PROTOCOL.replace(stimulus=jr_jax.Stimulus(amplitude=120.0))
    manifest = dict(kind="posterior", encoder=net.config, names=list(PRIOR.names), units=list(PRIOR.units),
                    lows=PRIOR.lows.tolist(), highs=PRIOR.highs.tolist(), fs=200.0, tmin=-0.1, tmax=0.3, n_times=81,
                    n_channels=1, n_trials=1, baseline=True, rms_range_mv=[1e-3, 1e3], protocol=other.to_dict(),
                    prior=PRIOR.to_dict())
    est = jr_jax.Estimator(net, jnp.zeros(1), jnp.ones(1), manifest)
    with pytest.raises(ValueError, match=r"trained on another protocol than this ERP's \(estimator vs ERP\): "
                                         r"stimulus\.amplitude: 120\.0 vs 60\.0"):
        jr_jax.fit(x, PROTOCOL, noise_sd=sd, estimator=est, key=jax.random.key(0))
    point = jr_jax.Estimator(net, jnp.zeros(1), jnp.ones(1), {**manifest, "kind": "point"})
    with pytest.raises(TypeError, match="must be a posterior estimator"):
        jr_jax.fit(x, PROTOCOL, noise_sd=sd, estimator=point, key=jax.random.key(0))


_TWO_DEVICES = """
import json
import jax, jax.numpy as jnp, numpy as np
import jr_jax
from jr_jax._likelihood import particle_batched, tempered_smc
import tests.test_fit as t

log_post, curves = t._split_batches()
out = dict(n_dev=len(jax.local_devices()), curves_devices=len(curves.sharding.device_set),
           log_post=log_post.tolist(), curves=np.asarray(curves, np.float64).tolist())
# tempered SMC from N(0, I) to N(1, 0.5^2 I) in 2-D, its particles split over the devices
target = particle_batched(lambda wb: -0.5 * jnp.sum((wb - 1.0) ** 2, axis=1) / 0.25)
draws, _, diag = tempered_smc(lambda w: -0.5 * jnp.sum(w**2), lambda k, n: jax.random.normal(k, (n, 2)), target,
                              jax.random.key(2), 2, 512, 5, 50)
out.update(smc_mean=draws.mean(0).tolist(), smc_sd=draws.std(0).tolist(), reached=diag["reached_posterior"])
print(json.dumps(out))
"""


def _split_batches():
    """The toy problem's batched log posterior at 64 points and 64 model curves, as the fit evaluates
    them (:func:`jr_jax._simulate.spread_batch` inputs, on as many devices as there are)."""
    from jr_jax._simulate import spread_batch

    comp = _fit._compiled(_fit._Space(PRIOR, None, None, 1.0), PROTOCOL, 25)
    z = np.asarray(jax.random.normal(jax.random.key(1), (64, 2)), np.float64)
    x = jnp.asarray(jr_jax.simulate(PRIOR.to_params(THETA0), PROTOCOL)[0], jnp.float32)
    log_post = _fit._eval_log_post(comp["log_post_jit"], z, np.ones(64), x, jnp.float32(1.0))
    u, s = spread_batch(jax.nn.sigmoid(jnp.asarray(z, jnp.float32)), jnp.ones(64, jnp.float32))
    return log_post, comp["model_jit"](u, s)


def test_the_fits_batches_split_over_two_devices_as_on_one():
    """With one host device per core (as ``jr-jax`` sets up), the fit's batched log posterior,
    model curves and tempered SMC run split over the devices: the same log posterior and curves as
    on one device up to float32 rounding (each device's program has another shape), and the SMC
    still samples its target."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], env=env, check=True, capture_output=True, text=True)
    two = json.loads(proc.stdout.strip().splitlines()[-1])
    assert two["n_dev"] == 2 and two["curves_devices"] == 2  # the split holds inside the jitted model
    lp1, c1 = _split_batches()
    lp1, c1 = np.asarray(lp1), np.asarray(c1, np.float64)
    assert np.isfinite(lp1).all() and np.isfinite(c1).all()
    np.testing.assert_allclose(np.array(two["log_post"]), lp1, rtol=1e-5)  # float32 sums of 81 squared residuals
    np.testing.assert_allclose(np.array(two["curves"]), c1, rtol=0, atol=1e-5 * np.abs(c1).max())
    # 512 particles, ESS at least about 250 after resampling: the mean's SE is about 0.5 / 16 = 0.03;
    # 0.15 is 5 SE. The SD within 20 % (its SE at ESS 250 is about 4.5 %).
    assert two["reached"]
    np.testing.assert_allclose(two["smc_mean"], [1.0, 1.0], atol=0.15)
    np.testing.assert_allclose(two["smc_sd"], [0.5, 0.5], rtol=0.2)


def test_the_solves_residuals_carry_their_forward_jacobian(observation):
    """The Levenberg-Marquardt residuals (:func:`jr_jax._fit._forward_jacobian`): the same value as
    the residuals, and a linearisation (as optimistix takes it, then materialises it) equal to the
    Jacobian by ``jax.jacfwd`` through the solve and to central differences in float32 where the
    derivative is well above their rounding."""
    x, sd, _, _ = observation
    comp = _fit._compiled(_fit._Space(PRIOR, None, None, 1.0), PROTOCOL, 25)
    res = comp["residuals"]
    fn = _fit._forward_jacobian(res)
    args = (jnp.float32(1.0), jnp.asarray(x, jnp.float32), jnp.float32(sd))
    z = jnp.array([0.3, -0.2], jnp.float32)
    value, lin = jax.linearize(lambda zz: fn(zz, *args), z)
    jac = jax.vmap(lin)(jnp.eye(2, dtype=jnp.float32)).T
    r = np.asarray(res(z, *args))  # the same float32 solve, compiled along another path: to its rounding
    np.testing.assert_allclose(np.asarray(value), r, rtol=0, atol=1e-6 * np.abs(r).max())
    ref = np.asarray(jax.jacfwd(lambda zz: res(zz, *args))(z))
    np.testing.assert_allclose(np.asarray(jac), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    h = 1e-2  # float32: the second-order error h^2 |r'''| stays below 1 % of the largest entries
    fd = np.stack([(np.asarray(res(z + h * e, *args)) - np.asarray(res(z - h * e, *args))) / (2 * h)
                   for e in np.eye(2, dtype=np.float32)], axis=1)
    big = np.abs(ref) > 0.1 * np.abs(ref).max()
    np.testing.assert_allclose(fd[big], ref[big], rtol=0.02)
