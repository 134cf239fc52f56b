"""Fit the Jansen-Rit model to one ERP: MAP by Levenberg-Marquardt (optimistix) from several starts
in one batch, then posterior draws by importance sampling from the Laplace approximation
(tempered SMC when the weights say it is poor), the posterior predictive ERP and checks of fit.

Observation model (``x``: the ERP in mV on ``protocol.times``, n samples)::

    x(t) = gain * m(t - latency; theta) + e(t),   e(t) ~ N(0, noise_sd^2) independent,

with ``m`` the noise-free source ERP y1 - y2 (mV) of :func:`jr_jax.simulate` (baseline-corrected
on ``t < 0`` when the protocol is). ``theta`` has the prior ``prior``; a free ``gain`` is
log-uniform in ``|gain|`` over a stated range with its sign chosen by the data; a free
``latency`` (s, the delay of the stimulus' arrival) is uniform over a stated range; the model is then
simulated from ``tmin - latency_high`` (after the protocol's burn-in) and read at ``t - latency``
by linear interpolation.

Every parameter lives in a box ``[low, high]`` (``log|gain|`` for the gain) and is fitted in
``z = logit((u - low) / (high - low))``. The negative log posterior in z is ``||r(z)||^2 / 2`` up to
a constant, with the residuals ``r = ((x - model) / noise_sd, rho(z), [(theta - mid) / sd])``:
``rho(z) = sign(z) 2 sqrt(log cosh(z / 2))`` carries the uniform prior with its Jacobian
(``-log(sigmoid(z) sigmoid(-z)) = 2 log cosh(z/2) + 2 log 2``), and the last block is the study's
truncated normal prior when ``prior.kind == "normal"``. So the MAP is a least-squares problem and
``J^T J`` at it is the Gauss-Newton Hessian of the Laplace approximation.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import expit as scipy_expit

from ._estimator import MisspecificationWarning
from ._flow import from_unbounded, log_jacobian, log_to_unbounded, to_unbounded
from ._likelihood import (_host_rng, _log_prior, _ridge_moves, _systematic, effective_sample_size, particle_batched,
                          psis, ridge_direction, tempered_smc)
from ._params import Prior
from ._simulate import Protocol, constrain_batch, simulate, spread_batch as _spread
from ._solve import as_typed_key

RECORDING_GAIN = (1e-7, 1e-1)
"""Default range of ``|gain|`` (sensor mV per source mV) for a recording: scalp ERPs of 0.1-100 µV
from source ERPs of 1-1000 mV, with margin."""

RECORDING_LATENCY = (0.0, 0.1)
"""Default range (s) of the stimulus' latency for a recording."""


def _soft_abs(z):
    """``sign(z) 2 sqrt(log cosh(z / 2))``, smooth through 0 (about ``z / sqrt(2)`` there)."""
    h = z / 2
    logcosh = jnp.logaddexp(h, -h) - math.log(2.0)
    safe = jnp.where(jnp.abs(z) < 1e-3, 1.0, logcosh)
    return jnp.where(jnp.abs(z) < 1e-3, z / math.sqrt(2.0), jnp.sign(z) * 2.0 * jnp.sqrt(safe))


@dataclass(frozen=True)
class _Space:
    """The fitted coordinates: the prior's parameters, then ``log|gain|`` and ``latency`` if free."""

    prior: Prior
    gain: tuple[float, float] | None
    latency: tuple[float, float] | None
    fixed_gain: float

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.prior.names) + (("gain",) if self.gain else ()) + (("latency",) if self.latency else ())

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(self.prior.units) + (("1",) if self.gain else ()) + (("s",) if self.latency else ())

    @property
    def lows(self) -> np.ndarray:
        extra = ([math.log(self.gain[0])] if self.gain else []) + ([self.latency[0]] if self.latency else [])
        return np.concatenate([self.prior.lows, extra])

    @property
    def highs(self) -> np.ndarray:
        extra = ([math.log(self.gain[1])] if self.gain else []) + ([self.latency[1]] if self.latency else [])
        return np.concatenate([self.prior.highs, extra])

    @property
    def d(self) -> int:
        return len(self.names)

    def split(self, u):
        """Box coordinates ``u (..., d)`` -> theta ``(..., n_params)``, ``log|gain|`` and latency (or None)."""
        k = len(self.prior.names)
        theta = u[..., :k]
        log_gain = u[..., k] if self.gain else None
        latency = u[..., k + (1 if self.gain else 0)] if self.latency else None
        return theta, log_gain, latency


class _Model:
    """The model ERP ``gain * m(t - latency; theta)`` on the protocol's grid, batched over rows."""

    def __init__(self, space: _Space, protocol: Protocol):
        self.space, self.protocol = space, protocol
        self.times = jnp.asarray(protocol.times, jnp.float32)
        self.n_pre = int(round(-protocol.tmin * protocol.fs))
        if space.latency:
            pad = math.ceil(space.latency[1] * protocol.fs - 1e-9) / protocol.fs
            self.sim_protocol = protocol.replace(tmin=round(protocol.tmin - pad, 9), baseline=False, snr_db=None)
        else:
            self.sim_protocol = protocol.replace(snr_db=None)
        self.sim_times = jnp.asarray(self.sim_protocol.times, jnp.float32)

    def source(self, theta, latency, differentiation="reverse"):
        """Unit-gain model ERPs ``(B, n_times)`` of ``theta (B, n_params)``."""
        sim = simulate(self.space.prior.to_params(theta), self.sim_protocol, chunk_size=theta.shape[0],
                       differentiation=differentiation)
        if latency is None:
            return sim
        shifted = jax.vmap(lambda s, tau: jnp.interp(self.times - tau, self.sim_times, s))(sim, latency)
        if self.protocol.baseline:
            shifted = shifted - jnp.mean(shifted[:, : self.n_pre], axis=1, keepdims=True)
        return shifted

    def __call__(self, u, sign, differentiation="reverse"):
        """Model ERPs ``(B, n_times)`` at box coordinates ``u (B, d)`` with gain signs ``sign (B,)``."""
        theta, log_gain, latency = self.space.split(u)
        m = self.source(theta, latency, differentiation)
        if log_gain is None:
            return self.space.fixed_gain * m
        return (sign * jnp.exp(log_gain))[:, None] * m


@dataclass(frozen=True)
class FitResult:
    """The fit of one ERP (:func:`fit`). Arrays in the units of ``units``; ``names`` are the prior's
    parameters, then ``gain`` (sensor mV per source mV, signed) and ``latency`` (s) when fitted.

    - ``params``: the MAP by name (also ``noise_sd``, mV, and ``gain`` when fixed);
    - ``samples (n, d)``: posterior draws (equally weighted); :meth:`summary` for intervals,
      including log(C*a_k);
    - ``erp``, ``times``: the data; ``erp_map``: the model at the MAP; ``erp_fit``: the posterior
      predictive mean; ``band (2, n_times)``: the central ``level`` interval of the model ERP over
      the posterior (measurement noise of SD ``noise_sd`` comes on top);
    - ``r2``: 1 - SS(erp - erp_fit) / SS(erp - mean); ``chi2_reduced``:
      ``sum((erp - erp_fit)^2) / noise_sd^2 / (n_times - d)`` (``chi2_reduced_map`` the same at
      the MAP); ``misfit``: it exceeds 1 + 5 sqrt(2 / n_times) (5 SD of a reduced chi-square);
    - per start: ``start_params (K, d)``, ``start_neg_log_post (K,)``, ``converged (K,)`` (a
      finite objective, and the solver reached its tolerance or the Newton decrement is below
      0.05 nats), ``start_steps (K,)``; starts stopped early (in a converged start's basin, or
      unable to reach the best) are not converged (``diagnostics``: ``starts_merged``,
      ``starts_stopped``);
      ``n_modes``: separate optima among the converged starts whose -log posterior is within
      ``mode_tolerance`` of the best (1: the starts agree; more: several modes), ``modes``: one dict
      per optimum;
    - ``diagnostics['map_at_bound']``: the names of the MAP's coordinates within 2 % of their range
      from a bound (also warned): the data push against the prior, or the starts found a boundary optimum;
    - ``sampler``: ``"laplace-importance"`` or ``"smc"`` (:func:`fit`);
      ``pareto_k``: the importance weights' k-hat; ``ess``: their ESS, or the SMC's final ESS;
      ``diagnostics``: timings and sampler details.
    """

    names: tuple[str, ...]
    units: tuple[str, ...]
    params: dict
    samples: np.ndarray
    erp: np.ndarray
    times: np.ndarray
    noise_sd: float
    erp_map: np.ndarray
    erp_fit: np.ndarray
    band: np.ndarray
    level: float
    r2: float
    r2_map: float
    chi2_reduced: float
    chi2_reduced_map: float
    misfit: bool
    start_params: np.ndarray
    start_neg_log_post: np.ndarray
    converged: np.ndarray
    start_steps: np.ndarray
    n_modes: int
    modes: list
    sampler: str
    pareto_k: float
    ess: float
    prior_sd: np.ndarray
    diagnostics: dict = field(default_factory=dict)

    @property
    def starts_agree(self) -> bool:
        return self.n_modes == 1

    def summary(self, level: float | None = None):
        """:class:`jr_jax.PosteriorSummary` of :attr:`samples` (with log(C*a_k) and the contraction
        of the prior)."""
        from ._summary import PosteriorSummary, derived_quantities

        _, labels = derived_quantities(self.samples[:1], self.names)
        prior_sd = np.concatenate([self.prior_sd, np.full(len(labels), np.nan)])
        if labels and self.diagnostics.get("prior_sd_derived") is not None:
            prior_sd[len(self.names):] = self.diagnostics["prior_sd_derived"]
        return PosteriorSummary.from_draws(self.samples, self.names, self.units, level=level or self.level,
                                           prior_sd=prior_sd)

    def table(self) -> str:
        """MAP, posterior intervals and the checks of fit as plain text."""
        s = self.summary()
        pct = f"{100 * s.level:g}%"
        lines = [f"{'parameter':<13} {'unit':<6} {'MAP':>11} {'mean':>11} {pct + ' interval':>26} {'contraction':>11}"]
        for j, (name, unit) in enumerate(zip(s.names, s.units)):
            mp = self.params.get(name)
            if mp is None and name.startswith("log(C*a_"):
                mp = math.log(self.params["C"] * self.params["a_" + name[8]])
            lines.append(f"{name:<13} {unit:<6} {mp:>11.4g} {s.mean[j]:>11.4g} "
                         f"{f'[{s.lower[j]:.4g}, {s.upper[j]:.4g}]':>26} {s.contraction[j]:>11.2f}")
        lines.append(f"noise SD {self.noise_sd:.4g} mV; waveform R2 {self.r2:.3f} (MAP {self.r2_map:.3f}); reduced "
                     f"chi2 {self.chi2_reduced:.3f} (MAP {self.chi2_reduced_map:.3f}); {int(self.converged.sum())}/"
                     f"{len(self.converged)} starts converged, {self.n_modes} mode(s); posterior by {self.sampler}, "
                     f"k-hat {self.pareto_k:.2f}, ESS {self.ess:.0f}")
        return "\n".join(lines)

    def plot(self, path=None, *, title: str | None = None):
        """The ERP with the fit and its band, the residual, and the residual's spectrum beside that
        of white noise of SD ``noise_sd``. Returns the figure (saved to ``path`` if given)."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        t = self.times * 1e3
        fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), constrained_layout=True)
        ax = axes[0]
        ax.plot(t, self.erp, color="0.3", lw=1, label="data")
        ax.fill_between(t, self.band[0], self.band[1], color="C1", alpha=0.35,
                        label=f"{100 * self.level:g}% band of the model")
        ax.plot(t, self.erp_fit, color="C1", lw=1.8, label="posterior predictive mean")
        ax.plot(t, self.erp_map, color="C0", lw=1, ls="--", label="MAP")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("time (ms)")
        ax.set_ylabel("mV")
        ax.legend(fontsize=8, loc="best")
        ax.set_title(title or f"fit: R² {self.r2:.2f}, reduced χ² {self.chi2_reduced:.2f}")
        res = self.erp - self.erp_fit
        ax = axes[1]
        ax.plot(t, res, color="C3", lw=1)
        ax.axhspan(-self.noise_sd, self.noise_sd, color="0.85", label="±1 noise SD (baseline)")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("time (ms)")
        ax.set_ylabel("residual (mV)")
        ax.legend(fontsize=8)
        ax = axes[2]
        fs = 1.0 / float(self.times[1] - self.times[0])
        freqs = np.fft.rfftfreq(len(res), 1 / fs)
        psd = np.abs(np.fft.rfft(res)) ** 2 / (fs * len(res)) * 2
        ax.semilogy(freqs[1:], psd[1:], color="C3", lw=1, label="residual")
        ax.axhline(2 * self.noise_sd**2 / fs, color="0.4", ls="--", lw=1, label="white noise of the baseline SD")
        ax.set_xlabel("frequency (Hz)")
        ax.set_ylabel("PSD (mV²/Hz)")
        ax.legend(fontsize=8)
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig


def _check_bounds(name, value, *, positive: bool):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or (positive and lo <= 0):
        raise ValueError(f"{name} needs finite low < high{' with low > 0' if positive else ''}, got ({lo}, {hi})")
    return lo, hi


def _prior_sd(space: _Space, prior: Prior) -> np.ndarray:
    """Prior SD of each fitted coordinate in its unit (the gain's SD under its log-uniform prior)."""
    lo, hi = space.lows, space.highs
    sd = (hi - lo) / math.sqrt(12.0)
    if prior.kind == "normal":
        k = len(prior.names)
        # a normal of SD (hi - lo) / 4 truncated at +-2 SD: variance factor 1 - 4 phi(2) / (2 Phi(2) - 1)
        phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
        factor = math.sqrt(1 - 4 * phi2 / math.erf(math.sqrt(2.0)))
        sd[:k] = (hi[:k] - lo[:k]) / 4 * factor
    if space.gain:
        j = len(prior.names)
        a, b = space.gain
        mean = (b - a) / (math.log(b) - math.log(a))
        sd[j] = math.sqrt((b**2 - a**2) / (2 * (math.log(b) - math.log(a))) - mean**2)
    return sd


def fit(erp, protocol: Protocol | None = None, *, noise_sd: float | None = None, estimator=None,
        prior: Prior | None = None, gain="auto", latency="auto", key, n_starts: int | None = None, n_samples: int = 1000,
        n_screen: int | None = None, n_proposal: int = 2000, max_steps: int = 100, level: float = 0.9,
        mode_tolerance: float = 3.0,
        khat_threshold: float = 0.7, sampler: str = "auto", smc_particles: int = 1000,
        smc_mcmc_steps: int = 10) -> FitResult:
    """Fit the model to one ERP and return its MAP, posterior draws and checks (module docstring).

    - ``erp``: ``(n_times,)`` in mV on ``protocol``'s grid, or a :class:`jr_jax.eeg.Recording`
      (then ``protocol`` and ``noise_sd`` default to the recording's);
    - ``noise_sd``: the measurement noise SD (mV); default: the SD of the pre-stimulus samples
      (:func:`jr_jax.eeg.baseline_noise_sd`, at least 20 of them);
    - ``prior``: over theta (default: the estimator's, else the study's nine parameters); its
      ``sigma`` must be 0 (the likelihood is that of noise-free dynamics);
    - ``gain``: a number fixes it (1: the ERP is the source in mV); ``(low, high)`` fits ``|gain|``
      log-uniform in that range, sign from the data. Default ``"auto"``: fitted over
      :data:`RECORDING_GAIN` for a Recording, 1 for an array;
    - ``latency``: ``None`` (0), or ``(low, high)`` in s, fitted uniform; ``"auto"``: fitted over
      :data:`RECORDING_LATENCY` for a Recording, ``None`` for an array;
    - ``estimator``: a posterior estimator trained on this protocol; its draws start the solver
      (otherwise prior draws do). An estimator trained on another protocol is refused;
    - ``n_starts``: default 4 with an ``estimator`` (its draws start near the posterior), 8 without;
    - ``n_screen`` candidates (amortised or prior draws; default 1000 with an ``estimator``, 20 000
      without: prior draws seldom land in a narrow optimum's basin) are ranked by their log
      posterior in one batch; the best half of ``n_starts`` and random others among the finite ones start
      ``n_starts`` solves, run in one batch (at most about ``max_steps`` Levenberg-Marquardt steps
      each, in chunks after which converged, duplicate and hopeless starts stop);
      ``n_proposal`` draws from the Laplace mixture are weighted by the exact posterior (PSIS; with
      the exact ridge, the mixture follows it in log(theta), and up to three adaptive rounds move it
      to the weighted draws while the weights fail);
      while k-hat <= ``khat_threshold`` but the ESS < 100, up to three more batches of draws come from
      the last proposal (k-hat says the weights are reliable, only too few are effective);
      when k-hat > ``khat_threshold`` or the ESS stays < 100, tempered SMC (``smc_particles``) runs
      from that last proposal mixed with 10 % of the prior instead (``sampler="auto"``;
      ``"laplace-importance"`` or ``"smc"`` force one, the first warned when its weights fail).
      ``n_samples`` posterior draws come back.
    """
    from .eeg._recording import Recording, baseline_noise_sd

    t_start = time.perf_counter()
    is_recording = isinstance(erp, Recording)
    if is_recording:
        protocol = erp.protocol if protocol is None else protocol
        noise_sd = erp.noise_sd if noise_sd is None else noise_sd
        x = np.asarray(erp.erp, np.float64)
    else:
        try:
            x = np.asarray(erp, np.float64)
        except (TypeError, ValueError):
            raise TypeError("erp must be an array of numbers (mV) or a jr_jax.eeg.Recording") from None
    if protocol is None:
        raise ValueError("protocol is required for an array ERP: the grid, stimulus and solver of the model")
    if not isinstance(protocol, Protocol):
        raise TypeError(f"protocol must be a jr_jax.Protocol, got {type(protocol).__name__}")
    if protocol.lead_field is not None:
        raise ValueError("fit takes one signal: use a protocol without lead_field (pick a channel or a mode)")
    if x.shape != (protocol.n_times,):
        raise ValueError(f"erp must have shape ({protocol.n_times},) ({protocol.tmin} to {protocol.tmax} s at "
                         f"{protocol.fs:g} Hz), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"erp has {int(np.sum(~np.isfinite(x)))} NaN or infinite value(s)")
    if not np.std(x) > 0:
        raise ValueError("erp is flat (constant): nothing to fit")
    if noise_sd is None:
        noise_sd = baseline_noise_sd(x, protocol)
    if isinstance(noise_sd, bool) or not isinstance(noise_sd, (int, float, np.floating)) \
            or not (math.isfinite(noise_sd) and noise_sd > 0):
        raise ValueError(f"noise_sd must be a finite number > 0 (mV), got {noise_sd!r}")
    noise_sd = float(noise_sd)
    if n_starts is None:
        n_starts = 8 if estimator is None else 4
    if n_screen is None:
        n_screen = _N_SCREEN_PRIOR if estimator is None else 1000
    for name, value, low in (("n_starts", n_starts, 1), ("n_samples", n_samples, 10), ("n_proposal", n_proposal, 100),
                             ("n_screen", n_screen, 1), ("max_steps", max_steps, 1), ("smc_particles", smc_particles, 10),
                             ("smc_mcmc_steps", smc_mcmc_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if sampler not in _SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(map(repr, _SAMPLERS))}, got {sampler!r}")
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    key = as_typed_key(key)

    if estimator is not None:
        from ._estimator import protocol_differences

        if estimator.kind != "posterior":
            raise TypeError("estimator must be a posterior estimator (jr_jax.train(..., kind='posterior'))")
        recorded = estimator.manifest.get("protocol") or {}
        diff = protocol_differences(recorded, protocol.to_dict())
        if diff:
            raise ValueError("the estimator was trained on another protocol than this ERP's (estimator vs ERP): "
                             + "; ".join(diff) + ". Fit without it, or train one on this protocol")
        if prior is None and estimator.manifest.get("prior"):
            prior = Prior.from_dict(estimator.manifest["prior"])
    prior = Prior() if prior is None else prior
    if not isinstance(prior, Prior):
        raise TypeError(f"prior must be a jr_jax.Prior, got {type(prior).__name__}")
    if "sigma" in prior.names or float(prior.base.sigma) != 0.0:
        raise ValueError("fit needs noise-free dynamics: the prior's sigma must be fixed at 0")
    if estimator is not None and tuple(prior.names) != tuple(estimator.names):
        raise ValueError(f"prior names {prior.names} differ from the estimator's {estimator.names}")

    if isinstance(gain, str) and gain == "auto":
        gain = RECORDING_GAIN if is_recording else 1.0
    if isinstance(latency, str) and latency == "auto":
        latency = RECORDING_LATENCY if is_recording else None
    if isinstance(gain, (int, float, np.floating)) and not isinstance(gain, bool):
        if not (math.isfinite(gain) and gain != 0):
            raise ValueError(f"gain must be a finite non-zero number or a (low, high) range of |gain|, got {gain!r}")
        space = _Space(prior, None, None, float(gain))
    else:
        space = _Space(prior, _check_bounds("gain", gain, positive=True), None, 1.0)
    if latency is not None:
        lat = _check_bounds("latency", latency, positive=False)
        if lat[0] < 0:
            raise ValueError(f"latency must be >= 0 s (a delay of the stimulus), got {lat}")
        space = _Space(prior, space.gain, lat, space.fixed_gain)
    comp = _compiled(space, protocol, _chunk_steps(max_steps))
    model, lows, highs = comp["model"], comp["lows"], comp["highs"]
    d = space.d
    xj = jnp.asarray(x, jnp.float32)
    sd_j = jnp.asarray(noise_sd, jnp.float32)
    k_start, k_prop, k_res, k_smc = jax.random.split(key, 4)

    # --- starts: screened amortised or prior draws of theta; latency profiled; gain by projection
    n_cand = max(n_screen, n_starts)
    if estimator is not None:
        x_est = x / space.fixed_gain if space.gain is None else x * _typical_rms(space, model) / np.sqrt(np.mean(x**2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MisspecificationWarning)
            theta_c = np.asarray(estimator.sample(x_est.astype(np.float32), n_cand, key=k_start), np.float64)
    else:
        theta_c = np.asarray(prior.sample_array(k_start, n_cand), np.float64)
    lat_c = proj_c = None
    t_screen = time.perf_counter()
    if space.latency:  # each candidate at its own best latency (one simulation, every shift scored)
        lat_c, proj_c = _profile_latency(space, model, x, theta_c)
    z_c, sign_c = _starts(space, comp, x, theta_c, lat_c, proj_c if space.gain else None)
    lp_c = _eval_log_post(comp["log_post_jit"], z_c, sign_c, xj, sd_j)
    # the best candidates find the main optimum in few steps; random others keep the search for
    # other modes (the starts' disagreement is reported)
    ranked = np.argsort(np.where(np.isfinite(lp_c), -lp_c, np.inf), kind="stable")
    n_best = (n_starts + 1) // 2
    rest = ranked[n_best:]
    finite_rest = rest[np.isfinite(lp_c[rest])]
    others = _host_rng(jax.random.fold_in(k_start, 99)).permutation(finite_rest)[:n_starts - n_best]
    chosen = np.concatenate([ranked[:n_best], others, rest[~np.isin(rest, others)]])[:n_starts]
    theta0, sign = theta_c[chosen], sign_c[chosen]
    lat0 = None if lat_c is None else lat_c[chosen]
    z0 = z_c[chosen]
    screen_s = time.perf_counter() - t_screen
    for attempt in range(5):  # a start whose trajectory diverges is replaced by a fresh prior draw
        bad = ~np.isfinite(_eval_log_post(comp["log_post_jit"], z0, sign, xj, sd_j))
        if not bad.any():
            break
        theta0[bad] = np.asarray(prior.sample_array(jax.random.fold_in(k_start, attempt + 1), n_starts))[bad]
        z0, sign = _starts(space, comp, x, theta0, lat0)
    z0 = jnp.asarray(z0, jnp.float32)

    t_solve = time.perf_counter()
    sign_j = jnp.asarray(sign, jnp.float32)
    threshold = _chi2_quantile(d, 0.99)
    z_map, converged, steps, jac, nlp, merged_into, solve_diag = _solve_in_chunks(
        comp, z0, sign_j, xj, sd_j, max_steps, mode_tolerance, threshold)
    solve_s = time.perf_counter() - t_solve
    if not converged.any():
        warnings.warn(f"none of the {n_starts} starts converged within {max_steps} Levenberg-Marquardt steps: the MAP "
                      "and posterior below are from the best unconverged point (raise max_steps or n_starts)",
                      RuntimeWarning, stacklevel=2)

    # --- modes among the converged starts: Mahalanobis distance under the Laplace covariance ----
    # the MAP is the best converged start, unless an unconverged one lies more than mode_tolerance
    # below it (a start still descending in a sloppy valley can lie far below every converged one):
    # then that start, with a warning giving its Newton decrement
    order = np.argsort(np.where(converged, nlp, np.inf) if converged.any() else nlp, kind="stable")
    best = int(order[0])
    best_any = int(np.argmin(np.where(np.isfinite(nlp), nlp, np.inf)))
    if converged.any() and nlp[best_any] < nlp[best] - mode_tolerance:
        best = best_any
        order = np.concatenate([[best], order[order != best]])
    covs = np.stack([_laplace_cov(j) for j in jac])
    if converged.any() and not converged[best]:
        warnings.warn(f"the best start did not converge within {max_steps} Levenberg-Marquardt steps (Newton "
                      f"decrement {solve_diag['newton_decrement'][best]:.3g} nats), but lies "
                      f"{np.min(nlp[converged]) - nlp[best]:.3g} nats below the best converged one: the MAP is that "
                      "start (raise max_steps to refine it)", RuntimeWarning, stacklevel=2)
    at_bound = _at_bounds(space, z_map[best], lows, highs)
    if at_bound:
        warnings.warn(f"the MAP lies within {100 * _BOUND_FRACTION:g} % of the prior's range from a bound of "
                      f"{', '.join(at_bound)}: either the data push against the prior there, or the starts ended in a "
                      "local optimum on the boundary (try more starts, another key, or an estimator's starts)",
                      RuntimeWarning, stacklevel=2)
    modes: list[dict] = []
    for i in order:
        if not (converged[i] or i == best) or nlp[i] - nlp[best] > mode_tolerance:
            continue
        for m in modes:
            diff = z_map[i] - z_map[m["index"]]
            if diff @ np.linalg.solve(covs[m["index"]], diff) <= threshold:
                m["starts"].append(int(i))
                break
        else:
            modes.append(dict(index=int(i), starts=[int(i)], neg_log_post=float(nlp[i]), sign=float(sign[i])))
    for i in np.flatnonzero(merged_into >= 0):  # copies stopped in a converged start's basin join its mode
        for m in modes:
            if int(merged_into[i]) in m["starts"]:
                m["starts"].append(int(i))
    for m in modes:
        m["params"] = dict(zip(space.names, _to_units(space, z_map[m["index"]], sign[m["index"]], lows, highs)))

    # --- posterior: PSIS from a Student-t mixture on the Laplace approximations of the modes -----
    t_post = time.perf_counter()
    centres = np.stack([z_map[m["index"]] for m in modes])
    mcovs = np.stack([covs[m["index"]] for m in modes])
    msign = np.array([sign[m["index"]] for m in modes])
    log_ev = np.array([-m["neg_log_post"] + 0.5 * np.linalg.slogdet(c)[1] for m, c in zip(modes, mcovs)])
    mix = np.exp(log_ev - log_ev.max())
    mix /= mix.sum()
    mchols = np.linalg.cholesky(mcovs)
    n_log = comp["smc"]["n_log"]
    ridge = ridge_direction(prior.names, d) if n_log else None
    # with the exact ridge the proposal lives in w = log(theta): _RIDGE_SHARE of the draws follow
    # the ridge over the prior's extent (:func:`_ridge_laplace_mixture`), the rest come from the t
    # mixture in z; without it, the t mixture in z alone
    rmix = None if ridge is None else _ridge_laplace_mixture(
        space, centres, np.stack([jac[m["index"]] for m in modes]), len(x), n_log, ridge[0], mix)
    round_khat, round_ess = [], []
    extra = 0
    for rnd in range(1 + (_IS_ADAPT_ROUNDS if ridge is not None else 0)):
        prop = _Proposal(space, comp, xj, sd_j, centres, mchols, mix, msign, rmix, n_log)
        v_prop, s_prop = prop.sample(k_prop if ridge is None else jax.random.fold_in(k_prop, rnd), n_proposal)
        log_q, q_ridge = prop.log_q(v_prop, s_prop, ridge_parts=True)
        lp = prop.log_post(v_prop, s_prop)
        lw, k_hat = psis(lp - log_q)
        ess = effective_sample_size(lw) if np.isfinite(lw).any() else 0.0
        while k_hat <= khat_threshold and ess < 100 and np.isfinite(lw).any() and extra < _IS_EXTEND:
            # the weights pass k-hat but too few are effective: more draws from the same proposal,
            # and k-hat and the ESS again on all of them (k-hat of the larger set must pass too)
            extra += 1
            v_more, s_more = prop.sample(jax.random.fold_in(k_prop, 1000 + extra), n_proposal)
            lq_more, q_ridge_more = prop.log_q(v_more, s_more, ridge_parts=True)
            v_prop, s_prop = np.concatenate([v_prop, v_more]), np.concatenate([s_prop, s_more])
            log_q = np.concatenate([log_q, lq_more])
            q_ridge = None if q_ridge is None else np.concatenate([q_ridge, q_ridge_more])
            lp = np.concatenate([lp, prop.log_post(v_more, s_more)])
            lw, k_hat = psis(lp - log_q)
            ess = effective_sample_size(lw)
        round_khat.append(float(k_hat))
        round_ess.append(float(ess))
        if (k_hat <= khat_threshold and ess >= 100) or not np.isfinite(lw).any() or ridge is None \
                or rnd == _IS_ADAPT_ROUNDS:
            break
        # adaptive importance sampling: the next round's ridge mixture moves to the weighted
        # draws (each draw shared among the components by its responsibility); only the last
        # round's draws are used, so each round's weights are exact for its own proposal
        rmix = _adapt_ridge_mixture(rmix, v_prop, np.exp(lw), q_ridge, space, n_log)
    n_rounds = rnd + 1
    z_prop = prop.to_z(v_prop)
    diag = dict(screen_s=screen_s, n_screen=n_cand, solve_s=solve_s, **solve_diag, map_at_bound=at_bound,
                n_proposal=len(v_prop), importance_pareto_k=k_hat, importance_ess=ess, importance_rounds=n_rounds,
                importance_pareto_k_per_round=round_khat, importance_ess_per_round=round_ess)
    is_ok = k_hat <= khat_threshold and ess >= 100
    if sampler == "auto":
        sampler = "laplace-importance" if is_ok else "smc"
    if sampler == "laplace-importance":
        if not is_ok:
            warnings.warn(f"importance sampling was asked for, but its weights are poor (k-hat {k_hat:.2f}, ESS "
                          f"{ess:.0f}): the posterior draws are unreliable", RuntimeWarning, stacklevel=2)
        idx = _systematic(k_res, lw, n_samples)
        z_post, s_post = z_prop[idx], s_prop[idx]
    else:  # "smc"
        mode_jacs = np.stack([jac[m["index"]] for m in modes])
        keep = np.ones(len(msign), bool)
        if len(set(msign)) > 1:
            # the SMC moves z continuously: keep the sign of the most probable mode
            keep = msign == msign[np.argmax(mix)]
            centres, mchols, mix, msign = centres[keep], mchols[keep], mix[keep] / mix[keep].sum(), msign[keep]
            mode_jacs = mode_jacs[keep]
        s_fixed = float(msign[0])

        # SMC moves in w: log(theta) for the model's parameters (every prior bound is positive), z for
        # the gain and latency. In log(theta) the exact ridge (C, a_k) -> (lambda C, a_k / lambda) is a
        # straight line, which random-walk moves on the particles' covariance follow; in z it is curved.
        # Tempering starts from a defensive mixture: a share of the prior (every direction, optima
        # the starts missed), the rest the last importance proposal (the ridge mixture as adapted to
        # the importance draws, and the Laplace t mixture of the optima the starts found; without the
        # ridge, the t mixture alone). Its weights failed k-hat, but far less than the prior's: the
        # tempering then needs a few temperatures where it needed 10-14 from half prior, half Laplace.
        # From the Laplace mixture alone the moves were almost never accepted on real recordings (its
        # Gauss-Newton covariance, from float32 Jacobians over curvatures of many decades, is far from
        # the target); from the prior alone a few hundred particles can settle in a worse optimum.
        smc = comp["smc"]
        k_par = len(prior.names)
        n_comp = max(n_starts, len(mix))
        rmix_kept = None
        if rmix is not None:
            rw = np.asarray(rmix["weights"], np.float64)[keep]
            rmix_kept = dict(rmix, centres=rmix["centres"][keep], chols=rmix["chols"][keep],
                             segments=rmix["segments"][keep], weights=rw / rw.sum())
        prop_kept = _Proposal(space, comp, xj, sd_j, centres, mchols, mix, msign, rmix_kept, n_log)
        shares = np.array([_SMC_PRIOR_SHARE, 1.0 - _SMC_PRIOR_SHARE, 0.0]) if rmix is None else \
            np.array([_SMC_PRIOR_SHARE, (1.0 - _SMC_PRIOR_SHARE) * (1 - _RIDGE_SHARE),
                      (1.0 - _SMC_PRIOR_SHARE) * _RIDGE_SHARE])
        with np.errstate(divide="ignore"):
            log_shares = jnp.asarray(np.log(shares), jnp.float32)
        smc_data = dict(x=xj, noise_sd=sd_j, sign=jnp.float32(s_fixed), log_shares=log_shares,
                        **_t_mixture_arrays(centres, mchols, mix, n_components=n_comp),
                        **_ridge_mixture_arrays(rmix_kept, d, n_comp))

        def sample_q(k, n):
            """``n`` independent draws from the initial law (``log_q``), in random order: the
            component counts multinomial, so that each row is a draw of the mixture itself (the
            SMC's independence moves need that)."""
            k1, k2, k3, k4 = jax.random.split(k, 4)
            rng = _host_rng(k4)
            label = rng.choice(3, n, p=shares / shares.sum())  # prior, t mixture, ridge mixture
            n_prior = int(np.sum(label == 0))
            # n prior draws (one compiled shape), of which those labelled 0 are kept
            extra = lows[k_par:] + (highs[k_par:] - lows[k_par:]) * jax.random.uniform(k2, (n, d - k_par))
            u = jnp.concatenate([jnp.asarray(prior.sample_array(k1, n), jnp.float32), extra], axis=1)
            w = np.array(_w_from_z(to_unbounded(u, lows, highs), lows, highs, n_log), np.float64)
            v_rest = prop_kept.sample(k3, n - n_prior, n_ridge=int(np.sum(label == 2)))[0]
            if rmix_kept is None:  # the t mixture's draws are in z
                v_rest = _w_from_z_host(v_rest, space, n_log)
            w[label != 0] = v_rest[rng.permutation(n - n_prior)]
            return jnp.asarray(w, jnp.float32)

        # the Laplace covariance of the most probable mode, carried from z to w (a diagonal Jacobian):
        # the moves keep every direction even when resampling leaves only a few distinct particles
        b = int(np.argmax(mix))
        dw_dz = _dw_dz(centres[b][None], space, n_log)[0]
        lap_chol_w = dw_dz[:, None] * np.asarray(mchols[b], np.float64)
        laplace_cov_w = lap_chol_w @ lap_chol_w.T
        # and the local proposal of the SMC's moves at each temperature, (beta P_data + P_prior)^-1:
        # the Gauss-Newton precision in w (the data's rows apart from the prior's), averaged over the
        # most likely distinct particles (where the mass is, which need not be the best start's mode)
        n_jac = len(z0)  # the batch of the solve's Jacobian: compiled already

        def local_precision(w_particles, ratio):
            order = np.argsort(np.where(np.isfinite(ratio), -ratio, np.inf), kind="stable")
            _, first = np.unique(w_particles[order], axis=0, return_index=True)
            top = order[np.sort(first)][:n_jac]
            top = np.resize(top, n_jac)  # repeated when fewer distinct particles
            z_top, _, inside = _w_z_float64(w_particles[top], lows, highs, n_log)
            z_top = np.where(inside[:, None], z_top, centres[b][None, :])
            _, jac_top = comp["residuals_and_jac"](jnp.asarray(z_top, jnp.float32), jnp.full(n_jac, s_fixed, jnp.float32),
                                                   xj, sd_j)
            jw = np.asarray(jac_top, np.float64) / _dw_dz(z_top, space, n_log)[:, None, :]  # (k, R, d)
            ok = np.all(np.isfinite(jw), axis=(1, 2))
            jw = jw[ok] if ok.any() else (np.asarray(mode_jacs[b], np.float64) / dw_dz[None, :])[None]
            n_x = len(x)
            return (np.einsum("kri,krj->ij", jw[:, :n_x], jw[:, :n_x]) / len(jw),
                    np.einsum("kri,krj->ij", jw[:, n_x:], jw[:, n_x:]) / len(jw))
        w_smc, _, smc_diag = tempered_smc(smc["log_q"], sample_q, smc["log_target"], k_smc, d, smc_particles,
                                          smc_mcmc_steps, 100, data=smc_data, ridge=ridge,
                                          base_cov=laplace_cov_w,
                                          max_move_factor=_SMC_MAX_MOVE_ROUNDS, local_precision=local_precision,
                                          final_rounds=2, independence_steps=smc_mcmc_steps)
        # the final rounds (2 x smc_mcmc_steps moves at the posterior) part the copies that the last
        # resampling made: the last tempering step can be a long jump (0.45 -> 1 on a 2-parameter ERP
        # at 10 dB); the distinct share before them (distinct_fraction) says how well the moves mixed
        w_smc = jnp.asarray(w_smc, jnp.float32)
        if ridge is not None:
            # Metropolis moves along the exact ridge: the likelihood does not change there, only the
            # prior and the Jacobian do, so these moves are accepted where random-walk moves in every
            # direction are not, and spread C and the a_k over what the prior allows (no simulation)
            w_smc, _, smc_diag["ridge_acceptance"] = _ridge_moves(
                _host_rng(jax.random.fold_in(k_smc, 1)), np.asarray(w_smc, np.float64), ridge[0], prior, n_log, 30)
        z_smc = np.asarray(_z_from_w(jnp.asarray(w_smc, jnp.float32), lows, highs, n_log)[0], np.float64)
        smc_diag["coordinates"] = "log(theta), z for gain and latency" if n_log else "z"
        idx = _host_rng(k_res).choice(z_smc.shape[0], n_samples, replace=z_smc.shape[0] < n_samples)
        z_post, s_post, sampler = z_smc[idx], np.full(n_samples, s_fixed), "smc"
        diag.update({f"smc_{k}": v for k, v in smc_diag.items()})
        ess = float(smc_diag["final_ess"])
        if not smc_diag["reached_posterior"]:
            warnings.warn("tempered SMC stopped before reaching the posterior: the samples are not converged "
                          f"({smc_diag['smc_steps']} steps)", RuntimeWarning, stacklevel=2)
    diag["posterior_s"] = time.perf_counter() - t_post

    # --- predictive and checks ---------------------------------------------------------------
    curves = np.asarray(comp["model_jit"](*_spread(from_unbounded(jnp.asarray(z_post, jnp.float32), lows, highs),
                                                   jnp.asarray(s_post, jnp.float32))), np.float64)
    good = np.all(np.isfinite(curves), axis=1)
    erp_fit = curves[good].mean(axis=0)
    band = np.quantile(curves[good], [(1 - level) / 2, (1 + level) / 2], axis=0)
    erp_map = np.asarray(model(from_unbounded(jnp.asarray(z_map[best:best + 1], jnp.float32), lows, highs),
                               jnp.asarray(sign[best:best + 1], jnp.float32)), np.float64)[0]
    ss_tot = float(np.sum((x - x.mean()) ** 2))
    dof = max(len(x) - d, 1)

    def chi2(fitted):
        return float(np.sum((x - fitted) ** 2) / noise_sd**2 / dof)

    chi2_fit = chi2(erp_fit)
    limit = 1.0 + 5.0 * math.sqrt(2.0 / len(x))
    misfit = not chi2_fit <= limit
    if misfit:
        warnings.warn(f"the ERP is not explained down to the noise: reduced chi-square {chi2_fit:.3g} > {limit:.3g} "
                      f"(5 SD above 1) with noise SD {noise_sd:.3g} mV", MisspecificationWarning, stacklevel=2)
    samples = np.stack([_to_units(space, z, s, lows, highs) for z, s in zip(z_post, s_post)])
    params = dict(zip(space.names, _to_units(space, z_map[best], sign[best], lows, highs)))
    if space.gain is None:
        params["gain"] = space.fixed_gain
    params["noise_sd"] = noise_sd
    diag["total_s"] = time.perf_counter() - t_start
    diag["prior_sd_derived"] = comp["prior_sd_derived"]
    diag["sign_of_gain"] = float(sign[best])
    return FitResult(
        names=space.names, units=space.units, params=params, samples=samples, erp=x, times=np.asarray(protocol.times),
        noise_sd=noise_sd, erp_map=erp_map, erp_fit=erp_fit, band=band, level=float(level),
        r2=1.0 - float(np.sum((x - erp_fit) ** 2)) / ss_tot, r2_map=1.0 - float(np.sum((x - erp_map) ** 2)) / ss_tot,
        chi2_reduced=chi2_fit, chi2_reduced_map=chi2(erp_map), misfit=misfit,
        start_params=np.stack([_to_units(space, z, s, lows, highs) for z, s in zip(z_map, sign)]),
        start_neg_log_post=nlp, converged=converged, start_steps=np.asarray(steps), n_modes=len(modes), modes=modes,
        sampler=sampler, pareto_k=float(k_hat), ess=float(ess), prior_sd=_prior_sd(space, prior), diagnostics=diag)


# --- pieces ----------------------------------------------------------------------------------


def _profile_latency(space: _Space, model: "_Model", x, theta, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The latency (s) that best fits ``x`` for each candidate ``theta (B, n_params)``: one
    simulation per candidate, shifted to every sample of the latency range (the grid of
    ``protocol.fs``), each shift scored by its residual sum of squares with the gain that best
    scales it onto ``x`` (least squares, sign free; or the fixed gain), as :meth:`_Model.source`
    shifts and baseline-corrects. Returns the latencies ``(B,)`` (a candidate whose simulation is
    not finite gets the range's midpoint) and, with a fitted gain, the least-squares gain at each
    (``(B,)``, NaN where not finite; for :func:`_starts`, which then simulates nothing again)."""
    lo, hi = space.latency
    fs = model.protocol.fs
    grid = lo + np.arange(int(math.floor((hi - lo) * fs + 1e-9)) + 1) / fs
    times = np.asarray(model.protocol.times, np.float64)
    t0 = float(model.sim_protocol.times[0])
    best = np.full(len(theta), 0.5 * (lo + hi))
    proj = np.full(len(theta), np.nan)
    for s0 in range(0, len(theta), chunk):
        sim = np.asarray(model.source(jnp.asarray(theta[s0:s0 + chunk], jnp.float32), None), np.float64)
        n_sim = sim.shape[1]
        scores, gains = np.empty((len(grid), len(sim))), np.empty((len(grid), len(sim)))
        for j, tau in enumerate(grid):
            pos = np.clip((times - tau - t0) * fs, 0, n_sim - 1)
            i0 = np.minimum(np.floor(pos).astype(int), n_sim - 2)
            w = pos - i0
            m = sim[:, i0] * (1 - w) + sim[:, i0 + 1] * w
            if model.protocol.baseline:
                m = m - m[:, : model.n_pre].mean(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                if space.gain:
                    gains[j] = (m @ x) / np.sum(m**2, axis=1)
                    scores[j] = np.sum(x**2) - gains[j] * (m @ x)
                else:
                    scores[j] = np.sum((x - space.fixed_gain * m) ** 2, axis=1)
        scores = np.where(np.isfinite(scores), scores, np.inf)
        ok = np.isfinite(scores).any(axis=0)
        j_best = np.argmin(scores, axis=0)
        best[s0:s0 + chunk] = np.where(ok, grid[j_best], best[s0:s0 + chunk])
        if space.gain:
            proj[s0:s0 + chunk] = np.where(ok, gains[j_best, np.arange(len(sim))], np.nan)
    return best, proj


def _starts(space: _Space, comp, x, theta0, lat0, proj=None):
    """Start points ``z (K, d)`` and gain signs ``(K,)``: theta as given, latency ``lat0``, and the
    gain that best scales each start's model ERP onto ``x`` (least squares; ``proj`` when already
    computed, see :func:`_profile_latency`), clipped into its range."""
    u0, sign = [theta0], np.ones(len(theta0))
    if space.gain:
        if proj is None:
            m0 = np.asarray(comp["model"].source(jnp.asarray(theta0, jnp.float32),
                                                 None if lat0 is None else jnp.asarray(lat0, jnp.float32)), np.float64)
            with np.errstate(invalid="ignore", over="ignore"):
                proj = (m0 @ x) / np.maximum(np.sum(m0**2, axis=1), 1e-30)
        proj = np.where(np.isfinite(proj) & (proj != 0), proj, space.gain[0] * 10)
        sign = np.sign(proj)
        a, b = np.log(space.gain)
        u0.append(np.clip(np.log(np.abs(proj)), a + 0.01 * (b - a), b - 0.01 * (b - a))[:, None])
    if lat0 is not None:
        u0.append(np.asarray(lat0)[:, None])
    u0 = np.concatenate(u0, axis=1)
    return np.asarray(to_unbounded(jnp.asarray(u0, jnp.float32), comp["lows"], comp["highs"]), np.float64), sign


#: a MAP coordinate closer than this fraction of its prior range to a bound is reported (:func:`fit`)
_BOUND_FRACTION = 0.02


def _at_bounds(space: _Space, z, lows, highs) -> list[str]:
    """The names of the coordinates of ``z (d,)`` that lie within :data:`_BOUND_FRACTION` of their
    range (the prior's box; log|gain| and latency ranges) from a bound."""
    u = np.asarray(from_unbounded(jnp.asarray(z, jnp.float32), lows, highs), np.float64)
    lo, hi = np.asarray(lows, np.float64), np.asarray(highs, np.float64)
    frac = (u - lo) / (hi - lo)
    return [n for n, f in zip(space.names, frac) if not _BOUND_FRACTION <= f <= 1 - _BOUND_FRACTION]


def _to_units(space: _Space, z, sign, lows, highs) -> np.ndarray:
    """z ``(d,)`` -> the parameters in their units (the gain signed, not its log)."""
    u = np.asarray(from_unbounded(jnp.asarray(z, jnp.float32), lows, highs), np.float64)
    if space.gain:
        j = len(space.prior.names)
        u[j] = sign * math.exp(u[j])
    return u


_COMPILED: dict = {}


def _compiled(space: _Space, protocol: Protocol, max_steps: int):
    """The jitted solve, Jacobian, log posterior and model of one fit structure, built once per
    (prior, gain/latency ranges, protocol) (the solve also per ``max_steps``) so that later fits
    reuse the compilation."""
    import json

    key = json.dumps([space.prior.to_dict(), space.gain, space.latency, space.fixed_gain, protocol.to_dict()],
                     sort_keys=True, default=str)
    if key not in _COMPILED:
        model = _Model(space, protocol)
        lows, highs = jnp.asarray(space.lows, jnp.float32), jnp.asarray(space.highs, jnp.float32)
        residuals = _residual_fn(space, model, lows, highs)
        log_post = _batched_log_post(space, model, lows, highs)
        _COMPILED[key] = dict(
            model=model, lows=lows, highs=highs, log_post=log_post, log_post_jit=jax.jit(log_post),
            residuals=residuals, solve={},
            residuals_and_jac=jax.jit(jax.vmap(functools.partial(_residuals_and_jacobian, residuals),
                                               in_axes=(0, 0, None, None))),
            model_jit=jax.jit(lambda u, s: model(constrain_batch(u), constrain_batch(s))), prior_sd_derived=_prior_sd_derived(space.prior))
        _COMPILED[key]["smc"] = _smc_functions(space, log_post, lows, highs)
    comp = _COMPILED[key]
    if max_steps not in comp["solve"]:
        comp["solve"][max_steps] = _solve_batch(comp["residuals"], max_steps)
    return dict(comp, solve=comp["solve"][max_steps])


def _smc_functions(space: _Space, log_post, lows, highs) -> dict:
    """The SMC's densities in w (:func:`_w_from_z`) for one fit structure, with the observation and
    the Laplace mixture an argument ``data`` (``x``, ``noise_sd``, ``sign`` and
    :func:`_t_mixture_arrays`), not a constant: the same functions, kept in :data:`_COMPILED`, let
    :func:`jr_jax._likelihood.tempered_smc` compile its step once for every later fit.

    ``log_q(w (d,), data)``: the SMC's initial law, a mixture of the prior, the Laplace t mixture (in
    z) and the ridge mixture (in w, :func:`_ridge_mixture_arrays`) with the log shares
    ``data["log_shares"] (3,)``;
    ``log_target(w (d,), data)``: the log posterior (:func:`particle_batched`);
    ``log_post(w (B, d), data) -> (B,)``: the same, batched and jitted."""
    prior = space.prior
    k_par = len(prior.names)
    n_log = k_par if bool(np.all(np.asarray(prior.lows) > 0)) else 0
    extra_log_volume = float(np.sum(np.log(np.asarray(highs[k_par:]) - np.asarray(lows[k_par:]))))

    def log_prior_z(z):  # the prior in z: the model's prior, uniform gain (in log|gain|) and latency
        u = from_unbounded(z, lows, highs)
        return _log_prior(prior, u[..., :k_par]) - extra_log_volume + log_jacobian(z, lows, highs)

    def log_q(w, data):
        z, ldj, inside = _z_from_w(w[None], lows, highs, n_log)
        lp = log_prior_z(z)[0]
        lt = _t_mixture_logpdf_arrays(z, data)[0]
        lr = _ridge_mixture_logpdf_arrays(w[None], data)[0]
        parts = jnp.stack([lp + ldj[0], lt + ldj[0], lr]) + data["log_shares"]
        return jnp.where(inside[0], jax.scipy.special.logsumexp(parts), -jnp.inf)

    def log_post_w(wb, data):
        z, ldj, inside = _z_from_w(wb, lows, highs, n_log)
        lp = log_post(z, jnp.broadcast_to(data["sign"], wb.shape[:1]), data["x"], data["noise_sd"])
        return jnp.where(inside, lp + ldj, -jnp.inf)

    return dict(n_log=n_log, log_q=log_q, log_target=particle_batched(log_post_w), log_post=jax.jit(log_post_w))


def _w_from_z_host(z, space: _Space, n_log: int) -> np.ndarray:
    """:func:`_w_from_z` in float64 numpy, for draws made on the host: ``z (n, d) -> w (n, d)``."""
    z = np.asarray(z, np.float64)
    u = space.lows + (space.highs - space.lows) * scipy_expit(z)
    return np.concatenate([np.log(u[:, :n_log]), z[:, n_log:]], axis=1)


def _dw_dz(z, space: _Space, n_log: int) -> np.ndarray:
    """The diagonal Jacobian ``dw/dz (n, d)`` of :func:`_w_from_z` at ``z (n, d)``, in float64:
    d log(theta) / dz = (hi - lo) s (1 - s) / theta with s = sigmoid(z) for the first ``n_log``
    coordinates, 1 for the rest."""
    z = np.asarray(z, np.float64)
    lo, hi = np.asarray(space.lows, np.float64)[:n_log], np.asarray(space.highs, np.float64)[:n_log]
    sig = scipy_expit(z[:, :n_log])
    out = np.ones_like(z)
    out[:, :n_log] = (hi - lo) * sig * (1.0 - sig) / (lo + (hi - lo) * sig)
    return out


def _w_z_float64(w, lows, highs, n_log: int):
    """:func:`_z_from_w` in float64 numpy: ``(z, log |dz/dw|, inside)`` for ``w (n, d)`` (z is NaN
    and the log-determinant -inf outside the box)."""
    lo, hi = np.asarray(lows, np.float64)[:n_log], np.asarray(highs, np.float64)[:n_log]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        theta = np.exp(w[:, :n_log])
        inside = np.all((theta > lo) & (theta < hi), axis=1) & np.all(np.isfinite(w), axis=1)
        z = np.concatenate([np.log(theta - lo) - np.log(hi - theta), w[:, n_log:]], axis=1)
        ldj = np.sum(w[:, :n_log] + np.log(hi - lo) - np.log(theta - lo) - np.log(hi - theta), axis=1)
    z[~inside] = np.nan
    return z, np.where(inside, ldj, -np.inf), inside


def _w_from_z(z, lows, highs, n_log: int):
    """SMC coordinates from fit coordinates: log(theta) for the first ``n_log``, z for the rest."""
    u = from_unbounded(z, lows, highs)
    return jnp.concatenate([jnp.log(u[..., :n_log]), z[..., n_log:]], axis=-1)


def _z_from_w(w, lows, highs, n_log: int):
    """The inverse of :func:`_w_from_z`, with ``log |dz/dw|`` and whether w lies inside the box."""
    z, ldj, inside = log_to_unbounded(w[..., :n_log], lows[:n_log], highs[:n_log])
    return jnp.concatenate([z, w[..., n_log:]], axis=-1), ldj, inside


def _prior_residuals(prior: Prior):
    """``(z (..., d), u (..., d)) -> (..., d [+ n_params])``: the prior's residuals (module
    docstring): ``rho(z)`` for every coordinate, and ``(theta - mid) / sd`` for a normal prior."""
    k = len(prior.names)
    mid = jnp.asarray((prior.lows + prior.highs) / 2, jnp.float32)
    sd = jnp.asarray((prior.highs - prior.lows) / 4, jnp.float32)

    def residuals(z, u):
        if prior.kind == "normal":
            return jnp.concatenate([_soft_abs(z), (u[..., :k] - mid) / sd], axis=-1)
        return _soft_abs(z)

    return residuals


def _residual_fn(space, model, lows, highs):
    """``(z (d,), sign, x, noise_sd) -> r``: the data's residuals, then the prior's."""
    prior_residuals = _prior_residuals(space.prior)

    def residuals(z, sign, xj, noise_sd):
        u = from_unbounded(z, lows, highs)
        m = model(u[None], sign[None], differentiation="forward")[0]
        return jnp.concatenate([(xj - m) / noise_sd, prior_residuals(z, u)])

    return residuals


_LM_CHUNK = 25  # Levenberg-Marquardt steps between the checks of :func:`_solve_in_chunks`

_NEWTON_DECREMENT_TOL = 0.05
"""A start has converged when its Newton decrement ``g^T H^-1 g / 2`` (gradient and Gauss-Newton
Hessian of the -log posterior) is below this many nats: the quadratic model puts its optimum that
close, far inside the posterior's own spread of about d/2 nats."""


def _chunk_steps(max_steps: int) -> int:
    """Steps per chunk: ``max_steps`` split into equal chunks of at most :data:`_LM_CHUNK`."""
    n_chunks = -(-max_steps // _LM_CHUNK)
    return -(-max_steps // n_chunks)


def _newton_decrement(jac: np.ndarray, r: np.ndarray) -> float:
    """``g^T (J^T J)^-1 g / 2`` with ``g = J^T r`` (the pseudo-inverse of :func:`_laplace_cov`)."""
    g = jac.T @ r
    return float(0.5 * g @ _laplace_cov(jac) @ g)


def _solve_in_chunks(comp, z0, sign, x, noise_sd, max_steps: int, mode_tolerance: float, merge_distance: float):
    """Levenberg-Marquardt from every start ``z0 (K, d)`` in one batch, in chunks of
    :func:`_chunk_steps` steps (up to about ``max_steps`` in all). After each chunk a start is

    - converged: the solver reached its tolerance, or its Newton decrement is below
      :data:`_NEWTON_DECREMENT_TOL` (along the ridge and the sloppy directions the steps stay above
      the solver's tolerance long after the objective has stopped changing);
    - merged: it lies in the basin of a converged start no worse than it (squared distance in that
      start's Gauss-Newton metric below ``merge_distance``), where it would be counted in the same
      mode; solving it on would only refine a copy (reported as not converged, and in that mode);
    - stopped: it lies more than ``mode_tolerance`` nats above the best start and, at the rate it
      descended in its last chunk, the remaining chunks cannot bring it to the best (reported as
      not converged);
    - or solved on. The batch stops when no start is left to solve on.

    Returns ``z (K, d)``, ``converged (K,)``, ``steps (K,)``, residual Jacobians ``(K, R, d)``,
    ``-log posterior (K,)`` (all float64 / numpy), ``merged_into (K,)`` (the converged start a
    merged start joined, else -1) and diagnostics."""
    chunk = _chunk_steps(max_steps)
    n_chunks = -(-max_steps // chunk)
    k = z0.shape[0]
    z = jnp.asarray(z0, jnp.float32)
    steps = np.zeros(k, np.int64)
    lm_ok = np.zeros(k, bool)
    active = np.ones(k, bool)
    prev = np.full(k, np.inf)
    stopped = np.zeros(k, bool)
    merged_into = np.full(k, -1)
    for c in range(n_chunks):
        z_new, ok, st = comp["solve"](z, sign, x, noise_sd)
        keep = jnp.asarray(active)[:, None]
        z = jnp.where(keep, z_new, z)
        steps += np.where(active, np.asarray(st), 0)
        lm_ok |= active & np.asarray(ok)
        r, jac = comp["residuals_and_jac"](z, sign, x, noise_sd)
        r, jac = np.asarray(r, np.float64), np.asarray(jac, np.float64)
        nlp = 0.5 * np.sum(r**2, axis=1)
        finite = np.isfinite(nlp) & np.all(np.isfinite(jac), axis=(1, 2))
        dec = np.array([_newton_decrement(j, rr) if f else np.inf for j, rr, f in zip(jac, r, finite)])
        converged = finite & (lm_ok | (dec < _NEWTON_DECREMENT_TOL))
        best = np.min(np.where(finite, nlp, np.inf))
        remaining = n_chunks - c - 1
        with np.errstate(invalid="ignore"):
            hopeless = (nlp - best > mode_tolerance) & (nlp - best > remaining * np.maximum(prev - nlp, 0.0))
        zc = np.asarray(z, np.float64)
        merged_into[:] = -1
        for i in np.flatnonzero(finite & ~converged):
            for j in np.flatnonzero(converged)[np.argsort(nlp[converged])]:
                diff = zc[i] - zc[j]
                if nlp[j] <= nlp[i] and diff @ (jac[j].T @ (jac[j] @ diff)) <= merge_distance:
                    merged_into[i] = j
                    break
        stopped |= active & ~converged & finite & hopeless & (remaining > 0) & (merged_into < 0)
        active = active & finite & ~converged & ~hopeless & (merged_into < 0)
        prev = nlp
        if not active.any():
            break
    z = np.asarray(z, np.float64)
    return z, converged, steps, jac, nlp, merged_into, dict(
        solve_chunks=c + 1, starts_stopped=int(stopped.sum()), starts_merged=int(np.sum(merged_into >= 0)),
        newton_decrement=dec)


def _solve_batch(residuals, max_steps):
    """Jitted ``(z0 (K, d), sign (K,), x, noise_sd) -> (z (K, d), converged (K,), steps (K,))``:
    one Levenberg-Marquardt solve per start, vmapped."""
    import optimistix as optx

    solver = optx.LevenbergMarquardt(rtol=1e-3, atol=1e-3)
    fn = _forward_jacobian(residuals)

    @jax.jit
    def run(z0, sign, x, noise_sd):
        def one(z, s):
            sol = optx.least_squares(lambda zz, args: fn(zz, *args), solver, z, args=(s, x, noise_sd),
                                     max_steps=max_steps, throw=False)
            return sol.value, sol.result == optx.RESULTS.successful, sol.stats["num_steps"]

        return jax.vmap(one)(z0, sign)

    return run


def _forward_jacobian(residuals):
    """``residuals`` whose derivative in ``z`` is its Jacobian ``(R, d)``, computed with the value in
    one forward-mode pass (``jax.jacfwd``: the d tangents ride along the solve of the ERP) and then
    applied as a matrix. Levenberg-Marquardt linearises the residuals at every step and materialises
    that linear map; through the ERP's solve itself, ``jax.linearize`` would store the whole
    trajectory's linearisation and replay it for each of the d directions. The other arguments (the
    gain's sign, the data, the noise SD) are constants of the solve: they get no derivative."""

    @jax.custom_jvp
    def fn(z, sign, xj, noise_sd):
        return residuals(z, sign, xj, noise_sd)

    @fn.defjvp
    def _jvp(primals, tangents):
        r, jac = _residuals_and_jacobian(residuals, *primals)
        return r, jac @ tangents[0]

    return fn


def _residuals_and_jacobian(residuals, z, sign, xj, noise_sd):
    """``(r (R,), dr/dz (R, d))`` from one forward-mode pass (the value rides along the tangents)."""
    jac, r = jax.jacfwd(lambda zz: (residuals(zz, sign, xj, noise_sd),) * 2, has_aux=True)(z)
    return r, jac


def _laplace_cov(jac: np.ndarray) -> np.ndarray:
    """``(J^T J)^-1`` (Gauss-Newton), symmetrised; pseudo-inverse with a floor for a flat direction."""
    h = jac.T @ jac
    w, v = np.linalg.eigh(0.5 * (h + h.T))
    w = np.maximum(w, 1e-8 * max(w.max(), 1e-12))
    return (v / w) @ v.T


def _chi2_quantile(d: int, p: float) -> float:
    from scipy.stats import chi2

    return float(chi2.ppf(p, d))


_IS_ADAPT_ROUNDS = 3  # adaptive importance-sampling rounds after the first, while k-hat or the ESS fail

_SAMPLERS = ("auto", "laplace-importance", "smc")

_SMC_MAX_MOVE_ROUNDS = 5
"""At each SMC temperature, up to this many rounds of ``smc_mcmc_steps`` moves, until 90 % of the
particles have left the point they were resampled at (:func:`jr_jax._likelihood.tempered_smc`)."""

_N_SCREEN_PRIOR = 20000
"""Candidate starts screened without an estimator. On the shipped Left Auditory recording (keys 0-3,
8 starts) 1000 prior candidates left every fit in a worse optimum (posterior predictive chi2
1.60-1.61); 8000 left two fits of four there; 20 000 none (chi2 1.17-1.38), for about 4 s more."""

_SMC_PRIOR_SHARE = 0.1
"""The prior's share of the tempered SMC's initial law; the rest is the last importance proposal."""

_IS_EXTEND = 3  # further batches of n_proposal draws (in all rounds) while k-hat passes but the ESS is below 100

_RIDGE_SHARE = 0.8  # of the importance draws from the ridge-shaped mixture in log(theta) (when there is a ridge)

_T_DF = 5.0  # Student-t proposal: heavier tails than the Laplace Gaussian, for stable weights


def _t_mixture_sample(key, centres, chols, weights, n):
    """``n`` draws ``(n, d)`` from the mixture of multivariate t (``_T_DF`` degrees of freedom) with
    the given centres, Cholesky factors of the scale matrices and weights; and the components."""
    rng = _host_rng(key)
    which = rng.choice(len(weights), n, p=np.asarray(weights, np.float64) / np.sum(weights))
    d = centres.shape[1]
    eps = rng.standard_normal((n, d))
    g = rng.gamma(_T_DF / 2, size=n) / (_T_DF / 2)
    z = centres[which] + np.einsum("nij,nj->ni", chols[which], eps) / np.sqrt(g)[:, None]
    return z, which


def _t_mixture_logpdf(z, centres, chols, weights, xp=np, per_component: bool = False):
    """Log density of the t mixture at ``z (n, d)``; ``xp``: numpy, or jax.numpy under tracing
    (the factors come in float64 from the host: no factorisation in float32); ``(n, K)``, each
    weighted component's, with ``per_component`` (numpy)."""
    d = centres.shape[1]
    nu = _T_DF
    const = math.lgamma((nu + d) / 2) - math.lgamma(nu / 2) - 0.5 * d * math.log(nu * math.pi)
    parts = []
    for c, chol, w in zip(centres, chols, weights):
        inv = np.linalg.inv(chol)  # lower-triangular inverse, float64
        logdet = 2 * float(np.sum(np.log(np.diag(chol))))
        sol = (z - xp.asarray(c, z.dtype)) @ xp.asarray(inv.T, z.dtype)
        maha = xp.sum(sol**2, axis=-1)
        parts.append(math.log(w) + const - 0.5 * logdet - 0.5 * (nu + d) * xp.log1p(maha / nu))
    if xp is np:
        return np.stack(parts, axis=1) if per_component else np.logaddexp.reduce(np.stack(parts), axis=0)
    return jax.scipy.special.logsumexp(jnp.stack(parts), axis=0)


def _t_mixture_arrays(centres, chols, weights, n_components: int) -> dict:
    """The t mixture as arrays for :func:`_t_mixture_logpdf_arrays`, padded to ``n_components``
    components of weight 0, so that the arrays' shapes do not depend on how many modes a fit found:
    ``centres (K, d)``, ``inv_chols (K, d, d)`` (float64 inverses, given in float32) and ``log_const (K,)``."""
    k, d = centres.shape
    inv = np.zeros((n_components, d, d))
    inv[:] = np.eye(d)
    inv[:k] = np.linalg.inv(chols)
    c = np.zeros((n_components, d))
    c[:k] = centres
    nu = _T_DF
    const = math.lgamma((nu + d) / 2) - math.lgamma(nu / 2) - 0.5 * d * math.log(nu * math.pi)
    log_const = np.full(n_components, -np.inf)
    log_const[:k] = (np.log(weights) + const - np.sum(np.log(np.diagonal(chols, axis1=1, axis2=2)), axis=1))
    return dict(centres=jnp.asarray(c, jnp.float32), inv_chols=jnp.asarray(inv, jnp.float32),
                log_const=jnp.asarray(log_const, jnp.float32))


def _t_mixture_logpdf_arrays(z, data):
    """:func:`_t_mixture_logpdf` in jax.numpy from :func:`_t_mixture_arrays`: ``z (n, d) -> (n,)``."""
    d = z.shape[-1]
    sol = jnp.einsum("kij,nkj->nki", data["inv_chols"], z[:, None, :] - data["centres"][None])
    maha = jnp.sum(sol**2, axis=-1)
    parts = data["log_const"][None] - 0.5 * (_T_DF + d) * jnp.log1p(maha / _T_DF)
    return jax.scipy.special.logsumexp(parts, axis=1)


def _ridge_laplace_mixture(space: _Space, z_modes, jacs, n_times: int, n_log: int, ridge, weights_z):
    """A proposal in w (:func:`_w_from_z`) shaped like the posterior along the exact ridge, one
    component per mode (``z_modes (M, d)``, residual Jacobians ``jacs (M, R, d)`` in z):

    - across the ridge (the ``d - 1`` directions orthogonal to the unit ``ridge (d,)``), a Student-t
      on the Gauss-Newton precision in w of the data's residuals (the prior's residuals for the
      coordinates left in z), plus the precision of a Gaussian of the prior's SD in each coordinate,
      which bounds the sloppy directions to the prior's extent;
    - along it, where the likelihood is constant, the prior's own law: in log(theta) a uniform prior
      in theta has density exp(sum w), i.e. exp(beta t) with ``beta = sum(ridge)`` along
      ``w_c + t ridge``, on the segment inside the box (widened by 10 % at each end, since the box's
      ends move with the other coordinates), mixed 9:1 with a normal of the segment's length (tails).

    Returns a dict of float64 arrays for :func:`_ridge_mixture_sample` and
    :func:`_ridge_mixture_logpdf`."""
    from scipy.linalg import null_space

    lows, highs = space.lows, space.highs
    k_par = len(space.prior.names)
    d = len(lows)
    r = np.asarray(ridge, np.float64).reshape(d)
    basis = null_space(r[None])  # (d, d - 1), orthonormal, orthogonal to the ridge
    log_lo, log_hi = np.log(lows[:n_log]), np.log(highs[:n_log])
    prior_var = np.concatenate([((log_hi - log_lo) ** 2) / 12.0, np.full(d - n_log, math.pi**2 / 3)])
    rows = np.concatenate([np.arange(n_times), n_times + np.arange(n_log, d),
                           n_times + d + np.arange(k_par if space.prior.kind == "normal" else 0)])
    centres, chols, segments = [], [], []
    for z_c, jac in zip(z_modes, jacs):
        u = lows + (highs - lows) / (1.0 + np.exp(-z_c))
        w_c = np.concatenate([np.log(u[:n_log]), z_c[n_log:]])
        theta = u[:n_log]
        dz_dw = np.ones(d)
        dz_dw[:n_log] = theta * (highs[:n_log] - lows[:n_log]) / ((theta - lows[:n_log]) * (highs[:n_log] - theta))
        jw = jac[rows] * dz_dw[None]
        prec = basis.T @ (jw.T @ jw + np.diag(1.0 / prior_var)) @ basis
        ev, vec = np.linalg.eigh(0.5 * (prec + prec.T))
        ev = np.maximum(ev, 1e-12 * ev.max())
        chols.append(np.linalg.cholesky((vec / ev) @ vec.T))
        segments.append(_ridge_segment(w_c, r, space, n_log))
        centres.append(w_c)
    return dict(centres=np.stack(centres), chols=np.stack(chols), segments=np.asarray(segments), basis=basis,
                ridge=r, beta=float(np.sum(r[:n_log])), weights=np.asarray(weights_z, np.float64))


def _ridge_segment(w_c, r, space: _Space, n_log: int) -> tuple[float, float]:
    """The t with ``w_c + t r`` inside the box, widened by 10 % at each end."""
    log_lo, log_hi = np.log(space.lows[:n_log]), np.log(space.highs[:n_log])
    nz = np.abs(r[:n_log]) > 0
    a = (log_lo[nz] - w_c[:n_log][nz]) / r[:n_log][nz]
    b = (log_hi[nz] - w_c[:n_log][nz]) / r[:n_log][nz]
    t_lo, t_hi = float(np.max(np.minimum(a, b))), float(np.min(np.maximum(a, b)))
    pad = 0.1 * max(t_hi - t_lo, 1e-6)
    return t_lo - pad, t_hi + pad


def _adapt_ridge_mixture(mix: dict, w, weights, q_parts, space: _Space, n_log: int) -> dict:
    """The ridge mixture moved to importance draws ``w (n, d)`` with normalised ``weights (n,)``:
    each component's across-ridge centre and scale to the draws' weighted mean and the average of
    its old and the weighted covariance (the average keeps it full rank from few effective draws),
    its weight half old, half its share; ``q_parts (n, M)``: the components' log densities at the
    draws (the responsibilities)."""
    with np.errstate(invalid="ignore"):
        resp = np.exp(q_parts - np.logaddexp.reduce(q_parts, axis=1, keepdims=True))
    resp = np.where(np.isfinite(resp), resp, 0.0)
    basis, r = mix["basis"], mix["ridge"]
    centres, chols, segments = mix["centres"].copy(), mix["chols"].copy(), mix["segments"].copy()
    share = np.zeros(len(centres))
    for m in range(len(centres)):
        a = weights * resp[:, m]
        share[m] = a.sum()
        if share[m] < 1e-3:
            continue
        a = a / share[m]
        y = (w - centres[m]) @ basis
        mu = a @ y
        cov_w = (y - mu).T @ ((y - mu) * a[:, None])
        cov = 0.5 * (chols[m] @ chols[m].T) + 0.5 * cov_w
        centres[m] = centres[m] + basis @ mu
        chols[m] = np.linalg.cholesky(0.5 * (cov + cov.T) + 1e-12 * np.eye(len(cov)))
        segments[m] = _ridge_segment(centres[m], r, space, n_log)
    weights_new = 0.5 * mix["weights"] + 0.5 * share / max(share.sum(), 1e-300)
    return dict(mix, centres=centres, chols=chols, segments=segments, weights=weights_new / weights_new.sum())


def _ridge_log_norm(seg, beta) -> float:
    """log of the integral of exp(beta t) over the segment ``seg = (lo, hi)``."""
    lo, hi = seg
    if abs(beta) * (hi - lo) < 1e-8:
        return math.log(hi - lo)
    if beta > 0:
        return beta * hi + math.log(-math.expm1(-beta * (hi - lo))) - math.log(beta)
    return beta * lo + math.log(-math.expm1(beta * (hi - lo))) - math.log(-beta)


def _ridge_t_logpdf(t, seg, beta):
    """Log density along the ridge: 0.9 truncated exp(beta t) on ``seg`` + 0.1 normal of the segment."""
    lo, hi = seg
    log_norm = _ridge_log_norm(seg, beta)
    inside = (t >= lo) & (t <= hi)
    with np.errstate(divide="ignore"):
        trunc = np.where(inside, beta * t - log_norm, -np.inf)
    mid, sd = 0.5 * (lo + hi), hi - lo
    normal = -0.5 * ((t - mid) / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi))
    return np.logaddexp(math.log(0.9) + trunc, math.log(0.1) + normal)


def _ridge_mixture_sample(key, mix: dict, n: int):
    """``n`` draws ``(n, d)`` in w from :func:`_ridge_laplace_mixture`, and their components."""
    rng = _host_rng(key)
    weights = np.asarray(mix["weights"], np.float64)
    which = rng.choice(len(weights), n, p=weights / weights.sum())
    dm = mix["basis"].shape[1]
    eps = rng.standard_normal((n, dm))
    g = rng.gamma(_T_DF / 2, size=n) / (_T_DF / 2)
    perp = np.einsum("nij,nj->ni", mix["chols"][which], eps) / np.sqrt(g)[:, None]
    lo, hi = mix["segments"][which, 0], mix["segments"][which, 1]
    beta = mix["beta"]
    v = rng.uniform(size=n)
    if abs(beta) < 1e-8:
        t = lo + v * (hi - lo)
    else:  # inverse CDF of exp(beta t) on [lo, hi]
        t = lo + np.log1p(v * np.expm1(beta * (hi - lo))) / beta
    tails = rng.uniform(size=n) < 0.1
    t_normal = 0.5 * (lo + hi) + (hi - lo) * rng.standard_normal(n)
    t = np.where(tails, t_normal, t)
    w = mix["centres"][which] + perp @ mix["basis"].T + t[:, None] * mix["ridge"][None]
    return w, which


def _ridge_mixture_logpdf(w, mix: dict, per_component: bool = False) -> np.ndarray:
    """Log density of :func:`_ridge_laplace_mixture` at ``w (n, d)`` (``(n, M)``: each weighted
    component's, with ``per_component``)."""
    dm = mix["basis"].shape[1]
    nu = _T_DF
    const = math.lgamma((nu + dm) / 2) - math.lgamma(nu / 2) - 0.5 * dm * math.log(nu * math.pi)
    parts = []
    for c, chol, seg, wt in zip(mix["centres"], mix["chols"], mix["segments"], mix["weights"]):
        dw = w - c
        sol = np.linalg.solve(chol, (dw @ mix["basis"]).T).T
        maha = np.sum(sol**2, axis=1)
        lp_perp = const - float(np.sum(np.log(np.diag(chol)))) - 0.5 * (nu + dm) * np.log1p(maha / nu)
        parts.append(math.log(wt) + lp_perp + _ridge_t_logpdf(dw @ mix["ridge"], seg, mix["beta"]))
    return np.stack(parts, axis=1) if per_component else np.logaddexp.reduce(np.stack(parts), axis=0)


def _ridge_mixture_arrays(mix: dict | None, d: int, n_components: int) -> dict:
    """:func:`_ridge_laplace_mixture` as arrays for :func:`_ridge_mixture_logpdf_arrays`, padded to
    ``n_components`` components of weight 0 (``mix`` None: every component of weight 0, for a prior
    without the exact ridge), so that the shapes do not depend on the fit: ``r_centres (K, d)``,
    ``r_inv_chols (K, d - 1, d - 1)``, ``r_log_perp (K,)`` (log weight and normalisation across),
    ``r_segments (K, 2)``, ``r_log_norm (K,)`` (along), ``r_basis (d, d - 1)``, ``r_ridge (d,)``,
    ``r_beta ()``; float64 factors given in float32."""
    dm = d - 1
    centres, segments = np.zeros((n_components, d)), np.tile([0.0, 1.0], (n_components, 1))
    inv = np.tile(np.eye(dm), (n_components, 1, 1))
    log_perp, log_norm = np.full(n_components, -np.inf), np.zeros(n_components)
    basis, ridge, beta = np.zeros((d, dm)), np.zeros(d), 0.0
    if mix is not None:
        k = len(mix["centres"])
        nu = _T_DF
        const = math.lgamma((nu + dm) / 2) - math.lgamma(nu / 2) - 0.5 * dm * math.log(nu * math.pi)
        centres[:k], segments[:k], inv[:k] = mix["centres"], mix["segments"], np.linalg.inv(mix["chols"])
        with np.errstate(divide="ignore"):
            log_perp[:k] = (np.log(mix["weights"]) + const
                            - np.sum(np.log(np.diagonal(mix["chols"], axis1=1, axis2=2)), axis=1))
        log_norm[:k] = [_ridge_log_norm(seg, mix["beta"]) for seg in mix["segments"]]
        basis, ridge, beta = mix["basis"], mix["ridge"], mix["beta"]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return dict(r_centres=f32(centres), r_inv_chols=f32(inv), r_log_perp=f32(log_perp), r_segments=f32(segments),
                r_log_norm=f32(log_norm), r_basis=f32(basis), r_ridge=f32(ridge), r_beta=f32(beta))


def _ridge_mixture_logpdf_arrays(w, data):
    """:func:`_ridge_mixture_logpdf` in jax.numpy from :func:`_ridge_mixture_arrays`: ``w (n, d) -> (n,)``."""
    dm = data["r_basis"].shape[1]
    nu = _T_DF
    dw = w[:, None, :] - data["r_centres"][None]  # (n, K, d)
    sol = jnp.einsum("kij,nkj->nki", data["r_inv_chols"], dw @ data["r_basis"])
    lp_perp = data["r_log_perp"][None] - 0.5 * (nu + dm) * jnp.log1p(jnp.sum(sol**2, axis=-1) / nu)
    t = dw @ data["r_ridge"]  # (n, K)
    lo, hi = data["r_segments"][:, 0], data["r_segments"][:, 1]
    trunc = jnp.where((t >= lo) & (t <= hi), data["r_beta"] * t - data["r_log_norm"], -jnp.inf)
    sd = hi - lo
    normal = -0.5 * ((t - 0.5 * (lo + hi)) / sd) ** 2 - jnp.log(sd * math.sqrt(2 * math.pi))
    along = jnp.logaddexp(math.log(0.9) + trunc, math.log(0.1) + normal)
    return jax.scipy.special.logsumexp(lp_perp + along, axis=1)


class _Proposal:
    """The importance proposal q of one fit on the host, in its sampling coordinates v: w
    (:func:`_w_from_z`) when the prior has the exact ridge (``rmix``, :func:`_ridge_laplace_mixture`,
    gives :data:`_RIDGE_SHARE` of q; the Laplace t mixture in z the rest), else z (the t mixture
    alone). Each draw carries the sign of its component's gain; q's density at ``(v, sign)`` is
    that of the components of that sign."""

    def __init__(self, space, comp, xj, sd_j, centres, chols, weights, signs, rmix, n_log: int):
        self.space, self.comp, self.xj, self.sd_j = space, comp, xj, sd_j
        self.centres, self.chols, self.weights, self.signs = centres, chols, weights, signs
        self.rmix, self.n_log = rmix, n_log

    def sample(self, key, n: int, n_ridge: int | None = None):
        """``n`` draws ``(v (n, d), sign (n,))``: ``n_ridge`` (default ``round(_RIDGE_SHARE n)``) from the
        ridge mixture, the rest from the t mixture (stratified: the weights use the whole mixture's
        density)."""
        if self.rmix is None:
            z, which = _t_mixture_sample(key, self.centres, self.chols, self.weights, n)
            return z, self.signs[which]
        k_ridge, k_t = jax.random.split(key)
        n_ridge = int(round(_RIDGE_SHARE * n)) if n_ridge is None else n_ridge
        w_ridge, which_ridge = _ridge_mixture_sample(k_ridge, self.rmix, n_ridge)
        z_t, which_t = _t_mixture_sample(k_t, self.centres, self.chols, self.weights, n - n_ridge)
        w_t = _w_from_z_host(z_t, self.space, self.n_log)
        return np.concatenate([w_ridge, w_t]), self.signs[np.concatenate([which_ridge, which_t])]

    def _z(self, v):
        if self.rmix is None:
            return v, np.zeros(len(v)), np.all(np.isfinite(v), axis=1)
        z, ldj, inside = _w_z_float64(v, self.space.lows, self.space.highs, self.n_log)
        return np.where(inside[:, None], z, 0.0), ldj, inside

    def to_z(self, v):
        """Fit coordinates z of ``v``."""
        return self._z(v)[0]

    def log_q(self, v, sign, ridge_parts: bool = False):
        """log q at ``(v (n, d), sign (n,))``; with ``ridge_parts`` also the ridge components' weighted
        log densities ``(n, M)`` (None without the ridge)."""
        same = sign[:, None] == self.signs[None, :]
        z, ldj, inside = self._z(v)
        q_t = np.where(same, _t_mixture_logpdf(z, self.centres, self.chols, self.weights, per_component=True), -np.inf)
        if self.rmix is None:
            out, parts = np.logaddexp.reduce(q_t, axis=1), None
        else:
            parts = np.where(same, _ridge_mixture_logpdf(v, self.rmix, per_component=True), -np.inf)
            out = np.logaddexp(math.log(_RIDGE_SHARE) + np.logaddexp.reduce(parts, axis=1),
                               math.log(1 - _RIDGE_SHARE) + np.logaddexp.reduce(q_t, axis=1) + np.where(inside, ldj, 0.0))
        return (out, parts) if ridge_parts else out

    def log_post(self, v, sign):
        """The log posterior density in v (up to a constant; -inf outside the box or where the model
        diverges): one batched simulation per row."""
        z, ldj, inside = self._z(v)
        lp = _eval_log_post(self.comp["log_post_jit"], z, sign, self.xj, self.sd_j)
        return np.where(inside, lp + ldj, -np.inf)


def _batched_log_post(space, model, lows, highs):
    """``(z (B, d), sign (B,), x, noise_sd) -> -||r||^2 / 2 (B,)``: the log posterior in z up to a
    constant (-inf where the model diverges)."""
    prior_residuals = _prior_residuals(space.prior)

    def log_post(z, sign, xj, noise_sd):
        z, sign = constrain_batch(z), constrain_batch(sign)  # the batch split over the devices, if several
        u = from_unbounded(z, lows, highs)
        m = model(u, sign)
        val = -0.5 * jnp.sum(((xj - m) / noise_sd) ** 2, axis=1) - 0.5 * jnp.sum(prior_residuals(z, u) ** 2, axis=1)
        return jnp.where(jnp.isfinite(val), val, -jnp.inf)

    return log_post


def _batch_bucket(n: int, chunk: int) -> int:
    """The padded batch size for ``n`` evaluations: a power of two from 64 up to ``chunk``, so that a
    fit compiles the batched log posterior for a few shapes, not one per request."""
    return min(chunk, max(64, 1 << (int(n) - 1).bit_length()))


def _eval_log_post(fn, z, sign, x, noise_sd, chunk: int = 1024) -> np.ndarray:
    out = []
    for s in range(0, len(z), chunk):
        zc, sc = z[s:s + chunk], sign[s:s + chunk]
        n = len(zc)
        size = chunk if s > 0 else _batch_bucket(n, chunk)
        if n < size:  # pad to a compiled shape
            zc = np.concatenate([zc, np.repeat(zc[-1:], size - n, 0)])
            sc = np.concatenate([sc, np.repeat(sc[-1:], size - n)])
        zc, sc = _spread(jnp.asarray(zc, jnp.float32), jnp.asarray(sc, jnp.float32))
        out.append(np.asarray(fn(zc, sc, x, noise_sd), np.float64)[:n])
    return np.concatenate(out)


def _typical_rms(space: _Space, model: _Model, n: int = 256) -> float:
    """Median RMS (mV) of unit-gain model ERPs over the prior: the scale an estimator was trained at."""
    theta = space.prior.sample_array(jax.random.key(0), n)
    lat = None if not space.latency else jnp.full(n, (space.latency[0] + space.latency[1]) / 2, jnp.float32)
    m = np.asarray(model.source(theta, lat), np.float64)
    rms = np.sqrt(np.mean(m**2, axis=1))
    return float(np.median(rms[np.isfinite(rms)]))


def _prior_sd_derived(prior: Prior, n: int = 20000):
    """Prior SD of log(C*a_k) by Monte Carlo (``n`` draws; relative error about 1/sqrt(2n) = 0.5 %)."""
    from ._summary import derived_quantities

    draws = np.asarray(prior.sample_array(jax.random.key(1), n), np.float64)
    extra, labels = derived_quantities(draws, prior.names)
    return extra.std(axis=0, ddof=1) if labels else None

