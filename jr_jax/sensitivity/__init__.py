"""Sensitivity and identifiability: SALib's Sobol' and Morris indices beside gradient measures."""

from ._gradients import (
    dgsm as dgsm,
    dgsm_from_gradients as dgsm_from_gradients,
    elasticities as elasticities,
    fisher as fisher,
    fisher_from_jacobian as fisher_from_jacobian,
    oat as oat,
    prior_variances as prior_variances,
)
from ._qoi import STANDARD_QOIS as STANDARD_QOIS, QoI as QoI, get_qoi as get_qoi
from ._salib import (
    morris as morris,
    morris_indices as morris_indices,
    problem as problem,
    sobol as sobol,
    sobol_indices as sobol_indices,
    sobol_waveform as sobol_waveform,
)
from ._plots import plot_fisher as plot_fisher, plot_indices as plot_indices, plot_oat as plot_oat
