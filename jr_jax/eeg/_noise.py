"""Sensor noise with a channel covariance at an SNR (DESIGN §3), average reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._simulate import measurement_noise
from .._solve import as_typed_key


def noise_factor(n_channels: int, cov=None, *, ch_names=None, reference: str | None = "average") -> np.ndarray:
    """A matrix ``L`` ``(n_channels, n_channels)`` with ``L @ L.T`` the channel covariance normalised to
    a mean variance of 1 per channel (after the average reference, if any).

    ``cov``: ``None`` (independent channels of equal variance), a vector of per-channel SDs
    ``(n_channels,)``, a covariance matrix ``(n_channels, n_channels)``, or an ``mne.Covariance``
    (then ``ch_names`` gives the ERP's channel order). Only the covariance's shape matters: the
    scale is set by the SNR.
    """
    c = int(n_channels)
    if cov is None:
        sigma = np.eye(c)
    elif type(cov).__name__ == "Covariance" and hasattr(cov, "ch_names"):
        if ch_names is None:
            raise ValueError("cov is an mne.Covariance: pass ch_names (the ERP's channels, in order)")
        names = list(ch_names)
        missing = [n for n in names if n not in cov.ch_names]
        if missing or len(names) != c:
            raise ValueError(f"ch_names must name the ERP's {c} channels, all in the covariance; "
                             f"got {len(names)} names, missing from cov: {missing[:10]}")
        idx = [cov.ch_names.index(n) for n in names]
        data = np.asarray(cov.data, float)
        if data.ndim == 1:  # a diagonal Covariance (mne.make_ad_hoc_cov, diag=True) stores variances
            data = np.diag(data)
        sigma = data[np.ix_(idx, idx)]
    else:
        a = np.asarray(cov, dtype=float)
        if a.shape == (c,):
            if not np.all(np.isfinite(a)) or np.any(a < 0) or not np.any(a > 0):
                raise ValueError("cov as a vector holds per-channel SDs: finite, >= 0, not all zero")
            sigma = np.diag(a**2)
        elif a.shape == (c, c):
            sigma = a
        else:
            raise ValueError(f"cov must be None, SDs ({c},), a covariance ({c}, {c}) or an mne.Covariance; "
                             f"got shape {a.shape}")
    if not np.all(np.isfinite(sigma)) or not np.allclose(sigma, sigma.T, rtol=1e-6, atol=0):
        raise ValueError("cov must be a finite symmetric matrix")
    if reference == "average":
        h = np.eye(c) - 1.0 / c
        sigma = h @ sigma @ h
    elif reference is not None:
        raise ValueError(f"reference must be 'average' or None, got {reference!r}")
    w, v = np.linalg.eigh(sigma)
    if w.min() < -1e-8 * max(w.max(), 0.0) or w.max() <= 0:
        raise ValueError("cov must be positive semi-definite and not zero (after the reference)")
    sigma_trace = np.sum(np.clip(w, 0, None))
    return v * np.sqrt(np.clip(w, 0, None) / (sigma_trace / c))


def add_sensor_noise(
    erp: Float[Array, "*batch n_times n_channels"],
    snr_db: float,
    *,
    key: PRNGKeyArray,
    cov=None,
    ch_names=None,
    color: str = "white",
    reference: str | None = "average",
) -> Float[Array, "*batch n_times n_channels"]:
    """Sensor ERPs (mV) plus Gaussian noise with a channel covariance at ``snr_db``, average-referenced.

    ``erp``: one ERP ``(n_times, n_channels)`` with one ``key``, or a batch ``(N, n_times, n_channels)``
    with keys ``(N,)``. With ``reference="average"`` the ERP and the noise are re-referenced to the
    channel mean. SNR (dB, DESIGN §3): mean square of the (re-referenced) clean ERP over the noise
    variance averaged over channels, stated on the averaged ERP; it equals per-trial noise of
    ``sqrt(n_trials)`` times that SD averaged over the trials. ``cov``: see :func:`noise_factor`;
    ``color``: ``"white"`` or ``"pink"`` along time.
    """
    if not (isinstance(snr_db, (int, float)) and math.isfinite(snr_db)):
        raise ValueError(f"snr_db must be a finite number (dB), got {snr_db!r}")
    if color not in ("white", "pink"):
        raise ValueError(f"color must be 'white' or 'pink', got {color!r}")
    erp = jnp.asarray(erp)
    key = as_typed_key(key)
    if erp.ndim != 2 + (key.shape != ()):
        raise ValueError(f"erp must be (n_times, n_channels) with one key or (N, n_times, n_channels) with keys "
                         f"(N,); got erp {erp.shape} and keys {key.shape}")
    if key.shape != () and key.shape != erp.shape[:1]:
        raise ValueError(f"keys must have shape ({erp.shape[0]},) for a batch of {erp.shape[0]}, got {key.shape}")
    factor = jnp.asarray(noise_factor(erp.shape[-1], cov, ch_names=ch_names, reference=reference), erp.dtype)
    if reference == "average":
        erp = erp - jnp.mean(erp, axis=-1, keepdims=True)

    def one(e, k):
        std = jnp.sqrt(jnp.mean(e**2) / 10.0 ** (snr_db / 10.0))
        return e + std * (measurement_noise(k, e.shape, color, e.dtype) @ factor.T)

    return one(erp, key) if key.shape == () else jax.vmap(one)(erp, key)
