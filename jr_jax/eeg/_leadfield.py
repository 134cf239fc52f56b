"""Lead fields from a JR source (mV) to EEG channels (mV) with MNE's spherical head model, offline."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Default source position (m, MNE head coordinates: x to the right ear, y to the nasion, z up):
#: the left caudal middle frontal gyrus (MNI about (-38, 10, 50) mm) approximated in the sphere
#: fitted to a standard montage (centre (0, 0, 0.04) m, scalp radius 0.095 m): 70 mm from the
#: centre, 16 mm inside the brain surface of MNE's default four-shell model.
DEFAULT_POSITION = (-0.040, 0.015, 0.095)

#: Default dipole moment per mV of the JR source y1 - y2 (nAm/mV). With it the ERP of the default
#: parameters under the study's stimulus (peak about 60 mV) gives a peak of about 10 µV at the
#: nearest electrodes of biosemi64, the order of magnitude of scalp ERPs.
DEFAULT_MOMENT_PER_MV = 1.0

# V/(A·m) -> mV per mV of source: moment (nAm/mV) * 1e-9 (A·m/nAm) * 1e3 (mV/V)
_MV_PER_V_PER_NAM = 1e-6


class LeadField(NamedTuple):
    """Gains from the source (mV) to each channel (mV), shape ``(n_channels,)``, and the channel names.

    Pass ``gain`` as ``Protocol(lead_field=...)``; ``ch_names`` to :func:`to_evoked`.
    """

    gain: np.ndarray
    ch_names: tuple[str, ...]


def montage_info(montage="biosemi64", fs: float = 1000.0, ch_names=None):
    """An ``mne.Info`` of EEG channels placed by ``montage`` (a name shipped with MNE or a
    ``DigMontage``); ``ch_names`` selects a subset in that order (default: all of the montage's)."""
    import mne

    if isinstance(montage, str):
        builtin = mne.channels.get_builtin_montages()
        if montage not in builtin:
            raise ValueError(f"montage must be one of MNE's built-in montages {builtin} or a DigMontage, "
                             f"got {montage!r}")
        montage = mne.channels.make_standard_montage(montage)
    elif not isinstance(montage, mne.channels.DigMontage):
        raise TypeError(f"montage must be a montage name or an mne.channels.DigMontage, got {type(montage).__name__}")
    names = list(montage.ch_names) if ch_names is None else list(ch_names)
    missing = [c for c in names if c not in montage.ch_names]
    if missing or not names:
        raise ValueError(f"ch_names {missing or names} not in the montage (it has {len(montage.ch_names)} "
                         f"channels: {', '.join(montage.ch_names[:8])}, ...)")
    info = mne.create_info(names, float(fs), "eeg")
    info.set_montage(montage, on_missing="ignore", verbose=False)
    return info


def _unit(v, name):
    v = np.asarray(v, dtype=float)
    n = np.linalg.norm(v)
    if v.shape != (3,) or not np.isfinite(n) or n == 0:
        raise ValueError(f"{name} must be a non-zero 3-vector, got {v!r}")
    return v / n


def _reference(g: np.ndarray, reference) -> np.ndarray:
    if reference == "average":
        return g - g.mean()
    if reference is None:
        return g
    raise ValueError(f"reference must be 'average' or None (the potential against infinity), got {reference!r}")


def _check_moment(moment_per_mv):
    if not (isinstance(moment_per_mv, (int, float)) and np.isfinite(moment_per_mv) and moment_per_mv > 0):
        raise ValueError(f"moment_per_mv must be a number > 0 (nAm per mV of source), got {moment_per_mv!r}")


def leadfield(
    montage="biosemi64",
    position=DEFAULT_POSITION,
    orientation=None,
    *,
    sphere=None,
    ch_names=None,
    moment_per_mv: float = DEFAULT_MOMENT_PER_MV,
    reference: str | None = "average",
) -> LeadField:
    """Gains (mV of sensor per mV of source y1 - y2) of one cortical dipole, from MNE's sphere model.

    - ``montage``: a montage shipped with MNE (nothing is downloaded) or an ``mne.channels.DigMontage``;
      ``ch_names`` picks a subset of its channels (default: all);
    - ``position``: dipole position (m) in MNE head coordinates (default :data:`DEFAULT_POSITION`,
      left caudal middle frontal); ``orientation``: unit 3-vector, default radial (outward from the
      sphere centre), as for a source on a gyral crown;
    - ``sphere``: an ``mne.make_sphere_model`` conductor; default: MNE's four-shell model (brain,
      CSF, skull, scalp) with centre and radius fitted to all of the montage's electrodes.
      Electrodes are projected radially onto the outer sphere;
    - ``moment_per_mv``: dipole moment (nAm) per mV of source (default :data:`DEFAULT_MOMENT_PER_MV`);
      gain = MNE's gain (V per A·m) x ``moment_per_mv`` x 1e-6;
    - ``reference``: ``"average"`` (gains sum to zero) or ``None`` (potential against infinity).

    Computed with ``mne.make_forward_dipole`` (equivalent to ``mne.make_forward_solution`` on a
    one-point discrete source space). Any other lead field (e.g. from a BEM ``mne.Forward``, see
    :func:`from_forward`) can be passed to ``Protocol(lead_field=...)`` directly.
    """
    import mne

    _check_moment(moment_per_mv)
    _reference(np.zeros(2), reference)
    info = montage_info(montage, ch_names=ch_names)
    pos = np.array([ch["loc"][:3] for ch in info["chs"]])
    if not np.all(np.isfinite(pos)) or np.any(np.linalg.norm(pos, axis=1) == 0):
        raise ValueError("the montage lacks positions for some of the channels")
    if sphere is None:  # fitted to all of the montage's electrodes, whatever the subset
        full = info if ch_names is None else montage_info(montage)
        radius, r0, _ = mne.bem.fit_sphere_to_headshape(full, dig_kinds=("eeg",), units="m", verbose=False)
        sphere = mne.make_sphere_model(r0=r0, head_radius=radius, verbose=False)
    if not (isinstance(sphere, mne.bem.ConductorModel) and sphere["is_sphere"] and sphere["layers"]):
        raise TypeError("sphere must be a layered sphere model from mne.make_sphere_model(r0, head_radius, ...)")
    r0 = np.asarray(sphere["r0"], float)
    radius = float(sphere["layers"][-1]["rad"])
    # electrodes on the scalp sphere
    with info._unlock():
        for ch in info["chs"]:
            d = ch["loc"][:3] - r0
            ch["loc"][:3] = r0 + radius * d / np.linalg.norm(d)
    p = np.asarray(position, dtype=float)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise ValueError(f"position must be 3 finite coordinates (m, head frame), got {position!r}")
    inner = float(sphere["layers"][0]["rad"])
    depth = np.linalg.norm(p - r0)
    if depth >= inner:
        raise ValueError(f"position {tuple(p)} m lies {depth * 1e3:.1f} mm from the sphere centre {tuple(r0)}, "
                         f"outside the innermost shell (radius {inner * 1e3:.1f} mm)")
    ori = _unit(p - r0, "position - sphere centre") if orientation is None else _unit(orientation, "orientation")
    dip = mne.Dipole(np.zeros(1), p[None], np.ones(1), ori[None], np.ones(1))
    fwd, _ = mne.make_forward_dipole(dip, sphere, info, verbose=False)
    gain_v_per_am = np.asarray(fwd["sol"]["data"], dtype=float)[:, 0]
    gain = _reference(gain_v_per_am * moment_per_mv * _MV_PER_V_PER_NAM, reference)
    return LeadField(gain, tuple(fwd["info"]["ch_names"]))


def from_forward(
    forward,
    source: int = 0,
    orientation=None,
    *,
    moment_per_mv: float = DEFAULT_MOMENT_PER_MV,
    reference: str | None = "average",
) -> LeadField:
    """The lead field of one source of an ``mne.Forward`` (e.g. a BEM forward of the user's own head).

    ``source``: index of the source point; ``orientation``: unit 3-vector (head coordinates) for a
    free-orientation forward (required there), ignored for a fixed-orientation one. EEG channels only;
    units as in :func:`leadfield`.
    """
    import mne

    if not isinstance(forward, mne.Forward):
        raise TypeError(f"forward must be an mne.Forward, got {type(forward).__name__}")
    _check_moment(moment_per_mv)
    _reference(np.zeros(2), reference)
    fwd = mne.pick_types_forward(forward, meg=False, eeg=True)
    n_src = fwd["nsource"]
    if not (isinstance(source, (int, np.integer)) and 0 <= source < n_src):
        raise ValueError(f"source must be an index 0..{n_src - 1}, got {source!r}")
    G = np.asarray(fwd["sol"]["data"], dtype=float)
    if fwd["source_ori"] == mne.io.constants.FIFF.FIFFV_MNE_FREE_ORI:
        if orientation is None:
            raise ValueError("this forward has free orientations: pass orientation (a unit 3-vector, head frame)")
        if fwd["surf_ori"]:
            raise ValueError("pass a forward with surf_ori=False (columns along x, y, z of the head frame)")
        g = G[:, 3 * source:3 * source + 3] @ _unit(orientation, "orientation")
    else:
        g = G[:, source]
    return LeadField(_reference(g * moment_per_mv * _MV_PER_V_PER_NAM, reference), tuple(fwd["info"]["ch_names"]))
