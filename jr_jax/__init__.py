"""jr_jax: the Jansen-Rit neural mass model in JAX — batched ERP simulation with Diffrax, datasets,
Bi-LSTM posterior (and point) inference with calibration and correction by the exact likelihood,
and gradient and variance-based sensitivity (``jr_jax.sensitivity``)."""

from importlib.metadata import PackageNotFoundError, version as _version

from ._data import (
    Dataset as Dataset,
    DatasetError as DatasetError,
    Split as Split,
    load_dataset as load_dataset,
    make_dataset as make_dataset,
)
from ._calibration import (
    Calibration as Calibration,
    calibrate as calibrate,
    calibration_from_draws as calibration_from_draws,
    calibration_table as calibration_table,
)
from ._estimator import Estimator as Estimator, MisspecificationWarning as MisspecificationWarning
from ._evaluate import evaluate as evaluate
from ._likelihood import (
    CorrectedPosterior as CorrectedPosterior,
    correct_posterior as correct_posterior,
    effective_sample_size as effective_sample_size,
    log_likelihood as log_likelihood,
    log_prior as log_prior,
    psis as psis,
)
from ._metrics import parameter_metrics as parameter_metrics
from ._model import Stimulus as Stimulus, drift as drift, sigmoid as sigmoid
from ._params import (
    PARAMETER_INFO as PARAMETER_INFO,
    SIGMA_ABLEIDINGER_2017 as SIGMA_ABLEIDINGER_2017,
    STUDY_PARAMETERS as STUDY_PARAMETERS,
    JRParams as JRParams,
    Prior as Prior,
)
from ._reproduce import (
    PRESETS as PRESETS,
    ReproduceConfig as ReproduceConfig,
    render_report as render_report,
    reproduce as reproduce,
)
from ._summary import PosteriorSummary as PosteriorSummary
from ._simulate import (
    Protocol as Protocol,
    add_measurement_noise as add_measurement_noise,
    simulate as simulate,
)
from ._train import TrainingData as TrainingData, train as train
from ._solve import DEFAULT_DT as DEFAULT_DT, DEFAULT_SOLVER as DEFAULT_SOLVER, solve as solve

try:
    __version__ = _version("jr-jax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
