"""Batched ERP simulation (DESIGN §3): burn-in, trials, averaging, measurement noise at an SNR."""

from __future__ import annotations

import functools
import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._model import NO_STIMULUS, Stimulus, source
from ._params import JRParams
from ._solve import (
    DEFAULT_DT,
    DEFAULT_SOLVER,
    as_typed_key,
    CounterBrownianPath,
    check_differentiation,
    check_solver,
    integrate,
    per_sample_keys,
    state_dtype,
)


def _is_integer_multiple(x: float, unit: float) -> bool:
    q = x / unit
    return abs(q - round(q)) < 1e-6 * max(1.0, abs(q))


def _to_lead_field(value):
    if value is None:
        return None
    value = getattr(value, "gain", value)  # a jr_jax.eeg.LeadField
    return tuple(float(v) for v in np.asarray(value, dtype=float).ravel())


class Protocol(eqx.Module):
    """How an ERP is made (DESIGN §3). All times in s, rates in Hz.

    - ``stimulus``: the transient at t = 0 (default: 60 s^-1, 50 ms rectangular pulse into p(t));
    - ``tmin``, ``tmax``: the epoch around the onset (default -0.2 to 1.0 s), sampled at ``fs``
      (default 1000 Hz) from a solver step ``dt`` (``1/fs`` must be a multiple of ``dt``):
      ``n_times = (tmax - tmin) fs + 1`` samples, both ends included;
    - ``burn_in``: time simulated from the zero state before the first epoch and discarded;
    - ``n_trials``: epochs averaged into the ERP. Trials follow one another without a gap (each
      starts where the last ended, period ``tmax - tmin``) with independent intrinsic noise. With
      ``sigma == 0`` all trials are equal and one is simulated;
    - ``baseline``: subtract the mean over ``tmin <= t < 0`` from the ERP (as MNE's default);
    - ``snr_db``: measurement noise at this SNR in dB, stated on the averaged ERP: mean square of the
      clean (baseline-corrected) ERP over the noise variance; ``None`` for none. This equals
      per-trial sensor noise of ``sqrt(n_trials)`` times the SD averaged over the trials;
    - ``noise_color``: ``"white"`` or ``"pink"`` (power spectral density ~ 1/f);
    - ``lead_field``: gains from the source (mV) to each of ``n_channels`` sensors (a vector, or a
      :func:`jr_jax.eeg.leadfield` result); ``None`` keeps the single source channel y1 - y2.
    """

    stimulus: Stimulus = eqx.field(static=True, default_factory=Stimulus)
    fs: float = eqx.field(static=True, default=1000.0)
    tmin: float = eqx.field(static=True, default=-0.2)
    tmax: float = eqx.field(static=True, default=1.0)
    burn_in: float = eqx.field(static=True, default=1.0)
    dt: float = eqx.field(static=True, default=DEFAULT_DT)
    solver: str = eqx.field(static=True, default=DEFAULT_SOLVER)
    n_trials: int = eqx.field(static=True, default=60)
    baseline: bool = eqx.field(static=True, default=True)
    snr_db: float | None = eqx.field(static=True, default=None)
    noise_color: Literal["white", "pink"] = eqx.field(static=True, default="white")
    lead_field: tuple[float, ...] | None = eqx.field(static=True, default=None, converter=_to_lead_field)

    def __check_init__(self):
        if not isinstance(self.stimulus, Stimulus):
            raise TypeError(f"Protocol stimulus must be a jr_jax.Stimulus, got {type(self.stimulus).__name__}")
        check_solver(self.solver, self.dt)
        if not (isinstance(self.fs, (int, float)) and math.isfinite(self.fs) and self.fs > 0):
            raise ValueError(f"Protocol fs must be a number > 0 (Hz), got {self.fs!r}")
        if not _is_integer_multiple(1.0 / self.fs, self.dt):
            raise ValueError(
                f"Protocol dt must divide the sampling period 1/fs = {1 / self.fs} s; got dt = {self.dt} s"
            )
        if not (math.isfinite(self.tmin) and math.isfinite(self.tmax) and self.tmin <= 0.0 < self.tmax):
            raise ValueError(f"Protocol epoch needs tmin <= 0 < tmax (s), got tmin={self.tmin}, tmax={self.tmax}")
        for name in ("tmin", "tmax"):
            if not _is_integer_multiple(getattr(self, name), 1.0 / self.fs):
                raise ValueError(f"Protocol {name} = {getattr(self, name)} s must be a multiple of 1/fs = {1 / self.fs} s")
        if not (math.isfinite(self.burn_in) and self.burn_in >= 0):
            raise ValueError(f"Protocol burn_in must be >= 0 (s), got {self.burn_in}")
        if not (isinstance(self.n_trials, (int, np.integer)) and self.n_trials >= 1):
            raise ValueError(f"Protocol n_trials must be an integer >= 1, got {self.n_trials!r}")
        if self.baseline and self.tmin >= 0:
            raise ValueError("Protocol baseline=True needs a pre-stimulus interval (tmin < 0)")
        if self.snr_db is not None and not (isinstance(self.snr_db, (int, float)) and math.isfinite(self.snr_db)):
            raise ValueError(f"Protocol snr_db must be a finite number (dB) or None, got {self.snr_db!r}")
        if self.noise_color not in ("white", "pink"):
            raise ValueError(f"Protocol noise_color must be 'white' or 'pink', got {self.noise_color!r}")
        if self.lead_field is not None:
            lf = np.asarray(self.lead_field)
            if lf.size == 0 or not np.all(np.isfinite(lf)) or not np.any(lf != 0):
                raise ValueError("Protocol lead_field must be a non-empty vector of finite gains, not all zero")

    @property
    def n_times(self) -> int:
        """Samples per ERP."""
        return int(round((self.tmax - self.tmin) * self.fs)) + 1

    @property
    def times(self) -> np.ndarray:
        """Sample times (s) relative to the onset, shape ``(n_times,)``."""
        return self.tmin + np.arange(self.n_times) / self.fs

    @property
    def steps_per_sample(self) -> int:
        return int(round(1.0 / (self.fs * self.dt)))

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one ERP: ``(n_times,)`` or ``(n_times, n_channels)``."""
        return (self.n_times,) if self.lead_field is None else (self.n_times, len(self.lead_field))

    def to_dict(self) -> dict:
        """A JSON-ready description; :meth:`from_dict` rebuilds the same protocol."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        st = self.stimulus
        d["stimulus"] = dict(amplitude=st.amplitude, duration=st.duration, gains=list(st.gains), shape=st.shape)
        d["lead_field"] = None if self.lead_field is None else list(self.lead_field)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        d = dict(d)
        st = dict(d.pop("stimulus"))
        st["gains"] = tuple(st["gains"])
        return cls(stimulus=Stimulus(**st), **d)

    def replace(self, **changes) -> "Protocol":
        """A copy with the named fields changed (and validated)."""
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"unknown Protocol field(s) {sorted(unknown)}; allowed: {sorted(fields)}")
        fields.update(changes)
        return Protocol(**fields)


def _noise_filter(n_times: int, color: str) -> np.ndarray | None:
    """rfft-domain amplitude filter giving unit-variance noise of the colour, or None for white."""
    if color == "white":
        return None
    f = np.fft.rfftfreq(n_times)
    h = np.zeros_like(f)
    h[1:] = 1.0 / np.sqrt(f[1:])  # power ~ 1/f; no DC
    weights = np.full_like(f, 2.0)
    weights[0] = 1.0
    if n_times % 2 == 0:
        weights[-1] = 1.0
    variance = np.sum(weights * h**2) / n_times**2 * n_times  # = mean of |H|^2 over the full spectrum
    return h / np.sqrt(variance)


def measurement_noise(key: PRNGKeyArray, shape: tuple[int, ...], color: str = "white", dtype=jnp.float32):
    """Unit-variance Gaussian noise of ``shape = (n_times, ...)``, white or pink along time."""
    z = jax.random.normal(key, shape, dtype)
    h = _noise_filter(shape[0], color)
    if h is None:
        return z
    hshape = (-1,) + (1,) * (len(shape) - 1)
    spectrum = jnp.fft.rfft(z, axis=0) * jnp.asarray(h.reshape(hshape), dtype)
    return jnp.fft.irfft(spectrum, n=shape[0], axis=0).astype(dtype)


def add_measurement_noise(
    erp: Float[Array, "*batch n_times"], snr_db: float, *, key: PRNGKeyArray, color: str = "white"
) -> Float[Array, "*batch n_times"]:
    """``erp`` plus Gaussian noise at ``snr_db`` (mean square of ``erp`` over noise variance).

    With one ``key``, ``erp`` is one ERP: ``(n_times,)`` or ``(n_times, n_channels)``. For a batch
    ``(N, n_times[, n_channels])`` pass keys of shape ``(N,)``: each sample gets its own noise at
    the SNR of its own power.
    """
    if not (isinstance(snr_db, (int, float)) and math.isfinite(snr_db)):
        raise ValueError(f"snr_db must be a finite number (dB), got {snr_db!r}")
    if color not in ("white", "pink"):
        raise ValueError(f"color must be 'white' or 'pink', got {color!r}")
    erp = jnp.asarray(erp)
    key = as_typed_key(key)
    if key.shape == ():
        return _noisy(erp, snr_db, key, color)
    if key.shape != erp.shape[:1]:
        raise ValueError(f"keys must have shape ({erp.shape[0]},) for a batch of {erp.shape[0]}, got {key.shape}")
    return jax.vmap(lambda e, k: _noisy(e, snr_db, k, color))(erp, key)


def _noisy(erp, snr_db, key, color):
    power = jnp.mean(erp**2)
    std = jnp.sqrt(power / 10.0 ** (snr_db / 10.0))
    return erp + std * measurement_noise(key, erp.shape, color, erp.dtype)


def _erp_batch(protocol: Protocol, stochastic: bool, differentiation: str, params: JRParams,
               keys: PRNGKeyArray | None) -> Array:
    """ERPs ``(n, *output_shape)`` for a batch of ``n`` parameter sets (one chunk).

    ``stochastic``: whether the dynamics have intrinsic noise (else one noise-free trial).
    """
    n = params.batch_shape[0]
    dtype = state_dtype(params)
    if stochastic:
        dynamics_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
        segment_keys = lambda j: jax.vmap(lambda k: jax.random.fold_in(k, j))(dynamics_keys)  # noqa: E731
    solver = dict(dt=protocol.dt, solver=protocol.solver, differentiation=differentiation)

    y = jnp.zeros((6, n), dtype)
    n_burn = int(round(protocol.burn_in / protocol.dt))
    if n_burn > 0:
        inc = CounterBrownianPath.from_keys(segment_keys(0), n_burn, protocol.dt, dtype) if stochastic else None
        y = integrate(params, y, n_burn, np.array([n_burn]), stimulus=NO_STIMULUS, increments=inc, **solver)[-1]

    sps = protocol.steps_per_sample
    n_epoch = (protocol.n_times - 1) * sps
    save_steps = np.arange(protocol.n_times) * sps
    onset = float(round(-protocol.tmin / protocol.dt))

    def trial(carry, j):
        y, total = carry
        inc = CounterBrownianPath.from_keys(segment_keys(j + 1), n_epoch, protocol.dt, dtype) if stochastic else None
        ys = integrate(
            params, y, n_epoch, save_steps, stimulus=protocol.stimulus, onset_step=onset, increments=inc, **solver
        )
        return (ys[-1], total + source(jnp.moveaxis(ys, 1, -1))), None

    n_trials = protocol.n_trials if stochastic else 1
    total = jnp.zeros((protocol.n_times, n), dtype)
    (_, total), _ = jax.lax.scan(trial, (y, total), jnp.arange(n_trials))
    erp = (total / n_trials).T  # (n, n_times)

    if protocol.baseline:
        n_pre = int(round(-protocol.tmin * protocol.fs))  # samples before the onset, by index
        erp = erp - jnp.mean(erp[:, :n_pre], axis=1, keepdims=True)
    valid = jnp.all(jnp.isfinite(erp), axis=1)
    erp = jnp.where(valid[:, None], erp, jnp.nan)
    if protocol.lead_field is not None:
        erp = erp[:, :, None] * jnp.asarray(protocol.lead_field, dtype)
    if protocol.snr_db is not None:
        noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        erp = jax.vmap(lambda e, k: _noisy(e, protocol.snr_db, k, protocol.noise_color))(erp, noise_keys)
    return erp


_erp_batch_jit = jax.jit(_erp_batch, static_argnums=(0, 1, 2))


def spread_batch(*arrays):
    """The arrays placed with their leading (batch) axis split over the local devices, when there
    are several (e.g. one host device per CPU core, as the ``jr-jax`` command sets up) and they
    divide its length; else unchanged. XLA then runs each device's share of a batched simulation
    (the batch inside one solve's state, as :func:`simulate` solves it) on its own core; each row's
    arithmetic is unchanged. Not for a ``jax.vmap`` over solves (the fit's Levenberg-Marquardt
    starts): the vmapped loop's condition then joins the devices at every step, which on a CPU costs
    far more than it saves."""
    devices = jax.local_devices()
    n = arrays[0].shape[0]
    if len(devices) < 2 or n % len(devices):
        return arrays[0] if len(arrays) == 1 else arrays
    sharding = _batch_sharding(tuple(devices))
    out = tuple(jax.device_put(jnp.asarray(a), sharding) for a in arrays)
    return out[0] if len(out) == 1 else out


def constrain_batch(x):
    """Inside ``jax.jit``: :func:`spread_batch`'s split of ``x``'s leading axis over the local devices,
    as a sharding constraint, so that it holds whatever placement the inputs arrived with (a
    resampled set of particles, for instance, comes out of a gather replicated)."""
    devices = jax.local_devices()
    if len(devices) < 2 or x.shape[0] % len(devices):
        return x
    return jax.lax.with_sharding_constraint(x, _batch_sharding(tuple(devices)))


@functools.lru_cache(maxsize=None)
def _batch_sharding(devices):
    """The leading axis split over ``devices`` (one mesh axis, "batch")."""
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))


def simulate(
    params: JRParams,
    protocol: Protocol | None = None,
    *,
    key: PRNGKeyArray | None = None,
    chunk_size: int = 1024,
    first_index: int = 0,
    differentiation: str = "reverse",
) -> Float[Array, "*batch n_times *channels"]:
    """ERPs (mV) of one parameter set, shape ``protocol.output_shape``, or of a batch, ``(N, ...)``.

    - ``key``: needed when ``sigma > 0`` or ``protocol.snr_db`` is set; sample i uses
      ``fold_in(key, first_index + i)`` only, so its ERP does not depend on N, ``chunk_size`` or
      the devices (``first_index`` lets a part of a larger batch be simulated on its own).
    - ``chunk_size``: at most this many trajectories are solved at once (memory is bounded by it;
      one compilation serves every chunk). Each chunk is split over all local devices.
    - A sample whose trajectory diverges (non-finite values) comes back as a row of NaN; the other
      samples are unaffected. ``jnp.isfinite(erp).all(axis=1)`` is the validity mask.

    Under ``jax.jit`` with traced parameters, ``key=None`` gives the noise-free ERP whatever sigma.
    ``differentiation``: ``"reverse"`` for ``jax.grad`` (default) or ``"forward"`` for ``jax.jacfwd``.

    With more than one chunk, chunks are gathered on the host and returned as a CPU array.
    """
    protocol = Protocol() if protocol is None else protocol
    if not isinstance(params, JRParams):
        raise TypeError(f"params must be a JRParams, got {type(params).__name__}")
    if not isinstance(protocol, Protocol):
        raise TypeError(f"protocol must be a jr_jax.Protocol, got {type(protocol).__name__}")
    if not (isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    check_differentiation(differentiation)
    if not (isinstance(first_index, (int, np.integer)) and first_index >= 0):
        raise ValueError(f"first_index must be an integer >= 0, got {first_index!r}")
    batch = params.batch_shape
    if len(batch) > 1:
        raise ValueError(f"params must be unbatched or have one batch axis, got batch shape {batch}")
    n = batch[0] if batch else 1
    if n == 0:
        raise ValueError("params has an empty batch (N = 0)")
    sigma_traced = isinstance(params.sigma, jax.core.Tracer)
    noisy_dynamics = (key is not None) if sigma_traced else bool(np.any(np.asarray(params.sigma) != 0))
    if (noisy_dynamics or protocol.snr_db is not None) and key is None:
        raise ValueError("key is required: sigma > 0 or protocol.snr_db is set, so the ERP is random")
    needs_keys = key is not None and (noisy_dynamics or protocol.snr_db is not None)
    if key is not None:
        key = as_typed_key(key)
        if key.shape != ():
            raise ValueError(f"key must be a single key (sample keys are derived from it), got shape {key.shape}")
    p = params.broadcast()
    if not batch:
        p = jax.tree_util.tree_map(lambda x: x[None], p)

    devices = jax.local_devices()
    n_dev = len(devices)
    chunk = min(chunk_size, n)
    traced = any(isinstance(getattr(p, f), jax.core.Tracer) for f in JRParams.names)
    if not traced:  # a chunk is split over the devices; traced batches stay on one (no padding)
        chunk = -(-chunk // n_dev) * n_dev
    if traced and chunk < n:
        raise ValueError("under jax.jit, simulate needs the whole batch in one chunk: pass chunk_size >= N")
    sharding = _batch_sharding(tuple(devices)) if n_dev > 1 and not traced else None

    outputs = []
    for start in range(0, n, chunk):
        index = np.minimum(np.arange(start, start + chunk), n - 1)  # pad the last chunk
        pc = jax.tree_util.tree_map(lambda x: x[index], p) if (start > 0 or chunk != n) else p
        kc = per_sample_keys(key, chunk, first_index + start) if needs_keys else None
        if sharding is not None:
            pc, kc = jax.device_put((pc, kc), sharding)
        out = _erp_batch_jit(protocol, noisy_dynamics, differentiation, pc, kc)[: min(chunk, n - start)]
        outputs.append(out)
    if len(outputs) == 1:
        erp = outputs[0]
    else:
        erp = jax.device_put(np.concatenate([np.asarray(o) for o in outputs]), jax.devices("cpu")[0])
    return erp if batch else erp[0]
