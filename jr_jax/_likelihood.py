"""The exact likelihood of an ERP under noise-free dynamics plus Gaussian measurement noise, and the
correction of amortised posterior draws by it (Pareto-smoothed importance sampling, with tempered
SMC from BlackJAX as the fallback).

Observation models (``x``: the ERP, ``f(theta)``: the noise-free simulated ERP, both in mV, n samples):

- ``noise_sd=s`` (known SD, e.g. from a recording's baseline):
  ``log p(x | theta) = -||x - f(theta)||^2 / (2 s^2) - n log(s sqrt(2 pi))``;
- ``snr_db=d`` (the SD follows the simulated ERP's power, as in training and ``Protocol.snr_db``):
  the same with ``s(theta) = rms(f(theta)) / 10^(d / 20)``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ._estimator import MisspecificationWarning
from ._flow import from_unbounded
from ._params import Prior
from ._simulate import Protocol, simulate, spread_batch
from ._solve import as_typed_key

_LOG_2PI = math.log(2.0 * math.pi)


def _check_noise(noise_sd, snr_db) -> None:
    if (noise_sd is None) == (snr_db is None):
        raise ValueError("give exactly one of noise_sd (the measurement noise SD, mV) or snr_db (dB)")
    if noise_sd is not None and not (isinstance(noise_sd, (int, float, np.floating)) and math.isfinite(noise_sd)
                                     and noise_sd > 0):
        raise ValueError(f"noise_sd must be a finite number > 0 (mV), got {noise_sd!r}")
    if snr_db is not None and not (isinstance(snr_db, (int, float, np.floating)) and math.isfinite(snr_db)):
        raise ValueError(f"snr_db must be a finite number (dB), got {snr_db!r}")


def _clean_protocol(protocol: Protocol, prior: Prior) -> Protocol:
    if not isinstance(protocol, Protocol):
        raise TypeError(f"protocol must be a jr_jax.Protocol, got {type(protocol).__name__}")
    if not isinstance(prior, Prior):
        raise TypeError(f"prior must be a jr_jax.Prior, got {type(prior).__name__}")
    if "sigma" in prior.names or float(prior.base.sigma) != 0.0:
        raise ValueError("the exact likelihood needs noise-free dynamics: the prior's sigma must be fixed at 0")
    return protocol.replace(snr_db=None)


def _noise_variance(sim, noise_sd, snr_db, xp):
    """Measurement-noise variance ``(n,)`` (or a scalar) of each simulated ERP ``sim (n, ...)``:
    ``noise_sd^2``, or the ERP's mean square over ``10^(snr_db / 10)``."""
    if noise_sd is not None:
        return xp.asarray(noise_sd, sim.dtype) ** 2
    return xp.mean(sim**2, axis=tuple(range(1, sim.ndim))) / 10.0 ** (snr_db / 10.0)


def _gaussian_loglik(sim, erp, noise_sd, snr_db):
    """``sim (n, n_times[, C])`` against ``erp (n_times[, C])``: ``(n,)``; -inf for diverged rows."""
    axes = tuple(range(1, sim.ndim))
    m = math.prod(sim.shape[1:])
    s2 = _noise_variance(sim, noise_sd, snr_db, jnp)
    ll = -0.5 * jnp.sum((sim - erp) ** 2, axis=axes) / s2 - 0.5 * m * (jnp.log(s2) + _LOG_2PI)
    return jnp.where(jnp.isfinite(ll), ll, -jnp.inf)


def log_likelihood(theta, erp, *, protocol: Protocol, prior: Prior, noise_sd: float | None = None,
                   snr_db: float | None = None, chunk_size: int = 1024) -> np.ndarray:
    """``log p(erp | theta)`` for parameter sets ``theta (n, n_params)`` (in the order of
    ``prior.names``, other parameters at ``prior.base``) and one ERP ``erp`` (mV, the protocol's
    ``output_shape``). Returns ``(n,)`` (float64 on the host); ``-inf`` where a trajectory diverges.

    One batched :func:`jr_jax.simulate` call (noise-free dynamics, ``chunk_size`` at a time) gives
    every ERP. ``noise_sd`` or ``snr_db`` chooses the observation model (module docstring).
    """
    _check_noise(noise_sd, snr_db)
    protocol = _clean_protocol(protocol, prior)
    theta = np.asarray(theta, np.float64)
    if theta.ndim != 2 or theta.shape[1] != len(prior.names):
        raise ValueError(f"theta must have shape (n, {len(prior.names)}) in the order {prior.names}, got {theta.shape}")
    erp = _check_erp(erp, protocol)
    sim = simulate(prior.to_params(jnp.asarray(theta, jnp.float32)), protocol, chunk_size=chunk_size)
    return np.asarray(_gaussian_loglik(jnp.asarray(sim), jnp.asarray(erp, jnp.float32), noise_sd, snr_db), np.float64)


def _check_erp(erp, protocol: Protocol) -> np.ndarray:
    try:
        x = np.asarray(erp, dtype=np.float32)
    except (TypeError, ValueError):
        raise TypeError("erp must be an array of numbers (mV)") from None
    if x.shape != protocol.output_shape:
        raise ValueError(f"erp must have the protocol's shape {protocol.output_shape} ({protocol.tmin} to "
                         f"{protocol.tmax} s at {protocol.fs} Hz); got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("erp has NaN or infinite values")
    return x


def log_prior(prior: Prior, theta) -> np.ndarray:
    """Log density of ``prior`` at ``theta (..., n_params)`` (``-inf`` outside its box).

    Uniform: ``-sum log(high - low)``. Normal: the study's normal (mean at the middle, SD a quarter
    of the range) truncated to the range, i.e. at +-2 SD.
    """
    return _log_prior(prior, np.asarray(theta, np.float64), np)


def _log_prior(prior: Prior, theta, xp=jnp):
    """:func:`log_prior` with the array module ``xp`` (numpy on the host, jax.numpy when traced)."""
    lows, highs = xp.asarray(prior.lows, theta.dtype), xp.asarray(prior.highs, theta.dtype)
    inside = xp.all((theta >= lows) & (theta <= highs), axis=-1)
    if prior.kind == "uniform":
        lp = -xp.sum(xp.log(highs - lows)) * xp.ones(theta.shape[:-1], theta.dtype)
    else:
        mid, sd = (lows + highs) / 2, (highs - lows) / 4
        z = (theta - mid) / sd
        log_mass = math.log(math.erf(math.sqrt(2.0)))  # P(|Z| < 2) of a standard normal
        lp = xp.sum(-0.5 * z**2 - xp.log(sd) - 0.5 * _LOG_2PI - log_mass, axis=-1)
    return xp.where(inside, lp, -xp.inf)


# --- Pareto-smoothed importance sampling --------------------------------------------------------


def _gpd_fit(x: np.ndarray) -> tuple[float, float]:
    """Shape k and scale of a generalized Pareto fitted to exceedances ``x > 0`` (sorted ascending):
    the empirical-Bayes estimator of Zhang & Stephens (2009), with the weakly informative shrinkage
    of k towards 0.5 of Vehtari et al. (PSIS, 2024)."""
    n = len(x)
    m = 30 + int(math.sqrt(n))
    theta = 1.0 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))
    theta = theta / (3.0 * x[int(n / 4 + 0.5) - 1]) + 1.0 / x[-1]
    k = np.mean(np.log1p(-theta[:, None] * x[None, :]), axis=1)  # (m,)
    profile = n * (np.log(-theta / k) - k - 1.0)
    w = np.exp(profile - np.logaddexp.reduce(profile))  # posterior weights of the grid of theta
    theta_hat = float(np.sum(theta * w))
    k_hat = float(np.mean(np.log1p(-theta_hat * x)))
    scale = -k_hat / theta_hat
    k_hat = (n * k_hat + 10 * 0.5) / (n + 10)
    return k_hat, scale


def psis(log_weights) -> tuple[np.ndarray, float]:
    """Pareto-smoothed importance sampling (Vehtari, Simpson, Gelman, Yao & Gabry, 2024).

    ``log_weights (S,)`` (unnormalised; ``-inf`` allowed). Returns the smoothed, normalised log
    weights and the Pareto shape estimate k-hat of the weights' upper tail: k-hat <= 0.7 means the
    importance-sampling estimate is reliable; above it, it is not (use another sampler). k-hat is
    ``inf`` when the tail cannot be fitted: fewer than 5 tail draws, or tail weights that differ by
    more than the float range (a few draws carry all the weight).
    """
    lw = np.asarray(log_weights, np.float64).copy()
    s = lw.size
    finite = np.isfinite(lw)
    if finite.sum() < 2:
        return np.full_like(lw, -np.inf), math.inf
    lw[~finite] = -np.inf
    lw = lw - lw[finite].max()
    m = int(math.ceil(min(0.2 * s, 3.0 * math.sqrt(s))))
    order = np.argsort(lw)
    k_hat = math.inf
    n_finite = int(finite.sum())
    if m >= 5 and n_finite > m:
        tail = order[-m:]
        cutoff = lw[order[-m - 1]]
        exceed = np.exp(lw[tail]) - np.exp(cutoff)
        if np.all(exceed > 0):
            k_hat, scale = _gpd_fit(np.sort(exceed))
            # replace the tail by the fitted distribution's quantiles, capped at the largest raw weight
            p = (np.arange(1, m + 1) - 0.5) / m
            if abs(k_hat) > 1e-8:
                with np.errstate(over="ignore"):  # a huge k-hat: quantiles beyond the cap below anyway
                    q = scale / k_hat * ((1.0 - p) ** (-k_hat) - 1.0)
            else:
                q = -scale * np.log1p(-p)
            lw[tail] = np.minimum(np.log(q + np.exp(cutoff)), 0.0)
        else:  # ties in the tail: no fit possible; flag it rather than report a number
            k_hat = math.inf
    lw = lw - np.logaddexp.reduce(lw[np.isfinite(lw)])
    return lw, float(k_hat)


def effective_sample_size(log_weights) -> float:
    """Kish's ESS ``1 / sum(w^2)`` of normalised weights given as logs."""
    lw = np.asarray(log_weights, np.float64)
    lw = lw - np.logaddexp.reduce(lw)
    return float(1.0 / np.sum(np.exp(2 * lw)))


# --- correction of amortised draws ----------------------------------------------------------------


@dataclass(frozen=True)
class CorrectedPosterior:
    """Posterior draws of one ERP corrected by the exact likelihood.

    - ``samples (n, n_params)``: equally weighted draws of p(theta | erp) (parameters' units);
    - ``method``: ``"importance"`` (PSIS-reweighted NPE draws, resampled) or ``"smc"`` (tempered SMC
      from the NPE approximation to the posterior, used when k-hat > ``khat_threshold``);
    - ``pareto_k``, ``ess``: the importance step's k-hat and effective sample size (ESS of the
      smoothed weights, out of ``proposal.shape[0]``, the NPE draws made: ``n`` or more);
    - ``log_evidence``: the importance (or SMC) estimate of log p(erp);
    - ``proposal`` and ``log_weights``: the NPE draws and their smoothed normalised log weights;
    - ``chi2_reduced``: the posterior predictive check, the median over :attr:`samples` of
      ``mean(((erp - f(theta)) / s)^2)``; near 1 (+ n_params / n_times) when the model can make the
      ERP. ``misfit``: it exceeds ``1 + 5 sqrt(2 / n_times)`` (5 SD of a reduced chi-square), so
      no parameter set explains the ERP down to the noise: another stimulus, window, units, an
      artefact or a wrong noise level (a :class:`MisspecificationWarning` says so);
    - ``diagnostics``: further numbers (``n_proposal``, the NPE draws weighted; importance: the
      ``distinct_draws`` among the resampled; SMC: tempering steps, acceptance rate, final ESS;
      the likelihood evaluations spent), ``converged``: whether the sampler's own checks passed.
    """

    samples: np.ndarray
    names: tuple[str, ...]
    units: tuple[str, ...]
    method: str
    pareto_k: float
    ess: float
    log_evidence: float
    proposal: np.ndarray
    log_weights: np.ndarray
    converged: bool
    chi2_reduced: float
    misfit: bool
    diagnostics: dict = field(default_factory=dict)

    def summary(self, level: float = 0.9, prior_sd=None):
        """:class:`jr_jax.PosteriorSummary` of :attr:`samples`."""
        from ._summary import PosteriorSummary

        return PosteriorSummary.from_draws(self.samples, self.names, self.units, level=level, prior_sd=prior_sd)


def _systematic(key, log_w: np.ndarray, n: int) -> np.ndarray:
    w = np.exp(log_w - np.logaddexp.reduce(log_w))
    u = (float(jax.random.uniform(key)) + np.arange(n)) / n
    idx = np.searchsorted(np.cumsum(w), u, side="left")
    return np.minimum(idx, len(w) - 1)


def correct_posterior(estimator, erp, *, key, noise_sd: float | None = None, snr_db: float | None = None,
                      n: int = 2000, protocol: Protocol | None = None, prior: Prior | None = None,
                      khat_threshold: float = 0.7, min_ess: int | None = None, max_proposals: int | None = None,
                      smc_particles: int = 1000, smc_mcmc_steps: int = 10,
                      max_smc_steps: int = 60) -> CorrectedPosterior:
    """Correct the amortised posterior of one ERP by the exact likelihood.

    Draws ``n`` parameter sets from ``estimator.sample`` (a posterior estimator), weights them by
    ``log p(erp | theta) + log prior(theta) - log q(theta | erp)`` (:func:`log_likelihood`,
    :func:`log_prior`) with Pareto smoothing (:func:`psis`), and resamples ``n`` draws. While the
    weights' k-hat passes but their effective sample size is below ``min_ess`` (default ``n``),
    ``n`` more draws join them, up to ``max_proposals`` in all (default ``16 n``; about 8000
    likelihoods per second on a 2-core CPU): so the ``n`` resampled draws are mostly distinct, not
    copies of a few heavy ones. When the k-hat exceeds ``khat_threshold``, or the ESS stays below
    ``min_ess``, the importance estimate is unreliable and adaptive
    tempered SMC (:func:`tempered_smc`; ``smc_particles`` particles) moves from the NPE
    approximation to the posterior instead, with the likelihood batched over the particles: at each
    temperature up to ``smc_mcmc_steps`` independence moves from the NPE, then rounds of
    ``smc_mcmc_steps`` random-walk Metropolis moves (BlackJAX's kernel) on the particles'
    covariance, 2 rounds at the posterior, and exact moves along the ridge (C, a_k) ->
    (lambda C, a_k / lambda), where the likelihood is constant.

    - ``erp``: one ERP in mV on the estimator's grid;
    - ``noise_sd`` (mV) or ``snr_db``: the observation model (module docstring);
    - ``protocol``/``prior``: default to those recorded in the estimator's manifest (the prior's
      ``sigma`` must be 0: the likelihood is exact for noise-free dynamics).
    """
    _check_noise(noise_sd, snr_db)
    if estimator.kind != "posterior":
        raise TypeError("correct_posterior needs a posterior estimator (jr_jax.train(..., kind='posterior'))")
    min_ess = n if min_ess is None else min_ess
    max_proposals = 16 * n if max_proposals is None else max_proposals
    for name, value, low in (("n", n, 10), ("smc_particles", smc_particles, 10), ("smc_mcmc_steps", smc_mcmc_steps, 1),
                             ("max_smc_steps", max_smc_steps, 1), ("min_ess", min_ess, 0),
                             ("max_proposals", max_proposals, n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    key = as_typed_key(key)
    if protocol is None:
        if not estimator.manifest.get("protocol"):
            raise ValueError("the estimator's manifest records no protocol: pass protocol=")
        protocol = Protocol.from_dict(estimator.manifest["protocol"])
    if prior is None:
        if not estimator.manifest.get("prior"):
            raise ValueError("the estimator's manifest records no prior: pass prior=")
        prior = Prior.from_dict(estimator.manifest["prior"])
    if tuple(prior.names) != estimator.names:
        raise ValueError(f"prior names {prior.names} differ from the estimator's {estimator.names}")
    protocol = _clean_protocol(protocol, prior)
    x = _check_erp(erp, protocol)
    k_draw, k_res, k_smc = jax.random.split(key, 3)

    batches, raws = [], []
    while True:
        k = jax.random.fold_in(k_draw, len(batches)) if batches else k_draw
        more = estimator.sample(x, n, key=k, check_distribution=False)  # the likelihood checks below
        ll = log_likelihood(more, x, protocol=protocol, prior=prior, noise_sd=noise_sd, snr_db=snr_db)
        batches.append(more)
        raws.append(ll + log_prior(prior, more) - estimator.log_prob(more, x))
        draws, raw = np.concatenate(batches), np.concatenate(raws)
        lw, k_hat = psis(raw)
        ess = effective_sample_size(lw) if np.isfinite(lw).any() else 0.0
        if k_hat > khat_threshold or ess >= min_ess or len(raw) + n > max_proposals or not np.isfinite(lw).any():
            break
    finite = raw[np.isfinite(raw)]
    log_z = float(np.logaddexp.reduce(finite) - math.log(len(raw))) if finite.size else -math.inf
    common = dict(names=estimator.names, units=estimator.units, pareto_k=k_hat, ess=ess, proposal=draws,
                  log_weights=lw)
    n_proposal = len(raw)
    if k_hat <= khat_threshold and ess >= min_ess:
        samples = draws[_systematic(k_res, lw, n)]
        method, converged = "importance", True
        diag = dict(n_proposal=n_proposal, likelihood_evaluations=n_proposal,
                    distinct_draws=int(len(np.unique(samples, axis=0))))
    else:
        samples, log_z, diag = _tempered_smc(estimator, x, prior, protocol, noise_sd, snr_db, k_smc, smc_particles,
                                             smc_mcmc_steps, max_smc_steps)
        diag.update(n_proposal=n_proposal, likelihood_evaluations=diag["likelihood_evaluations"] + n_proposal)
        method, converged = "smc", diag["reached_posterior"] and diag["acceptance_rate"] > 0.05
    chi2 = float(np.median(_chi2_reduced(samples, x, protocol, prior, noise_sd, snr_db)))
    limit = 1.0 + 5.0 * math.sqrt(2.0 / x.size)
    misfit = not chi2 <= limit
    if misfit:
        warnings.warn(f"the ERP is not explained down to the noise: the corrected posterior's median reduced "
                      f"chi-square is {chi2:.3g} (> {limit:.3g}, 5 SD above 1); no parameter set of this model, "
                      "protocol and noise level makes it (another stimulus, window, units, an artefact, or a "
                      "wrong noise_sd/snr_db?)", MisspecificationWarning, stacklevel=2)
    return CorrectedPosterior(samples=samples, method=method, log_evidence=log_z, converged=converged,
                              chi2_reduced=chi2, misfit=misfit, diagnostics=diag, **common)


def _chi2_reduced(theta, x, protocol, prior, noise_sd, snr_db) -> np.ndarray:
    """Reduced chi-square ``(n,)`` of the noise-free ERPs of ``theta`` against ``x``."""
    sim = np.asarray(simulate(prior.to_params(jnp.asarray(theta, jnp.float32)), protocol), np.float64)
    axes = tuple(range(1, sim.ndim))
    chi2 = ((sim - x) ** 2).mean(axis=axes) / _noise_variance(sim, noise_sd, snr_db, np)
    return np.where(np.isfinite(chi2), chi2, np.inf)


def particle_batched(batch_fn):
    """``batch_fn: (z (B, d), *args) -> (B,)`` as a per-particle function ``(z (d,), *args) -> ()``
    whose ``jax.vmap`` over ``z`` calls ``batch_fn`` once on the whole batch
    (``jax.custom_batching.custom_vmap``): samplers written per particle get the speed of one
    batched :func:`jr_jax.simulate`. ``args`` (e.g. the observed ERP) are shared by the particles,
    never batched. Not differentiable."""

    @jax.custom_batching.custom_vmap
    def one(z, *args):
        return batch_fn(z[None], *args)[0]

    @one.def_vmap
    def _rule(axis_size, in_batched, z, *args):
        batched, *args_batched = in_batched
        if any(jax.tree.leaves(args_batched)):
            raise ValueError("particle_batched: only the particles may be batched, not the shared arguments")
        if not batched:
            z = jnp.broadcast_to(z, (axis_size,) + z.shape)
        return batch_fn(z, *args), True

    return one


def batched_loglik_fn(prior: Prior, protocol: Protocol, erp, noise_sd, snr_db):
    """``z (n_params,) -> log p(erp | theta(z))``, batched over particles (:func:`particle_batched`)."""
    lows, highs = jnp.asarray(prior.lows, jnp.float32), jnp.asarray(prior.highs, jnp.float32)
    erp = jnp.asarray(erp, jnp.float32)

    def batch(z):  # (B, d)
        sim = simulate(prior.to_params(from_unbounded(z, lows, highs)), protocol, chunk_size=z.shape[0])
        return _gaussian_loglik(sim, erp, noise_sd, snr_db)

    return particle_batched(batch)


def _tempered_smc(estimator, x, prior, protocol, noise_sd, snr_db, key, n_particles, mcmc_steps, max_steps):
    """Adaptive tempered SMC from the NPE q(theta | x) to the posterior, in log coordinates
    u = log(theta) with the prior's box as hard walls (every prior bound is positive): there the exact
    ridge (C, a_k) -> (lambda C, a_k / lambda) is a straight line, which random-walk moves on the
    particles' covariance follow. The NPE's density moves to u with its Jacobian."""
    from ._estimator import _embed_jit
    from ._flow import log_to_unbounded, to_unbounded

    lows, highs = jnp.asarray(prior.lows, jnp.float32), jnp.asarray(prior.highs, jnp.float32)
    if not bool(jnp.all(lows > 0)):
        raise ValueError("the likelihood correction's SMC works in log(theta): every prior bound must be > 0, got "
                         f"lows {prior.lows}")
    emb = _embed_jit(estimator, jnp.asarray(estimator._check(x, None)))[0]  # (1, T, C) -> one embedding
    net = estimator.encoder
    loglik = batched_loglik_fn(prior, protocol, x, noise_sd, snr_db)

    def log_q(u):
        z, log_dz_du, inside = log_to_unbounded(u, lows, highs)
        return jnp.where(inside, net.log_prob_z(z[None], emb[None])[0] + log_dz_du, -jnp.inf)

    def log_target(u):
        theta = jnp.exp(u)
        lp = _log_prior(prior, theta) + jnp.sum(u)
        return jnp.where(jnp.isfinite(lp), loglik(to_unbounded(theta, lows, highs)) + lp, -jnp.inf)

    def sample_q(k, n):
        return jnp.log(from_unbounded(net.sample_z(k, n, emb), lows, highs))

    ridge = ridge_direction(prior.names)
    k_smc, k_ridge = jax.random.split(key)
    u, log_z, diag = tempered_smc(log_q, sample_q, log_target, k_smc, len(prior.names), n_particles, mcmc_steps,
                                  max_steps, ridge=ridge, max_move_factor=_CORRECTION_MOVE_ROUNDS, final_rounds=2,
                                  independence_steps=mcmc_steps)
    u = np.asarray(u, np.float64)
    if ridge is not None and diag["reached_posterior"]:
        # exact Metropolis moves along the ridge: the likelihood is constant there, so they are
        # accepted on the prior and its Jacobian alone (no simulation)
        u, _, diag["ridge_acceptance"] = _ridge_moves(_host_rng(k_ridge), u, ridge[0], prior, len(prior.names), 30)
    diag["coordinates"] = "log(theta)"
    return np.exp(u), log_z, diag


_CORRECTION_MOVE_ROUNDS = 3
"""At each temperature of the correction's SMC, up to this many rounds of random-walk moves until 90 %
of the particles have moved (:func:`tempered_smc`'s ``max_move_factor``)."""


def ridge_direction(names, d: int | None = None) -> np.ndarray | None:
    """The exact ridge (C, a_k) -> (lambda C, a_k / lambda) as a unit direction ``(1, d)`` in
    log(theta) coordinates of ``names`` (+ for log C, - for each log a_k), or None when C or one of
    a_1..a_4 is not among them (then C also scales a fixed a_k and there is no ridge). Coordinates
    past ``len(names)`` (up to ``d``) get 0."""
    names = list(names)
    ks = [f"a_{k}" for k in range(1, 5)]
    if "C" not in names or not all(k in names for k in ks):
        return None
    v = np.zeros((1, len(names) if d is None else d))
    v[0, names.index("C")] = 1.0
    for k in ks:
        v[0, names.index(k)] = -1.0
    return v / np.linalg.norm(v)


def _host_rng(key) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key: the host-side draws (the proposals, the starts, the
    resampling) come from it, since a ``jax.random`` call outside ``jit`` compiles a sampler for each
    new shape (about 0.5 s for a gamma). The same key gives the same draws."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key), np.uint32).ravel().tolist())


def _ridge_log_density(prior: Prior, w, n_log: int) -> np.ndarray:
    """The part of the log posterior in w that changes along the exact ridge: the prior's log
    density at theta = exp(w) plus log |dtheta/dw| = sum(w) (-inf outside the box). The likelihood
    depends on C and a_k only through C a_k, so it does not change there."""
    k = len(prior.names)
    with np.errstate(over="ignore"):
        return _log_prior(prior, np.exp(w[:, :k]), np) + np.sum(w[:, :n_log], axis=1)


def _ridge_moves(rng, w, ridge, prior: Prior, n_log: int, sweeps: int, scale: float = 0.3):
    """``sweeps`` Metropolis moves of every particle ``w (n, d)`` along the unit ``ridge (d,)``, steps
    N(0, ``scale``^2), accepted on :func:`_ridge_log_density` alone (exact for the posterior: the
    likelihood is constant along the ridge). No simulation. Returns the particles, the change of
    :func:`_ridge_log_density` per particle, and the mean acceptance."""
    w = np.array(w, np.float64)
    cur = _ridge_log_density(prior, w, n_log)
    start, accepted = cur.copy(), 0.0
    for _ in range(sweeps):
        prop = w + scale * rng.standard_normal(len(w))[:, None] * ridge[None]
        new = _ridge_log_density(prior, prop, n_log)
        with np.errstate(invalid="ignore"):
            take = (np.log(rng.uniform(size=len(w))) < new - cur) & np.isfinite(new)
        w[take], cur[take] = prop[take], new[take]
        accepted += float(take.mean())
    return w, cur - start, accepted / max(sweeps, 1)


def _smc_step(log_q, log_target, mcmc_steps: int, with_data: bool):
    """The jitted pieces of :func:`tempered_smc` for (log_q, log_target): ``log_ratio(z (n, d), data)``
    gives log target - log q per particle; ``move(key, z, beta, chol (n, d, m), data)`` runs
    ``mcmc_steps`` random-walk Metropolis steps (BlackJAX) of each particle on
    q^(1 - beta) target^beta and returns the particles, their acceptance rates and log ratios. With
    ``with_data`` both densities take ``(z, data)`` and the data are an argument, not a constant (see
    :func:`_cached_smc_step`)."""
    import blackjax

    rw_kernel = blackjax.additive_step_random_walk.build_kernel()

    def densities(data):
        lq = (lambda z: log_q(z, data)) if with_data else log_q
        lt = (lambda z: log_target(z, data)) if with_data else log_target

        def log_ratio(z):
            v = lt(z)
            return jnp.where(jnp.isfinite(v), v - lq(z), -jnp.inf)

        return lq, log_ratio

    @jax.jit
    def log_ratio(z, data):
        return jax.vmap(densities(data)[1])(z)

    @jax.jit
    def move(k, z, beta, chol, data):
        lq, ratio = densities(data)

        def tempered(x):  # beta > 0 here: -inf ratios stay -inf
            return lq(x) + beta * ratio(x)

        def one(k1, x, c):
            # c (d, d + k): a square factor, then k extra columns (the ridge term; zeros where it is off, so
            # that one program serves every round), each with its own normal draws
            d = x.shape[-1]

            def propose(k2, pos):
                return c[:, :d] @ jax.random.normal(k2, (d,)) + c[:, d:] @ jax.random.normal(
                    jax.random.fold_in(k2, 1), (c.shape[-1] - d,))

            def body(state, kk):
                state, info = rw_kernel(kk, state, tempered, propose)
                return state, info.is_accepted

            state, accepted = jax.lax.scan(body, blackjax.rmh.init(x, tempered), jax.random.split(k1, mcmc_steps))
            return state.position, jnp.mean(accepted)

        z, acc = jax.vmap(one)(jax.random.split(k, z.shape[0]), z, chol)
        return z, acc, jax.vmap(ratio)(z)

    return log_ratio, move


#: with the data an argument, module-level (log_q, log_target) compile once for every observation;
#: closures (which capture their data) are new on every call and are not kept
_cached_smc_step = functools.lru_cache(maxsize=8)(_smc_step)


def _precision_factor(precision: np.ndarray) -> np.ndarray:
    """A square root ``F`` of ``precision^-1`` (``F F^T``; from the symmetrised eigendecomposition,
    eigenvalues floored at 1e-10 of the largest so that a flat direction gets a wide but finite
    spread; no Cholesky factorisation, which fails on such a condition number)."""
    ev, vec = np.linalg.eigh(0.5 * (precision + precision.T))
    ev = np.maximum(ev, 1e-10 * max(ev.max(), 1e-300))
    return vec / np.sqrt(ev)


def _next_temperature(ratio: np.ndarray, beta: float, target: float = 0.5) -> float:
    """The next temperature after ``beta``: 1 when reweighting the particles (log ratios ``ratio``)
    by the whole rest keeps ESS / n >= ``target``, else the one that gives ESS / n = ``target``
    (bisection; the ESS falls as the step grows). A -inf ratio weighs nothing."""
    finite = ratio[np.isfinite(ratio)]

    def ess_fraction(step):
        return effective_sample_size(step * finite) / len(ratio) if finite.size else 0.0

    if ess_fraction(1.0 - beta) >= target:
        return 1.0
    lo, hi = 0.0, 1.0 - beta
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ess_fraction(mid) >= target else (lo, mid)
    return beta + max(lo, 1e-9)


def independence_metropolis(key, z, ratio, beta: float, sample_q, log_ratio, max_steps: int,
                            stop_share: float = 2.0, min_acceptance: float = 0.05):
    """Independence Metropolis steps for the tempered target q^(1 - beta) target^beta: every particle
    ``z (n, d)`` (log ratios ``ratio (n,)`` = log target - log q) proposes a fresh draw of q
    (``sample_q(key, n)``: independent rows of q itself), accepted with probability
    min(1, exp(beta (ratio' - ratio))), whose q terms cancel. Up to ``max_steps`` steps, stopping
    when the share ``stop_share`` of the particles has moved or a step accepts under
    ``min_acceptance``. Returns the particles, their log ratios, which moved ``(n,)`` and each
    step's acceptance."""
    n = len(ratio)
    zn, ratio, moved, step_acc = np.asarray(z, np.float64), np.asarray(ratio, np.float64), np.zeros(n, bool), []
    for i in range(max_steps):
        k_draw, k_u = jax.random.split(jax.random.fold_in(key, i))
        z_new = spread_batch(jnp.asarray(sample_q(k_draw, n), jnp.float32))
        r_new = np.asarray(log_ratio(z_new), np.float64)
        log_u = np.log(np.asarray(jax.random.uniform(k_u, (n,)), np.float64))
        with np.errstate(invalid="ignore"):
            take = np.isfinite(r_new) & (~np.isfinite(ratio) | (log_u < beta * (r_new - ratio)))
        zn = np.where(take[:, None], np.asarray(z_new, np.float64), zn)
        ratio = np.where(take, r_new, ratio)
        moved |= take
        step_acc.append(float(take.mean()))
        if moved.mean() >= stop_share or take.mean() < min_acceptance:
            break
    return spread_batch(jnp.asarray(zn, jnp.float32)), ratio, moved, step_acc


def tempered_smc(log_q, sample_q, log_target, key, d, n_particles, mcmc_steps, max_steps, data=None, ridge=None,
                 ridge_scale: float = 0.3, base_cov=None, max_move_factor: int = 1, moved_target: float = 0.9,
                 local_precision=None, final_rounds: int = 0, independence_steps: int = 0):
    """Adaptive tempered SMC from a tractable q(z) to a target in R^d:
    pi_beta(z) ~ q(z)^(1 - beta) target(z)^beta, beta from 0 to 1.

    Each step takes equally weighted particles at beta, chooses the next temperature so that the
    reweighting keeps the ESS at half (or goes to 1 when that keeps more), reweights, resamples
    (systematic) and moves the particles by random-walk Metropolis (BlackJAX's kernel) on the new
    tempered target. The temperature is chosen on the very particles it reweights, so every
    reweighting, the last one included, keeps an ESS of half the particles counted copy by copy.
    (BlackJAX's adaptive tempered SMC chooses it on the particles before they are resampled and
    moved: where the moves seldom succeed, its last reweighting kept an ESS of 4 of 500.) Copies of
    one point that the moves did not part still count once in ``final_ess`` (below).

    The moves' proposal is the particles' covariance times a scale per particle, drawn
    log-uniformly within a factor e of a centre; after each round of moves the centre moves to the
    scales' mean (in log) weighted by each particle's acceptance x scale^2, the expected squared
    jump in the covariance's metric (Fearnhead & Taylor 2013), or, when fewer than 10 moves were
    accepted (too few to weigh the scales), down by a factor e^2. The moves at one temperature come
    in rounds of ``mcmc_steps`` steps; with ``max_move_factor`` > 1, rounds are added (each with the
    re-centred scales, up to ``max_move_factor`` rounds) until a share ``moved_target`` of the
    particles has left the point it was resampled at: where the first scales are far off (a proposal
    much wider than the tempered target), the later rounds still part the copies that resampling
    made.

    ``log_q``, ``log_target``: per-particle log densities (``log_target`` may be
    :func:`particle_batched`); ``sample_q(key, n) -> (n, d)``. Returns equally weighted particles
    ``(n_particles, d)`` (resampled after the last reweighting), the log-evidence estimate and
    diagnostics (``final_ess``: the ESS of the last reweighting). With ``data`` (a pytree, e.g. the
    observed ERP), ``log_q`` and ``log_target`` take ``(z, data)``: the same module-level functions then
    compile once for every observation. ``ridge`` (``(k, d)``): directions along which the target is
    known to be flat but for the prior (in log(theta), the exact (C, a_k) -> (lambda C, a_k / lambda)
    line); the final rounds' proposal (at the posterior, ``final_rounds``) gets ``ridge_scale^2 R^T R``
    added to its covariance, so that particles narrow along it still spread over it. Not during the
    tempering: there q^(1 - beta) is not flat along the ridge (a Laplace mixture's components are
    narrow along it too), and these fixed-size steps were rejected whatever the scale (acceptance
    0.1 % on a real recording, its last population 38 distinct points of 500).

    ``base_cov`` (``(d, d)``, e.g. a Laplace covariance of the target): added to the particles'
    covariance, rescaled to the same trace, so that the proposal keeps every direction when the
    resampled particles are few distinct points (their covariance then has a low rank) while its
    size stays the particles' (a Laplace covariance from float32 Jacobians can be far wider than the
    target).

    ``final_ess`` counts duplicated particles once: the weights of copies of one point are summed
    before the ESS is taken, so a population resampled down to a few distinct points reports that
    few, however many copies it holds.

    ``local_precision`` (``(P_data, P_rest)``, each ``(d, d)``, e.g. the Gauss-Newton precision of
    the likelihood and of the prior at the best mode, or a function of the particles and their log
    ratios ``(z (n, d), ratio (n,)) -> (P_data, P_rest)``, called at each temperature before the
    resampling): a second proposal covariance, ``(beta P_data + P_rest)^-1``, the target's local
    spread at the temperature. Rounds of moves then alternate between the particles' covariance
    (jumps across the population, between modes) and this one (moves within a mode, where the
    particles' covariance is far wider than the tempered target), each with its own scale centre.
    Both kernels are fixed before each round, symmetric and exact for the tempered target.

    ``final_rounds``: rounds of moves at the posterior (beta = 1) on the particles resampled after
    the last reweighting, the kernels in turn (``diag['final_acceptance']``); they part the copies
    of one point that the resampling made. ``diag['distinct_fraction']`` is the distinct
    share before them.

    ``independence_steps``: at each temperature, before the random-walk rounds, up to this many
    independence Metropolis steps (:func:`independence_metropolis`; ``sample_q`` must then give
    independent draws of q itself, each row of the law ``log_q``), exact for the tempered target;
    one likelihood per particle and step. They stop when the share ``moved_target`` has moved or a
    step accepts under 5 %; while beta is small they move nearly every particle, where random walks
    scaled to the particles' covariance seldom succeed (``diag['independence_acceptance_per_step']``).
    At least one round of random-walk moves follows: the particles that refuse the independence
    moves are the copies of the likeliest points."""
    log_ratio, move = (_cached_smc_step if data is not None else _smc_step)(log_q, log_target, mcmc_steps,
                                                                           data is not None)
    k0, key = jax.random.split(key)
    z = spread_batch(jnp.asarray(sample_q(k0, n_particles)))  # split over the local devices, if several
    ratio = np.asarray(log_ratio(z, data), np.float64)
    beta, log_z, steps, acc, betas, scales = 0.0, 0.0, 0, [], [], []
    # the centres of the particles' random-walk scales (log; one per proposal covariance: the
    # particles', and the local one from local_precision), their bounds, and the half-width of the
    # log-uniform spread around them
    log_lo, log_hi, spread = math.log(1e-3 / math.sqrt(d)), math.log(3.0), 1.0
    centres = {"particles": math.log(2.38 / math.sqrt(d)), "local": math.log(2.38 / math.sqrt(d))}
    kinds = ["particles"] + (["local"] if local_precision is not None else [])
    # the ridge term's columns of the proposal factor, (d, k): zeros before the posterior, so that every
    # round's factor has one shape and the move program compiles once
    ridge_columns = None if ridge is None else ridge_scale * np.asarray(ridge, np.float64).reshape(-1, d).T
    rounds_per_step, kinds_per_step, ind_acc_per_step = [], [], []

    def proposal_factors(zn, w, ratio_now, beta_now):
        """Square-root factors ``F`` (``F F^T``) of the proposal covariances at this temperature,
        before the scale: the particles' (Cholesky) and the local one (eigendecomposition)."""
        mean = w @ zn
        cov = (w[:, None] * (zn - mean)).T @ (zn - mean) + 1e-6 * np.eye(d)
        if base_cov is not None:
            base = np.asarray(base_cov, np.float64)
            cov = cov + np.trace(cov) / np.trace(base) * base
        factors = {"particles": np.linalg.cholesky(cov)}
        if local_precision is not None:
            p_data, p_rest = local_precision(zn, ratio_now) if callable(local_precision) else local_precision
            factors["local"] = _precision_factor(beta_now * np.asarray(p_data, np.float64)
                                                 + np.asarray(p_rest, np.float64))
        return factors

    def move_rounds(k_move, z, beta_now, factors, n_rounds, stop_share, moved=None):
        """Rounds of ``mcmc_steps`` moves, the kernels in turn, each round's scales re-centred,
        until ``stop_share`` of the particles have moved (or ``n_rounds``), at least one round;
        ``moved``: those moved already (by the independence steps)."""
        start = np.asarray(z, np.float64)
        moved = np.zeros(n_particles, bool) if moved is None else moved.copy()
        round_acc, round_kinds, ratio_now = [], [], None
        for rnd in range(n_rounds):
            kind = kinds[rnd % len(kinds)]
            k_scale_r, k_move_r = jax.random.split(jax.random.fold_in(k_move, rnd))
            s = np.exp(centres[kind] + spread * np.asarray(jax.random.uniform(k_scale_r, (n_particles,), minval=-1.0,
                                                                              maxval=1.0), np.float64))
            prop = s[:, None, None] * factors[kind]
            if ridge_columns is not None:  # the ridge term at the posterior: more columns of the factor
                r = ridge_columns if beta_now >= 1.0 else np.zeros_like(ridge_columns)
                prop = np.concatenate([prop, np.broadcast_to(r, (n_particles, d, r.shape[1]))], axis=2)
            chol = spread_batch(jnp.asarray(prop, jnp.float32))  # (n, d, d [+ k]), split like z
            z, a, ratio_now = move(k_move_r, z, jnp.float32(beta_now), chol, data)
            a = np.asarray(a, np.float64)
            round_acc.append(float(a.mean()))
            round_kinds.append(kind)
            jump = a * s**2  # each particle's expected squared jump, up to the factor d
            if a.sum() * mcmc_steps >= 10:
                centres[kind] = float(np.sum(jump * np.log(s)) / jump.sum())
            else:  # too few accepted moves to weigh the scales: the proposal is far too wide
                centres[kind] -= 2 * spread
            centres[kind] = min(max(centres[kind], log_lo), log_hi)
            moved |= np.any(np.asarray(z, np.float64) != start, axis=1)
            if moved.mean() >= stop_share:
                break
        return z, np.asarray(ratio_now, np.float64), round_acc, round_kinds

    log_w = np.zeros(n_particles)
    while beta < 1.0 and steps < max_steps:
        key, k_res, k_move = jax.random.split(key, 3)
        new_beta = _next_temperature(ratio, beta)
        with np.errstate(invalid="ignore"):
            log_w = np.where(np.isfinite(ratio), (new_beta - beta) * ratio, -np.inf)
        if not np.isfinite(log_w).any():
            break
        log_z += float(np.logaddexp.reduce(log_w) - math.log(n_particles))
        beta = new_beta
        betas.append(beta)
        steps += 1
        if beta >= 1.0:
            break
        w = np.exp(log_w - np.logaddexp.reduce(log_w))
        zn = np.asarray(z, np.float64)
        factors = proposal_factors(zn, w, ratio, beta)
        idx = _systematic(k_res, log_w, n_particles)
        z, ratio = spread_batch(jnp.asarray(zn[idx], jnp.float32)), ratio[idx]
        moved = None
        if independence_steps:
            z, ratio, moved, ind_acc = independence_metropolis(
                jax.random.fold_in(k_move, 7919), z, ratio, beta, sample_q, lambda zz: log_ratio(zz, data),
                independence_steps, moved_target)
            ind_acc_per_step.append(ind_acc)
        # at least one round of random-walk moves: the particles that refuse the independence moves
        # are the copies of the likeliest points, which moves within their mode part
        z, ratio, round_acc, round_kinds = move_rounds(k_move, z, beta, factors, max(1, max_move_factor),
                                                       moved_target, moved)
        acc.append(float(np.mean((ind_acc_per_step[-1] if independence_steps else []) + round_acc)))
        rounds_per_step.append(len(round_acc))
        kinds_per_step.append(round_kinds)
        scales.append({k: float(math.exp(v)) for k, v in centres.items() if k in kinds})
    z_last = np.asarray(z, np.float64)
    finite_particles = bool(np.all(np.isfinite(z_last)))
    w = np.exp(log_w - np.logaddexp.reduce(log_w)) if np.isfinite(log_w).any() else np.full(n_particles, 1.0 / n_particles)
    _, copies_of = np.unique(z_last, axis=0, return_inverse=True)
    w_distinct = np.bincount(copies_of.ravel(), weights=w)  # the weight of each distinct point
    k_final_res, k_final_move = jax.random.split(key)
    idx = _systematic(k_final_res, np.log(np.maximum(w, 1e-300)), n_particles)
    z_out = z_last[idx]
    distinct_resampled = len(np.unique(z_out, axis=0))
    final_acc: list[float] = []
    if final_rounds and beta >= 1.0 and finite_particles:
        # moves at the posterior on the resampled particles: they part the copies of one point
        factors = proposal_factors(z_last, w, ratio, 1.0)
        z_moved, _, final_acc, _ = move_rounds(k_final_move, spread_batch(jnp.asarray(z_out, jnp.float32)), 1.0, factors,
                                               final_rounds, 2.0)
        z_out = np.asarray(z_moved, np.float64)
    diag = dict(smc_steps=steps, temperatures=betas, acceptance_rate=float(np.mean(acc)) if acc else 0.0,
                acceptance_per_step=acc, scale_per_step=scales, move_rounds_per_step=rounds_per_step,
                move_kinds_per_step=kinds_per_step, independence_acceptance_per_step=ind_acc_per_step,
                final_ess=float(1.0 / np.sum(w_distinct**2)),
                distinct_before_last_reweighting=int(len(w_distinct)),
                distinct_fraction=distinct_resampled / n_particles,
                final_acceptance=float(np.mean(final_acc)) if final_acc else None, particles=n_particles,
                reached_posterior=beta >= 1.0 and finite_particles,
                likelihood_evaluations=n_particles * (1 + len(acc) + sum(map(len, ind_acc_per_step))
                                                      + mcmc_steps * (sum(rounds_per_step) + len(final_acc))))
    return z_out, log_z, diag
