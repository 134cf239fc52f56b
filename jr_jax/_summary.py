"""Posterior summaries: per parameter and per identifiable combination log(C a_k)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def derived_quantities(draws: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """The combinations the ERP can identify: ``log(C*a_k)`` for each a_k varied with C.

    Only the products C a_k enter the equations ((C, a_k) -> (lambda C, a_k / lambda) leaves every
    ERP unchanged), so these are determined where C and a_k separately are not.
    ``draws (..., n_params)`` -> ``(..., n_derived)`` and their names.
    """
    names = tuple(names)
    if "C" not in names:
        return draws[..., :0], []
    c = draws[..., names.index("C")]
    cols, labels = [], []
    for k in range(1, 5):
        a = f"a_{k}"
        if a in names:
            cols.append(np.log(c * draws[..., names.index(a)]))
            labels.append(f"log(C*a_{k})")
    if not cols:
        return draws[..., :0], []
    return np.stack(cols, axis=-1), labels


@dataclass(frozen=True)
class PosteriorSummary:
    """Summary of posterior draws of one ERP (arrays ``(q,)``) or of N ERPs (``(N, q)``).

    ``names``: the parameters, then ``log(C*a_k)``; ``units`` likewise ("1" for the logs).
    ``lower``/``upper``: the central ``level`` credible interval (quantiles (1 -+ level) / 2).
    ``contraction``: 1 - posterior variance / prior variance (0: the data taught nothing, 1: fully
    determined), where the prior's SD is known (else NaN). ``draws``: the parameter draws
    ``([N,] n, n_params)`` behind the summary.
    """

    names: tuple[str, ...]
    units: tuple[str, ...]
    level: float
    mean: np.ndarray
    median: np.ndarray
    sd: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    contraction: np.ndarray
    draws: np.ndarray

    @classmethod
    def from_draws(cls, draws, names, units, *, level: float = 0.9, prior_sd=None) -> "PosteriorSummary":
        """From draws ``([N,] n, n_params)``; ``prior_sd``: the prior SD of each parameter and
        combination (length q), or ``None``."""
        if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
            raise ValueError(f"level must be a number in (0, 1), got {level!r}")
        draws = np.asarray(draws, np.float64)
        extra, labels = derived_quantities(draws, tuple(names))
        allq = np.concatenate([draws, extra], axis=-1)
        lo, hi = np.quantile(allq, [(1 - level) / 2, (1 + level) / 2], axis=-2)
        sd = allq.std(axis=-2, ddof=1)
        if prior_sd is None:
            contraction = np.full_like(sd, np.nan)
        else:
            contraction = 1.0 - sd**2 / np.asarray(prior_sd, np.float64) ** 2
        return cls(tuple(names) + tuple(labels), tuple(units) + ("1",) * len(labels), float(level),
                   allq.mean(axis=-2), np.median(allq, axis=-2), sd, lo, hi, contraction, draws)

    def rows(self) -> list[dict]:
        """A tidy table: one dict per (ERP, quantity) with name, unit, mean, median, sd, lower, upper,
        contraction (and ``erp`` index for a batch)."""
        batch = self.mean.ndim == 2
        out = []
        for i in range(self.mean.shape[0] if batch else 1):
            for j, (name, unit) in enumerate(zip(self.names, self.units)):
                get = (lambda a: float(a[i, j])) if batch else (lambda a: float(a[j]))
                row = dict(erp=i) if batch else {}
                row.update(name=name, unit=unit, mean=get(self.mean), median=get(self.median), sd=get(self.sd),
                           lower=get(self.lower), upper=get(self.upper), contraction=get(self.contraction))
                out.append(row)
        return out

    def table(self, erp: int = 0) -> str:
        """A plain-text table of one ERP's summary."""
        pick = (lambda a: a[erp]) if self.mean.ndim == 2 else (lambda a: a)
        pct = f"{100 * self.level:g}%"
        lines = [f"{'parameter':<12} {'unit':<10} {'mean':>10} {'median':>10} {'sd':>10} "
                 f"{pct + ' interval':>24} {'contraction':>11}"]
        for j, (name, unit) in enumerate(zip(self.names, self.units)):
            lo, hi = pick(self.lower)[j], pick(self.upper)[j]
            lines.append(f"{name:<12} {unit:<10} {pick(self.mean)[j]:>10.4g} {pick(self.median)[j]:>10.4g} "
                         f"{pick(self.sd)[j]:>10.3g} {f'[{lo:.4g}, {hi:.4g}]':>24} {pick(self.contraction)[j]:>11.2f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
