"""The study end to end: simulate, train at each noise level, evaluate at every level, sensitivity.

This module is the pipeline: ``reproduce(preset, out)`` runs cached, resumable steps into ``out``
(datasets, one point regressor per training noise level, a noise-robust point regressor and a
posterior estimator trained on the same data, their evaluations and the posterior's calibration,
the sensitivity analysis) and writes every number to ``results.json``. The rendering
(``report.md``, ``report.html``, CSV tables, figures) lives in :mod:`jr_jax._report` and reads
only ``results.json`` and the arrays the steps store under ``steps/``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import numbers
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from ._report import RESULTS, level_label, read_json as _read_json, render_report  # noqa: F401 (re-exported)
from ._train import DEFAULT_ENCODER

# Pearson r visible in the reference study's notebooks (its transformer, noise factor 1, ~50 dB SNR
# after averaging; its Bi-LSTM runs were near 0 on every parameter). STUDY.md sets out the source.
STUDY_PEARSON = {"A_e": 0.12, "A_i": 0.99, "b_e": 0.54, "b_i": 0.93, "C": 0.17,
                 "a_1": 0.08, "a_2": 0.08, "a_3": 0.08, "a_4": 0.08}
#: about how many test ERPs those r come from (STUDY.md), for the uncertainty of the comparison
STUDY_N_TEST = 100
#: the SNR of the study's averaged ERPs at its reported setting (noise factor 1), by an independent
#: reproduction (STUDY.md); jr_jax is compared with the study at this level
STUDY_SNR_DB = 50.0

# The study's ten noise levels (noise factors 0, 0.11, ..., 0.95 of a sensor covariance) expressed
# as ten SNRs of the averaged ERP: clean, then 40 dB down to 0 dB in steps of 5 dB.
STUDY_LEVELS_DB = (None, 40.0, 35.0, 30.0, 25.0, 20.0, 15.0, 10.0, 5.0, 0.0)
# the test levels: the study's, plus its own SNR (about 50 dB), so that it is compared at matched SNR
TEST_LEVELS_DB = (None, STUDY_SNR_DB) + STUDY_LEVELS_DB[1:]

CONFIG = "config.json"

#: the reproduce posterior's flow options: on the frozen robust regressor, the ERP's noise level as a
#: feature and the conditional affine layer (its posterior mean keeps the regressor's R²; measured
#: with the alternatives in benchmarks/results/reproduce_posterior.json, docs/guides/inference.md)
POSTERIOR_OPTIONS = dict(noise_feature=True, conditional_affine=True)
#: and the SNRs it is trained on: wider than the robust regressor's 0-40 dB, so that the quick preset's
#: calibrated levels (0 to 50 dB) lie inside its training range, not at or beyond its edge (trained on
#: 0-40 dB, its worst calibration error was 0.045 at 50 dB and 0.050 at 0 dB; on -5 to 55 dB, 0.039
#: and 0.032, in 15 epochs)
POSTERIOR_SNR_DB = (-5.0, 55.0)
#: what a configuration written before these fields existed did: its posterior was trained end to end
#: on the robust regressor's SNRs, with the flow's default options
_EARLIER_POSTERIOR = dict(posterior_embedding=None, posterior_snr_db=None, posterior_options={})


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """What a reproduce run does. Sizes are numbers of simulated (clean) ERPs.

    - ``n_levels``: the per-level dataset (the study: 1000 simulations per noise level; the same
      clean ERPs serve every level, with measurement noise drawn fresh at that level);
    - ``train_levels_db`` / ``test_levels_db``: the grid (``None``: clean);
    - ``n_large``: the larger-data variant, one noise-robust model trained on SNRs drawn in
      ``robust_snr_db``; ``None`` trains that model on the per-level dataset;
    - epochs and patience of the grid models and of the robust model; ``encoder`` options;
    - ``posterior_epochs`` / ``posterior_patience``: a posterior estimator (NPE, ``kind="posterior"``)
      trained on the robust model's data, calibrated on the test split at
      ``posterior_levels_db`` (``None``: every test level) with ``calibration_draws`` posterior
      draws per ERP. ``posterior_embedding="robust"``: its flow is trained on the robust point
      regressor's estimates, that network frozen as the embedding (``jr_jax.train(...,
      embedding=...)``); ``None``: trained end to end on its own encoder. ``posterior_options``:
      the flow's options (``jr_jax.train(..., posterior=...)``); ``posterior_snr_db``: the range of
      SNRs it is trained on (``None``: ``robust_snr_db``);
    - ``sobol_n``: Sobol' base samples (n (d + 2) simulations); ``fisher_draws``: prior draws at
      which the Fisher information is computed.
    """

    preset: str
    n_levels: int
    train_levels_db: tuple
    test_levels_db: tuple
    grid_epochs: int
    grid_patience: int
    n_large: int | None
    robust_snr_db: tuple
    robust_epochs: int
    robust_patience: int
    encoder: dict
    sobol_n: int
    fisher_draws: int
    posterior_epochs: int
    posterior_patience: int
    posterior_levels_db: tuple | None = None
    posterior_embedding: str | None = "robust"
    posterior_snr_db: tuple | None = POSTERIOR_SNR_DB
    posterior_options: dict = dataclasses.field(default_factory=lambda: dict(POSTERIOR_OPTIONS))
    calibration_draws: int = 199
    n_trials: int = 60
    seed: int = 0

    def __post_init__(self):
        if self.posterior_embedding not in ("robust", None):
            raise ValueError(f"posterior_embedding must be 'robust' or None, got {self.posterior_embedding!r}")
        snr = self.posterior_snr_db
        if snr is not None and not (isinstance(snr, (tuple, list)) and len(snr) == 2
                                    and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                            and math.isfinite(v) for v in snr)
                                    and snr[0] <= snr[1]):
            raise ValueError(f"posterior_snr_db must be None or (low, high): two finite numbers in dB with "
                             f"low <= high, got {snr!r}")
        if snr is not None:  # plain floats, as the configuration is written to JSON
            object.__setattr__(self, "posterior_snr_db", (float(snr[0]), float(snr[1])))
        if not isinstance(self.posterior_options, dict):
            raise TypeError(f"posterior_options must be a dict of jr_jax.train's posterior options, got "
                            f"{type(self.posterior_options).__name__}")
        from ._flow import check_flow_options

        try:
            check_flow_options(self.posterior_options, frozen_embedding=self.posterior_embedding == "robust")
        except ValueError as e:
            raise ValueError(f"posterior_options: {e}") from None

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# train()'s default encoder: the study's Bi-LSTM (1 layer, 64 units per direction, dropout 0.1) behind
# a strided convolution (its CNN-BiLSTM option); at 1200 Hz its 16-sample windows leave 75 LSTM steps
_ENCODER = DEFAULT_ENCODER

PRESETS = {
    # 4.5 min on a 2-core CPU on 2026-12-07 (benchmarks/results/reproduce_quick.json; README): enough data
    # that A_i and b_i are clearly recovered, and a posterior checked on 1000 held-out ERPs
    "quick": ReproduceConfig(
        preset="quick", n_levels=10000, train_levels_db=(None, 20.0, 0.0), test_levels_db=TEST_LEVELS_DB,
        grid_epochs=4, grid_patience=4, n_large=None, robust_snr_db=(0.0, 40.0), robust_epochs=15,
        robust_patience=15, encoder=_ENCODER, sobol_n=64, fisher_draws=4, posterior_epochs=25,
        posterior_patience=25, posterior_levels_db=(STUDY_SNR_DB, 30.0, 10.0, 0.0)),
    # the study's design: ten levels, 1000 simulations per level, 80/10/10; plus 50 000 simulations
    # for a noise-robust point regressor and a posterior estimator, each trained until its
    # validation loss stops falling (80 epochs at most), the posterior calibrated on 5000 test ERPs
    "study": ReproduceConfig(
        preset="study", n_levels=1000, train_levels_db=STUDY_LEVELS_DB, test_levels_db=TEST_LEVELS_DB,
        grid_epochs=60, grid_patience=15, n_large=50000, robust_snr_db=(0.0, 40.0), robust_epochs=80,
        robust_patience=15, encoder=_ENCODER, sobol_n=256, fisher_draws=16, posterior_epochs=80,
        posterior_patience=15),
    # seconds: for the tests
    "test": ReproduceConfig(
        preset="test", n_levels=400, train_levels_db=(None, 10.0), test_levels_db=(None, STUDY_SNR_DB, 20.0, 0.0),
        grid_epochs=2, grid_patience=2, n_large=None, robust_snr_db=(0.0, 40.0), robust_epochs=2,
        robust_patience=2, encoder=dict(_ENCODER, hidden=16, conv_channels=8), sobol_n=8, fisher_draws=1,
        posterior_epochs=2, posterior_patience=2, posterior_levels_db=(STUDY_SNR_DB, 0.0), calibration_draws=39,
        n_trials=1),
}


#: Each named preset's measured time, all steps, on the 2-core development CPU (AMD EPYC), printed
#: before a run starts: quick from ``benchmarks/reproduce_quick.py`` (``reproduce_quick.json``,
#: 2026-12-08), study from the sum of its steps in ``docs/study/results.json`` (2026-12-06).
#: tests/test_reproduce.py checks them against those files.
MEASURED_SECONDS = {"quick": 266.0, "study": 6816.0}


def _expected_duration(preset: str) -> str | None:
    """The line ``reproduce`` prints first for a named preset: its measured time and the machine."""
    seconds = MEASURED_SECONDS.get(preset)
    if seconds is None:
        return None
    span = f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"
    return (f"expected duration: about {span} on a 2-core CPU (measured; a machine's speed can make it half or twice "
            "that), less for the steps an earlier run here finished")


def _slug(snr_db) -> str:
    return "clean" if snr_db is None else f"{snr_db:g}dB"


class _Steps:
    """Cached steps: ``steps/NAME.json`` holds a finished step's value and time; a rerun skips it.

    ``order``: every step name in the order the pipeline asked for it (cached or run now);
    ``ran``: those run now; ``seconds``: each step's time when it ran."""

    def __init__(self, out: Path, log):
        self.dir = out / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.ran: list[str] = []
        self.order: list[str] = []
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn):
        path = self.dir / f"{name}.json"
        self.order.append(name)
        if path.is_file():
            self.log(f"  {name}: done earlier (cached)")
            rec = _read_json(path, f"the cached result of step {name}", "delete it to run that step again")
            self.seconds[name] = rec["seconds"]
            return rec
        self.log(f"  {name} ...")
        t0 = time.perf_counter()
        value = fn()
        record = dict(value=value, seconds=time.perf_counter() - t0,
                      finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
        os.replace(tmp, path)
        self.ran.append(name)
        self.seconds[name] = record["seconds"]
        self.log(f"  {name}: {record['seconds']:.0f} s")
        return json.loads(path.read_text())


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _device() -> dict:
    import jax

    devices = jax.devices()
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(platform=devices[0].platform, device_kind=devices[0].device_kind, n_devices=len(devices),
                cpu=cpu, cpu_cores=os.cpu_count())


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return "unknown"

    return {name: v(dist) for name, dist in (("jr_jax", "jr-jax"), ("jax", "jax"), ("diffrax", "diffrax"),
                                             ("equinox", "equinox"), ("optax", "optax"), ("SALib", "SALib"),
                                             ("numpy", "numpy"))} | dict(python=platform.python_version())


def _is_run_config(saved) -> bool:
    """Whether a parsed config.json is one that reproduce wrote (a ReproduceConfig as a dict)."""
    return (isinstance(saved, dict) and isinstance(saved.get("preset"), str)
            and {"n_levels", "train_levels_db", "test_levels_db", "encoder"} <= set(saved))


def _check_out(out: Path, config: ReproduceConfig, force: bool) -> None:
    """Refuse to mix runs: an existing folder must hold this same configuration (then it resumes).

    ``force`` deletes ``out`` only if it is a jr_jax reproduce run (its ``config.json`` is a
    reproduce configuration); anything else that exists at ``out`` (a non-empty folder, a file) is
    refused and left as it is. An empty folder is used.
    """
    cfg_path = out / CONFIG
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a jr_jax reproduce folder, so it will not be deleted or "
                              "overwritten; choose another out")
    saved = None
    if cfg_path.is_file():
        saved = _read_json(cfg_path, "the run's configuration", "it is not deleted: if the folder is an earlier "
                           "jr_jax reproduce run, delete the folder yourself, or choose another out")
        if not _is_run_config(saved):
            raise FileExistsError(f"{out} is not a jr_jax reproduce folder ({cfg_path} is not a reproduce "
                                  "configuration), so it will not be deleted or overwritten; choose another out")
    if saved is not None:
        earlier = not set(_EARLIER_POSTERIOR) <= set(saved)
        saved = {**_EARLIER_POSTERIOR, **saved}  # an earlier version's run: what its posterior step did
        if saved != config.to_dict():
            if not force:
                diff = sorted(k for k in set(saved) | set(config.to_dict()) if saved.get(k) != config.to_dict().get(k))
                note = (" (it was written by an earlier version of jr_jax, whose posterior was trained end to end: "
                        "to resume it, pass a ReproduceConfig with posterior_embedding=None, posterior_snr_db=None, "
                        "posterior_options={})") if earlier else ""
                raise ValueError(f"{out} holds a reproduce run with a different configuration (differs in: "
                                 f"{', '.join(diff)}){note}; pass force=True (--force) to delete it, or choose "
                                 "another out")
            shutil.rmtree(out)  # a jr_jax reproduce run (its config.json says so)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a jr_jax reproduce folder (no {CONFIG} written by "
                              "jr_jax.reproduce), so it will not be deleted or overwritten, with or without "
                              "force; choose another out (a new or an empty folder)")
    out.mkdir(parents=True, exist_ok=True)
    if not cfg_path.is_file():
        tmp = out / f".{CONFIG}.tmp"
        tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        os.replace(tmp, cfg_path)


def reproduce(preset: str | ReproduceConfig = "quick", out: str | os.PathLike = "jr_jax_out/quick", *,
              force: bool = False, scheduler: str | None = None, progress: bool = True, log=print) -> dict:
    """Run the study end to end into ``out`` and write its report; returns the results dict.

    ``preset``: ``"quick"`` (a few minutes on a 2-core CPU), ``"study"`` (the study's ten noise
    levels with 1000 simulations per level, plus 50 000 simulations for a noise-robust point
    regressor and a posterior estimator), ``"test"`` (seconds), or a :class:`ReproduceConfig`.
    Steps (datasets, one training per noise level, the robust and posterior models, evaluations,
    calibration, sensitivity) are cached under ``out``: running the same call again after an
    interruption continues where it stopped. A folder holding a different configuration is refused
    unless ``force=True``, which deletes it first; a path that is not a reproduce run (a folder
    with other files, a file) is never deleted. ``scheduler``: simulate the datasets with Dask
    (``"local"`` or a scheduler address, as in :func:`jr_jax.make_dataset`; the data are the same).
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        config = PRESETS[preset]
    elif isinstance(preset, ReproduceConfig):
        config = preset
    else:
        raise TypeError(f"preset must be a name or a ReproduceConfig, got {type(preset).__name__}")
    out = Path(out)
    _check_out(out, config, force)
    t_start = time.perf_counter()
    steps = _Steps(out, log)
    log(f"jr-jax reproduce --preset {config.preset} -> {out}")
    if config == PRESETS.get(config.preset) and (expected := _expected_duration(config.preset)):
        log(expected)

    import jax

    from ._data import load_dataset, make_dataset
    from ._estimator import Estimator
    from ._evaluate import evaluate
    from ._model import Stimulus
    from ._params import Prior
    from ._simulate import Protocol
    from ._train import train

    prior = Prior(kind="normal")  # the study's normal prior, truncated to its ranges
    protocol = Protocol(stimulus=Stimulus.study(), n_trials=config.n_trials)
    key = jax.random.key(config.seed)

    def data_step(name, n, index):
        def run():
            ds = make_dataset(prior, protocol, n, out / "data" / f"{name}.zarr", key=jax.random.fold_in(key, index),
                              chunk_size=1000, split_seed=config.seed, scheduler=scheduler, progress=progress)
            split = ds.split()
            return dict(path=str(ds.path), n=ds.n, n_valid=ds.n_valid(), train=len(split.train), val=len(split.val),
                        test=len(split.test), simulate_seconds=ds.last_run["seconds"])
        return steps(f"data_{name}", run)["value"]

    data = dict(levels=data_step("levels", config.n_levels, 0))
    if config.n_large:
        data["large"] = data_step("large", config.n_large, 1)
    ds_levels = load_dataset(out / "data" / "levels.zarr")
    ds_test = load_dataset(out / "data" / ("large.zarr" if config.n_large else "levels.zarr"))
    amplitude = steps("erp_amplitude", lambda: _amplitude(ds_test, protocol))["value"]

    def train_step(name, ds, snr, epochs, patience, kind="point", **options):
        model_dir = out / "models" / name

        def run():
            encoder = None if options.get("embedding") is not None else config.encoder
            est, history = train(ds, kind=kind, snr_db=snr, encoder=encoder, epochs=epochs, patience=patience,
                                 schedule="cosine", seed=config.seed, checkpoint_dir=out / "checkpoints" / name,
                                 progress=progress, **options)
            est.save(model_dir, overwrite=True)
            samples = sum(h["samples"] for h in history)
            seconds = sum(h["seconds"] for h in history)
            return dict(model=str(model_dir), kind=kind, snr_db=snr, epochs=len(history),
                        n_train=est.manifest["data"]["n_train"],
                        best_val_loss=est.manifest["training"]["best_val_loss"],
                        samples_per_s=samples / max(seconds, 1e-9), history=history)

        return steps(f"train_{name}", run)

    test_levels = list(config.test_levels_db)
    grid_rows, grid_training = [], {}
    for snr in config.train_levels_db:
        name = f"grid_{_slug(snr)}"
        rec = train_step(name, ds_levels, snr, config.grid_epochs, config.grid_patience)
        grid_training[level_label(snr)] = dict(rec["value"], seconds=rec["seconds"])
        ev = steps(f"evaluate_{name}", lambda: evaluate(Estimator.load(out / "models" / name), ds_test, test_levels,
                                                         seed=config.seed, baselines=False))
        grid_rows += [dict(r, train_snr_db=snr) for r in ev["value"]]

    robust_ds = load_dataset(out / "data" / "large.zarr") if config.n_large else ds_levels
    rec = train_step("robust", robust_ds, tuple(config.robust_snr_db), config.robust_epochs, config.robust_patience)
    robust_training = dict(rec["value"], seconds=rec["seconds"])

    def evaluate_robust():
        est = Estimator.load(out / "models" / "robust")
        rows = evaluate(est, ds_test, test_levels, seed=config.seed, baselines=True)
        _save_examples(est, ds_test, test_levels, out / "steps" / "examples.npz", seed=config.seed)
        return rows

    robust_rows = steps("evaluate_robust", evaluate_robust)["value"]

    # the posterior estimator: the robust point regressor's data, by default its flow on that
    # regressor's frozen network
    embedding = Estimator.load(out / "models" / "robust") if config.posterior_embedding == "robust" else None
    posterior_snr = tuple(config.posterior_snr_db or config.robust_snr_db)
    rec = train_step("posterior", robust_ds, posterior_snr, config.posterior_epochs,
                     config.posterior_patience, kind="posterior", embedding=embedding,
                     posterior=dict(config.posterior_options))
    posterior_training = dict(rec["value"], seconds=rec["seconds"])
    posterior_levels = [s for s in test_levels if config.posterior_levels_db is None or s in config.posterior_levels_db]
    posterior = steps("calibrate_posterior", lambda: _calibrate_posterior(
        Estimator.load(out / "models" / "posterior"), ds_test, test_levels, posterior_levels, out / "steps",
        n_draws=config.calibration_draws, seed=config.seed))["value"]

    sens = steps("sensitivity", lambda: _sensitivity(config, protocol, [s for s in test_levels if s is not None],
                                                     key=jax.random.fold_in(key, 2)))["value"]

    step_seconds = dict(steps.seconds)  # in run order
    results = dict(
        meta=dict(preset=config.preset, config=config.to_dict(), versions=_versions(), device=_device(),
                  finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  seconds_this_run=time.perf_counter() - t_start, seconds_all_steps=sum(step_seconds.values()),
                  step_seconds=step_seconds, steps_run_now=steps.ran,
                  prior=prior.to_dict(), protocol=protocol.to_dict()),
        data=data,
        test_dataset="large" if config.n_large else "levels",
        headline_snr_db=headline_level(test_levels),
        grid=dict(train_levels_db=list(config.train_levels_db), test_levels_db=test_levels, training=grid_training,
                  rows=grid_rows),
        robust=dict(training=robust_training, rows=robust_rows),
        posterior=dict(posterior, training=posterior_training),
        amplitude=amplitude,
        sensitivity=sens,
        study=dict(pearson=STUDY_PEARSON, n_test=STUDY_N_TEST, snr_db=STUDY_SNR_DB,
                   note="Pearson r of the study's transformer at its noise factor 1 (about 50 dB after averaging, "
                        "about 100 test ERPs); its Bi-LSTM reached about 0."),
    )
    tmp = out / f".{RESULTS}.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    os.replace(tmp, out / RESULTS)
    render_report(out)
    log(f"wrote {out / 'report.md'}, {out / 'report.html'} and {out / RESULTS} "
        f"({time.perf_counter() - t_start:.0f} s this run)")
    return results


def headline_level(levels):
    """The level of the headline comparison: the study's SNR if tested, else 30 dB, else the first finite."""
    for s in (STUDY_SNR_DB, 30.0):
        if s in levels:
            return s
    return next((s for s in levels if s is not None), None)


def _save_examples(est, ds, levels, path: Path, *, seed: int) -> None:
    """Three test ERPs at every level, and the robust model's predictions on the test split at the
    headline level."""
    import jax

    from ._evaluate import _load_rows, _noisy

    split = ds.split()
    theta, erp = _load_rows(ds, split.test)
    color = est.manifest.get("noise_color", "white")
    pick = np.linspace(0, len(theta) - 1, 3).astype(int)
    noisy = np.stack([_noisy(erp[pick], s, jax.random.key(seed + 7 + i), color)[..., 0] for i, s in enumerate(levels)])
    scatter_snr = headline_level(levels)
    pred = est.predict_array(_noisy(erp, scatter_snr, jax.random.key(seed + 30), color))
    np.savez(path, times=ds.times, examples=noisy, example_theta=theta[pick], theta=theta, pred=pred,
             scatter_snr=np.nan if scatter_snr is None else scatter_snr,
             levels=np.array([np.nan if s is None else s for s in levels]))


def _amplitude(ds, protocol) -> dict:
    """How large the clean test ERPs are (mV): RMS over the epoch (the power the SNR refers to), the
    most negative and most positive value of each ERP, their quantiles, the Spearman correlation
    of the RMS with each parameter over the prior, and the RMS at the JR-1995 defaults."""
    from ._evaluate import _load_rows
    from ._params import JRParams
    from ._simulate import simulate

    theta, erp = _load_rows(ds, ds.split().test)
    erp = erp[..., 0] if erp.shape[-1] == 1 else erp.reshape(len(erp), erp.shape[1], -1).mean(axis=-1)
    rms = np.sqrt(np.mean(erp**2, axis=1))
    low, high = erp.min(axis=1), erp.max(axis=1)

    def ranks(x):
        return np.argsort(np.argsort(x, axis=0), axis=0).astype(float)

    rr = ranks(rms[:, None])[:, 0]
    rt = ranks(theta)
    rho = [float(np.corrcoef(rr, rt[:, j])[0, 1]) for j in range(theta.shape[1])]
    default = np.asarray(simulate(JRParams(), protocol.replace(n_trials=1)))

    def q(x):
        return {f"q{p:02d}": float(np.percentile(x, p)) for p in (5, 25, 50, 75, 95)}

    return dict(n=len(rms), rms_mv=q(rms), min_mv=q(low), max_mv=q(high),
                spearman_rms=dict(zip(ds.names, rho)), default_rms_mv=float(np.sqrt(np.mean(default**2))),
                default_min_mv=float(default.min()), default_max_mv=float(default.max()))


def _calibrate_posterior(est, ds, test_levels, levels, steps_dir: Path, *, n_draws: int, seed: int) -> dict:
    """The posterior estimator on the test split at ``levels``: its posterior mean scored as
    :func:`jr_jax.evaluate` scores it, with the calibration (SBC, coverage, contraction) from the
    same draws. The noisy test ERPs are those :func:`jr_jax.evaluate` gives the point regressors at
    the same level (level i of ``test_levels`` uses ``fold_in(key(seed), i)``), so the posterior
    mean and the point regressor are compared on identical inputs. The calibration arrays of the
    figure levels go to ``steps_dir/calibration_<level>.npz`` for the report's figures.
    """
    import warnings

    import jax

    from ._calibration import calibration_from_draws, posterior_draws
    from ._estimator import MisspecificationWarning
    from ._evaluate import _load_rows, _noisy
    from ._metrics import metrics_rows

    theta, erp = _load_rows(ds, ds.split().test)
    color = est.manifest.get("noise_color", "white")
    key = jax.random.key(seed)
    keep = ("calibration_error", "sbc_pvalue", "sbc_in_band", "coverage_50", "coverage_80", "coverage_90",
            "coverage_95", "contraction", "z_mean", "z_sd")
    figure_levels = [s for s in (STUDY_SNR_DB, 10.0) if s in levels] or levels[:1]
    rows, flagged, figures = [], {}, []
    for i, snr in enumerate(test_levels):
        if snr not in levels:
            continue
        label = dict(snr_db=snr, n_test=len(theta))
        k = jax.random.fold_in(key, i)
        x = _noisy(erp, snr, jax.random.fold_in(k, 0), color)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MisspecificationWarning)
            draws = posterior_draws(est, x, n_draws, key=jax.random.fold_in(k, 3))
        flagged[level_label(snr)] = [str(w.message) for w in caught if issubclass(w.category, MisspecificationWarning)]
        for w in caught:
            if not issubclass(w.category, MisspecificationWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        cal = calibration_from_draws(draws, theta, est.names, prior_sd=est.prior_sd(), lows=est.lows, highs=est.highs,
                                     snr_db=snr)
        extra = {r["parameter"]: r for r in cal.rows()}
        level_rows = metrics_rows(theta, draws.mean(axis=1), est.names, est.lows, est.highs,
                                  method="jr_jax NPE (posterior mean)", **label)
        for row in level_rows:
            row.update({k: extra[row["parameter"]][k] for k in keep})
        level_rows += [dict(method="jr_jax NPE (combination)", parameter=q, **label, **{k: extra[q][k] for k in keep})
                       for q in cal.names[len(est.names):]]
        rows += level_rows
        if snr in figure_levels:
            path = steps_dir / f"calibration_{_slug(snr)}.npz"
            np.savez(path, names=np.array(cal.names), n_draws=cal.n_draws, ranks=cal.ranks, sbc_pvalue=cal.sbc_pvalue,
                     in_band=cal.in_band, levels=np.array(cal.levels), coverage=cal.coverage,
                     calibration_error=cal.calibration_error, contraction=cal.contraction, z_score=cal.z_score,
                     posterior_mean=cal.posterior_mean, truth=cal.truth)
            figures.append(dict(snr_db=snr, arrays=path.name, file=f"calibration_{_slug(snr)}.png"))
    return dict(levels_db=list(levels), n_test=len(theta), n_draws=n_draws, rows=rows, figures=figures,
                misspecification_warnings=flagged)


def _sensitivity(config: ReproduceConfig, protocol, snrs, *, key) -> dict:
    """Sobol' indices of the ERP's RMS over the box prior, and the Fisher R² ceiling per SNR (median
    over prior draws), to set beside the measured R²."""
    import jax

    from . import sensitivity as sa
    from ._params import Prior

    t0 = time.perf_counter()
    sobol = sa.sobol(Prior(), protocol.replace(n_trials=1), "rms", config.sobol_n, key=jax.random.fold_in(key, 0))
    sobol_seconds = time.perf_counter() - t0
    prior = Prior(kind="normal")
    pv = sa.prior_variances(prior)
    ceilings = []  # (draws, snrs, params)
    t0 = time.perf_counter()
    with jax.enable_x64(True):
        draws = prior.sample(jax.random.fold_in(key, 1), config.fisher_draws)
        ref = 20.0
        for i in range(config.fisher_draws):
            params = jax.tree_util.tree_map(lambda x: x[i], draws).astype("float64")
            info = sa.fisher(params, protocol.replace(n_trials=1), ref)["information"]
            per_snr = []
            for snr in snrs:
                f = info * 10 ** ((snr - ref) / 10)  # information scales with 1 / noise variance
                post = np.linalg.inv(f + np.diag(1.0 / pv))
                per_snr.append(1.0 - np.diag(post) / pv)
            ceilings.append(per_snr)
    ceilings = np.asarray(ceilings)
    return dict(
        sobol=dict(qoi="rms", n_simulations=sobol[0]["n_simulations"], prior="box-uniform over the same ranges",
                   seconds=sobol_seconds,
                   rows=[{k: r[k] for k in ("parameter", "S1", "S1_conf", "ST", "ST_conf") if k in r} for r in sobol]),
        fisher=dict(snrs_db=list(snrs), names=list(prior.names), draws=config.fisher_draws,
                    seconds=time.perf_counter() - t0,
                    r2_ceiling_median=np.median(ceilings, axis=0).tolist(),
                    r2_ceiling_q25=np.percentile(ceilings, 25, axis=0).tolist(),
                    r2_ceiling_q75=np.percentile(ceilings, 75, axis=0).tolist()),
    )


