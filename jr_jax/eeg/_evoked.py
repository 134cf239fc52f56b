"""MNE ``Evoked`` in and out: recordings to the estimator's input (mV), simulations to ``EvokedArray`` (V)."""

from __future__ import annotations

import os

import numpy as np

# Scalp EEG in volts: an averaged ERP is ~1e-7..1e-4 V; 1 mV RMS is beyond any recording, and data
# of order 1-100 are µV numbers stored as volts.
EEG_MAX_RMS_V = 1e-3
EEG_MIN_RMS_V = 1e-10


def _target(estimator, protocol, fs, tmin, tmax, baseline):
    """The model's ``(fs, tmin, tmax, baseline)`` from exactly one of estimator, protocol, or fs/tmin/tmax;
    ``baseline=None`` follows the estimator or protocol (True with fs/tmin/tmax)."""
    given = [x is not None for x in (estimator, protocol)] + [any(v is not None for v in (fs, tmin, tmax))]
    if sum(given) != 1:
        raise ValueError("give exactly one of estimator, protocol, or fs with tmin and tmax (the model's sampling "
                         "and epoch window)")
    if estimator is not None:
        m = estimator.manifest
        return float(m["fs"]), float(m["tmin"]), float(m["tmax"]), estimator.baseline if baseline is None else baseline
    if protocol is not None:
        return (float(protocol.fs), float(protocol.tmin), float(protocol.tmax),
                bool(protocol.baseline) if baseline is None else baseline)
    if fs is None or tmin is None or tmax is None:
        raise ValueError(f"pass fs, tmin and tmax together (Hz, s, s); got fs={fs}, tmin={tmin}, tmax={tmax}")
    if not (np.isfinite(fs) and fs > 0 and np.isfinite(tmin) and np.isfinite(tmax) and tmin < tmax):
        raise ValueError(f"need fs > 0 and tmin < tmax, got fs={fs}, tmin={tmin}, tmax={tmax}")
    return float(fs), float(tmin), float(tmax), True if baseline is None else baseline


def _read(evoked, condition):
    import mne

    if isinstance(evoked, (str, os.PathLike)):
        path = os.fspath(evoked)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such Evoked file: {path}")
        try:
            return mne.read_evokeds(path, condition=condition, verbose=False)
        except (ValueError, IndexError, KeyError) as e:
            raise ValueError(f"{path}: cannot read condition {condition!r} as an Evoked ({e})") from e
    if not isinstance(evoked, mne.Evoked):
        raise TypeError(f"evoked must be an mne.Evoked or the path of a -ave.fif file, got {type(evoked).__name__}")
    return evoked


def _channel_names(evoked, picks, estimator):
    import mne

    multichannel = estimator is not None and estimator.n_channels > 1
    if picks is None and multichannel:
        m = estimator.manifest
        picks = m.get("ch_names") or (m.get("data") or {}).get("ch_names")
        if picks is None:
            raise ValueError(f"this estimator takes {estimator.n_channels} channels but its manifest does not name "
                             "them: pass picks (the channel names in the training order)")
        bad = [c for c in picks if c in evoked.info["bads"]]
        if bad:
            raise ValueError(f"channel(s) {bad} needed by the estimator are marked bad in the recording: "
                             "interpolate them first (evoked.interpolate_bads())")
    if picks is None:
        eeg = mne.pick_types(evoked.info, eeg=True, exclude="bads")
        idx = eeg if len(eeg) else [i for i, c in enumerate(evoked.ch_names) if c not in evoked.info["bads"]]
        names = [evoked.ch_names[i] for i in idx]
    else:
        picks = [picks] if isinstance(picks, (str, int, np.integer)) else list(picks)
        names = []
        for p in picks:
            if isinstance(p, (int, np.integer)):
                if not 0 <= p < len(evoked.ch_names):
                    raise ValueError(f"picks index {p} out of range: the recording has {len(evoked.ch_names)} channels")
                names.append(evoked.ch_names[p])
            else:
                names.append(str(p))
        missing = [c for c in names if c not in evoked.ch_names]
        if missing:
            raise ValueError(f"channel(s) {missing} not in the recording; it has {len(evoked.ch_names)} channels: "
                             f"{', '.join(evoked.ch_names[:12])}{', ...' if len(evoked.ch_names) > 12 else ''}")
        if len(set(names)) != len(names):
            raise ValueError(f"picks name a channel twice: {names}")
    if not names:
        raise ValueError("no channels to use: the recording has no good channels")
    if multichannel and len(names) != estimator.n_channels:
        raise ValueError(f"the estimator takes {estimator.n_channels} channels, picks name {len(names)}")
    return names


def from_evoked(
    evoked,
    picks=None,
    *,
    estimator=None,
    protocol=None,
    fs: float | None = None,
    tmin: float | None = None,
    tmax: float | None = None,
    condition=0,
    reference: str | None = "average",
    baseline: bool | None = None,
    return_ch_names: bool = False,
):
    """An ``mne.Evoked`` (or the path of a ``-ave.fif`` file) as ERPs in mV on the model's time grid.

    The target sampling comes from exactly one of ``estimator`` (its manifest), ``protocol``, or
    ``fs`` (Hz) with ``tmin``/``tmax`` (s). Steps: projections applied; ``reference="average"``
    re-references to the mean of the good EEG channels (MNE's ``set_eeg_reference``; ``None`` keeps
    the recording's reference); channels picked (``picks``: names or indices; default: the
    estimator's training channels for a multichannel estimator (``manifest["data"]["ch_names"]``),
    else all good EEG channels); resampled to ``fs`` (``Evoked.resample``; a lower recording rate is
    an error: it cannot be upsampled); cropped to ``tmin..tmax`` (cubic interpolation onto the grid
    if the recording's samples are offset from it); volts to mV; the mean over ``tmin <= t < 0``
    subtracted if ``baseline`` (default: as the estimator's training ERPs, or the protocol's
    ``baseline``; else True). ``condition``: which Evoked of a file (index or comment).

    Returns ``(n_picks, n_times)`` for a single-channel estimator (one ERP per channel), else
    ``(n_times, n_picks)`` (one multichannel ERP, as ``Protocol.output_shape``); with
    ``return_ch_names`` also the channel names. Raises ``ValueError`` for a recording rate below
    ``fs``, a window not covering ``tmin..tmax``, missing channels, and EEG data whose scale is not
    volts (e.g. µV numbers stored as V).
    """
    import mne

    fs, tmin, tmax, baseline = _target(estimator, protocol, fs, tmin, tmax, baseline)
    if reference not in ("average", None):
        raise ValueError(f"reference must be 'average' or None, got {reference!r}")
    ev = _read(evoked, condition).copy()
    if ev.proj is not True and ev.info["projs"]:
        ev.apply_proj(verbose=False)
    names = _channel_names(ev, picks, estimator)
    n_eeg_good = len(mne.pick_types(ev.info, eeg=True, exclude="bads"))
    picked_eeg = [c for c in names if ev.get_channel_types([c])[0] == "eeg"]
    if reference == "average" and picked_eeg:
        if n_eeg_good < 2:
            raise ValueError("reference='average' needs at least 2 good EEG channels; pass reference=None to keep "
                             "the recording's reference")
        ev.set_eeg_reference("average", projection=False, verbose=False)
    ev.pick(names)

    sfreq = float(ev.info["sfreq"])
    if sfreq < fs * (1 - 1e-9):
        raise ValueError(f"the recording is sampled at {sfreq:g} Hz, below the model's fs = {fs:g} Hz: it cannot be "
                         f"upsampled (content above {sfreq / 2:g} Hz is missing); use a model trained at fs <= "
                         f"{sfreq:g} Hz")
    if not np.isclose(sfreq, fs, rtol=1e-9, atol=0):
        ev.resample(fs, verbose=False)
    times = ev.times
    n_times = int(round((tmax - tmin) * fs)) + 1
    grid = tmin + np.arange(n_times) / fs
    tol = 1e-3 / fs
    if times[0] > grid[0] + tol or times[-1] < grid[-1] - tol:
        raise ValueError(f"the recording's epoch {times[0]:.4g} to {times[-1]:.4g} s does not cover the model's window "
                         f"{tmin:g} to {tmax:g} s ({n_times} samples at {fs:g} Hz)")
    data = ev.get_data()  # (n_picks, n_samples), volts
    start = int(round((grid[0] - times[0]) * fs))
    if abs(times[start] - grid[0]) <= tol:
        x = data[:, start:start + n_times]
    else:  # samples offset from the model's grid by a fraction of a sample
        from scipy.interpolate import CubicSpline

        x = CubicSpline(times, data, axis=1)(grid)
    if not np.all(np.isfinite(x)):
        raise ValueError("the recording has NaN or infinite values in the model's window")
    eeg_rows = [i for i, c in enumerate(names) if c in picked_eeg]
    if eeg_rows:
        rms = float(np.sqrt(np.mean(x[eeg_rows] ** 2)))
        if rms > EEG_MAX_RMS_V:
            raise ValueError(f"EEG RMS is {rms:.3g} 'V': not EEG in volts (scalp ERPs are µV, ~1e-6 V). MNE holds "
                             f"volts: data in µV must be divided by 1e6 (in mV by 1e3) before making the Evoked")
        if rms < EEG_MIN_RMS_V:
            raise ValueError(f"EEG RMS is {rms:.3g} V: flat or scaled twice (scalp ERPs are ~1e-6 V)")
    x = x * 1e3  # V -> mV
    if baseline and tmin < 0:
        n_pre = int(round(-tmin * fs))
        x = x - x[:, :n_pre].mean(axis=1, keepdims=True)
    out = x if (estimator is not None and estimator.n_channels == 1) else x.T
    return (out, names) if return_ch_names else out


def to_evoked(erp, protocol, *, ch_names=None, montage="biosemi64", comment: str = "jr_jax simulation"):
    """A simulated ERP (mV) as an ``mne.EvokedArray`` (V) for MNE's plotting and I/O.

    ``erp``: ``(n_times,)`` (the source y1 - y2: one ``misc`` channel named ``"source"`` unless
    ``ch_names`` says otherwise) or ``(n_times, n_channels)`` (EEG channels named by ``ch_names``,
    default the montage's channels, which must number ``n_channels``). The montage is set when it
    knows every channel. ``protocol`` gives fs, tmin and nave = n_trials.
    """
    import mne

    from ._leadfield import montage_info

    x = np.asarray(erp, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
        kind = "misc" if ch_names is None else "eeg"
        ch_names = ["source"] if ch_names is None else list(ch_names)
    elif x.ndim == 2:
        kind = "eeg"
        if ch_names is None:
            ch_names = list(montage_info(montage).ch_names)
    else:
        raise ValueError(f"erp must be (n_times,) or (n_times, n_channels), got shape {x.shape}")
    ch_names = list(ch_names)
    if x.shape != (protocol.n_times, len(ch_names)):
        raise ValueError(f"erp has shape {x.shape}; expected ({protocol.n_times}, {len(ch_names)}) for the protocol's "
                         f"{protocol.n_times} samples and {len(ch_names)} channel name(s)")
    if not np.all(np.isfinite(x)):
        raise ValueError("erp has NaN or infinite values")
    info = mne.create_info(ch_names, float(protocol.fs), kind)
    if kind == "eeg" and montage is not None:
        mont = montage_info(montage, ch_names=None).get_montage() if isinstance(montage, str) else montage
        if all(c in mont.ch_names for c in ch_names):
            info.set_montage(mont, verbose=False)
    return mne.EvokedArray(x.T * 1e-3, info, tmin=float(protocol.tmin), nave=int(protocol.n_trials),
                           comment=comment, verbose=False)
