"""Evaluation of an estimator on a dataset's test split at several SNRs, beside two baselines."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ._data import Dataset
from ._estimator import Estimator, prior_differences, protocol_differences
from ._metrics import Ridge, metrics_rows
from ._train import add_noise_batch


def _load_rows(ds: Dataset, rows: np.ndarray):
    rows = np.sort(rows)
    theta = np.asarray(ds.theta.get_orthogonal_selection((rows, slice(None))))
    erp = np.asarray(ds.erp.get_orthogonal_selection((rows,) + (slice(None),) * (ds.erp.ndim - 1)))
    return theta, erp[..., None] if erp.ndim == 2 else erp


#: below this many test ERPs, :func:`evaluate` warns: R² and Pearson r are too noisy to read
#: (their sampling SD is about (1 - r²)/sqrt(n); with 2 ERPs Pearson r is ±1 by construction)
MIN_TEST_ERPS = 100


def _noisy(erp, snr, key, color):
    if snr is None or math.isinf(snr):
        return erp
    return np.asarray(add_noise_batch(jnp.asarray(erp), key, (snr, snr), color))


def evaluate(
    estimator: Estimator,
    dataset: Dataset,
    snrs=(None, 30.0, 20.0, 10.0, 0.0),
    *,
    seed: int = 0,
    baselines: bool = True,
    n_ridge: int = 4000,
    calibration: bool = True,
    n_draws: int = 199,
) -> list[dict]:
    """Per parameter and per test SNR: R², Pearson r, Spearman ρ, NRMSE and bias on the test split.

    ``snrs``: test SNRs in dB (``None`` or ``inf``: clean); noise is drawn per sample with fixed
    seeds. With ``baselines``, the same rows for the prior mean (the middle of the prior range, as
    targets are scaled) and for ridge regression on the ERP downsampled to 100 Hz (fitted on up to
    ``n_ridge`` training samples with noise at the same SNR, penalty chosen on the validation set).
    Rows: ``{method, snr_db, parameter, r2, pearson, spearman, nrmse, bias, n_test}``.

    A posterior estimator is scored by its posterior mean (method ``"jr_jax NPE (posterior mean)"``)
    and, with ``calibration``, its rows also carry the calibration of :func:`jr_jax.calibrate` on
    the same noisy test ERPs (``n_draws`` draws each): ``calibration_error``, ``sbc_pvalue``,
    ``sbc_in_band``, ``coverage_50/80/90/95``, ``contraction`` (median), ``z_mean``, ``z_sd``; the
    rows for log(C*a_k) have method ``"jr_jax NPE (combination)"`` and no point metrics.

    Refused (``ValueError``): a dataset whose ERPs mean something else than the training ERPs. When
    the manifest records them, the training prior (kind, names, bounds, the dynamics' noise
    ``sigma``) and protocol (stimulus amplitude, duration, gains and shape, ``n_trials``, ``fs``,
    ``tmin``, ``tmax``, ``baseline``, lead field) are compared with the dataset's, and every
    difference is listed as ``field: estimator value vs dataset value``. Not compared: the solver,
    ``dt``, ``burn_in``, and the dataset's ``snr_db`` (test noise is added here).

    At least ``MIN_TEST_ERPS`` = 100 test ERPs are needed for the metrics to be read: below that a
    ``UserWarning`` says how many there are (R² and Pearson r from a few ERPs are mostly noise; with
    2, Pearson r is ±1 by construction).
    """
    if tuple(estimator.names) != tuple(dataset.names):
        raise ValueError(f"estimator parameters {estimator.names} differ from the dataset's {dataset.names}")
    m, p = estimator.manifest, dataset.protocol
    trained = (float(m["fs"]), float(m["tmin"]), estimator.n_times, estimator.baseline)
    given = (float(p.fs), float(p.tmin), int(p.n_times), bool(p.baseline))
    if not (np.allclose(trained[:2], given[:2]) and trained[2:] == given[2:]):
        raise ValueError(f"the dataset's ERPs (fs, tmin, n_times, baseline) = {given} differ from the estimator's "
                         f"{trained}")
    diff = []
    if m.get("prior"):
        diff += [f"prior.{d}" for d in prior_differences(m["prior"], dataset.prior.to_dict())]
    if m.get("protocol"):
        diff += [f"protocol.{d}" for d in protocol_differences(m["protocol"], p.to_dict())]
    if diff:
        raise ValueError("the dataset was made differently from the estimator's training data (estimator vs "
                         "dataset): " + "; ".join(diff) + ". Its metrics would not measure this estimator: evaluate "
                         "on a dataset simulated with the training prior and protocol")
    split = dataset.split()
    if len(split.test) < MIN_TEST_ERPS:
        warnings.warn(f"the test split has only {len(split.test)} ERPs (fewer than {MIN_TEST_ERPS}): R² and Pearson r "
                      "from so few are too noisy to read (with 2, Pearson r is ±1 by construction); evaluate on a "
                      "larger dataset", UserWarning, stacklevel=2)
    theta_test, erp_test = _load_rows(dataset, split.test)
    if baselines:
        rng = np.random.default_rng(seed)
        ridge_rows = rng.permutation(split.train)[:n_ridge]
        theta_tr, erp_tr = _load_rows(dataset, ridge_rows)
        theta_val, erp_val = _load_rows(dataset, split.val)
    lows, highs, names = estimator.lows, estimator.highs, estimator.names
    color = estimator.manifest.get("noise_color", "white")
    downsample = max(1, int(round(dataset.protocol.fs / 100.0)))
    rows = []
    key = jax.random.key(seed)
    for i, snr in enumerate(snrs):
        label = dict(snr_db=None if snr is None or math.isinf(snr) else float(snr), n_test=len(theta_test))
        k = jax.random.fold_in(key, i)
        x = _noisy(erp_test, snr, jax.random.fold_in(k, 0), color)
        if estimator.kind == "posterior":
            rows += _posterior_rows(estimator, theta_test, x, label, calibration, n_draws, jax.random.fold_in(k, 3))
        else:
            pred = estimator.predict_array(x)
            rows += metrics_rows(theta_test, pred, names, lows, highs, method="jr_jax Bi-LSTM", **label)
        if baselines:
            mid = np.broadcast_to((lows + highs) / 2, theta_test.shape)
            rows += metrics_rows(theta_test, mid, names, lows, highs, method="prior mean", **label)
            ridge = Ridge(downsample=downsample).fit(
                np.arcsinh(_noisy(erp_tr, snr, jax.random.fold_in(k, 1), color)), theta_tr,
                np.arcsinh(_noisy(erp_val, snr, jax.random.fold_in(k, 2), color)), theta_val)
            rows += metrics_rows(theta_test, ridge.predict(np.arcsinh(x)), names, lows, highs, method="ridge", **label)
    return rows


def _posterior_rows(estimator, theta, x, label, calibration, n_draws, key) -> list[dict]:
    from ._calibration import calibration_from_draws, posterior_draws

    draws = posterior_draws(estimator, x, n_draws, key=key)
    rows = metrics_rows(theta, draws.mean(axis=1), estimator.names, estimator.lows, estimator.highs,
                        method="jr_jax NPE (posterior mean)", **label)
    if not calibration:
        return rows
    cal = calibration_from_draws(draws, theta, estimator.names, prior_sd=estimator.prior_sd(), lows=estimator.lows,
                                 highs=estimator.highs, snr_db=label["snr_db"])
    extra = {r["parameter"]: r for r in cal.rows()}
    keep = ("calibration_error", "sbc_pvalue", "sbc_in_band", "coverage_50", "coverage_80", "coverage_90",
            "coverage_95", "contraction", "z_mean", "z_sd")
    for row in rows:
        row.update({k: extra[row["parameter"]][k] for k in keep})
    for name in cal.names[len(estimator.names):]:
        rows.append(dict(method="jr_jax NPE (combination)", parameter=name, **label,
                         **{k: extra[name][k] for k in keep}))
    return rows


def format_table(rows: list[dict], metric: str = "r2") -> str:
    """A plain-text table: one line per (method, SNR), one column per parameter; "–" where the metric
    is undefined (Pearson r of a constant estimate such as the prior mean)."""
    rows = [r for r in rows if metric in r]
    names = list(dict.fromkeys(r["parameter"] for r in rows))
    keys = list(dict.fromkeys((r["method"], r["snr_db"]) for r in rows))
    value = {(r["method"], r["snr_db"], r["parameter"]): r[metric] for r in rows}
    width = max([18] + [len(method) for method, _ in keys])
    head = f"{'method':{width}s} {'SNR dB':>7s} " + " ".join(f"{n:>7s}" for n in names)
    lines = [f"{metric} per parameter", head, "-" * len(head)]

    def cell(v):
        return f"{v:7.3f}" if np.isfinite(v) else f"{'–':>7s}"

    for method, snr in keys:
        snr_text = "clean" if snr is None else f"{snr:g}"
        lines.append(f"{method:{width}s} {snr_text:>7s} " + " ".join(cell(value[(method, snr, n)]) for n in names))
    return "\n".join(lines)


def plot_scatter(true, pred, names, units, path, *, title: str = "") -> None:
    """True against predicted values, one panel per parameter, with R² and Pearson r; saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._metrics import parameter_metrics

    true, pred = np.asarray(true), np.asarray(pred)
    m = parameter_metrics(true, pred, true.min(0), true.max(0) + 1e-12)
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), dpi=110, squeeze=False)
    for j, name in enumerate(names):
        ax = axes[j // cols, j % cols]
        ax.scatter(true[:, j], pred[:, j], s=4, alpha=0.5)
        lo, hi = true[:, j].min(), true[:, j].max()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_title(f"{name}: R²={m['r2'][j]:.2f}, r={m['pearson'][j]:.2f}", fontsize=9)
        ax.set_xlabel(f"true [{units[j]}]", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
    for j in range(len(names), rows * cols):
        axes[j // cols, j % cols].axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_metric_vs_snr(rows: list[dict], path, *, metric: str = "pearson", reference: dict | None = None) -> None:
    """``metric`` against test SNR per parameter for each method; ``reference`` values drawn as marks at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["parameter"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)  # skip methods with no finite value
               if any(np.isfinite(r[metric]) for r in rows if r["method"] == m)]
    snrs = sorted({r["snr_db"] for r in rows if r["snr_db"] is not None})
    clean_x = (max(snrs) + 10) if snrs else 0
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.8), dpi=110, squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        for name in names:
            pts = sorted(((clean_x if r["snr_db"] is None else r["snr_db"]), r[metric]) for r in rows
                         if r["method"] == method and r["parameter"] == name)
            line, = ax.plot(*zip(*pts), marker="o", ms=3, label=name)
            if reference and name in reference and method == methods[0]:
                ax.plot([clean_x + 4], [reference[name]], marker="*", ms=8, color=line.get_color())
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("test SNR (dB); rightmost: clean" + (", ★ study" if reference else ""), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(metric)
    axes[0, -1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
