"""Fixed-step Diffrax solves of the JR ODE/SDE for one trajectory or a batch (state ``(6, N)``)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._model import NO_STIMULUS, Stimulus, noise_scale
from ._params import JRParams

SolverName = Literal["euler", "heun", "midpoint"]
#: How a solve is differentiated: reverse mode (jax.grad, checkpointed) or forward mode (jax.jacfwd).
DIFFERENTIATION = ("reverse", "forward")
#: Defaults chosen by the convergence study in ``benchmarks/convergence.py`` (see README).
DEFAULT_SOLVER: SolverName = "heun"
DEFAULT_DT: float = 2.5e-4


def _adjoint(differentiation: str, n_steps: int):
    if differentiation == "forward":
        return diffrax.ForwardMode()
    # One checkpoint per step: with fewer (diffrax's default for a known max_steps), reverse-mode
    # gradients of solves that save many time points were seen to differ from forward mode and
    # from finite differences by up to 20 % (tests/test_solve.py checks this case). Memory: one
    # (6, N) state per step.
    return diffrax.RecursiveCheckpointAdjoint(checkpoints=int(n_steps) + 1)


def check_differentiation(differentiation: str) -> None:
    if differentiation not in DIFFERENTIATION:
        raise ValueError(f"differentiation must be one of {DIFFERENTIATION}, got {differentiation!r}")


def check_solver(solver: str, dt: float) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    if not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt must be a number > 0 (s), got {dt!r}")


# Threefry-2x32 rotation constants (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers:
# as easy as 1, 2, 3"), the generator behind jax.random's default keys.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k0, k1, x0, x1):
    """Threefry-2x32 with 20 rounds: the block ``(x0, x1)`` hashed under the key ``(k0, k1)``.

    All arguments are uint32 arrays that broadcast together; returns the two uint32 output words.
    Bit for bit the function of ``jax.extend.random.threefry2x32_p`` (tests/test_noise.py checks
    it), written in jnp so that XLA fuses it with the solver step: on a CPU, inside a time loop,
    it runs 2-3x faster than the primitive's lowering.
    """
    k2 = k0 ^ k1 ^ np.uint32(0x1BD11BDA)
    ks = (k0, k1, k2)
    x0 = x0 + k0
    x1 = x1 + k1
    for i in range(5):
        for r in _THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
            x1 = x1 ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def bits_to_normal(bits):
    """N(0, 1) (float32) from uint32 words by the inverse CDF, as ``jax.random.normal`` maps bits.

    The top 23 bits give u uniform on [1, 2); v = 2u - 3 in [-1, 1), kept off -1; the draw is
    sqrt(2) erfinv(v). Its support is |z| <= 5.42 (the largest v below 1 is 1 - 2^-22).
    """
    u = jax.lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32)
    v = jnp.maximum(2.0 * u - 3.0, np.nextafter(np.float32(-1), np.float32(0)))
    return np.float32(math.sqrt(2)) * jax.lax.erf_inv(v)


def key_words(keys: PRNGKeyArray) -> tuple[Array, Array]:
    """The two uint32 Threefry key words of each key (shape ``keys.shape``).

    Threefry keys (JAX's default) give their own key data; keys of another implementation (e.g.
    ``impl="rbg"``) give two words drawn from them with ``jax.random.bits``, so any key works.
    """
    if str(jax.random.key_impl(keys)) == "threefry2x32":
        data = jax.random.key_data(keys)
    else:
        data = jax.random.bits(keys, (2,), jnp.uint32) if keys.shape == () else jax.vmap(
            lambda k: jax.random.bits(k, (2,), jnp.uint32))(keys)
    return data[..., 0], data[..., 1]


def step_normals(k0, k1, step) -> Float[Array, "..."]:
    """The standard normal of step ``step`` (an integer >= 0) for each key ``(k0, k1)``.

    Steps 2m and 2m + 1 take the first and second word of ``threefry2x32(k0, k1, m, 0)``: the
    value is a function of the key and the step index alone, whatever else is computed with it.
    """
    step = jnp.asarray(step).astype(jnp.uint32)
    w0, w1 = threefry2x32(k0, k1, step >> np.uint32(1), np.uint32(0))
    return bits_to_normal(jnp.where((step & np.uint32(1)) == 0, w0, w1))


def _pair_normals(k0, k1, pairs, size: int):
    """Normals of steps 2 pairs[j] and 2 pairs[j] + 1 for each key, interleaved: ``(size, *k0.shape)``."""
    shape = (-1,) + (1,) * jnp.ndim(k0)
    w0, w1 = threefry2x32(k0, k1, pairs.reshape(shape), np.uint32(0))
    z = jnp.stack([bits_to_normal(w0), bits_to_normal(w1)], axis=1)  # (size/2, 2, ...)
    return z.reshape((size,) + jnp.shape(w0)[1:])


class CounterBrownianPath(diffrax.AbstractBrownianPath):
    """A Brownian motion on a fixed step grid whose increments are computed, not stored.

    Time is counted in steps (``t0 = 0`` to ``t1 = n_steps``). The increment of step k (from k to
    k + 1) for trajectory i is ``scale * sum_{j<substeps} z_i(k * substeps + j)``, where
    ``z_i(n)`` is the n-th standard normal of trajectory i's key (:func:`step_normals`): the
    counter-based generator Threefry-2x32-20, mapped to N(0, 1) by the inverse CDF
    (:func:`bits_to_normal`). ``scale`` is ``sqrt(dt / substeps)`` for steps of ``dt`` seconds;
    ``substeps > 1`` gives the same path seen at a coarser step (used for strong-error studies).

    Nothing of size ``n_steps`` is allocated: the solver asks for one step's increments at a time,
    drawn inside its time loop. A trajectory's path depends on its key alone (not on the batch,
    the chunk or the devices). ``evaluate(t0, t1)`` sums the steps between the grid points nearest
    to ``t0`` and ``t1``; ``evaluate(t)`` is the path at the grid point nearest to t (W(0) = 0).
    """

    k0: Array
    k1: Array
    scale: Array
    t1: float = eqx.field(static=True)
    substeps: int = eqx.field(static=True, default=1)
    t0: float = eqx.field(static=True, default=0.0)
    levy_area: type = eqx.field(static=True, default=diffrax.BrownianIncrement)

    @classmethod
    def from_keys(cls, keys: PRNGKeyArray, n_steps: int, dt: float, dtype, substeps: int = 1):
        """The path of ``n_steps`` steps of ``dt`` (s) for each key in ``keys`` (any shape)."""
        if not (isinstance(substeps, (int, np.integer)) and substeps >= 1):
            raise ValueError(f"substeps must be an integer >= 1, got {substeps!r}")
        k0, k1 = key_words(keys)
        return cls(k0, k1, jnp.asarray(math.sqrt(dt / substeps), dtype), float(n_steps), int(substeps))

    def step_increment(self, step) -> Float[Array, "..."]:
        """Increments of step ``step`` (integer) for every key, in the dtype of ``scale``."""
        dtype = self.scale.dtype
        if self.substeps == 1:
            return self.scale * step_normals(self.k0, self.k1, step).astype(dtype)
        first = jnp.asarray(step).astype(jnp.uint32) * np.uint32(self.substeps)
        total = jax.lax.fori_loop(
            0, self.substeps,
            lambda j, acc: acc + step_normals(self.k0, self.k1, first + j.astype(jnp.uint32)).astype(dtype),
            jnp.zeros(jnp.shape(self.k0), dtype),
        )
        return self.scale * total

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        if t1 is None:
            t0, t1 = 0.0, t0
        a = jnp.clip(jnp.round(t0), 0, self.t1).astype(jnp.int32)
        b = jnp.clip(jnp.round(t1), 0, self.t1).astype(jnp.int32)
        lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
        dtype = self.scale.dtype
        w = jax.lax.fori_loop(lo, hi, lambda k, acc: acc + self.step_increment(k), jnp.zeros(jnp.shape(self.k0), dtype))
        w = jnp.where(b >= a, w, -w)
        if use_levy:
            return diffrax.BrownianIncrement(dt=jnp.asarray(t1 - t0, dtype), W=w)
        return w


class StepCoefficients(eqx.Module):
    """Per-trajectory constants of the JR drift over one step of ``dt`` seconds (arrays ``(N,)``).

    With S_k the logistic function at ``slope_k * v - r v0`` (``slope_3 = r``, v = y1 - y2;
    ``slope_4 = r a_1 C``, ``slope_5 = r a_3 C``, v = y0), the change of y3..y5 over one step is
    ``rates[k] * S_k + mu_k - damping * y_k - stiffness * y_(k-3)`` (``mu_4 = dt A_e b_e mu``, the
    others 0; damping and stiffness of the excitatory rate b_e for y3, y4 and of b_i for y5), and of
    y0..y2 it is ``dt * y3..y5``. Computed once per solve from the parameters (so the
    time loop does no parameter arithmetic), differentiably.
    """

    dt: Array
    slopes: tuple[Array, Array, Array]
    offset: Array
    rates: tuple[Array, Array, Array]
    mu_4: Array
    damping: tuple[Array, Array]
    stiffness: tuple[Array, Array]

    @classmethod
    def from_params(cls, params: JRParams, dt) -> "StepCoefficients":
        p = params
        ae_be = p.A_e * p.b_e
        two_e0_dt = 2.0 * p.e0 * dt
        return cls(
            dt=jnp.asarray(dt, p.r.dtype),
            slopes=(p.r, p.r * p.a_1 * p.C, p.r * p.a_3 * p.C),
            offset=p.r * p.v0,
            rates=(two_e0_dt * ae_be, two_e0_dt * ae_be * p.a_2 * p.C, two_e0_dt * p.A_i * p.b_i * p.a_4 * p.C),
            mu_4=dt * ae_be * p.mu,
            damping=(2.0 * dt * p.b_e, 2.0 * dt * p.b_i),
            stiffness=(dt * p.b_e**2, dt * p.b_i**2),
        )

    def step_drift(self, y):
        """``dt * drift(y)`` for a state given as its six rows; returns six rows."""
        y0, y1, y2, y3, y4, y5 = y
        s3 = jax.nn.sigmoid(self.slopes[0] * (y1 - y2) - self.offset)
        s4 = jax.nn.sigmoid(self.slopes[1] * y0 - self.offset)
        s5 = jax.nn.sigmoid(self.slopes[2] * y0 - self.offset)
        (de, di), (ke, ki) = self.damping, self.stiffness
        return (
            self.dt * y3,
            self.dt * y4,
            self.dt * y5,
            self.rates[0] * s3 - de * y3 - ke * y0,
            self.mu_4 + self.rates[1] * s4 - de * y4 - ke * y1,
            self.rates[2] * s5 - di * y5 - ki * y2,
        )


class _JRTerm(diffrax.AbstractTerm):
    """The whole JR right-hand side as one term, in time measured in solver steps.

    The state is a tuple of six rows ``(N,)`` (XLA then fuses each row's update on its own, with no
    copies of a stacked ``(6, N)`` array). Control over step k = [t0, t1]: ``(t1 - t0, dS[k], dW[k])``
    with dS the exact integral of the stimulus over the step (it enters linearly, so integrating it
    exactly keeps each solver's order across the pulse edges) and dW the Brownian increments of
    step k: drawn there from the trajectories' keys by a :class:`CounterBrownianPath` (nothing per
    step is stored), or read from an array of pre-drawn increments (one row per step).
    ``args``: ``(StepCoefficients, stimulus gains on y3..y5, noise scale A_e b_e sigma)``.
    """

    stimulus_increments: Float[Array, " n_steps"] | None
    noise: "CounterBrownianPath | Float[Array, 'n_steps N'] | None"

    def vf(self, t, y, args):
        coefficients, stimulus_gains, noise = args
        return coefficients.step_drift(y), stimulus_gains, noise

    def contr(self, t0, t1, **kwargs):
        ds = dw = None
        if self.stimulus_increments is not None or self.noise is not None:
            index = jnp.round(t0).astype(jnp.int32)
        if self.stimulus_increments is not None:
            ds = self.stimulus_increments[jnp.clip(index, 0, self.stimulus_increments.shape[0] - 1)]
        if isinstance(self.noise, CounterBrownianPath):
            dw = self.noise.step_increment(jnp.maximum(index, 0))
        elif self.noise is not None:
            dw = self.noise[jnp.clip(index, 0, self.noise.shape[0] - 1)]
        return t1 - t0, ds, dw

    def prod(self, vf, control):
        f, stimulus_gains, noise = vf
        dtau, ds, dw = control
        out = [row * dtau for row in f]
        if ds is not None:
            for k, g in zip((3, 4, 5), stimulus_gains):
                if g is not None:
                    out[k] = out[k] + g * ds
        if dw is not None:
            out[4] = out[4] + noise * dw
        return tuple(out)


class AdditiveNoiseHeun(diffrax.AbstractStratonovichSolver):
    """Heun's method for the JR term: predictor ``y + k0``, corrector ``y + (k0 + k1) / 2``.

    The control (stimulus integral and Brownian increment) is drawn once per step and enters both
    stages, as in ``diffrax.Heun``; with additive noise (on y4 only) Itô and Stratonovich agree.
    Unlike ``diffrax.Heun`` it carries no embedded error estimate (the steps are fixed) and
    interpolates linearly between steps (the solves save at step boundaries), which halves the
    work per step outside the vector field. Order 2 for the ODE and strong order 1 with additive
    noise (tests/test_solve.py measures both).
    """

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 1.0

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        control = terms.contr(t0, t1)
        k0 = terms.vf_prod(t0, y0, args, control)
        k1 = terms.vf_prod(t1, jax.tree_util.tree_map(jnp.add, y0, k0), args, control)
        y1 = jax.tree_util.tree_map(lambda y, a, b: y + 0.5 * (a + b), y0, k0, k1)
        return y1, None, dict(y0=y0, y1=y1), None, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "heun": AdditiveNoiseHeun,
    "midpoint": diffrax.Midpoint,
}


def standard_normals(keys: PRNGKeyArray, n: int, dtype) -> Float[Array, "n N"]:
    """The first ``n`` standard normals of each key's stream (:func:`step_normals`), ``(n, N)``.

    Column i is drawn from ``keys[i]`` alone; row k is what a :class:`CounterBrownianPath` uses at
    step k. This materialises them (``n x N`` values): the solvers draw them step by step instead.
    """
    k0, k1 = key_words(keys)
    m = -(-n // 2)
    return _pair_normals(k0, k1, jnp.arange(m, dtype=jnp.uint32), 2 * m)[:n].astype(dtype)


def brownian_increments(keys: PRNGKeyArray, n_steps: int, dt: float, dtype) -> Float[Array, "n_steps N"]:
    """Increments dW ~ N(0, dt) for each trajectory, materialised: column i from ``keys[i]`` alone.

    Equal to the step increments of ``CounterBrownianPath.from_keys(keys, n_steps, dt, dtype)``.
    """
    return standard_normals(keys, n_steps, dtype) * jnp.asarray(math.sqrt(dt), dtype)


def integrate(
    params: JRParams,
    y0: Float[Array, "6 N"],
    n_steps: int,
    save_steps: np.ndarray,
    *,
    dt: float,
    solver: str,
    stimulus: Stimulus = NO_STIMULUS,
    onset_step: float = 0.0,
    increments: "CounterBrownianPath | Float[Array, 'n_steps N'] | None" = None,
    differentiation: str = "reverse",
) -> Float[Array, "n_save 6 N"]:
    """Integrate ``n_steps`` fixed steps of size ``dt`` (s) from ``y0`` (state ``(6, N)``).

    Time is counted in steps: the stimulus onset is at step ``onset_step``; ``save_steps`` (static,
    increasing, within ``[0, n_steps]``) are the steps at which the state is returned.
    ``increments`` makes it the SDE with noise on y4 (else the ODE): a :class:`CounterBrownianPath`
    (increments drawn inside the time loop: memory O(N) for the noise) or pre-drawn increments
    ``(n_steps, N)``.
    ``differentiation``: ``"reverse"`` (``jax.grad``; checkpointed) or ``"forward"`` (``jax.jacfwd``).
    """
    dtype = y0.dtype

    stim_increments, stimulus_gains = None, (None, None, None)
    if stimulus.amplitude != 0:
        edges = (np.arange(n_steps + 1) - onset_step) * dt  # float64, exact on the grid
        stim_increments = jnp.asarray(np.diff(stimulus.integral(edges)), dtype)
        gains = stimulus.gains_per_state(params)
        stimulus_gains = tuple(g if static != 0 else None for g, static in zip(gains, stimulus.gains))
    noise = None if increments is None else noise_scale(params)
    args = (StepCoefficients.from_params(params, dt), stimulus_gains, noise)
    term = _JRTerm(stim_increments, increments)
    sol = diffrax.diffeqsolve(
        term,
        SOLVERS[solver](),
        t0=0.0,
        t1=float(n_steps),
        dt0=1.0,
        y0=tuple(y0),
        args=args,
        # each saved state is stacked as it is saved: one (6, N) row of the output, written in place
        saveat=diffrax.SaveAt(ts=jnp.asarray(save_steps, dtype), fn=lambda t, y, args: jnp.stack(y)),
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=int(n_steps) + 1,
        throw=False,
        adjoint=_adjoint(differentiation, n_steps),
    )
    return sol.ys


def state_dtype(params: JRParams):
    """The floating dtype of the state: the widest dtype among the parameter fields."""
    return jnp.result_type(*(getattr(params, n).dtype for n in JRParams.names))


def per_sample_keys(key: PRNGKeyArray, n: int, start: int = 0) -> PRNGKeyArray:
    """Keys ``fold_in(key, i)`` for i = start..start+n-1: sample i's key depends on i alone."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, start + n))


def as_typed_key(key, name: str = "key") -> PRNGKeyArray:
    """Accept new-style typed keys and legacy uint32 keys (``jax.random.PRNGKey``)."""
    if not isinstance(key, jax.Array):
        raise TypeError(f"{name} must be a JAX PRNG key (jax.random.key(seed)), got {type(key).__name__}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(f"{name} must be a JAX PRNG key (jax.random.key(seed)), got dtype {key.dtype} shape {key.shape}")


def solve(
    params: JRParams,
    ts,
    *,
    y0=None,
    key: PRNGKeyArray | None = None,
    dt: float = DEFAULT_DT,
    solver: SolverName = DEFAULT_SOLVER,
    stimulus: Stimulus | None = None,
    differentiation: str = "reverse",
) -> Float[Array, "*batch n_ts 6"]:
    """The JR trajectory at times ``ts`` (s), by a fixed-step ``diffrax.diffeqsolve``.

    - ``params``: one parameter set (output ``(len(ts), 6)``) or a batch with leading axis N
      (output ``(N, len(ts), 6)``). A batch is solved as one ``diffeqsolve`` over a ``(6, N)`` state.
    - ``ts``: increasing times (s), concrete (a NumPy array or list): they fix the number of steps.
      Integration starts at ``ts[0]``; a stimulus onset, if any, is at t = 0.
    - ``y0``: state at ``ts[0]``, shape ``(6,)`` or ``(N, 6)`` (mV, mV/s); default zeros.
    - ``key``: ``None`` or ``sigma == 0`` gives the ODE; otherwise the SDE with noise
      ``A_e b_e sigma dW`` on y4. For a batch, keys of shape ``(N,)``, or one key from which
      sample i gets ``fold_in(key, i)``. The increments are drawn inside the solver's time loop
      by a :class:`CounterBrownianPath` (Threefry-2x32-20 on the key and the step index, inverse-CDF
      normals): trajectory i's path depends on its key alone.
    - ``dt``: solver step (s); ``solver``: ``"euler"`` (Euler-Maruyama), ``"heun"`` or ``"midpoint"``.
    - ``differentiation``: ``"reverse"`` for ``jax.grad`` (default) or ``"forward"`` for ``jax.jacfwd``.

    Works under ``jax.jit`` (with ``ts`` closed over), ``jax.vmap`` and ``jax.grad``.
    """
    check_solver(solver, dt)
    check_differentiation(differentiation)
    if not isinstance(params, JRParams):
        raise TypeError(f"params must be a JRParams, got {type(params).__name__}")
    if isinstance(ts, jax.core.Tracer):
        raise TypeError("ts must be concrete (a NumPy array or a list), not traced: it fixes the number of steps")
    ts = np.asarray(ts, dtype=float)
    if ts.ndim != 1 or ts.size < 1 or not np.all(np.isfinite(ts)) or np.any(np.diff(ts) < 0):
        raise ValueError(f"ts must be a 1-D array of finite, non-decreasing times (s), got shape {ts.shape}")
    batch = params.batch_shape
    if len(batch) > 1:
        raise ValueError(f"params must be unbatched or have one batch axis, got batch shape {batch}")
    n = batch[0] if batch else 1
    p = params.broadcast()
    if not batch:
        p = jax.tree_util.tree_map(lambda x: x[None], p)
    dtype = state_dtype(p)

    if y0 is None:
        y = jnp.zeros((6, n), dtype)
    else:
        y0 = jnp.asarray(y0, dtype)
        if y0.shape not in ((6,), (n, 6)):
            raise ValueError(f"y0 must have shape (6,) or ({n}, 6), got {y0.shape}")
        y = jnp.broadcast_to(y0, (n, 6)).T

    steps = (ts - ts[0]) / dt
    rounded = np.round(steps)
    steps = np.where(np.abs(steps - rounded) < 1e-6, rounded, steps)
    n_steps = max(int(math.ceil(steps[-1] - 1e-9)), 1)
    onset = -ts[0] / dt
    onset = float(round(onset)) if abs(onset - round(onset)) < 1e-6 else float(onset)

    increments = None
    stochastic = key is not None and not (
        not isinstance(p.sigma, jax.core.Tracer) and bool(np.all(np.asarray(p.sigma) == 0))
    )
    if stochastic:
        key = as_typed_key(key)
        if key.shape == ():
            keys = per_sample_keys(key, n) if batch else key[None]
        elif batch and key.shape == (n,):
            keys = key
        else:
            raise ValueError(f"key must be one key or, for a batch of {n}, keys of shape ({n},); got shape {key.shape}")
        increments = CounterBrownianPath.from_keys(keys, n_steps, dt, dtype)

    ys = integrate(
        p,
        y,
        n_steps,
        steps,
        dt=dt,
        solver=solver,
        stimulus=NO_STIMULUS if stimulus is None else stimulus,
        onset_step=onset,
        increments=increments,
        differentiation=differentiation,
    )
    ys = jnp.transpose(ys, (2, 0, 1))  # (N, n_ts, 6)
    return ys if batch else ys[0]
