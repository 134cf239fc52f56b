"""EEG sensors and recordings through MNE-Python (imported only when used).

- :func:`leadfield`: gains from the JR source (mV) to the channels of a standard montage (mV),
  from MNE's spherical head model, offline; :func:`from_forward` takes them from an ``mne.Forward``;
- :func:`add_sensor_noise`: Gaussian sensor noise with a channel covariance at an SNR, average reference;
- :func:`from_evoked`: an ``mne.Evoked`` (or ``-ave.fif``) as the estimator's input in mV;
- :func:`to_evoked`: simulated ERPs as an ``mne.EvokedArray`` for MNE's plots;
- :func:`signal_from_evoked`: one channel or spatial mode of a recording as a :class:`Recording`
  for :func:`jr_jax.fit` (noise SD from the baseline); :func:`recording_protocol` its grid;
- :func:`sample_recording`: the path of the shipped real recording (MNE's sample subject).
"""


from ._evoked import from_evoked as from_evoked, to_evoked as to_evoked
from ._leadfield import (
    DEFAULT_MOMENT_PER_MV as DEFAULT_MOMENT_PER_MV,
    DEFAULT_POSITION as DEFAULT_POSITION,
    LeadField as LeadField,
    from_forward as from_forward,
    leadfield as leadfield,
    montage_info as montage_info,
)
from ._noise import add_sensor_noise as add_sensor_noise, noise_factor as noise_factor
from ._recording import (
    MIN_BASELINE_SAMPLES as MIN_BASELINE_SAMPLES,
    Recording as Recording,
    baseline_noise_sd as baseline_noise_sd,
    recording_protocol as recording_protocol,
    sample_recording as sample_recording,
    signal_from_evoked as signal_from_evoked,
)

