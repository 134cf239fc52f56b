"""The Jansen-Rit vector field: sigmoid, stimulus and drift, as pure functions of (t, y, params).

State ``y`` has shape ``(6, *batch)``: y0..y2 are the PSPs (mV) of pyramidal cells, excitatory and
inhibitory interneurons, y3..y5 their time derivatives (mV/s). Parameter fields of shape ``batch``
broadcast against ``y[k]``, so one call evaluates a whole batch.
"""

from __future__ import annotations

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._params import JRParams


def sigmoid(v, params: JRParams):
    """Population firing rate S(v) = 2 e0 / (1 + exp(r (v0 - v))) in s^-1; ``v`` in mV.

    Evaluated as 2 e0 * logistic(r (v - v0)), which neither overflows nor gives NaN gradients.
    """
    return 2.0 * params.e0 * jax.nn.sigmoid(params.r * (v - params.v0))


class Stimulus(eqx.Module):
    """A transient input (s^-1) added at the stimulus onset, t = 0 of the epoch.

    The stimulus s(t) is a rate: it is added, times ``gains``, to the firing rate that drives each
    population, i.e. inside the brackets of dy3, dy4 and dy5 next to S(.) (so it is multiplied by
    A_e b_e, A_e b_e and A_i b_i). The default gains ``(0, 1, 0)`` add it to the input p(t) of the
    excitatory interneurons only; :meth:`study` gives the reference study's pattern.

    ``shape="rect"``: amplitude for ``0 <= t < duration``; ``shape="gaussian"``: a Gaussian bump of
    the same area centred at ``duration/2`` with SD ``duration/4``. ``amplitude`` in s^-1,
    ``duration`` in s.
    """

    amplitude: float = eqx.field(static=True, default=60.0)
    duration: float = eqx.field(static=True, default=0.05)
    gains: tuple[float, float, float] = eqx.field(static=True, default=(0.0, 1.0, 0.0))
    shape: Literal["rect", "gaussian"] = eqx.field(static=True, default="rect")

    def __check_init__(self):
        if not (isinstance(self.amplitude, (int, float)) and math.isfinite(self.amplitude)):
            raise ValueError(f"Stimulus amplitude must be a finite number (1/s), got {self.amplitude!r}")
        if not (isinstance(self.duration, (int, float)) and self.duration > 0):
            raise ValueError(f"Stimulus duration must be a number > 0 (s), got {self.duration!r}")
        self_gains = tuple(self.gains)
        if len(self_gains) != 3:
            raise ValueError(f"Stimulus gains must be 3 numbers (pyramidal, excitatory, inhibitory), got {self.gains!r}")
        if self.shape not in ("rect", "gaussian"):
            raise ValueError(f"Stimulus shape must be 'rect' or 'gaussian', got {self.shape!r}")

    @classmethod
    def study(cls) -> "Stimulus":
        """The reference study's injection: 60 s^-1 for 50 ms into both interneuron equations and
        0.56 x 60 into the pyramidal equation."""
        return cls(amplitude=60.0, duration=0.05, gains=(0.56, 1.0, 1.0), shape="rect")

    def __call__(self, t):
        """s(t) in s^-1 at time ``t`` (s) relative to the onset."""
        if self.shape == "rect":
            on = (t >= 0.0) & (t < self.duration)
            return jnp.where(on, self.amplitude, 0.0)
        centre, sd = self.duration / 2, self.duration / 4
        return self.amplitude * self.duration / (sd * jnp.sqrt(2 * jnp.pi)) * jnp.exp(-0.5 * ((t - centre) / sd) ** 2)


    def integral(self, t) -> np.ndarray:
        """The integral of s from -inf to ``t`` (s), in NumPy float64: a count, dimensionless."""
        t = np.asarray(t, dtype=float)
        if self.shape == "rect":
            return self.amplitude * np.clip(t, 0.0, self.duration)
        centre, sd = self.duration / 2, self.duration / 4
        erf = np.vectorize(math.erf, otypes=[float])
        return self.amplitude * self.duration * 0.5 * (1.0 + erf((t - centre) / (sd * math.sqrt(2.0))))

    def gains_per_state(self, params: JRParams):
        """Coefficients (mV s^-1 per unit of s dt) with which s enters dy3, dy4, dy5."""
        g3, g4, g5 = self.gains
        ae_be = params.A_e * params.b_e
        return ae_be * g3, ae_be * g4, params.A_i * params.b_i * g5


NO_STIMULUS = Stimulus(amplitude=0.0)


def drift(
    t, y: Float[Array, "6 *batch"], params: JRParams, stimulus: Stimulus | None = None
) -> Float[Array, "6 *batch"]:
    """dy/dt of the JR model (DESIGN §2) at time ``t`` (s, relative to the stimulus onset).

    The reference formula: the solvers evaluate the same drift from per-step coefficients
    (``jr_jax._solve.StepCoefficients``, checked against this function in tests/test_solve.py) and
    integrate the stimulus separately, exactly over each step (it enters linearly).
    """
    y0, y1, y2, y3, y4, y5 = y
    p = params
    ae_be = p.A_e * p.b_e
    dy3 = ae_be * sigmoid(y1 - y2, p) - 2.0 * p.b_e * y3 - p.b_e**2 * y0
    dy4 = ae_be * (p.mu + p.a_2 * p.C * sigmoid(p.a_1 * p.C * y0, p)) - 2.0 * p.b_e * y4 - p.b_e**2 * y1
    dy5 = p.A_i * p.b_i * p.a_4 * p.C * sigmoid(p.a_3 * p.C * y0, p) - 2.0 * p.b_i * y5 - p.b_i**2 * y2
    if stimulus is not None and stimulus.amplitude != 0:
        s = stimulus(t)
        g3, g4, g5 = stimulus.gains_per_state(p)
        dy3, dy4, dy5 = dy3 + g3 * s, dy4 + g4 * s, dy5 + g5 * s
    return jnp.stack([y3, y4, y5, dy3, dy4, dy5])


def noise_scale(params: JRParams) -> Float[Array, "*batch"]:
    """Diffusion coefficient of y4 (mV s^-3/2): A_e b_e sigma."""
    return params.A_e * params.b_e * params.sigma


def source(y: Float[Array, "... 6"]) -> Float[Array, "..."]:
    """EEG source y1 - y2 (mV) from states with the state axis last."""
    return y[..., 1] - y[..., 2]
