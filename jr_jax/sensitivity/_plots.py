"""Figures for sensitivity results (matplotlib, saved as PNG)."""

from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_indices(rows: list[dict], path, *, title: str = "") -> None:
    """Bars per parameter for Sobol' (S1, ST), Morris (mu*, sigma) or DGSM (bound on ST) rows."""
    plt = _plt()
    rows = [r for r in rows if "other" not in r and r.get("time", None) is None]
    names = [r["parameter"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    if "ST" in rows[0]:
        ax.bar(x - 0.2, [r["S1"] for r in rows], 0.4, yerr=[r.get("S1_conf", 0) for r in rows], label="S1")
        ax.bar(x + 0.2, [r["ST"] for r in rows], 0.4, yerr=[r.get("ST_conf", 0) for r in rows], label="ST")
        ax.set_ylabel("Sobol' index")
    elif "mu_star" in rows[0]:
        ax.bar(x - 0.2, [r["mu_star"] for r in rows], 0.4, yerr=[r["mu_star_conf"] for r in rows], label="μ*")
        ax.bar(x + 0.2, [r["sigma"] for r in rows], 0.4, label="σ")
        ax.set_ylabel("elementary effects")
    else:
        dg = np.array([r["dgsm"] for r in rows])
        err = np.array([[r["dgsm"] - r["dgsm_low"] for r in rows], [r["dgsm_high"] - r["dgsm"] for r in rows]])
        ax.bar(x, dg, 0.6, yerr=err, label="DGSM bound on ST")
        ax.set_yscale("log")
        ax.set_ylabel("(b-a)² ν / (π² V)")
    ax.set_xticks(x, names)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_fisher(result: dict, path, *, title: str = "") -> None:
    """Eigen-spectrum of the Fisher information and the R² ceiling per parameter."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    a.semilogy(np.arange(1, len(result["eigenvalues"]) + 1), np.clip(result["eigenvalues"], 1e-300, None), "o-")
    a.set_xlabel("eigenvalue index")
    a.set_ylabel("Fisher eigenvalue")
    a.grid(alpha=0.3)
    names = result["names"]
    if "r2_ceiling" in result:
        b.bar(np.arange(len(names)), result["r2_ceiling"])
        b.set_ylabel("R² ceiling (Laplace)")
        b.set_ylim(0, 1)
    else:
        b.bar(np.arange(len(names)), result["crlb_sd"])
        b.set_ylabel("Cramér-Rao SD")
    b.set_xticks(np.arange(len(names)), names)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_oat(erps, times, factors, name: str, path) -> None:
    """The study's one-at-a-time figure: the ERP as a heat map over time and the factor, and the
    log relative squared deviation from the sweep's mean."""
    plt = _plt()
    erps = np.asarray(erps)
    dev = np.log10((erps - erps.mean(axis=0)) ** 2 / (erps.mean(axis=0) ** 2 + 1e-12) + 1e-12)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for ax, data, label in ((axes[0], erps, "ERP (mV)"), (axes[1], dev, "log10 relative squared deviation")):
        im = ax.imshow(data, aspect="auto", origin="lower", extent=[times[0] * 1e3, times[-1] * 1e3, factors[0],
                                                                      factors[-1]], cmap="RdBu_r" if data is erps else "viridis")
        fig.colorbar(im, ax=ax, label=label)
        ax.set_xlabel("time (ms)")
        ax.set_ylabel(f"{name} / default")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
