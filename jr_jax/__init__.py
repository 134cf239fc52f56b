"""jr_jax: the Jansen-Rit neural mass model in JAX — batched ERP simulation with Diffrax, datasets,
Bi-LSTM posterior (and point) inference with calibration and correction by the exact likelihood,
and gradient and variance-based sensitivity (``jr_jax.sensitivity``)."""

from importlib import import_module as _import_module
from importlib.metadata import PackageNotFoundError, version as _version

# name -> (module, attribute): imported on first use (PEP 562), so that `import jr_jax` and the
# jr-jax command start without importing JAX; `from jr_jax import X` works as before.
_EXPORTS = {
    'Dataset': ('._data', 'Dataset'),
    'DatasetError': ('._data', 'DatasetError'),
    'Split': ('._data', 'Split'),
    'load_dataset': ('._data', 'load_dataset'),
    'make_dataset': ('._data', 'make_dataset'),
    'Calibration': ('._calibration', 'Calibration'),
    'c2st': ('._calibration', 'c2st'),
    'calibrate': ('._calibration', 'calibrate'),
    'calibration_from_draws': ('._calibration', 'calibration_from_draws'),
    'calibration_table': ('._calibration', 'calibration_table'),
    'Estimator': ('._estimator', 'Estimator'),
    'EstimatorError': ('._estimator', 'EstimatorError'),
    'MisspecificationWarning': ('._estimator', 'MisspecificationWarning'),
    'evaluate': ('._evaluate', 'evaluate'),
    'FitResult': ('._fit', 'FitResult'),
    'fit': ('._fit', 'fit'),
    'format_table': ('._evaluate', 'format_table'),
    'CorrectedPosterior': ('._likelihood', 'CorrectedPosterior'),
    'correct_posterior': ('._likelihood', 'correct_posterior'),
    'effective_sample_size': ('._likelihood', 'effective_sample_size'),
    'log_likelihood': ('._likelihood', 'log_likelihood'),
    'log_prior': ('._likelihood', 'log_prior'),
    'psis': ('._likelihood', 'psis'),
    'parameter_metrics': ('._metrics', 'parameter_metrics'),
    'Stimulus': ('._model', 'Stimulus'),
    'drift': ('._model', 'drift'),
    'sigmoid': ('._model', 'sigmoid'),
    'PARAMETER_INFO': ('._params', 'PARAMETER_INFO'),
    'SIGMA_ABLEIDINGER_2017': ('._params', 'SIGMA_ABLEIDINGER_2017'),
    'STUDY_PARAMETERS': ('._params', 'STUDY_PARAMETERS'),
    'JRParams': ('._params', 'JRParams'),
    'Prior': ('._params', 'Prior'),
    'PRESETS': ('._reproduce', 'PRESETS'),
    'ReproduceConfig': ('._reproduce', 'ReproduceConfig'),
    'render_report': ('._report', 'render_report'),
    'reproduce': ('._reproduce', 'reproduce'),
    'PosteriorSummary': ('._summary', 'PosteriorSummary'),
    'Protocol': ('._simulate', 'Protocol'),
    'add_measurement_noise': ('._simulate', 'add_measurement_noise'),
    'simulate': ('._simulate', 'simulate'),
    'TrainingData': ('._train', 'TrainingData'),
    'train': ('._train', 'train'),
    'DEFAULT_DT': ('._solve', 'DEFAULT_DT'),
    'DEFAULT_SOLVER': ('._solve', 'DEFAULT_SOLVER'),
    'solve': ('._solve', 'solve'),
}
_SUBPACKAGES = ("eeg", "sensitivity")
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(_import_module(module, __name__), attr)
    elif name in _SUBPACKAGES:
        value = _import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBPACKAGES))


try:
    __version__ = _version("jr-jax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
