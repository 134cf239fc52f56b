"""Calibration of a posterior estimator on held-out simulations: simulation-based calibration (SBC)
ranks with a uniformity test and simultaneous ECDF bands, expected coverage and the calibration
error, posterior contraction and z-scores, and the posterior mean's accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from ._metrics import parameter_metrics
from ._summary import derived_quantities

#: central-interval levels at which coverage is reported
REPORT_LEVELS = (0.5, 0.8, 0.9, 0.95)
#: the grid of levels over which the calibration error (median |coverage - level|) is taken
LEVEL_GRID = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))


def _chi2_sf(x: float, dof: int) -> float:
    """P(X > x) for X ~ chi^2(dof) (regularised upper incomplete gamma)."""
    return float(jax.scipy.special.gammaincc(dof / 2.0, x / 2.0))


def rank_uniformity_pvalue(ranks, n_draws: int, n_bins: int | None = None) -> float:
    """Chi-square test that SBC ranks (integers in 0..n_draws) are uniform.

    The ranks are pooled into ``n_bins`` equal groups of the n_draws + 1 values (default: about
    N/20 bins so that each expects >= 20 counts, at most 20); p-value of Pearson's statistic.
    """
    ranks = np.asarray(ranks)
    n = ranks.size
    L = n_draws + 1
    if n_bins is None:
        n_bins = int(max(2, min(20, n // 20)))
    while L % n_bins:  # equal groups of rank values, so that each bin has the same probability
        n_bins -= 1
    if n_bins < 2:
        raise ValueError(f"cannot bin {L} rank values into >= 2 equal groups; use n_draws + 1 with small factors")
    counts = np.bincount(ranks * n_bins // L, minlength=n_bins)
    expected = n / n_bins
    stat = float(np.sum((counts - expected) ** 2 / expected))
    return _chi2_sf(stat, n_bins - 1)


def ecdf_band(n: int, *, alpha: float = 0.05, grid: int = 100, n_sim: int = 2000, seed: int = 0):
    """Simultaneous 1 - alpha band for the ECDF difference of ``n`` uniform fractional ranks
    (Säilynoja, Bürkner & Vehtari, 2022): the pointwise binomial level gamma is chosen by simulation
    so that uniform samples stay inside the band at every grid point with probability 1 - alpha.

    Returns ``z (grid,)``, ``lower (grid,)``, ``upper (grid,)`` (bands of ECDF(z) - z).
    """
    from jax.scipy.stats import binom

    z = np.arange(1, grid + 1) / (grid + 1)
    k = np.arange(n + 1)
    pmf = np.asarray(jax.vmap(lambda p: binom.pmf(k, n, p))(z), np.float64)  # (grid, n + 1)
    cdf = np.clip(np.cumsum(pmf, axis=1), 0.0, 1.0)
    sf_incl = np.clip(1.0 - cdf + pmf, 0.0, 1.0)  # P(X >= k)
    rng = np.random.default_rng(seed)
    u = rng.random((n_sim, n))
    counts = (u[:, :, None] <= z[None, None, :]).sum(axis=1)  # (n_sim, grid)
    gi = np.arange(grid)[None, :]
    tail = 2.0 * np.minimum(cdf[gi, counts], sf_incl[gi, counts])
    gamma = float(np.quantile(tail.min(axis=1), alpha))
    lo_count = np.array([np.searchsorted(cdf[i], gamma / 2) for i in range(grid)])
    hi_count = np.array([np.searchsorted(cdf[i], 1 - gamma / 2) for i in range(grid)])
    return z, lo_count / n - z, hi_count / n - z


@dataclass(frozen=True)
class Calibration:
    """Calibration of a posterior estimator at one test SNR (``snr_db``; None: clean).

    Per quantity q (the parameters, then log(C*a_k)):
    ``ranks (N, q)`` SBC ranks of the truth among ``n_draws`` posterior draws; ``sbc_pvalue (q,)``
    the chi-square uniformity test; ``in_band (q,)`` whether the ranks' ECDF difference stays inside
    the simultaneous 95 % band; ``coverage (len(levels), q)`` the fraction of truths inside the
    central intervals at ``levels``; ``calibration_error (q,)`` the median |coverage - level| over
    :data:`LEVEL_GRID`; ``contraction (N, q)`` 1 - posterior var / prior var; ``z_score (N, q)``
    (posterior mean - truth) / posterior SD. ``metrics``: R², NRMSE, ... of the posterior mean
    (:func:`jr_jax.parameter_metrics`, parameters only).
    """

    names: tuple[str, ...]
    snr_db: float | None
    n_draws: int
    ranks: np.ndarray
    sbc_pvalue: np.ndarray
    in_band: np.ndarray
    levels: tuple[float, ...]
    coverage: np.ndarray
    calibration_error: np.ndarray
    contraction: np.ndarray
    z_score: np.ndarray
    posterior_mean: np.ndarray
    truth: np.ndarray
    metrics: dict

    def rows(self) -> list[dict]:
        """One dict per quantity: calibration error, SBC p-value and band check, coverage at
        :data:`REPORT_LEVELS`, median contraction, mean and SD of the z-scores, and (parameters) R²
        and NRMSE of the posterior mean."""
        out = []
        grid = np.asarray(self.levels)
        for j, name in enumerate(self.names):
            row = dict(snr_db=self.snr_db, parameter=name, n_test=len(self.truth), n_draws=self.n_draws,
                       calibration_error=float(self.calibration_error[j]), sbc_pvalue=float(self.sbc_pvalue[j]),
                       sbc_in_band=bool(self.in_band[j]),
                       contraction=float(np.median(self.contraction[:, j])),
                       z_mean=float(np.mean(self.z_score[:, j])), z_sd=float(np.std(self.z_score[:, j])))
            for lv in REPORT_LEVELS:
                row[f"coverage_{int(round(100 * lv))}"] = float(self.coverage[int(np.argmin(abs(grid - lv))), j])
            if name in self.metrics:
                row.update(r2=float(self.metrics[name]["r2"]), nrmse=float(self.metrics[name]["nrmse"]))
            out.append(row)
        return out

    def plot(self, path=None, *, title: str = ""):
        """Three rows of panels: SBC ECDF difference with its simultaneous 95 % band per quantity,
        expected coverage against the level, and contraction against z-score (BayesFlow's view)."""
        import matplotlib

        matplotlib.use("Agg") if path is not None else None
        import matplotlib.pyplot as plt

        q = len(self.names)
        fig, axes = plt.subplots(3, q, figsize=(2.1 * q, 6.6), squeeze=False)
        z, lo, hi = ecdf_band(len(self.truth))
        frac = (self.ranks + 0.5) / (self.n_draws + 1)
        grid = np.asarray(self.levels)
        for j, name in enumerate(self.names):
            ax = axes[0, j]
            ecdf = (frac[:, j][:, None] <= z[None, :]).mean(axis=0)
            ax.fill_between(z, lo, hi, color="0.85", label="95 % band")
            ax.plot(z, ecdf - z, color="C0" if self.in_band[j] else "C3")
            ax.axhline(0, color="0.5", lw=0.5)
            ax.set_title(f"{name}\np = {self.sbc_pvalue[j]:.2g}", fontsize=8)
            ax.set_xlabel("fractional rank", fontsize=7)
            ax = axes[1, j]
            ax.plot([0, 1], [0, 1], color="0.5", lw=0.5)
            ax.plot(grid, self.coverage[:, j], "o-", ms=2)
            ax.set_title(f"cal. error {self.calibration_error[j]:.3f}", fontsize=8)
            ax.set_xlabel("central interval level", fontsize=7)
            ax = axes[2, j]
            ax.scatter(self.contraction[:, j], self.z_score[:, j], s=2, alpha=0.3)
            ax.set_xlim(-0.05, 1.05)
            ax.axhline(0, color="0.5", lw=0.5)
            ax.set_xlabel("contraction", fontsize=7)
            for a in axes[:, j]:
                a.tick_params(labelsize=6)
        axes[0, 0].set_ylabel("ECDF - uniform", fontsize=8)
        axes[1, 0].set_ylabel("coverage", fontsize=8)
        axes[2, 0].set_ylabel("z-score", fontsize=8)
        snr = "clean" if self.snr_db is None else f"{self.snr_db:g} dB"
        fig.suptitle(title or f"posterior calibration, {snr}, {len(self.truth)} test ERPs, {self.n_draws} draws",
                     fontsize=9)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def posterior_draws(estimator, erp, n_draws: int, *, key, batch_size: int = 250) -> np.ndarray:
    """``estimator.sample`` over ``erp (N, ...)`` in batches of ``batch_size`` ERPs: ``(N, n_draws, d)``;
    batch b uses ``fold_in(key, b)``."""
    return np.concatenate([estimator.sample(erp[b:b + batch_size], n_draws, key=jax.random.fold_in(key, b))
                           for b in range(0, len(erp), batch_size)])


def calibrate(estimator, theta, erp, *, key, snr_db: float | None = None, n_draws: int = 199,
              batch_size: int = 250, noise_color: str | None = None) -> Calibration:
    """Calibration of a posterior ``estimator`` on held-out simulations ``theta (N, n_params)`` and
    their clean ERPs ``erp (N, n_times[, n_channels])`` (mV), with measurement noise at ``snr_db``
    drawn from ``key`` (``None``: the ERPs are used as given).

    ``n_draws`` posterior draws per ERP (SBC ranks take n_draws + 1 values; the default 199 gives 200,
    binned in 20 equal groups). The issue's protocol uses N >= 1000.
    """
    from ._train import add_noise_batch

    if estimator.kind != "posterior":
        raise TypeError("calibrate needs a posterior estimator (jr_jax.train(..., kind='posterior'))")
    theta = np.asarray(theta, np.float64)
    erp = np.asarray(erp, np.float32)
    if theta.ndim != 2 or theta.shape[1] != len(estimator.names) or len(theta) != len(erp):
        raise ValueError(f"theta must be (N, {len(estimator.names)}) matching erp's N; got {theta.shape}, {erp.shape}")
    if len(theta) < 20:
        raise ValueError(f"calibration needs at least 20 test simulations (1000 for the stated targets), got {len(theta)}")
    if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 9:
        raise ValueError(f"n_draws must be an integer >= 9, got {n_draws!r}")
    color = noise_color or estimator.manifest.get("noise_color", "white")
    k_noise, k_draw = jax.random.split(key)
    x = erp if erp.ndim == 3 else erp[..., None]
    if snr_db is not None:
        x = np.asarray(add_noise_batch(jax.numpy.asarray(x), k_noise, (float(snr_db), float(snr_db)), color))
    x = x[..., 0] if estimator.n_channels == 1 else x
    draws = posterior_draws(estimator, x, n_draws, key=k_draw, batch_size=batch_size)
    return calibration_from_draws(draws, theta, estimator.names, prior_sd=estimator.prior_sd(), lows=estimator.lows,
                                  highs=estimator.highs, snr_db=snr_db)


def calibration_from_draws(draws, theta, names, *, prior_sd, lows, highs, snr_db=None) -> Calibration:
    """:class:`Calibration` from posterior draws ``(N, n_draws, n_params)`` of N test cases with
    true values ``theta (N, n_params)``; ``prior_sd``: the prior SD of each quantity (parameters,
    then log(C*a_k)); ``lows``/``highs``: the ranges that scale NRMSE."""
    draws, theta = np.asarray(draws, np.float64), np.asarray(theta, np.float64)
    if draws.ndim != 3 or draws.shape[0] != len(theta) or draws.shape[2] != theta.shape[1]:
        raise ValueError(f"draws must be (N, n_draws, n_params) matching theta {theta.shape}; got {draws.shape}")
    n_draws = draws.shape[1]
    t_extra, labels = derived_quantities(theta, names)
    d_extra, _ = derived_quantities(draws, names)
    truth = np.concatenate([theta, t_extra], axis=-1)
    alld = np.concatenate([draws, d_extra], axis=-1)
    ranks = (alld < truth[:, None, :]).sum(axis=1)  # (N, q) in 0..n_draws
    pvals = np.array([rank_uniformity_pvalue(ranks[:, j], n_draws) for j in range(truth.shape[1])])
    z, lo, hi = ecdf_band(len(truth))
    frac = (ranks + 0.5) / (n_draws + 1)
    ecdf_diff = (frac[:, :, None] <= z[None, None, :]).mean(axis=0) - z[None, :]  # (q, grid)
    in_band = np.all((ecdf_diff >= lo - 1e-12) & (ecdf_diff <= hi + 1e-12), axis=1)
    grid = np.asarray(LEVEL_GRID)
    q_lo = np.quantile(alld, (1 - grid) / 2, axis=1)  # (levels, N, q)
    q_hi = np.quantile(alld, (1 + grid) / 2, axis=1)
    coverage = ((q_lo <= truth[None]) & (truth[None] <= q_hi)).mean(axis=1)  # (levels, q)
    # rounded: coverages are multiples of 1/N, and an error of exactly 0.03 must not read as 0.030000000000000027
    cal_error = np.round(np.median(np.abs(coverage - grid[:, None]), axis=0), 12)
    mean, sd = alld.mean(axis=1), alld.std(axis=1, ddof=1)
    contraction = 1.0 - sd**2 / np.asarray(prior_sd, np.float64) ** 2
    z_score = (mean - truth) / sd
    pm = parameter_metrics(theta, mean[:, :len(names)], np.asarray(lows), np.asarray(highs))
    metrics = {n: {m: float(pm[m][j]) for m in pm} for j, n in enumerate(names)}
    return Calibration(tuple(names) + tuple(labels), None if snr_db is None else float(snr_db), int(n_draws), ranks,
                       pvals, in_band, tuple(float(v) for v in grid), coverage, cal_error, contraction, z_score,
                       mean, truth, metrics)


def calibration_table(calibrations: list[Calibration]) -> str:
    """A plain-text table: per SNR and quantity, calibration error, SBC p, coverage at 90 %,
    median contraction and the posterior mean's R²."""
    head = f"{'SNR':>6} {'quantity':<12} {'cal.err':>7} {'SBC p':>7} {'band':>5} {'cov90':>6} {'contr.':>6} {'R2':>6}"
    lines = [head, "-" * len(head)]
    for cal in calibrations:
        for r in cal.rows():
            snr = "clean" if r["snr_db"] is None else f"{r['snr_db']:g}"
            r2 = f"{r['r2']:6.3f}" if "r2" in r else f"{'':>6}"
            lines.append(f"{snr:>6} {r['parameter']:<12} {r['calibration_error']:7.3f} {r['sbc_pvalue']:7.3f} "
                         f"{'yes' if r['sbc_in_band'] else 'NO':>5} {r['coverage_90']:6.3f} {r['contraction']:6.2f} {r2}")
    return "\n".join(lines)



def c2st(samples_p, samples_q, *, key, folds: int = 5, hidden: int | None = None, steps: int = 1000,
         learning_rate: float = 3e-3) -> float:
    """Classifier two-sample test: how well a classifier tells draws of p from draws of q.

    ``samples_p``, ``samples_q``: ``(n_p, d)`` and ``(n_q, d)`` draws (any units). Returns the mean
    held-out accuracy over ``folds`` stratified folds: 0.5 when the two are indistinguishable, 1.0
    when they are disjoint. The protocol of sbibm's C2ST: both sets standardised by the mean and SD
    of ``samples_p``, a ReLU MLP with two hidden layers of ``hidden`` units (default ``10 d``),
    trained by Adam on the cross-entropy (here full batch, ``steps`` steps), accuracy on the held-out
    fold. The folds are trained together (``jax.vmap``).
    """
    import equinox as eqx
    import optax

    p, q = np.asarray(samples_p, np.float64), np.asarray(samples_q, np.float64)
    for name, x in (("samples_p", p), ("samples_q", q)):
        if x.ndim != 2 or x.shape[0] < 2 * folds or not np.isfinite(x).all():
            raise ValueError(f"{name} must be a finite (n, d) array with n >= {2 * folds} (2 per fold), "
                             f"got shape {x.shape}")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"samples_p and samples_q must have the same dimension, got {p.shape[1]} and {q.shape[1]}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    d = p.shape[1]
    hidden = 10 * d if hidden is None else hidden
    mean, sd = p.mean(axis=0), p.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    x = np.concatenate([(p - mean) / sd, (q - mean) / sd]).astype(np.float32)
    y = np.concatenate([np.zeros(len(p)), np.ones(len(q))]).astype(np.float32)
    k_perm, k_init = jax.random.split(key)
    # stratified folds: each class split into `folds` near-equal parts after a shuffle
    fold = np.empty(len(x), np.int64)
    for cls, idx in ((0, np.arange(len(p))), (1, len(p) + np.arange(len(q)))):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_perm, cls), idx))
        fold[perm] = np.arange(len(perm)) % folds
    train_mask = np.stack([fold != f for f in range(folds)]).astype(np.float32)  # (folds, n)

    def make(k):
        return eqx.nn.MLP(d, "scalar", hidden, 2, activation=jax.nn.relu, key=k)

    models = eqx.filter_vmap(make)(jax.random.split(k_init, folds))
    opt = optax.adam(learning_rate)
    xs, ys = jax.numpy.asarray(x), jax.numpy.asarray(y)

    def loss(model, mask):
        logits = jax.vmap(model)(xs)
        ce = optax.sigmoid_binary_cross_entropy(logits, ys)
        # each class weighted equally, whatever the sizes
        w = mask * jax.numpy.where(ys > 0, 0.5 / jax.numpy.sum(mask * ys), 0.5 / jax.numpy.sum(mask * (1 - ys)))
        return jax.numpy.sum(w * ce)

    @eqx.filter_jit
    def train(models, masks):
        def one(model, mask):
            params, static = eqx.partition(model, eqx.is_array)
            state = opt.init(params)

            def step(carry, _):
                params, state = carry
                g = jax.grad(lambda pr: loss(eqx.combine(pr, static), mask))(params)
                updates, state = opt.update(g, state, params)
                return (optax.apply_updates(params, updates), state), None

            (params, _), _ = jax.lax.scan(step, (params, state), None, length=steps)
            model = eqx.combine(params, static)
            hit = (jax.vmap(model)(xs) > 0) == (ys > 0)
            test = 1.0 - mask
            # balanced accuracy on the held-out fold (the plain accuracy when the classes are equal in size)
            acc1 = jax.numpy.sum(test * ys * hit) / jax.numpy.sum(test * ys)
            acc0 = jax.numpy.sum(test * (1 - ys) * hit) / jax.numpy.sum(test * (1 - ys))
            return 0.5 * (acc0 + acc1)

        return eqx.filter_vmap(one)(models, masks)

    return float(np.mean(np.asarray(train(models, jax.numpy.asarray(train_mask)))))
