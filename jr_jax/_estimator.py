"""A trained estimator: encoder + input scaler + target bounds + a JSON manifest."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._flow import from_unbounded, log_jacobian, to_unbounded
from ._nn import build_encoder
from ._solve import as_typed_key, per_sample_keys

MANIFEST = "manifest.json"
WEIGHTS = "model.eqx"


class MisspecificationWarning(UserWarning):
    """An ERP lies outside what the estimator was trained on (its answer is an extrapolation)."""


class EstimatorError(ValueError):
    """A saved estimator that cannot be read: a corrupt ``manifest.json`` or ``model.eqx``, or files
    written by another version of jr_jax or for another architecture than the manifest describes."""


#: Protocol fields that change what an ERP means, compared between an estimator's training protocol
#: and the protocol of the ERPs given to it (:func:`protocol_differences`). Not compared: how the
#: ERPs were computed (``burn_in``, ``dt``, ``solver``) and the measurement noise (``snr_db``,
#: ``noise_color``), which training adds itself.
PROTOCOL_FIELDS = ("stimulus.amplitude", "stimulus.duration", "stimulus.gains", "stimulus.shape", "n_trials", "fs",
                   "tmin", "tmax", "baseline", "lead_field")


def _same(a, b) -> bool:
    if a is None or b is None or isinstance(a, (bool, str)) or isinstance(b, (bool, str)):
        return a == b
    try:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    except (TypeError, ValueError):
        return a == b
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-6, atol=1e-12))


def _get(d: dict, field: str):
    for part in field.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


_MISSING = object()


def protocol_differences(recorded: dict, given: dict) -> list[str]:
    """The :data:`PROTOCOL_FIELDS` in which two ``Protocol.to_dict()`` descriptions differ, each as
    ``"field: recorded value vs given value"`` (empty when they agree).

    ``recorded``: the estimator's training protocol (``manifest["protocol"]``); ``given``: that of
    the ERPs (a dataset's, or the one passed to :meth:`Estimator.predict`). A field absent from
    either is not compared (older manifests), nor is a ``lead_field`` that either leaves unset.
    """
    out = []
    for field in PROTOCOL_FIELDS:
        a, b = _get(recorded, field), _get(given, field)
        if a is _MISSING or b is _MISSING or (field == "lead_field" and (a is None or b is None)):
            continue
        if not _same(a, b):
            out.append(f"{field}: {a!r} vs {b!r}")
    return out


def prior_differences(recorded: dict, given: dict) -> list[str]:
    """How two ``Prior.to_dict()`` descriptions differ, each as ``"field: recorded vs given"``:
    ``kind``, ``names``, each parameter's ``bounds``, and the dynamics' noise ``base.sigma``
    (noise-free if 0) when sigma is not among the varied parameters. Absent fields are not compared."""
    out = []
    for field in ("kind", "names"):
        a, b = recorded.get(field, _MISSING), given.get(field, _MISSING)
        if a is not _MISSING and b is not _MISSING and not _same(list(a) if field == "names" else a,
                                                                 list(b) if field == "names" else b):
            out.append(f"{field}: {a!r} vs {b!r}")
    ra, rb = recorded.get("bounds") or {}, given.get("bounds") or {}
    for name in ra:
        if name in rb and not _same(ra[name], rb[name]):
            out.append(f"bounds.{name}: {list(ra[name])!r} vs {list(rb[name])!r}")
    names = set(recorded.get("names", ())) | set(given.get("names", ()))
    a, b = _get(recorded, "base.sigma"), _get(given, "base.sigma")
    if "sigma" not in names and a is not _MISSING and b is not _MISSING and not _same(a, b):
        def text(v):
            return f"{v!r} ({'noise-free' if not np.any(np.asarray(v)) else 'noisy'} dynamics)"
        out.append(f"base.sigma: {text(a)} vs {text(b)}")
    return out


# predict refuses an ERP whose RMS lies more than this factor outside the range seen in training
# (the 0.1th percentile to the maximum): the network has never seen such amplitudes
SCALE_MARGIN = 10.0


def scale_input(erp, x_mean, x_std):
    """Network input from ERPs in mV: asinh((erp - mean) / scale), per channel.

    JR ERPs span four decades of amplitude across the prior (about 0.1 to 400 mV RMS); asinh keeps
    sign and order, is linear near 0 and logarithmic for large values, so small and large ERPs
    both reach the network at a usable scale. ``x_std`` is the median RMS of training ERPs.
    """
    return jnp.arcsinh((erp - x_mean) / x_std)


class Estimator(eqx.Module):
    """Predicts JR parameters (in their units) from an ERP (mV).

    ``encoder``: network on scaled input ``(n_times, n_channels)`` returning targets scaled to
    [0, 1] by the prior bounds. ``x_mean``/``x_std`` (per channel) come from the training split
(see :func:`scale_input`).
    ``manifest``: architecture, parameter names/units/bounds, the protocol's fs, epoch window and
    n_trials, the training SNRs, the ERP scale seen in training, versions.
    """

    encoder: eqx.Module
    x_mean: jax.Array
    x_std: jax.Array
    manifest: dict = eqx.field(static=True)

    @property
    def kind(self) -> str:
        """``"posterior"`` (a conditional flow: :meth:`sample`, :meth:`posterior`) or ``"point"``."""
        return str(self.manifest.get("kind", "point"))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.manifest["names"])

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(self.manifest["units"])

    @property
    def lows(self) -> np.ndarray:
        return np.asarray(self.manifest["lows"])

    @property
    def highs(self) -> np.ndarray:
        return np.asarray(self.manifest["highs"])

    @property
    def n_times(self) -> int:
        return int(self.manifest["n_times"])

    @property
    def n_channels(self) -> int:
        return int(self.manifest["n_channels"])

    @property
    def baseline(self) -> bool:
        """Whether the training ERPs had their pre-stimulus mean subtracted (older manifests: True)."""
        return bool(self.manifest.get("baseline", True))

    def scaled_output(self, x: jax.Array) -> jax.Array:
        """Point regressor's output for a batch of ERPs ``(B, n_times, n_channels)`` in mV, targets in [0, 1] units."""
        x = scale_input(x, self.x_mean, self.x_std)
        return self.encoder.batch(x, inference=True)

    def _check(self, erp, fs) -> np.ndarray:
        if fs is not None and not np.isclose(float(fs), self.manifest["fs"]):
            raise ValueError(f"erp sampled at fs={fs} Hz, but this estimator was trained at "
                             f"{self.manifest['fs']} Hz: resample it first")
        raw = np.asarray(erp)
        if raw.dtype.kind not in "iuf":
            raise TypeError(f"erp must be numbers (mV), got an array of dtype {raw.dtype} "
                            f"({'strings' if raw.dtype.kind in 'US' else 'objects' if raw.dtype.kind == 'O' else raw.dtype.kind}): "
                            "convert it with np.asarray(erp, dtype=float) after checking its contents")
        x = raw.astype(np.float32)
        c = self.n_channels
        if c == 1 and x.ndim >= 1 and x.shape[-1] == self.n_times:
            x = x[..., None]
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (self.n_times, c):
            raise ValueError(f"erp must have shape (n_times,), (N, n_times) or (N, n_times, {c}) with n_times = "
                             f"{self.n_times} ({self.manifest['tmin']} to {self.manifest['tmax']} s at "
                             f"{self.manifest['fs']} Hz); got {np.shape(erp)}")
        bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if bad.any():
            raise ValueError(f"erp has NaN or infinite values in sample(s) {np.flatnonzero(bad)[:10].tolist()}")
        rms = np.sqrt((x**2).mean(axis=(1, 2)))
        lo, hi = self.manifest["rms_range_mv"]
        wrong = (rms < lo / SCALE_MARGIN) | (rms > hi * SCALE_MARGIN)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise ValueError(f"erp sample {i} has RMS {rms[i]:.3g}, more than {SCALE_MARGIN:g}x outside the "
                             f"{lo:.3g}..{hi:.3g} mV seen in training: jr_jax ERPs are in mV (volts from MNE must be "
                             "multiplied by 1e3; jr_jax.eeg.from_evoked does it)")
        if self.baseline and float(self.manifest["tmin"]) < 0:
            n_pre = int(round(-float(self.manifest["tmin"]) * float(self.manifest["fs"])))
            pre = x[:, :n_pre, :]
            offset = np.abs(pre.mean(axis=1)).max(axis=1)
            spread = pre.std(axis=1).max(axis=1)
            shifted = offset > 0.5 * spread + 1e-3 * rms
            if shifted.any():
                i = int(np.flatnonzero(shifted)[0])
                raise ValueError(f"erp sample {i} has a pre-stimulus mean of {float(pre[i].mean()):.3g} mV, but this "
                                 "estimator was trained on baseline-corrected ERPs (the mean over tmin <= t < 0 "
                                 "removed): subtract it first (jr_jax.eeg.from_evoked does it)")
        return x

    def _check_protocol(self, protocol) -> None:
        """Refuse ERPs made with a protocol that differs from the training one (:func:`protocol_differences`)."""
        if protocol is None:
            return
        from ._simulate import Protocol

        if not isinstance(protocol, Protocol):
            raise TypeError(f"protocol must be a jr_jax.Protocol (how the ERP was made), got {type(protocol).__name__}")
        recorded = self.manifest.get("protocol") or {k: self.manifest[k] for k in ("fs", "tmin", "tmax")
                                                     if k in self.manifest}
        diff = protocol_differences(recorded, protocol.to_dict())
        if diff:
            raise ValueError("the ERP's protocol differs from the one this estimator was trained on (estimator vs "
                             "ERP): " + "; ".join(diff) + ". Its answer would not mean the same: train an estimator "
                             "for this protocol")

    def embedding_distance(self, erp, *, fs: float | None = None) -> np.ndarray:
        """Squared Mahalanobis distance ``(N,)`` of each ERP's embedding from those of the noisy
        validation ERPs seen in training (posterior estimators); compare with
        ``manifest["embedding_check"]["threshold"]`` (1.5 x the largest among held-out validation ERPs)."""
        self._require_posterior("embedding_distance")
        check = self.manifest.get("embedding_check")
        if not check:
            raise ValueError("this estimator's manifest has no embedding statistics (trained before they were recorded)")
        return _mahalanobis2(_embed_jit(self, jnp.asarray(self._check(erp, fs))), check)

    def _warn_if_unlike_training(self, emb) -> None:
        """Warn for embeddings ``emb (N, E)`` beyond the manifest's threshold (see :meth:`sample`)."""
        check = self.manifest.get("embedding_check")
        if not check:
            return
        d2 = _mahalanobis2(emb, check)
        far = d2 > check["threshold"]
        if far.any():
            i = int(np.flatnonzero(far)[0])
            warnings.warn(f"{int(far.sum())} of {len(d2)} ERP(s) (first: sample {i}) lie farther from the training "
                          f"ERPs than 1.5 x any of {check['n']} held-out validation ERPs (embedding distance {d2[i]:.3g} > "
                          f"{check['threshold']:.3g}): a different stimulus, window, units or an artefact? Their "
                          "posteriors are extrapolations; jr_jax.correct_posterior checks them against the likelihood",
                          MisspecificationWarning, stacklevel=3)

    def _single(self, erp) -> bool:
        return np.ndim(erp) == 1 or (self.n_channels > 1 and np.ndim(erp) == 2)

    def _require_posterior(self, what: str) -> None:
        if self.kind != "posterior":
            raise TypeError(f"{what} needs a posterior estimator (jr_jax.train(..., kind='posterior')); this one is "
                            f"kind={self.kind!r} and gives point estimates only (predict)")

    def predict_array(self, erp, *, fs: float | None = None, protocol=None) -> np.ndarray:
        """Parameters ``(N, n_params)`` (or ``(n_params,)`` for one ERP) in their units.

        A posterior estimator returns the posterior mean, estimated from
        ``POSTERIOR_MEAN_DRAWS`` draws with a fixed key (so the same ERP gives the same answer).
        ``protocol``: see :meth:`predict`.
        """
        if self.kind == "posterior":
            draws = self.sample(erp, POSTERIOR_MEAN_DRAWS, key=jax.random.key(0), fs=fs, protocol=protocol)
            return draws.mean(axis=-2)
        self._check_protocol(protocol)
        single = self._single(erp)
        x = self._check(erp, fs)
        scaled = np.asarray(_predict_jit(self, jnp.asarray(x)))
        theta = self.lows + scaled * (self.highs - self.lows)
        return theta[0] if single else theta

    def sample(self, erp, n: int, *, key, fs: float | None = None, protocol=None,
               check_distribution: bool = True) -> np.ndarray:
        """Posterior draws in the parameters' units: ``(n, n_params)`` for one ERP, ``(N, n, n_params)``
        for a batch ``(N, n_times[, n_channels])`` (mV). Every draw lies inside the prior box.

        The ERP's embedding is computed once per ERP; ERP i uses ``fold_in(key, i)``. Refused (as in
        :meth:`predict`): a wrong length or rate, NaNs, an amplitude far outside training, a
        pre-stimulus offset for a baseline-corrected model. With ``check_distribution``, a
        :class:`MisspecificationWarning` names ERPs whose embedding lies farther from the training
        ERPs' than 1.5 x any held-out validation ERP's (:meth:`embedding_distance`). ``protocol``:
        see :meth:`predict`.
        """
        self._require_posterior("sample")
        self._check_protocol(protocol)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n (draws per ERP) must be an integer >= 1, got {n!r}")
        key = as_typed_key(key)
        if key.shape != ():
            raise ValueError(f"key must be a single key, got shape {key.shape}")
        single = self._single(erp)
        x = self._check(erp, fs)
        emb = _embed_jit(self, jnp.asarray(x))  # one embedding per ERP, for the check and the draws
        if check_distribution:
            self._warn_if_unlike_training(emb)
        z = np.asarray(_sample_z_jit(self, emb, key, int(n)), np.float64)
        theta = np.asarray(from_unbounded(z, self.lows, self.highs))
        # float32 rounding of sigmoid(z) can land on a bound: keep draws strictly inside the box
        span = self.highs - self.lows
        theta = np.clip(theta, self.lows + 1e-7 * span, self.highs - 1e-7 * span)
        return theta[0] if single else theta

    def log_prob(self, theta, erp, *, fs: float | None = None) -> np.ndarray:
        """Log posterior density ``log q(theta | erp)`` in the parameters' units (the Jacobian of the
        logit map included): ``theta (n, n_params)`` for one ERP gives ``(n,)``; ``(N, n, n_params)``
        for N ERPs gives ``(N, n)``. ``-inf`` outside the prior box."""
        self._require_posterior("log_prob")
        single = self._single(erp)
        x = self._check(erp, fs)
        theta = np.asarray(theta, np.float64)
        d = len(self.names)
        if theta.ndim != (2 if single else 3) or theta.shape[-1] != d or (not single and len(theta) != len(x)):
            raise ValueError(f"theta must have shape (n, {d}) for one ERP or (N, n, {d}) for N ERPs; got {theta.shape}"
                             f" for {len(x)} ERP(s)")
        if single:
            theta = theta[None]
        inside = np.all((theta > self.lows) & (theta < self.highs), axis=-1)
        safe = np.where(inside[..., None], theta, (self.lows + self.highs) / 2)
        z = np.asarray(to_unbounded(safe, self.lows, self.highs), np.float32)
        lp = np.asarray(_log_prob_z_jit(self, jnp.asarray(x), jnp.asarray(z)), np.float64)
        lp = lp - np.asarray(log_jacobian(z.astype(np.float64), self.lows, self.highs))
        lp = np.where(inside, lp, -np.inf)
        return lp[0] if single else lp

    def posterior(self, erp, n: int = 1000, *, key, level: float = 0.9, fs: float | None = None, protocol=None):
        """Posterior summary of one ERP or a batch: mean, median, SD and central ``level`` credible
        intervals per parameter and per identifiable combination log(C a_k) (see
        :class:`PosteriorSummary`), from ``n`` draws. ``protocol``: see :meth:`predict`."""
        from ._summary import PosteriorSummary

        draws = self.sample(erp, n, key=key, fs=fs, protocol=protocol)
        return PosteriorSummary.from_draws(draws, self.names, self.units, level=level, prior_sd=self.prior_sd())

    def prior_draws(self, n: int = 20000, *, seed: int = 0) -> np.ndarray:
        """Draws ``(n, n_params)`` of the training prior (from the manifest; a uniform box over the
        bounds for estimators trained on arrays without a recorded prior)."""
        if self.manifest.get("prior"):
            from ._params import Prior

            prior = Prior.from_dict(self.manifest["prior"])
            return np.asarray(prior.sample_array(jax.random.key(seed), n), np.float64)
        u = np.random.default_rng(seed).random((n, len(self.names)))
        return self.lows + u * (self.highs - self.lows)

    def prior_sd(self) -> np.ndarray:
        """Prior SD of each parameter and each log(C*a_k) (the denominators of the contraction)."""
        from ._summary import derived_quantities

        draws = self.prior_draws()
        extra, _ = derived_quantities(draws, self.names)
        return np.concatenate([draws, extra], axis=-1).std(axis=0, ddof=1)

    def predict(self, erp, *, fs: float | None = None, protocol=None) -> dict[str, np.ndarray]:
        """Parameters by name (arrays of shape ``(N,)``, or scalars for one ERP), in their units.

        ``erp``: ``(n_times,)``, ``(N, n_times)`` or with channels, in mV, sampled at the
        estimator's fs (pass ``fs`` to have it checked). Raises ``ValueError`` for a wrong length,
        rate, NaNs or values whose scale is not that of ERPs in mV.

        ``protocol``: optionally, the :class:`jr_jax.Protocol` describing how the ERP was made;
        an ERP whose stimulus (amplitude, duration, gains, shape), ``n_trials``, ``fs``, epoch
        (``tmin``, ``tmax``) or ``baseline`` differs from the training protocol recorded in the
        manifest is refused with a ``ValueError`` naming each difference (:func:`protocol_differences`;
        manifests without a protocol: ``fs``, ``tmin`` and ``tmax`` only).
        """
        theta = self.predict_array(erp, fs=fs, protocol=protocol)
        return {name: theta[..., j] for j, name in enumerate(self.names)}

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``model.eqx`` (``eqx.tree_serialise_leaves``) and ``manifest.json`` into ``directory``."""
        d = Path(directory)
        if (d / MANIFEST).exists() and not overwrite:
            raise FileExistsError(f"{d} already holds an estimator; pass overwrite=True to replace it")
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{WEIGHTS}.tmp"
        eqx.tree_serialise_leaves(tmp, self)
        os.replace(tmp, d / WEIGHTS)
        (d / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Estimator":
        """The estimator saved by :meth:`save` in ``directory``.

        Raises ``FileNotFoundError`` if a file is missing and :class:`EstimatorError` (a
        ``ValueError``) if ``manifest.json`` or ``model.eqx`` cannot be read: corrupt (truncated,
        overwritten), or written by another version of jr_jax or for another architecture.
        """
        from . import __version__

        d = Path(directory)
        if not (d / MANIFEST).is_file() or not (d / WEIGHTS).is_file():
            raise FileNotFoundError(f"{d} is not a saved jr_jax estimator (needs {MANIFEST} and {WEIGHTS})")
        try:
            manifest = json.loads((d / MANIFEST).read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EstimatorError(f"{d / MANIFEST} is corrupt: not valid JSON ({e}); save the estimator again") from None
        if not isinstance(manifest, dict):
            raise EstimatorError(f"{d / MANIFEST} is corrupt: a JSON {type(manifest).__name__}, not an estimator's "
                                 "manifest (an object)")
        versions = manifest.get("versions")
        written = versions.get("jr_jax") if isinstance(versions, dict) else None
        origin = (f"written by jr_jax {written}, this is {__version__}" if written else f"this is jr_jax {__version__}")
        try:
            like = cls.skeleton(manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EstimatorError(f"{d / MANIFEST} does not describe an estimator this jr_jax can build "
                                 f"({type(e).__name__}: {e}): it is corrupt or was written by another version of "
                                 f"jr_jax ({origin})") from None
        with open(d / WEIGHTS, "rb") as f:  # a file that cannot be opened (permissions) raises as it is
            try:
                estimator = eqx.tree_deserialise_leaves(f, like)
                trailing = f.read(1)
            except (RuntimeError, ValueError, EOFError, TypeError, OSError) as e:
                error = e
            else:
                error = None
        if error is not None:
            cause = error  # equinox wraps the reader's error once per level of the tree
            while cause.__cause__ is not None:
                cause = cause.__cause__
            path = getattr(error, "path", None)
            where = f" at {jax.tree_util.keystr(tuple(path))}" if path else ""
            text = str(cause).splitlines()[0].split(". ")[0] if str(cause) else ""  # its first sentence
            reason = f"{type(cause).__name__}{where}: {text}"[:200]
            raise EstimatorError(f"{d / WEIGHTS} cannot be read as the weights {MANIFEST} describes ({reason}): it "
                                 "is corrupt (truncated or overwritten) or was written by another version of jr_jax "
                                 f"or for another architecture ({origin}); save or train the estimator again") from None
        if trailing:
            raise EstimatorError(f"{d / WEIGHTS} is longer than the weights {MANIFEST} describes: it is corrupt or "
                                 "was written for another architecture than the manifest's "
                                 f"({origin}); save or train the estimator again")
        return estimator

    @classmethod
    def skeleton(cls, manifest: dict) -> "Estimator":
        """An estimator with the manifest's structure (weights to be filled in)."""
        c = int(manifest["n_channels"])
        encoder = build_encoder(manifest["encoder"], key=jax.random.key(0))
        return cls(encoder, jnp.zeros((c,)), jnp.ones((c,)), manifest)


#: draws behind a posterior estimator's ``predict`` (the posterior mean's Monte Carlo SD is the
#: posterior SD / sqrt(1000), about 3 % of it)
POSTERIOR_MEAN_DRAWS = 1000


@eqx.filter_jit
def _predict_jit(estimator: Estimator, x):
    return estimator.scaled_output(x)


@eqx.filter_jit
def _embed_jit(estimator: Estimator, x):
    return estimator.encoder.embed(scale_input(x, estimator.x_mean, estimator.x_std), inference=True)


@eqx.filter_jit
def _sample_z_jit(estimator: Estimator, emb, key, n: int):
    """``n`` draws of z per embedding ``emb (N, E)``; ERP i uses ``fold_in(key, i)``."""
    return jax.vmap(lambda k, e: estimator.encoder.sample_z(k, n, e))(per_sample_keys(key, len(emb)), emb)


def _mahalanobis2(emb, check: dict) -> np.ndarray:
    """Squared Mahalanobis distances ``(N,)`` of embeddings ``(N, E)`` under ``manifest["embedding_check"]``."""
    diff = (np.asarray(emb, np.float64) - np.asarray(check["mean"])).T
    return np.sum(np.linalg.solve(np.asarray(check["chol"]), diff) ** 2, axis=0)


@eqx.filter_jit
def _log_prob_z_jit(estimator: Estimator, x, z):
    emb = _embed_jit(estimator, x)  # (N, E)
    return jax.vmap(lambda zi, e: estimator.encoder.log_prob_z(zi, jnp.broadcast_to(e, (zi.shape[0],) + e.shape)))(z, emb)
