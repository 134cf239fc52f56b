"""Accuracy of parameter estimates, per parameter: R², Pearson r, Spearman ρ, NRMSE, bias."""

from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged, along axis 0."""
    out = np.empty_like(x, dtype=float)
    for j in range(x.shape[1]):
        order = np.argsort(x[:, j], kind="mergesort")
        ranks = np.empty(len(x))
        ranks[order] = np.arange(len(x), dtype=float)
        values = x[order, j]
        start = 0
        for k in range(1, len(x) + 1):  # average the ranks of tied runs
            if k == len(x) or values[k] != values[start]:
                ranks[order[start:k]] = (start + k - 1) / 2
                start = k
        out[:, j] = ranks
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=0) / denom, np.nan)


def parameter_metrics(true, pred, lows, highs) -> dict[str, np.ndarray]:
    """Per-parameter metrics of ``pred`` against ``true`` (both ``(N, n_params)``, same units).

    - ``r2``: 1 - SSE / SST (can be negative: worse than predicting the mean);
    - ``pearson``, ``spearman``: correlation of predicted with true values (NaN if one is constant);
    - ``nrmse``: RMSE divided by the prior range ``highs - lows``;
    - ``bias``: mean of pred - true, in the parameter's unit.
    """
    true = np.asarray(true, dtype=float)
    pred = np.asarray(pred, dtype=float)
    if true.ndim != 2 or true.shape != pred.shape:
        raise ValueError(f"true and pred must both be (N, n_params), got {true.shape} and {pred.shape}")
    if len(true) < 2:
        raise ValueError("need at least 2 samples")
    err = pred - true
    sst = ((true - true.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(sst > 0, 1.0 - (err**2).sum(axis=0) / sst, np.nan)
    return dict(
        r2=r2,
        pearson=_pearson(true, pred),
        spearman=_pearson(_ranks(true), _ranks(pred)),
        nrmse=np.sqrt((err**2).mean(axis=0)) / (np.asarray(highs, float) - np.asarray(lows, float)),
        bias=err.mean(axis=0),
    )


def metrics_rows(true, pred, names, lows, highs, **labels) -> list[dict]:
    """The metrics as tidy rows ``{**labels, parameter, r2, pearson, spearman, nrmse, bias}``."""
    m = parameter_metrics(true, pred, lows, highs)
    return [dict(labels, parameter=name, **{k: float(v[j]) for k, v in m.items()}) for j, name in enumerate(names)]


class Ridge:
    """Ridge regression baseline on a downsampled ERP: closed form, one penalty per target chosen on
    validation data (``alpha``, shape ``(n_targets,)``)."""

    def __init__(self, alphas=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3), downsample: int = 10):
        self.alphas, self.downsample = alphas, downsample

    def _features(self, erp):
        x = np.asarray(erp, dtype=float).reshape(len(erp), erp.shape[1], -1)[:, :: self.downsample]
        return x.reshape(len(x), -1)

    def fit(self, erp_train, y_train, erp_val, y_val) -> "Ridge":
        x = self._features(erp_train)
        self.mean, self.std = x.mean(axis=0), x.std(axis=0) + 1e-12
        y_train, y_val = np.asarray(y_train, float), np.asarray(y_val, float)
        self.y_mean = y_train.mean(axis=0)
        xs = (x - self.mean) / self.std
        xv = (self._features(erp_val) - self.mean) / self.std
        gram, rhs = xs.T @ xs, xs.T @ (y_train - self.y_mean).reshape(len(xs), -1)
        w = np.stack([np.linalg.solve(gram + a * len(xs) * np.eye(len(gram)), rhs) for a in self.alphas])
        val_pred = np.einsum("vf,afk->avk", xv, w) + self.y_mean.reshape(-1)
        losses = ((val_pred - y_val.reshape(len(xv), -1)) ** 2).mean(axis=1)  # (n_alphas, n_targets)
        best = np.argmin(losses, axis=0)  # one penalty per target, whatever its units
        self.alpha = np.asarray(self.alphas, float)[best]
        self.w = w[best, :, np.arange(len(best))].T.reshape((len(gram),) + y_train.shape[1:])
        return self

    def predict(self, erp) -> np.ndarray:
        return ((self._features(erp) - self.mean) / self.std) @ self.w + self.y_mean
