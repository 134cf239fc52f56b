"""Training an encoder with Optax: fresh measurement noise per epoch, early stopping, checkpoints."""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._data import Dataset
from ._estimator import Estimator, scale_input
from ._flow import PosteriorNet, check_flow_options, to_unbounded
from ._nn import BiLSTM
from ._params import Prior
from ._simulate import Protocol, measurement_noise, simulate


@dataclass
class TrainingData:
    """Training batches, a validation set in memory, and what the estimator must know.

    Build it with :meth:`from_dataset`, :meth:`from_arrays` or :meth:`on_the_fly`. ERPs are clean
    (mV); measurement noise is added by :func:`train`. ``x_mean``/``x_std`` (per channel) are
    statistics of the training split only (mean, and the median RMS as scale).
    """

    batches: Callable[[int, int, int], Iterator[tuple[np.ndarray, np.ndarray]]]  # (epoch, batch_size, seed)
    theta_val: np.ndarray
    erp_val: np.ndarray
    names: tuple[str, ...]
    units: tuple[str, ...]
    lows: np.ndarray
    highs: np.ndarray
    fs: float
    tmin: float
    tmax: float
    n_trials: int
    x_mean: np.ndarray
    x_std: np.ndarray
    rms_range_mv: tuple[float, float]
    n_train: int | None  # None: unlimited (simulated on the fly)
    info: dict = field(default_factory=dict)
    baseline: bool = True  # the ERPs had their pre-stimulus mean subtracted (Protocol.baseline)
    prior: dict | None = None  # Prior.to_dict() of the training parameters, where known
    protocol: dict | None = None  # Protocol.to_dict() of the training ERPs (clean), where known

    @property
    def n_times(self) -> int:
        return self.erp_val.shape[1]

    @property
    def n_channels(self) -> int:
        return self.erp_val.shape[2]

    @staticmethod
    def _stats(erp: np.ndarray):
        erp = _with_channels(erp)
        rms = np.sqrt((erp**2).mean(axis=1))  # (N, C)
        scale = np.median(rms, axis=0) + 1e-8
        total = np.sqrt((erp**2).mean(axis=(1, 2)))
        return erp.mean(axis=(0, 1)), scale, (float(np.percentile(total, 0.1)), float(total.max()))

    @classmethod
    def from_dataset(cls, ds: Dataset, *, stats_samples: int = 4096) -> "TrainingData":
        """The dataset's stored split: training batches streamed from disk, validation in memory."""
        split = ds.split()
        if len(split.train) < 2 or len(split.val) < 2:
            raise ValueError(f"{ds.path}: too few valid samples for training ({len(split.train)} train, {len(split.val)} val)")
        val_theta = np.asarray(ds.theta.get_orthogonal_selection((split.val, slice(None))))
        val_erp = _with_channels(np.asarray(ds.erp.get_orthogonal_selection((split.val,) + (slice(None),) * (ds.erp.ndim - 1))))
        sample = np.sort(np.random.default_rng(0).permutation(split.train)[:stats_samples])
        stats_erp = np.asarray(ds.erp.get_orthogonal_selection((sample,) + (slice(None),) * (ds.erp.ndim - 1)))
        mean, std, rms = cls._stats(stats_erp)
        p = ds.protocol

        def batches(epoch, batch_size, seed):
            for theta, erp in ds.batches(split.train, batch_size, seed=seed * 100_003 + epoch, drop_last=True):
                yield theta, _with_channels(erp)

        return cls(batches, val_theta, val_erp, ds.names, ds.units, ds.prior.lows, ds.prior.highs, p.fs, p.tmin,
                   p.tmax, p.n_trials, mean, std, rms, len(split.train),
                   info=dict(source=str(ds.path), n_train=len(split.train), n_val=len(split.val),
                             n_invalid=split.n_invalid), baseline=bool(p.baseline),
                   prior=ds.prior.to_dict(), protocol=p.to_dict())

    @classmethod
    def from_arrays(cls, theta, erp, *, names, lows, highs, fs, tmin=0.0, units=None, n_trials=1,
                    val_fraction=0.1, seed=0, baseline=True) -> "TrainingData":
        """In-memory samples ``theta (N, n_params)``, ``erp (N, n_times[, n_channels])``, split by ``seed``.

        ``baseline``: whether the ERPs had their pre-stimulus mean subtracted (recorded in the manifest,
        so that :func:`jr_jax.eeg.from_evoked` prepares recordings the same way)."""
        theta, erp = np.asarray(theta, np.float32), _with_channels(np.asarray(erp, np.float32))
        if theta.ndim != 2 or len(theta) != len(erp):
            raise ValueError(f"theta must be (N, n_params) matching erp's N; got {theta.shape} and {erp.shape}")
        ok = np.isfinite(erp).reshape(len(erp), -1).all(axis=1)
        theta, erp = theta[ok], erp[ok]
        perm = np.random.default_rng(seed).permutation(len(theta))
        n_val = max(2, int(round(val_fraction * len(theta))))
        val, tr = perm[:n_val], perm[n_val:]
        mean, std, rms = cls._stats(erp[tr])

        def batches(epoch, batch_size, s):
            order = tr[np.random.default_rng(s * 100_003 + epoch).permutation(len(tr))]
            for b in range(0, len(order) - batch_size + 1, batch_size):
                idx = order[b:b + batch_size]
                yield theta[idx], erp[idx]

        n_times = erp.shape[1]
        return cls(batches, theta[val], erp[val], tuple(names), tuple(units or ("",) * len(names)),
                   np.asarray(lows, float), np.asarray(highs, float), float(fs), float(tmin),
                   float(tmin + (n_times - 1) / fs), int(n_trials), mean, std, rms, len(tr),
                   info=dict(source="arrays", n_train=len(tr), n_val=len(val), n_invalid=int((~ok).sum())),
                   baseline=bool(baseline))

    @classmethod
    def on_the_fly(cls, prior: Prior, protocol: Protocol, *, key, n_val: int = 512,
                   batches_per_epoch: int = 100) -> "TrainingData":
        """Every training batch freshly simulated from ``prior`` (nothing stored); a fixed validation set."""
        if protocol.snr_db is not None:
            raise ValueError("pass a protocol with snr_db=None: train() adds the measurement noise")
        k_val, k_train = jax.random.split(key)

        def draw(k, n, first):
            params = prior.sample(jax.random.fold_in(k, 0), n, first_index=first)
            erp = np.asarray(simulate(params, protocol, key=jax.random.fold_in(k, 1), chunk_size=n, first_index=first))
            theta = np.asarray(prior.to_array(params), np.float32)
            ok = np.isfinite(erp).reshape(n, -1).all(axis=1)
            return theta[ok], _with_channels(erp[ok])

        theta_val, erp_val = draw(k_val, n_val, 0)
        mean, std, rms = cls._stats(draw(jax.random.fold_in(k_train, 2**30), min(4096, 8 * n_val), 0)[1])

        def batches(epoch, batch_size, seed):
            k = jax.random.fold_in(jax.random.fold_in(k_train, seed), epoch)
            for b in range(batches_per_epoch):
                theta, erp = draw(k, batch_size, b * batch_size)
                if len(theta) == batch_size:
                    yield theta, erp

        return cls(batches, theta_val, erp_val, prior.names, prior.units, prior.lows, prior.highs, protocol.fs,
                   protocol.tmin, protocol.tmax, protocol.n_trials, mean, std, rms, None,
                   info=dict(source="simulated on the fly", batches_per_epoch=batches_per_epoch, n_val=len(theta_val)),
                   baseline=bool(protocol.baseline), prior=prior.to_dict(), protocol=protocol.to_dict())


def _with_channels(erp: np.ndarray) -> np.ndarray:
    return erp[..., None] if erp.ndim == 2 else erp


def _snr_spec(snr_db):
    """None (clean), a number, or a (low, high) range in dB drawn uniformly per sample."""
    if snr_db is None:
        return None
    if isinstance(snr_db, (int, float)):
        if not math.isfinite(snr_db):
            raise ValueError(f"snr_db must be finite, a (low, high) range or None; got {snr_db!r}")
        return (float(snr_db), float(snr_db))
    lo, hi = (float(v) for v in snr_db)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"snr_db range must be finite with low <= high, got {snr_db!r}")
    return (lo, hi)


def add_noise_batch(erp, key, snr, color="white", noisy=True):
    """Measurement noise per sample at SNRs drawn uniformly in ``snr = (low, high)`` dB (or clean).

    ``snr`` may be an array ``(2,)`` and ``noisy`` a traced bool (False: ``erp`` unchanged), so that
    one compiled training step serves every noise level."""
    if snr is None:
        return erp
    k_snr, k_noise = jax.random.split(key)
    n = erp.shape[0]
    db = jax.random.uniform(k_snr, (n,), minval=snr[0], maxval=snr[1])
    power = jnp.mean(erp**2, axis=(1, 2))
    std = jnp.sqrt(power / 10.0 ** (db / 10.0))
    noise = jax.vmap(lambda k: measurement_noise(k, erp.shape[1:], color, erp.dtype))(jax.random.split(k_noise, n))
    return jnp.where(noisy, erp + std[:, None, None] * noise, erp)


# scaled targets are kept this far inside (0, 1) before the logit (a prior draw may sit on a bound)
_EDGE = 1e-6


def _objective(model, x, y, keys=None, frozen_embedding=False):
    """Training objective on scaled inputs ``x`` and targets ``y`` in [0, 1] (by the prior bounds).

    Point regressor: mean squared error. Posterior: mean negative log-density of
    ``z = logit(y)`` under the flow given the ERP's embedding. The Jacobian from z to the parameters
    does not depend on the network, so this is the negative log posterior density in parameter
    units up to a constant of the data. ``frozen_embedding``: the encoder runs in inference mode
    and no gradient reaches it (its weights stay as they are).
    """
    inference = keys is None
    if isinstance(model, PosteriorNet):
        z = to_unbounded(jnp.clip(y, _EDGE, 1.0 - _EDGE), 0.0, 1.0)
        if frozen_embedding:
            emb = jax.lax.stop_gradient(model.embed(x, inference=True))
        else:
            emb = model.embed(x, keys=keys, inference=inference)
        loss = -jnp.mean(model.log_prob_z(z, emb))
        if model.regression_head is not None:
            loss = loss + model.config["regression_weight"] * jnp.mean(jnp.sum((model.regress(emb) - y) ** 2, axis=-1))
        return loss
    return jnp.mean((model.batch(x, keys=keys, inference=inference) - y) ** 2)


def _loss(model, x_mean, x_std, erp, y, key, snr, noisy, color, dropout_key, frozen_embedding=False):
    x = scale_input(add_noise_batch(erp, key, snr, color, noisy), x_mean, x_std)
    return _objective(model, x, y, jax.random.split(dropout_key, x.shape[0]), frozen_embedding)


#: seconds of batches (after the first, which compiles) timed before the expected duration is printed
_TIMING_SECONDS = 5.0


def _expected_duration(compile_seconds: float, batch_seconds: float, batches_per_epoch: int, epochs: int,
                       batch_size: int, validation_seconds: float) -> str:
    """The line printed a few seconds into the first epoch, before the long part of a training run.

    ``compile_seconds``: the first batch (compilation included); ``batch_seconds``: the mean time of
    the batches timed after it; ``validation_seconds``: one validation pass (compiled); the run is
    ``epochs`` epochs (those left) of ``batches_per_epoch`` batches and one validation pass each.
    """
    epoch = batches_per_epoch * batch_seconds + validation_seconds
    rest = epochs * epoch
    rate = batch_size / batch_seconds if batch_seconds > 0 else float("inf")

    def span(s):
        return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"

    return (f"expected duration: {span(epoch)} per epoch ({rate:.0f} samples/s after {compile_seconds:.0f} s of "
            f"compilation, validation {validation_seconds:.0f} s); {epochs} epochs at most: about {span(rest)} "
            "(early stopping may end sooner)")


#: train()'s Adam learning rate unless one is given
LEARNING_RATE = 1e-3
#: and for a flow trained on a frozen point estimator (``embedding=``), where only the flow learns: on
#: the quick preset's data (8000 ERPs, -5 to 55 dB, 25 epochs, cosine; benchmarks/reproduce_posterior.py,
#: frozen_wide_25 against frozen_wide_25_lr1e-3), 4e-3 reached a validation loss of 7.77 nats against
#: 8.39 at 1e-3, and worst calibration errors at 50/30/10/0 dB of 0.018/0.018/0.034/0.015 against
#: 0.038/0.031/0.017/0.031 (8e-3, tried once: 8.22 nats)
FROZEN_EMBEDDING_LEARNING_RATE = 4e-3

#: train()'s encoder unless options are given (the reproduce presets' too): the study's Bi-LSTM (64
#: units per direction, one layer) behind a strided Conv1d (32 channels, kernel and stride 16
#: samples), which shortens the recurrence 16-fold. On the development CPU the plain Bi-LSTM trained
#: at 186 samples/s on 1201-sample ERPs and a stride-4 front-end 3.4x faster (``benchmarks/train.py``);
#: the plain one is too slow for a default. ``encoder=dict(conv_channels=0)`` gives it.
DEFAULT_ENCODER = dict(hidden=64, layers=1, dropout=0.1, conv_channels=32, conv_kernel=16, conv_stride=16)


#: train()'s posterior options unless ``posterior`` replaces them (the others: the defaults of
#: :class:`jr_jax._flow.PosteriorNet`). The noise feature and the regression head are off by default.
#: On the posterior benchmark's problem (10^4 noise-free simulations of the study's prior, SNR 0-40
#: dB; ``benchmarks/posterior_options.py``, runs in ``benchmarks/results/posterior_options.jsonl``)
#: the two together (weight 10, 15 epochs, cosine schedule) gave SBC failures on 0 and 1 of 13
#: quantities at 30 and 10 dB (without them: 3 and 4 after 12 epochs at a constant rate, 2 and 0
#: after 30 epochs with the cosine schedule). On the quick preset's data (trial averages with
#: intrinsic noise, 10 epochs) they made b_i's posterior overconfident: calibration error 0.058 at
#: 50 dB (outside the training SNRs) against 0.023 without them, and SBC failures on b_i at 50, 10
#: and 0 dB. Pass ``posterior=dict(noise_feature=True, regression_weight=10.0)`` to use them.
DEFAULT_POSTERIOR = dict(noise_feature=False, regression_weight=0.0)


def train(
    data: TrainingData | Dataset,
    *,
    kind: str = "posterior",
    snr_db=None,
    noise_color: str = "white",
    encoder: dict | None = None,
    posterior: dict | None = None,
    embedding: Estimator | None = None,
    epochs: int = 60,
    batch_size: int = 32,
    learning_rate: float | None = None,
    schedule: str | None = None,
    clip_norm: float = 1.0,
    patience: int = 15,
    min_delta: float = 0.0,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[Estimator, list[dict]]:
    """Train an estimator of the parameters from an ERP: a posterior (default) or a point regressor.

    - ``kind="posterior"`` (default): neural posterior estimation. The encoder (default: the study's
      Bi-LSTM) embeds the ERP and a conditional normalizing flow (flowjax; options in
      ``posterior``: ``embed_dim``, ``flow_layers``, ``knots``, ``interval``, ``nn_width``,
      ``noise_feature``, ``regression_weight``, ``conditional_affine``, see
      :class:`jr_jax._flow.PosteriorNet`; each replaces that of :data:`DEFAULT_POSTERIOR`) models
      the parameters in the logit of the prior box, trained end to end on the negative log
      posterior density (plus ``regression_weight`` times the squared error of a linear head from
      the embedding to the scaled parameters). It is the default because the JR parameters are
      largely sloppy (only the products C a_k enter the model, and most other directions are
      weakly determined at realistic SNR): a posterior says which numbers the data determine, a
      point estimate does not. The estimator's :meth:`~Estimator.sample` and
      :meth:`~Estimator.posterior` give draws and intervals; ``predict`` the posterior mean.
    - ``embedding``: a point estimator (``kind="point"``) trained on the same data. Its network
      becomes the posterior's embedding, frozen (no gradient reaches it, dropout off): the flow is
      trained on its estimates, the regression summaries of Fearnhead and Prangle (2012), plus the
      noise feature if asked for; the encoder options are the regressor's. The posterior is then
      that of the parameters given those estimates (calibrated as far as the flow fits), and its
      mean carries the regressor's information. Not with ``regression_weight`` or ``embed_dim``.
    - ``kind="point"``: the study's regressor, MSE on the targets scaled by the prior bounds.
    - ``data``: a :class:`TrainingData` or a :class:`Dataset` (its stored split is used).
    - ``snr_db``: measurement noise added to every training batch, fresh each epoch: ``None``
      (clean), a number, or a ``(low, high)`` range drawn per sample (noise-robust training).
      The validation set gets noise drawn once, at the same SNRs.
    - ``encoder``: options of :class:`jr_jax._nn.BiLSTM` (``hidden``, ``layers``, ``dropout``,
      ``conv_channels``, ``conv_kernel``, ``conv_stride``), each replacing that of
      :data:`DEFAULT_ENCODER` (64 units, a Conv1d front-end of 32 channels, kernel and stride 16
      samples); ``conv_channels=0`` removes the front-end (the study's plain Bi-LSTM, several
      times slower to train).
    - Adam (``learning_rate``, default :data:`LEARNING_RATE` = 1e-3, or
      :data:`FROZEN_EMBEDDING_LEARNING_RATE` = 4e-3 for a flow on a frozen ``embedding``;
      ``schedule="cosine"`` decays it to 0 over ``epochs``) after global
      gradient clipping at ``clip_norm``; MSE on targets scaled to [0, 1] by the prior bounds;
      inputs standardised with training-split statistics.
    - Early stopping: stops when the validation loss has not improved by ``min_delta`` for
      ``patience`` epochs; the best weights are returned. The defaults (60 epochs, patience 15) are
      chosen to end in hours, not days, on a CPU (the study trained for 150 epochs with patience 50:
      pass those to match it). With ``progress``, the expected duration of the run (time per
      epoch, samples/s, the time of all epochs) is printed about five seconds into the first epoch,
      from the batches after the first (which compiles) and one validation pass timed before it.
    - ``checkpoint_dir``: state saved after every epoch; calling again with the same arguments
      resumes where the last run stopped.
    - Several local devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` on a CPU, as the
      ``jr-jax`` command sets up with one per core): each batch is split over them.

    Returns the :class:`Estimator` and the history (one dict per epoch).
    """
    if isinstance(data, Dataset):
        data = TrainingData.from_dataset(data)
    snr = _snr_spec(snr_db)
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("patience", patience, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if learning_rate is None:
        learning_rate = FROZEN_EMBEDDING_LEARNING_RATE if embedding is not None else LEARNING_RATE
    for name, value, low, strict in (("learning_rate", learning_rate, 0.0, True), ("clip_norm", clip_norm, 0.0, True),
                                     ("min_delta", min_delta, 0.0, False)):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value <= low if strict else value < low):
            raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
    learning_rate, clip_norm, min_delta = float(learning_rate), float(clip_norm), float(min_delta)
    if noise_color not in ("white", "pink"):
        raise ValueError(f"noise_color must be 'white' or 'pink', got {noise_color!r}")
    if schedule not in (None, "cosine"):
        raise ValueError(f"schedule must be None or 'cosine', got {schedule!r}")
    if data.n_train is not None and data.n_train < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {data.n_train} training samples")
    if kind not in ("posterior", "point"):
        raise ValueError(f"kind must be 'posterior' or 'point', got {kind!r}")
    if posterior is not None and kind != "posterior":
        raise ValueError("posterior options are only for kind='posterior'")
    posterior_options = dict(DEFAULT_POSTERIOR, **dict(posterior or {}))
    if embedding is not None:
        _check_embedding_estimator(embedding, data, kind, encoder, posterior_options)
        encoder = {k: v for k, v in embedding.encoder.config.items() if k not in ("kind", "n_channels", "n_out")}
        posterior_options["embed_dim"] = len(data.names)
    options = dict(DEFAULT_ENCODER, **dict(encoder or {}))
    if options["conv_channels"] and data.n_times < options["conv_kernel"]:
        raise ValueError(f"the ERPs have {data.n_times} samples, fewer than the encoder's conv_kernel "
                         f"{options['conv_kernel']}: pass encoder=dict(conv_kernel=...) no longer than the ERP, "
                         "or encoder=dict(conv_channels=0) for no convolution front-end")
    key = jax.random.key(seed)
    k_model, k_val, k_train = jax.random.split(key, 3)
    if kind == "point":
        model = BiLSTM(data.n_channels, len(data.names), **options, key=k_model)
    else:
        model = PosteriorNet(data.n_channels, len(data.names), encoder=options, **posterior_options, key=k_model)
        if embedding is not None:
            model = eqx.tree_at(lambda m: m.embedding, model, embedding.encoder)
    frozen_embedding = embedding is not None

    lows, highs = np.asarray(data.lows, np.float32), np.asarray(data.highs, np.float32)
    x_mean, x_std = jnp.asarray(data.x_mean, jnp.float32), jnp.asarray(data.x_std, jnp.float32)
    y_val = jnp.asarray((data.theta_val - lows) / (highs - lows))
    erp_val = jnp.asarray(data.erp_val)
    x_val = add_noise_batch(erp_val, k_val, snr, noise_color)

    batches_per_epoch = data.n_train // batch_size if data.n_train else data.info["batches_per_epoch"]
    lr = learning_rate
    if schedule == "cosine":
        steps = epochs * batches_per_epoch
        lr = optax.cosine_decay_schedule(learning_rate, max(steps, 1))
    optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(lr))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    # the SNR range is an argument, not a constant: the trainings of a reproduce run (clean, each
    # level, the robust range) compile the same program, and the jr-jax command's cache loads it
    snr_range = jnp.asarray(snr if snr is not None else (0.0, 0.0), jnp.float32)
    noisy = jnp.asarray(snr is not None)

    @eqx.filter_jit
    def step(model, opt_state, erp, y, key, snr_range, noisy):
        k_noise, k_drop = jax.random.split(key)
        loss, grads = eqx.filter_value_and_grad(_loss)(model, x_mean, x_std, erp, y, k_noise, snr_range, noisy,
                                                       noise_color, k_drop, frozen_embedding)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    @eqx.filter_jit
    def val_loss(model, x, y):
        return _objective(model, scale_input(x, x_mean, x_std), y)

    import hashlib

    data_digest = hashlib.sha256(b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in
                                          (data.theta_val, data.erp_val, data.x_mean, data.x_std))).hexdigest()
    if frozen_embedding:
        leaves = jax.tree_util.tree_leaves(eqx.filter(embedding.encoder, eqx.is_array))
        data_digest += " embedding " + hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in leaves)).hexdigest()
    fingerprint = json.dumps(dict(data=data_digest, snr=snr, noise_color=noise_color, encoder=model.config, epochs=epochs,
                                  batch_size=batch_size, lr=learning_rate, schedule=schedule, clip=clip_norm,
                                  patience=patience, min_delta=min_delta, seed=seed, names=list(data.names),
                                  n_train=data.n_train, info=data.info), sort_keys=True)
    state = dict(epoch=0, best=math.inf, bad=0, history=[])
    best_model = model
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and (ckpt / "state.json").is_file():
        saved = json.loads((ckpt / "state.json").read_text())
        if saved["fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt} holds a checkpoint of a different training run; use another checkpoint_dir "
                             "(jr-jax train: --force starts afresh)")
        model, opt_state, best_model = eqx.tree_deserialise_leaves(ckpt / saved["weights"], (model, opt_state, model))
        state = saved["state"]
    put_batch, model, opt_state = _data_parallel(batch_size, model, opt_state)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=state["epoch"], unit="epoch", desc="training", dynamic_ncols=True)
    announce = bar is not None and state["epoch"] < epochs and batches_per_epoch > 1
    if announce:  # time one validation pass for the expected duration (the first call compiles it)
        float(val_loss(model, x_val, y_val))
        t_val = time.perf_counter()
        float(val_loss(model, x_val, y_val))
        validation_seconds = time.perf_counter() - t_val
    try:
        while state["epoch"] < epochs and state["bad"] < patience:
            epoch = state["epoch"]
            t0 = time.perf_counter()
            total, count = 0.0, 0
            k_epoch = jax.random.fold_in(k_train, epoch)
            for b, (theta, erp) in enumerate(data.batches(epoch, batch_size, seed)):
                y = (theta - lows) / (highs - lows)
                model, opt_state, loss = step(model, opt_state, put_batch(erp), put_batch(y),
                                              jax.random.fold_in(k_epoch, b), snr_range, noisy)
                total, count = total + float(loss), count + 1
                if announce:
                    now = time.perf_counter()
                    if b == 0:
                        t_compiled = now
                    elif now - t_compiled >= _TIMING_SECONDS or b + 1 == batches_per_epoch:
                        bar.write(_expected_duration(t_compiled - t0, (now - t_compiled) / b, batches_per_epoch,
                                                     epochs - epoch, batch_size, validation_seconds))
                        announce = False
            if count == 0:
                raise ValueError("no training batch: fewer training samples than batch_size")
            v = float(val_loss(model, x_val, y_val))
            if v < state["best"] - min_delta:
                state["best"], state["bad"], best_model = v, 0, model
            else:
                state["bad"] += 1
            state["epoch"] = epoch + 1
            state["history"].append(dict(epoch=epoch + 1, train_loss=total / count, val_loss=v,
                                         seconds=time.perf_counter() - t0, samples=count * batch_size))
            if ckpt is not None:
                ckpt.mkdir(parents=True, exist_ok=True)
                # weights under a new name first, then state.json naming them (each write atomic): a
                # crash at any point leaves a state.json whose weights file is the matching one
                weights = f"checkpoint-{state['epoch']}.eqx"
                tmp = ckpt / f".{weights}.tmp"
                eqx.tree_serialise_leaves(tmp, (model, opt_state, best_model))
                os.replace(tmp, ckpt / weights)
                tmp = ckpt / ".state.json.tmp"
                tmp.write_text(json.dumps(dict(fingerprint=fingerprint, state=state, weights=weights)))
                os.replace(tmp, ckpt / "state.json")
                for old in ckpt.glob("checkpoint-*.eqx"):
                    if old.name != weights:
                        old.unlink()
            if bar is not None:
                bar.set_postfix(train=f"{total / count:.4f}", val=f"{v:.4f}", best=f"{state['best']:.4f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    import diffrax

    from . import __version__

    manifest = dict(
        kind=kind,
        encoder=best_model.config,
        names=list(data.names), units=list(data.units), lows=lows.tolist(), highs=highs.tolist(),
        fs=data.fs, tmin=data.tmin, tmax=data.tmax, n_times=data.n_times, n_channels=data.n_channels,
        n_trials=data.n_trials, baseline=data.baseline, snr_db=None if snr is None else list(snr),
        noise_color=noise_color,
        rms_range_mv=list(data.rms_range_mv), data=data.info, prior=data.prior, protocol=data.protocol,
        training=dict(epochs=state["epoch"], best_val_loss=state["best"], batch_size=batch_size,
                      frozen_embedding=frozen_embedding,
                      learning_rate=learning_rate, schedule=schedule, clip_norm=clip_norm, patience=patience,
                      min_delta=min_delta, seed=seed),
        versions=dict(jr_jax=__version__, jax=jax.__version__, equinox=eqx.__version__, optax=optax.__version__,
                      diffrax=diffrax.__version__),
    )
    best_model = jax.tree_util.tree_map(lambda a: jax.device_put(a, jax.local_devices()[0]) if eqx.is_array(a) else a,
                                        best_model)
    if kind == "posterior":
        manifest["embedding_check"] = _embedding_check(best_model, scale_input(x_val, x_mean, x_std))
    return Estimator(best_model, x_mean, x_std, manifest), state["history"]


def _check_embedding_estimator(embedding, data: TrainingData, kind: str, encoder, posterior: dict):
    """``train(..., embedding=...)`` needs a point estimator of the same parameters, data and inputs."""
    if kind != "posterior":
        raise ValueError("embedding is only for kind='posterior' (the flow is trained on its estimates)")
    if not isinstance(embedding, Estimator) or embedding.kind != "point":
        raise ValueError(f"embedding must be a point Estimator (jr_jax.train(..., kind='point')), got "
                         f"{getattr(embedding, 'kind', type(embedding).__name__)!r}")
    if encoder is not None:
        raise ValueError("pass either encoder or embedding: with embedding the encoder is the point estimator's")
    check_flow_options(posterior, frozen_embedding=True)
    m = embedding.manifest
    for what, mine, theirs in (("names", list(data.names), m.get("names")),
                               ("n_channels", data.n_channels, m.get("n_channels")),
                               ("n_times", data.n_times, m.get("n_times"))):
        if mine != theirs:
            raise ValueError(f"embedding was trained with {what} {theirs!r}, the data have {mine!r}")
    for what, mine, theirs in (("prior bounds", np.r_[data.lows, data.highs], np.r_[m["lows"], m["highs"]]),
                               ("input scaling", np.r_[np.ravel(data.x_mean), np.ravel(data.x_std)],
                                np.r_[np.ravel(embedding.x_mean), np.ravel(embedding.x_std)])):
        if not np.allclose(np.asarray(mine, np.float64), np.asarray(theirs, np.float64), rtol=1e-5, atol=0):
            raise ValueError(f"embedding was trained on other data (its {what} differ from these data's): "
                             "train the point estimator on the same data")


def _embedding_check(model: PosteriorNet, x_val) -> dict:
    """Where the (noisy) validation ERPs' embeddings lie, for the misspecification check of
    :meth:`Estimator.sample`: the mean and the Cholesky factor of the covariance (shrunk by 10 %
    towards its diagonal's mean) of one half of them, and a threshold of 1.5 x the largest squared
    Mahalanobis distance among the other half (held out, so that the distances are not biased low
    by the covariance's fit)."""
    emb = np.concatenate([np.asarray(model.embed(x_val[b:b + 256], inference=True), np.float64)
                          for b in range(0, len(x_val), 256)])
    fit, held = emb[0::2], emb[1::2]
    mean = fit.mean(axis=0)
    cov = np.cov(fit, rowvar=False)
    cov = 0.9 * cov + 0.1 * np.trace(cov) / len(cov) * np.eye(len(cov)) + 1e-9 * np.eye(len(cov))
    chol = np.linalg.cholesky(cov)
    d2 = np.sum(np.linalg.solve(chol, (held - mean).T) ** 2, axis=0)
    return dict(mean=mean.tolist(), chol=chol.tolist(), threshold=1.5 * float(d2.max()), n=len(held))


def _data_parallel(batch_size: int, model, opt_state):
    """With several local devices (e.g. one host device per CPU core, as the ``jr-jax`` command sets
    up) and a batch size they divide: each batch split over the devices, the model and optimiser
    state replicated; XLA sums the gradients across devices. Otherwise one device."""
    devices = jax.local_devices()
    if len(devices) < 2 or batch_size % len(devices):
        return jnp.asarray, model, opt_state
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices), ("batch",))
    split, replicated = NamedSharding(mesh, PartitionSpec("batch")), NamedSharding(mesh, PartitionSpec())
    replicate = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda a: jax.device_put(a, replicated) if eqx.is_array(a) else a, tree)
    return (lambda a: jax.device_put(np.asarray(a), split)), replicate(model), replicate(opt_state)
