"""A measured ERP as one signal for :func:`jr_jax.fit`: a channel, or a leading spatial mode, in mV
on a protocol's grid, with its measurement-noise SD estimated from the pre-stimulus baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Rates (Hz) tried for a recording's protocol, highest first: each sampling period is a whole
# number of the default solver step (0.25 ms).
_GRID_RATES = (1000.0, 500.0, 250.0, 200.0, 125.0, 100.0)

MIN_BASELINE_SAMPLES = 20
"""Fewest pre-stimulus samples from which a noise SD is estimated (relative SE of the SD about
1 / sqrt(2 (n - 1)), 16 % at 20 samples of white noise)."""


@dataclass(frozen=True)
class Recording:
    """One measured ERP signal ready for :func:`jr_jax.fit`.

    - ``erp (n_times,)``: the signal in mV on ``protocol.times`` (baseline-corrected if the
      protocol says so); for a spatial mode, ``weights @ data`` with unit-norm ``weights``;
    - ``noise_sd``: SD (mV) of the signal over ``tmin <= t < 0``, the noise level the fit uses;
    - ``signal``: ``"channel <name>"`` or ``"mode <k>"``; ``weights (n_channels,)`` and
      ``ch_names`` the channels behind it (one weight of 1 for a channel);
    - ``explained_variance``: the mode's share of the sensor data's variance (1 for a channel);
    - ``condition``, ``nave``: the Evoked's comment and number of averaged epochs.
    """

    erp: np.ndarray
    protocol: object
    noise_sd: float
    signal: str
    weights: np.ndarray
    ch_names: tuple[str, ...]
    explained_variance: float
    condition: str
    nave: int


def sample_recording() -> str:
    """Path of the shipped ``sample_audvis-ave.fif.gz``: real evoked EEG/MEG of MNE's sample subject
    (four auditory/visual conditions, nave 3-6, 60 EEG channels, 600.6 Hz, -0.2 to 0.5 s; BSD-3,
    see ``jr_jax/eeg/data/README.md``)."""
    import os

    return os.path.join(os.path.dirname(__file__), "data", "sample_audvis-ave.fif.gz")


def baseline_noise_sd(erp, protocol) -> float:
    """SD (mV, ddof 1) of ``erp (n_times,)`` over the protocol's pre-stimulus samples ``t < 0``.

    Raises ``ValueError`` when fewer than :data:`MIN_BASELINE_SAMPLES` samples precede the onset,
    or when the baseline is flat (SD 0) or not finite."""
    n_pre = int(round(-protocol.tmin * protocol.fs))
    if n_pre < MIN_BASELINE_SAMPLES:
        raise ValueError(f"the baseline has {n_pre} pre-stimulus samples ({protocol.tmin} to 0 s at {protocol.fs:g} Hz); "
                         f"estimating the noise SD needs at least {MIN_BASELINE_SAMPLES}: pass noise_sd (mV) or use a "
                         "protocol with an earlier tmin")
    sd = float(np.std(np.asarray(erp, np.float64)[:n_pre], ddof=1))
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"the baseline (t < 0) is flat or not finite (SD {sd:.3g} mV): cannot estimate the noise; "
                         "pass noise_sd (mV)")
    return sd


def recording_protocol(evoked, *, condition=0, fs: float | None = None, **fields):
    """A :class:`jr_jax.Protocol` on a recording's window: the highest of 1000, 500, 250, 200, 125,
    100 Hz not above its rate (or ``fs``), ``tmin``/``tmax`` the first/last grid points inside its
    epoch, baseline correction on. ``fields``: other Protocol fields (e.g. ``stimulus``,
    ``burn_in``)."""
    from .._simulate import Protocol
    from ._evoked import _read

    ev = _read(evoked, condition)
    sfreq = float(ev.info["sfreq"])
    if fs is None:
        usable = [r for r in _GRID_RATES if r <= sfreq * (1 + 1e-9)]
        if not usable:
            raise ValueError(f"the recording is sampled at {sfreq:g} Hz, below the lowest model rate {_GRID_RATES[-1]:g} Hz")
        fs = usable[0]
    t0, t1 = float(ev.times[0]), float(ev.times[-1])
    tmin = math.ceil(t0 * fs - 1e-6) / fs
    tmax = math.floor(t1 * fs + 1e-6) / fs
    if not tmin < 0 < tmax:
        raise ValueError(f"the recording's epoch {t0:.4g} to {t1:.4g} s must contain the stimulus onset t = 0 with "
                         "samples on both sides")
    fields.setdefault("baseline", True)
    return Protocol(fs=float(fs), tmin=round(tmin, 9), tmax=round(tmax, 9), **fields)


def signal_from_evoked(evoked, *, protocol=None, condition=0, channel: str | None = None, mode: int | None = None,
                       reference: str | None = "average") -> Recording:
    """One signal of an ``mne.Evoked`` (or ``-ave.fif`` path) as a :class:`Recording` for
    :func:`jr_jax.fit`.

    ``channel``: a channel name; or ``mode=k``: the k-th spatial mode (principal component) of
    the good EEG channels, as DCM for ERPs fits spatial modes: the time course ``u_k @ X`` of the
    k-th left singular vector ``u_k`` (unit norm, sign such that its largest weight is positive) of
    the baseline-corrected data ``X (n_channels, n_times)``. Default: ``mode=1``. ``protocol``:
    the model's grid (default :func:`recording_protocol`). The data are re-referenced
    (``reference``), resampled and cropped as :func:`jr_jax.eeg.from_evoked` does, in mV; nothing
    is rescaled: the source-to-sensor gain is a parameter of the fit.
    """
    from ._evoked import _read, from_evoked

    if channel is not None and mode is not None:
        raise ValueError("give channel or mode, not both")
    if mode is None and channel is None:
        mode = 1
    ev = _read(evoked, condition)
    if channel is not None:
        if not isinstance(channel, str):
            raise TypeError(f"channel must be a channel name (str), got {type(channel).__name__}")
        if channel not in ev.ch_names:
            eeg = [c for c, t in zip(ev.ch_names, ev.get_channel_types()) if t == "eeg"]
            raise ValueError(f"channel {channel!r} is not in the recording; its EEG channels are "
                             f"{', '.join(eeg[:12])}{', ...' if len(eeg) > 12 else ''} ({len(eeg)} in all)")
        kind = ev.get_channel_types([channel])[0]
        if kind != "eeg":
            raise ValueError(f"channel {channel!r} is a {kind} channel: fit takes EEG channels (volts)")
        if channel in ev.info["bads"]:
            raise ValueError(f"channel {channel!r} is marked bad in the recording")
        raw = ev.data[ev.ch_names.index(channel)]
        if not np.all(np.isfinite(raw)):
            raise ValueError(f"channel {channel} has NaN or infinite values")
        if not np.std(raw) > 0:
            raise ValueError(f"channel {channel} is flat (constant): pick another channel")
    if protocol is None:
        protocol = recording_protocol(ev)
    x, names = from_evoked(ev, channel, protocol=protocol, reference=reference, return_ch_names=True)
    x = np.asarray(x, np.float64).T  # (n_picks, n_times), mV
    if not np.all(np.isfinite(x)):
        raise ValueError("the recording has NaN or infinite values in the model's window")
    if channel is not None:
        sig, weights, label, explained = x[0], np.ones(1), f"channel {names[0]}", 1.0
        if not np.std(sig) > 0:
            raise ValueError(f"channel {names[0]} is flat (constant) in the model's window: pick another channel")
    else:
        if isinstance(mode, bool) or not isinstance(mode, (int, np.integer)) or not 1 <= mode <= len(names):
            raise ValueError(f"mode must be an integer from 1 to the number of good EEG channels ({len(names)}), "
                             f"got {mode!r}")
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        if not s[0] > 0:
            raise ValueError("the EEG channels are flat in the model's window")
        weights = u[:, mode - 1]
        weights = weights * np.sign(weights[np.argmax(np.abs(weights))])
        sig, label = weights @ x, f"mode {mode}"
        explained = float(s[mode - 1] ** 2 / np.sum(s**2))
    noise_sd = baseline_noise_sd(sig, protocol)
    return Recording(erp=sig, protocol=protocol, noise_sd=noise_sd, signal=label, weights=np.asarray(weights),
                     ch_names=tuple(names), explained_variance=explained, condition=str(ev.comment),
                     nave=int(ev.nave))
