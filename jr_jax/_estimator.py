"""A trained estimator: encoder + input scaler + target bounds + a JSON manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._nn import build_encoder

MANIFEST = "manifest.json"
WEIGHTS = "model.eqx"
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
        """Network output for a batch of ERPs ``(B, n_times, n_channels)`` in mV, targets in [0, 1] units."""
        x = scale_input(x, self.x_mean, self.x_std)
        return self.encoder.batch(x, inference=True)

    def _check(self, erp, fs) -> np.ndarray:
        if fs is not None and not np.isclose(float(fs), self.manifest["fs"]):
            raise ValueError(f"erp sampled at fs={fs} Hz, but this estimator was trained at "
                             f"{self.manifest['fs']} Hz: resample it first")
        x = np.asarray(erp, dtype=np.float32)
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
        return x

    def predict_array(self, erp, *, fs: float | None = None) -> np.ndarray:
        """Parameters ``(N, n_params)`` (or ``(n_params,)`` for one ERP) in their units."""
        single = np.ndim(erp) == 1 or (self.n_channels > 1 and np.ndim(erp) == 2)
        x = self._check(erp, fs)
        scaled = np.asarray(_predict_jit(self, jnp.asarray(x)))
        theta = self.lows + scaled * (self.highs - self.lows)
        return theta[0] if single else theta

    def predict(self, erp, *, fs: float | None = None) -> dict[str, np.ndarray]:
        """Parameters by name (arrays of shape ``(N,)``, or scalars for one ERP), in their units.

        ``erp``: ``(n_times,)``, ``(N, n_times)`` or with channels, in mV, sampled at the
        estimator's fs (pass ``fs`` to have it checked). Raises ``ValueError`` for a wrong length,
        rate, NaNs or values whose scale is not that of ERPs in mV.
        """
        theta = self.predict_array(erp, fs=fs)
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
        d = Path(directory)
        if not (d / MANIFEST).is_file() or not (d / WEIGHTS).is_file():
            raise FileNotFoundError(f"{d} is not a saved jr_jax estimator (needs {MANIFEST} and {WEIGHTS})")
        manifest = json.loads((d / MANIFEST).read_text())
        like = cls.skeleton(manifest)
        return eqx.tree_deserialise_leaves(d / WEIGHTS, like)

    @classmethod
    def skeleton(cls, manifest: dict) -> "Estimator":
        """An estimator with the manifest's structure (weights to be filled in)."""
        c = int(manifest["n_channels"])
        encoder = build_encoder(manifest["encoder"], key=jax.random.key(0))
        return cls(encoder, jnp.zeros((c,)), jnp.ones((c,)), manifest)


@eqx.filter_jit
def _predict_jit(estimator: Estimator, x):
    return estimator.scaled_output(x)
