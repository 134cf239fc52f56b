"""Multichannel inference: the Bi-LSTM trained on 64-channel sensor ERPs vs on the source channel.

Both models see the same parameter draws (the study's truncated-normal prior, its stimulus,
60-trial ERPs without intrinsic noise), the same train/validation/test split, the same encoder
(strided Conv1d front-end + Bi-LSTM), epochs and training noise (SNRs uniform in [0, 40] dB, white,
independent across channels, SNR stated on the averaged ERP over all channels). The sensor ERPs are
the source ERPs times the default lead field (``jr_jax.eeg.leadfield()``: biosemi64, MNE's
four-shell sphere, a radial dipole in the left caudal middle frontal region, average reference),
which is exactly what ``simulate`` does with ``Protocol(lead_field=...)``; they are formed batch by
batch so that the 64-channel set never sits in memory whole.

Test: the held-out split at SNRs {clean, 30, 20, 10, 0} dB, noise drawn per sample with fixed seeds
(``add_sensor_noise`` for the sensors, without re-referencing, i.e. the training noise), and once
more for the sensor model with spatially correlated noise that it was not trained on (the
covariance of 500 random background dipoles plus 10 % white sensor noise, average reference).
A third row uses the known lead field g as a spatial filter: the source model applied to
g·x/|g|² of the noisy sensors (with white noise this is the source at the SNR + 10 log10(64) dB).
Also writes a 64-channel topography of the default ERP made with MNE's ``plot_joint``.

    python benchmarks/multichannel.py [--n 5000] [--epochs 10] [--out benchmarks/results]
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jr_jax
import jr_jax.eeg as eeg
from jr_jax._metrics import metrics_rows
from jr_jax._train import TrainingData, add_noise_batch

TEST_SNRS = (None, 30.0, 20.0, 10.0, 0.0)
PROJECTED = "source model on g·x/|g|²"


def sensor_training_data(theta, source, gain, train_idx, val_idx, prior, protocol, ch_names):
    """TrainingData whose batches are the source ERPs times the lead field, formed on the fly."""
    gain = np.asarray(gain, np.float32)

    def sensors(rows):
        return source[rows][:, :, None] * gain

    def batches(epoch, batch_size, seed):  # the order of TrainingData.from_arrays
        order = train_idx[np.random.default_rng(seed * 100_003 + epoch).permutation(len(train_idx))]
        for b in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[b:b + batch_size]
            yield theta[idx], sensors(idx)

    mean, std, rms = TrainingData._stats(sensors(train_idx[:2000]))
    return TrainingData(batches, theta[val_idx], sensors(val_idx), prior.names, prior.units, prior.lows,
                        prior.highs, protocol.fs, protocol.tmin, protocol.tmax, protocol.n_trials, mean, std, rms,
                        len(train_idx), info=dict(source="source ERPs x lead field", n_train=len(train_idx),
                                                  n_val=len(val_idx), ch_names=list(ch_names)))


def background_covariance(n_dipoles=500, seed=0):
    """Channel covariance of ``n_dipoles`` independent random dipoles in the brain (unit variance,
    random orientation, 30-80 mm from the sphere centre, upper half) plus white sensor noise of 10 %
    of the mean variance: spatially smooth 'brain noise'. Same sphere model as ``eeg.leadfield()``."""
    import mne

    info = eeg.montage_info("biosemi64")
    radius, r0, _ = mne.bem.fit_sphere_to_headshape(info, dig_kinds=("eeg",), units="m", verbose=False)
    sphere = mne.make_sphere_model(r0=r0, head_radius=radius, verbose=False)
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n_dipoles, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    u[:, 2] = np.abs(u[:, 2])
    pos = r0 + u * rng.uniform(0.03, 0.08, size=(n_dipoles, 1))
    ori = rng.normal(size=(n_dipoles, 3))
    ori /= np.linalg.norm(ori, axis=1, keepdims=True)
    src = mne.setup_volume_source_space(pos=dict(rr=pos, nn=ori), verbose=False)
    fwd = mne.make_forward_solution(info, None, src, sphere, meg=False, eeg=True, verbose=False)
    G = np.asarray(fwd["sol"]["data"], float).reshape(len(info.ch_names), -1, 3)  # free orientation
    used = np.flatnonzero(fwd["src"][0]["inuse"])
    gains = np.einsum("cnk,nk->cn", G, ori[used])
    cov = gains @ gains.T
    return cov + 0.1 * np.trace(cov) / len(cov) * np.eye(len(cov))


def topomap_figure(gain, ch_names, protocol, path: Path) -> float:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    erp = np.asarray(jr_jax.simulate(jr_jax.JRParams(), protocol.replace(lead_field=gain)))
    ev = eeg.to_evoked(erp, protocol, ch_names=ch_names)
    peaks = [float(protocol.times[np.argmax(np.abs(erp).max(axis=1) * (protocol.times > t0) * (protocol.times < t1))])
             for t0, t1 in ((0.0, 0.15), (0.2, 0.4))]
    fig = ev.plot_joint(times=peaks, title="jr_jax: default parameters, study stimulus, 64-channel sensor ERP (biosemi64)",
                        show=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return float(np.abs(erp).max() * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    prior = jr_jax.Prior(kind="normal")
    protocol = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study())
    lf = eeg.leadfield()
    peak_uv = topomap_figure(lf.gain, lf.ch_names, protocol, out / "eeg_topomap.png")
    print(f"default ERP: sensor peak {peak_uv:.1f} µV; wrote {out / 'eeg_topomap.png'}")

    t0 = time.perf_counter()
    params = prior.sample(jax.random.key(7), args.n)
    source = np.asarray(jr_jax.simulate(params, protocol, chunk_size=1000), np.float32)
    theta = np.asarray(prior.to_array(params), np.float32)
    ok = np.isfinite(source).all(axis=1)
    theta, source = theta[ok], source[ok]
    t_sim = time.perf_counter() - t0
    perm = np.random.default_rng(0).permutation(len(theta))
    test_idx, rest = np.sort(perm[:args.n_test]), perm[args.n_test:]
    n_val = max(2, int(round(0.1 * len(rest))))
    rest_perm = rest[np.random.default_rng(1).permutation(len(rest))]
    val_idx, train_idx = rest_perm[:n_val], rest_perm[n_val:]
    print(f"simulated {args.n} ERPs ({int((~ok).sum())} invalid) in {t_sim:.0f} s; "
          f"split {len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test")

    encoder = dict(hidden=args.hidden, conv_channels=32, conv_kernel=8, conv_stride=8)
    common = dict(snr_db=(0.0, 40.0), encoder=encoder, epochs=args.epochs, patience=10, schedule="cosine",
                  progress=True)
    def src_batches(epoch, batch_size, seed):  # the order of TrainingData.from_arrays
        order = train_idx[np.random.default_rng(seed * 100_003 + epoch).permutation(len(train_idx))]
        for b in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[b:b + batch_size]
            yield theta[idx], source[idx][:, :, None]

    src_data = TrainingData(src_batches, theta[val_idx], source[val_idx][:, :, None], prior.names, prior.units,
                            prior.lows, prior.highs, protocol.fs, protocol.tmin, protocol.tmax, protocol.n_trials,
                            *TrainingData._stats(source[train_idx]), len(train_idx),
                            info=dict(source="source ERPs", n_train=len(train_idx), n_val=len(val_idx)))
    sen_data = sensor_training_data(theta, source, lf.gain, train_idx, val_idx, prior, protocol, lf.ch_names)

    models, seconds = {}, {}
    for label, data in (("source (1 channel)", src_data), ("sensors (64 channels)", sen_data)):
        t0 = time.perf_counter()
        models[label], history = jr_jax.train(data, kind="point", **common)
        seconds[label] = time.perf_counter() - t0
        print(f"{label}: {len(history)} epochs in {seconds[label]:.0f} s, best val loss "
              f"{models[label].manifest['training']['best_val_loss']:.4f}")

    theta_test, src_test = theta[test_idx], source[test_idx][:, :, None]
    gain = np.asarray(lf.gain, np.float32)
    cov_brain = background_covariance()
    rows = []
    names, lows, highs = prior.names, prior.lows, prior.highs
    for i, snr in enumerate(TEST_SNRS):
        key = jax.random.fold_in(jax.random.key(2024), i)
        label = dict(snr_db=snr, n_test=len(test_idx))
        x = src_test if snr is None else np.asarray(add_noise_batch(jnp.asarray(src_test), key, (snr, snr)))
        pred = models["source (1 channel)"].predict_array(x)
        rows += metrics_rows(theta_test, pred, names, lows, highs, model="source (1 channel)", noise="white", **label)
        sensors = src_test * gain
        keys = jax.random.split(key, len(test_idx))
        for noise, cov, ref in (("white", None, None), ("correlated", cov_brain, "average")):
            if snr is None and noise == "correlated":
                continue
            x = sensors if snr is None else np.asarray(eeg.add_sensor_noise(sensors, snr, key=keys, cov=cov,
                                                                             reference=ref))
            pred = models["sensors (64 channels)"].predict_array(x)
            rows += metrics_rows(theta_test, pred, names, lows, highs, model="sensors (64 channels)", noise=noise,
                                 **label)
            if snr is not None:  # the known lead field as a spatial filter, then the source model
                proj = np.einsum("ntc,c->nt", x, gain) / float(gain @ gain)
                pred = models["source (1 channel)"].predict_array(proj)
                rows += metrics_rows(theta_test, pred, names, lows, highs, model=PROJECTED, noise=noise, **label)
    for metric in ("pearson", "r2"):
        print(f"\n{metric}: model, noise, SNR | " + " ".join(f"{n:>6s}" for n in names))
        for model in (*models, PROJECTED):
            for noise in ("white", "correlated"):
                for snr in TEST_SNRS:
                    vals = [r[metric] for r in rows if r["model"] == model and r["noise"] == noise and r["snr_db"] == snr]
                    if vals:
                        print(f"{model:22s} {noise:10s} {'clean' if snr is None else f'{snr:g} dB':>6s} | "
                              + " ".join(f"{v:6.3f}" for v in vals))
    summary = dict(
        n=args.n, n_invalid=int((~ok).sum()), split=dict(train=len(train_idx), val=len(val_idx), test=len(test_idx)),
        encoder=models["source (1 channel)"].manifest["encoder"], epochs=args.epochs, train_snr_db=[0.0, 40.0],
        test_snrs=list(TEST_SNRS), simulate_s=t_sim, train_s=seconds, total_s=time.perf_counter() - t_start,
        leadfield=dict(montage="biosemi64", n_channels=len(lf.gain), position_m=list(eeg.DEFAULT_POSITION),
                       orientation="radial", moment_nam_per_mv=eeg.DEFAULT_MOMENT_PER_MV, reference="average",
                       default_erp_peak_uv=peak_uv, max_gain_ch=lf.ch_names[int(np.abs(lf.gain).argmax())]),
        correlated_noise="covariance of 500 random background dipoles + 10 % white, average reference",
        names=list(names), rows=rows, jax=jax.__version__, jr_jax=jr_jax.__version__,
        mne=__import__("mne").__version__,
    )
    (out / "multichannel.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {out / 'multichannel.json'} ({summary['total_s'] / 60:.1f} min in all)")


if __name__ == "__main__":
    main()
