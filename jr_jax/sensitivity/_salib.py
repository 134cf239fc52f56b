"""Variance-based (Sobol') and screening (Morris) indices with SALib, on any model or on the JR ERP."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._params import Prior
from .._simulate import Protocol, simulate
from ._qoi import QoI, get_qoi


def problem(names, lows, highs) -> dict:
    """SALib's problem dictionary."""
    return dict(num_vars=len(names), names=list(names), bounds=[[float(a), float(b)] for a, b in zip(lows, highs)])


def _check_outputs(y: np.ndarray, what: str) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    bad = ~np.isfinite(y).reshape(len(y), -1).all(axis=1)
    if bad.any():
        raise ValueError(f"{what}: {int(bad.sum())} of {len(y)} model evaluations are not finite (first rows "
                         f"{np.flatnonzero(bad)[:5].tolist()}); SALib needs every row in order, so nothing is "
                         "dropped: narrow the prior, shorten dt, or use a QoI defined for these ERPs")
    return y


def _seed(key) -> int:
    return int(np.asarray(jax.random.randint(key, (), 0, 2**31 - 1)))


def sobol_indices(model: Callable[[np.ndarray], np.ndarray], names, lows, highs, n: int, *, seed: int,
                  second_order: bool = False, num_resamples: int = 100) -> list[dict]:
    """Sobol' S1 and ST (and S2) of ``model`` (``(M, d) -> (M,)``) by Saltelli sampling, n a power of 2.

    Rows: ``{parameter, S1, S1_conf, ST, ST_conf}`` (95 % bootstrap half-widths) and, with
    ``second_order``, ``{parameter, other, S2, S2_conf}``.
    """
    from SALib.analyze import sobol as analyze

    prob, x = _saltelli(names, lows, highs, n, second_order, seed)
    y = _check_outputs(model(x), "sobol")
    if y.ndim != 1:
        raise ValueError(f"sobol_indices needs a scalar output per row, got shape {y.shape}")
    si = analyze.analyze(prob, y, calc_second_order=second_order, num_resamples=num_resamples, seed=seed)
    rows = [dict(parameter=p, S1=float(si["S1"][j]), S1_conf=float(si["S1_conf"][j]), ST=float(si["ST"][j]),
                 ST_conf=float(si["ST_conf"][j])) for j, p in enumerate(names)]
    if second_order:
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                rows.append(dict(parameter=names[a], other=names[b], S2=float(si["S2"][a, b]),
                                 S2_conf=float(si["S2_conf"][a, b])))
    return rows


def _saltelli(names, lows, highs, n, second_order, seed):
    from SALib.sample import sobol as sample

    if not (isinstance(n, (int, np.integer)) and n >= 2 and (n & (n - 1)) == 0):
        raise ValueError(f"n must be a power of two (Sobol' sequences lose their balance otherwise), got {n!r}; "
                         f"try {2 ** int(np.ceil(np.log2(max(n, 2))))}")
    prob = problem(names, lows, highs)
    return prob, sample.sample(prob, n, calc_second_order=second_order, seed=seed)


def sobol_waveform(prior: Prior, protocol: Protocol, n: int, *, key, time_stride: int = 10,
                   chunk_size: int = 1024) -> list[dict]:
    """First-order and total Sobol' indices of the ERP at every ``time_stride``-th sample, and the
    variance-weighted aggregate over time, S = sum_t Var(y_t) S_t / sum_t Var(y_t) (Gamboa et al.).

    Rows ``{time, parameter, S1, ST, variance}`` per time point (``time`` in s) and
    ``{time: None, parameter, S1, ST}`` for the aggregate. Time points with zero variance (the
    baseline-corrected ERP at its pre-stimulus mean) are skipped.
    """
    from SALib.analyze import sobol as analyze

    _require_uniform(prior, "sobol_waveform")
    seed = _seed(key)
    prob, x = _saltelli(prior.names, prior.lows, prior.highs, n, False, seed)
    q = get_qoi("waveform")
    y = _check_outputs(erp_model(prior, protocol, q, chunk_size=chunk_size, key=key)(x), "sobol_waveform")
    times = protocol.times
    rows, weights, s1s, sts = [], [], [], []
    for t in range(0, y.shape[1], time_stride):
        variance = float(np.var(y[:, t]))
        if variance <= 1e-12 * float(np.var(y)):
            continue
        si = analyze.analyze(prob, y[:, t], calc_second_order=False, num_resamples=20, seed=seed)
        weights.append(variance)
        s1s.append(si["S1"])
        sts.append(si["ST"])
        rows += [dict(time=float(times[t]), parameter=p, S1=float(si["S1"][j]), ST=float(si["ST"][j]),
                      variance=variance) for j, p in enumerate(prior.names)]
    w = np.asarray(weights) / np.sum(weights)
    agg_s1, agg_st = w @ np.asarray(s1s), w @ np.asarray(sts)
    rows += [dict(time=None, parameter=p, S1=float(agg_s1[j]), ST=float(agg_st[j]), variance=None)
             for j, p in enumerate(prior.names)]
    return rows


def morris_indices(model: Callable[[np.ndarray], np.ndarray], names, lows, highs, n_trajectories: int, *,
                   seed: int, num_levels: int = 4) -> list[dict]:
    """Morris elementary effects: rows ``{parameter, mu_star, mu_star_conf, sigma, mu}``."""
    from SALib.analyze import morris as analyze
    from SALib.sample import morris as sample

    if not (isinstance(n_trajectories, (int, np.integer)) and n_trajectories >= 2):
        raise ValueError(f"n_trajectories must be an integer >= 2, got {n_trajectories!r}")
    prob = problem(names, lows, highs)
    x = sample.sample(prob, n_trajectories, num_levels=num_levels, seed=seed)
    y = _check_outputs(model(x), "morris")
    si = analyze.analyze(prob, x, y, num_levels=num_levels, seed=seed)
    return [dict(parameter=p, mu_star=float(si["mu_star"][j]), mu_star_conf=float(si["mu_star_conf"][j]),
                 sigma=float(si["sigma"][j]), mu=float(si["mu"][j])) for j, p in enumerate(names)]


def _require_uniform(prior: Prior, what: str) -> None:
    if prior.kind != "uniform":
        raise ValueError(f"{what} samples the prior's box uniformly (SALib's sampler): use Prior(kind='uniform') "
                         f"with the bounds you want, not kind={prior.kind!r}")


def _scalar_qoi(prior: Prior, qoi: str | QoI, what: str) -> QoI:
    """The QoI, after checking that it is scalar and the prior uniform (what every global method needs)."""
    q = get_qoi(qoi)
    _require_uniform(prior, what)
    if q.is_vector:
        raise ValueError(f"{what} takes a scalar QoI" + ("; for the waveform use sobol_waveform" if what == "sobol" else ""))
    return q


def padded_chunks(theta: np.ndarray, chunk_size: int):
    """``(start, rows, padded)`` per chunk: the last chunk is padded with its last row to
    ``chunk_size`` so that one compilation serves every chunk."""
    for lo in range(0, len(theta), chunk_size):
        part = theta[lo:lo + chunk_size]
        pad = np.repeat(part[-1:], chunk_size - len(part), axis=0)
        yield lo, len(part), np.concatenate([part, pad]) if len(pad) else part


def erp_model(prior: Prior, protocol: Protocol, qoi: QoI, *, chunk_size: int = 1024, key=None):
    """``theta (M, n_params) -> QoI values`` through the batched simulator, in chunks."""
    times = protocol.times
    f = jax.jit(jax.vmap(lambda e: qoi(e, times)))

    def model(theta):
        theta = np.asarray(theta, dtype=np.float32)
        out = []
        for lo, rows, padded in padded_chunks(theta, chunk_size):
            erp = simulate(prior.to_params(jnp.asarray(padded)), protocol, key=key, chunk_size=chunk_size,
                           first_index=lo)
            out.append(np.asarray(f(erp))[:rows])
        return np.concatenate(out)

    return model


def sobol(prior: Prior, protocol: Protocol, qoi: str | QoI, n: int, *, key, second_order: bool = False,
          chunk_size: int = 1024) -> list[dict]:
    """Sobol' indices of a scalar QoI of the ERP over ``prior`` (n a power of two: n (d + 2) simulations,
    n (2d + 2) with ``second_order``). Rows as :func:`sobol_indices`, plus ``qoi`` and ``n_simulations``."""
    q = _scalar_qoi(prior, qoi, "sobol")
    rows = sobol_indices(erp_model(prior, protocol, q, chunk_size=chunk_size, key=key), prior.names, prior.lows,
                         prior.highs, n, seed=_seed(key), second_order=second_order)
    d = len(prior.names)
    n_sim = n * (2 * d + 2 if second_order else d + 2)
    return [dict(r, qoi=q.name, n_simulations=n_sim) for r in rows]


def morris(prior: Prior, protocol: Protocol, qoi: str | QoI, n_trajectories: int, *, key, num_levels: int = 4,
           chunk_size: int = 1024) -> list[dict]:
    """Morris screening of a scalar QoI over ``prior``: n_trajectories (d + 1) simulations."""
    q = _scalar_qoi(prior, qoi, "morris")
    rows = morris_indices(erp_model(prior, protocol, q, chunk_size=chunk_size, key=key), prior.names, prior.lows,
                          prior.highs, n_trajectories, seed=_seed(key), num_levels=num_levels)
    return [dict(r, qoi=q.name, n_simulations=n_trajectories * (len(prior.names) + 1)) for r in rows]
