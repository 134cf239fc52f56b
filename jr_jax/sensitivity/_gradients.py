"""Sensitivities from exact derivatives through the simulator: elasticities, DGSM, Fisher information."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .._params import STUDY_PARAMETERS, JRParams, Prior
from .._simulate import Protocol, simulate
from ._qoi import QoI, get_qoi
from ._salib import _check_outputs, _scalar_qoi, _seed, padded_chunks


def _values(params: JRParams, names) -> jnp.ndarray:
    return jnp.stack([jnp.asarray(getattr(params, n)) for n in names])


def elasticities(params: JRParams, protocol: Protocol, qoi: str | QoI = "waveform", *, names=STUDY_PARAMETERS):
    """Local sensitivities at one parameter set, by forward-mode ``jax.jacfwd`` through the solver.

    Scalar QoI: elasticities d log q / d log θ, shape ``(n_params,)`` (dimensionless).
    Waveform: d erp(t) / d log θ = θ ∂erp/∂θ, shape ``(n_times, n_params)`` in mV (the ERP crosses
    zero, so its logarithm is not used).
    """
    q = get_qoi(qoi)
    if params.batch_shape != ():
        raise ValueError("elasticities takes one parameter set (an unbatched JRParams)")
    theta = _values(params, names)
    times = protocol.times

    def f(t):
        return q(simulate(params.replace(**dict(zip(names, t))), protocol, differentiation="forward"), times)

    value = f(theta)
    jac = jax.jacfwd(f)(theta)
    _check_outputs(np.atleast_1d(np.asarray(value))[None], "elasticities")
    if q.is_vector:
        return np.asarray(jac * theta)
    return np.asarray(jac * theta / value)


def dgsm_from_gradients(grads, values, lows, highs, names, *, n_bootstrap: int = 1000, seed: int = 0,
                        conf_level: float = 0.95) -> list[dict]:
    """DGSM from per-sample gradients ``(N, d)`` and values ``(N,)`` of a model over a box prior.

    ``vi`` = E[(∂q/∂θ_i)²] (Sobol' & Kucherenko 2009) with a bootstrap percentile interval;
    ``dgsm`` = (b_i - a_i)² vi / (π² V), the upper bound on the total Sobol' index ST_i for
    uniform inputs (V = Var q), as SALib's ``dgsm``, with its bootstrap interval.
    """
    g = _check_outputs(grads, "dgsm gradients")
    v = _check_outputs(values, "dgsm values")
    widths = np.asarray(highs, float) - np.asarray(lows, float)
    variance = np.var(v)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(g), size=(n_bootstrap, len(g)))
    vi_boot = (g[idx] ** 2).mean(axis=1)  # (B, d)
    var_boot = v[idx].var(axis=1)  # (B,)
    bound_boot = vi_boot * widths**2 / (math.pi**2 * var_boot[:, None])
    lo_q, hi_q = (1 - conf_level) / 2 * 100, (1 + conf_level) / 2 * 100
    vi = (g**2).mean(axis=0)
    bound = vi * widths**2 / (math.pi**2 * variance)
    return [dict(parameter=n, vi=float(vi[j]), vi_low=float(np.percentile(vi_boot[:, j], lo_q)),
                 vi_high=float(np.percentile(vi_boot[:, j], hi_q)), dgsm=float(bound[j]),
                 dgsm_low=float(np.percentile(bound_boot[:, j], lo_q)),
                 dgsm_high=float(np.percentile(bound_boot[:, j], hi_q)))
            for j, n in enumerate(names)]


def dgsm(prior: Prior, protocol: Protocol, qoi: str | QoI, n: int, *, key, chunk_size: int = 256,
         n_bootstrap: int = 1000) -> list[dict]:
    """DGSM of a scalar QoI over ``prior`` from exact gradients (reverse mode through the solver).

    ``n`` prior draws (one simulation and one gradient each). The bound is for uniform inputs
    (``prior.kind == "uniform"``). Rows as :func:`dgsm_from_gradients`, plus ``qoi`` and ``n``.
    """
    q = _scalar_qoi(prior, qoi, "dgsm (its bound on ST holds for uniform inputs)")
    if not (isinstance(n, (int, np.integer)) and n >= 2):
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    times = protocol.times
    theta_all = np.asarray(prior.sample_array(key, n))

    @jax.jit
    def value_and_grads(theta):
        def total(t):
            qs = jax.vmap(lambda e: q(e, times))(simulate(prior.to_params(t), protocol, chunk_size=t.shape[0]))
            return jnp.sum(qs), qs

        (_, qs), g = jax.value_and_grad(total, has_aux=True)(theta)
        return qs, g  # samples are independent: row i of g is the gradient of q_i

    values, grads = [], []
    for _, rows, padded in padded_chunks(theta_all, chunk_size):
        qs, g = value_and_grads(jnp.asarray(padded, jnp.float32))
        values.append(np.asarray(qs)[:rows])
        grads.append(np.asarray(g)[:rows])
    rows = dgsm_from_gradients(np.concatenate(grads), np.concatenate(values), prior.lows, prior.highs, prior.names,
                               n_bootstrap=n_bootstrap, seed=_seed(key))
    return [dict(r, qoi=q.name, n_simulations=n) for r in rows]


def prior_variances(prior: Prior) -> np.ndarray:
    """Variance of each parameter under ``prior`` ``(n_params,)``: box (b-a)²/12; the normal preset
    (SD a quarter of the range, truncated at ±2 SD) its truncated-normal variance."""
    width = prior.highs - prior.lows
    if prior.kind == "uniform":
        return width**2 / 12
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    z = math.erf(2 / math.sqrt(2))
    return (width / 4) ** 2 * (1 - 2 * 2 * phi2 / z)


def fisher_from_jacobian(jac, noise_variance: float, prior_variances=None) -> dict:
    """Fisher information ``J^T J / σ²`` of y = f(θ) + N(0, σ² I) and what it implies.

    Returns ``information (d, d)``, its ``eigenvalues`` (ascending) and ``eigenvectors``,
    ``crlb_sd`` (Cramér-Rao standard deviations, sqrt of diag(F⁺)) and, given
    ``prior_variances``, ``r2_ceiling`` = 1 - (F + Σ_prior⁻¹)⁻¹_ii / var_i: the R² that an
    efficient estimator could reach under a Gaussian (Laplace) approximation of the posterior.
    """
    j = np.asarray(jac, dtype=float)
    info = j.T @ j / float(noise_variance)
    eigenvalues, eigenvectors = np.linalg.eigh(info)
    out = dict(information=info, eigenvalues=eigenvalues, eigenvectors=eigenvectors,
               crlb_sd=np.sqrt(np.clip(np.diag(np.linalg.pinv(info, hermitian=True)), 0, None)))
    if prior_variances is not None:
        pv = np.asarray(prior_variances, dtype=float)
        post = np.linalg.inv(info + np.diag(1.0 / pv))
        out["r2_ceiling"] = 1.0 - np.diag(post) / pv
    return out


def fisher(params: JRParams, protocol: Protocol, snr_db: float, *, prior: Prior | None = None,
           names=STUDY_PARAMETERS) -> dict:
    """Fisher information of the ERP about the parameters ``names`` at ``params``, under white
    Gaussian measurement noise at ``snr_db`` (variance = mean square of the ERP / 10^(snr/10)).

    With ``prior``: ``r2_ceiling`` per parameter under the prior's variances (box: (b-a)²/12;
    normal preset: the truncated normal's). Use float64 parameters for a well-conditioned result.
    """
    if not (isinstance(snr_db, (int, float)) and math.isfinite(snr_db)):
        raise ValueError(f"snr_db must be a finite number (dB), got {snr_db!r}")
    if params.batch_shape != ():
        raise ValueError("fisher takes one parameter set (an unbatched JRParams)")
    theta = _values(params, names)
    erp = simulate(params, protocol)
    jac = jax.jacfwd(lambda t: simulate(params.replace(**dict(zip(names, t))), protocol, differentiation="forward"))(
        theta)
    jac = np.asarray(jac).reshape(-1, len(names))  # (n_times [x n_channels], n_params)
    _check_outputs(jac.T, "fisher Jacobian")
    noise_variance = float(jnp.mean(erp**2)) / 10 ** (snr_db / 10)
    prior_var = None
    if prior is not None:
        if tuple(prior.names) != tuple(names):
            raise ValueError(f"prior names {prior.names} must equal names {tuple(names)}")
        prior_var = prior_variances(prior)
    out = fisher_from_jacobian(np.asarray(jac), noise_variance, prior_var)
    out.update(names=tuple(names), noise_variance=noise_variance, snr_db=float(snr_db))
    return out


def oat(params: JRParams, protocol: Protocol, name: str, factors) -> np.ndarray:
    """The study's one-at-a-time sweep: ERPs ``(len(factors), n_times)`` with ``name`` set to
    ``factors`` times its value in ``params`` (the others fixed), simulated as one batch."""
    if name not in JRParams.names:
        raise ValueError(f"unknown parameter {name!r}; allowed: {JRParams.names}")
    if params.batch_shape != ():
        raise ValueError("oat takes one parameter set (an unbatched JRParams)")
    factors = np.asarray(factors, dtype=float)
    if factors.ndim != 1 or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise ValueError("factors must be a 1-D array of positive, finite numbers")
    base = np.asarray(getattr(params, name))
    batch = params.replace(**{name: base * factors}).broadcast()
    return np.asarray(simulate(batch, protocol, chunk_size=len(factors)))
