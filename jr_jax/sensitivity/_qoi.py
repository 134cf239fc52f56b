"""Quantities of interest (QoIs): differentiable functions of one ERP ``(n_times,)`` in mV.

Components (latencies after the stimulus onset, for JR ERPs with the study's stimulus):
``N1`` is the most negative deflection in 50-200 ms, ``P2`` the most positive in 100-300 ms.
Peak amplitudes use a smooth maximum (log-sum-exp with a 0.1 mV temperature) and latencies a
softmax-weighted time (2 ms temperature), so that gradients exist; both converge to the hard
max / argmax as the temperature goes to 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class QoI:
    """A named function ``fn(erp (n_times,), times (n_times,)) -> scalar or (k,)`` with a unit."""

    name: str
    fn: Callable
    unit: str = ""

    def __call__(self, erp, times):
        return self.fn(erp, jnp.asarray(times, erp.dtype))

    @property
    def is_vector(self) -> bool:
        return self.name == "waveform"


def _window(times, lo, hi):
    return (times >= lo) & (times <= hi)


def peak_amplitude(lo: float, hi: float, sign: int, name: str, temperature_mv: float = 0.1) -> QoI:
    """Smooth extreme of ``sign * erp`` in ``[lo, hi]`` s, returned with the ERP's sign (mV)."""

    def fn(erp, times):
        x = jnp.where(_window(times, lo, hi), sign * erp, -jnp.inf)
        return sign * temperature_mv * jax.nn.logsumexp(x / temperature_mv)

    return QoI(name, fn, "mV")


def peak_latency(lo: float, hi: float, sign: int, name: str, temperature_mv: float = 0.1) -> QoI:
    """Softmax-weighted time of the extreme of ``sign * erp`` in ``[lo, hi]`` s (s)."""

    def fn(erp, times):
        x = jnp.where(_window(times, lo, hi), sign * erp / temperature_mv, -jnp.inf)
        return jnp.sum(jax.nn.softmax(x) * times)

    return QoI(name, fn, "s")


def rms(lo: float = 0.0, hi: float = np.inf) -> QoI:
    """Root mean square of the ERP over ``[lo, hi]`` s (mV)."""

    def fn(erp, times):
        w = _window(times, lo, hi)
        return jnp.sqrt(jnp.sum(jnp.where(w, erp**2, 0.0)) / jnp.sum(w))

    return QoI("rms", fn, "mV")


def band_power(fmin: float, fmax: float, name: str) -> QoI:
    """Power of the post-stimulus ERP in ``[fmin, fmax)`` Hz (mV², periodogram, Hann window)."""

    def fn(erp, times):
        x = jnp.where(times >= 0, erp, 0.0)
        n = x.shape[0]
        fs = 1.0 / (times[1] - times[0])
        spectrum = jnp.abs(jnp.fft.rfft(x * jnp.hanning(n))) ** 2 / n**2
        f = jnp.fft.rfftfreq(n) * fs
        return jnp.sum(jnp.where((f >= fmin) & (f < fmax), spectrum, 0.0))

    return QoI(name, fn, "mV^2")


def waveform() -> QoI:
    """The whole ERP, one output per time point (mV)."""
    return QoI("waveform", lambda erp, times: erp, "mV")


#: The standard set of scalar QoIs.
STANDARD_QOIS: dict[str, QoI] = {
    "N1_amplitude": peak_amplitude(0.05, 0.2, -1, "N1_amplitude"),
    "N1_latency": peak_latency(0.05, 0.2, -1, "N1_latency"),
    "P2_amplitude": peak_amplitude(0.1, 0.3, +1, "P2_amplitude"),
    "P2_latency": peak_latency(0.1, 0.3, +1, "P2_latency"),
    "rms": rms(0.0),
    "theta_power": band_power(4.0, 8.0, "theta_power"),
    "alpha_power": band_power(8.0, 13.0, "alpha_power"),
    "beta_power": band_power(13.0, 30.0, "beta_power"),
    "waveform": waveform(),
}


def get_qoi(qoi: str | QoI) -> QoI:
    if isinstance(qoi, QoI):
        return qoi
    if qoi not in STANDARD_QOIS:
        raise ValueError(f"unknown QoI {qoi!r}; known: {sorted(STANDARD_QOIS)} (or pass a jr_jax.sensitivity.QoI)")
    return STANDARD_QOIS[qoi]
