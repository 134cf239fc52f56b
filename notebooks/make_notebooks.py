"""Write the notebooks from the cells below and execute them, so that they are stored with their
figures. Small sizes by default (each notebook runs in well under a minute on a 2-core CPU);
JR_JAX_FULL=1 selects the full sizes.

    python notebooks/make_notebooks.py [NAME.ipynb ...]

To add a notebook: write its cells as a list of ("md" | "code", source) pairs and add one entry
to NOTEBOOKS (name -> cells) and to MIN_FIGURES (name -> the figures it must draw);
tests/test_notebooks.py runs every notebook listed there. Notebooks use the public API only
(``jr_jax.X``, ``jr_jax.sensitivity.X``), and any number their text quotes is printed by a code
cell from the results it computed (the "Reading" cells), never typed into markdown.
"""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

SETUP = """\
import os
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
import jr_jax
from jr_jax import sensitivity as sa

FULL = os.environ.get("JR_JAX_FULL") == "1"   # small sizes unless JR_JAX_FULL=1
protocol = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study())
names = jr_jax.STUDY_PARAMETERS
print("full sizes" if FULL else "small sizes (set JR_JAX_FULL=1 for the full ones)")"""

GRADIENT = [
    ("md", """\
# Gradient sensitivity of the Jansen-Rit ERP

Which of the study's nine parameters can an ERP reveal? This notebook sets exact derivatives
through the simulator (elasticities, DGSM, Fisher information) beside SALib's variance-based
Sobol' indices and Morris screening. Units are consistent throughout (mV, s, s⁻¹): the reference
study's later code mixed volts with r = 0.56 mV⁻¹, which flattened the sigmoid.

Protocol: the study's stimulus (60 s⁻¹ for 50 ms into both interneuron populations, 0.56 × 60 into
the pyramidal one), 1 s burn-in, epoch −0.2..1.0 s at 1 kHz, noise-free ERP."""),
    ("code", SETUP),
    ("md", """\
## Elasticities over time

d ERP(t) / d log θ at the JR-1995 defaults, by forward-mode differentiation (`jax.jacfwd`) through
the Diffrax solve, in float64: how much the ERP moves, in mV, for a 100 % relative change of each
parameter, time point by time point."""),
    ("code", """\
with jax.enable_x64(True):
    el = sa.elasticities(jr_jax.JRParams().astype(jnp.float64), protocol, "waveform")
t_ms = protocol.times * 1e3
fig, ax = plt.subplots(figsize=(9, 4))
for j, name in enumerate(names):
    ax.plot(t_ms, el[:, j], label=name, lw=1)
ax.axvspan(0, 50, color="0.9", zorder=0)
ax.set_xlabel("time from stimulus onset (ms)"); ax.set_ylabel("d ERP / d log θ (mV)")
ax.legend(ncol=3, fontsize=8); ax.grid(alpha=0.3)
peak = np.abs(el).max(axis=0)
print("largest |d ERP / d log θ| (mV):", dict(zip(names, np.round(peak, 2))))"""),
    ("md", """\
## Sobol' ST beside the DGSM bound

For the post-stimulus RMS of the ERP over the study's (uniform) ranges: Sobol' indices from SALib,
and the derivative-based measure ν_i = E[(∂q/∂θ_i)²] from exact reverse-mode gradients, with the
Sobol'–Kucherenko bound ST_i ≤ (b_i − a_i)² ν_i / (π² V)."""),
    ("code", """\
prior = jr_jax.Prior()
key = jax.random.key(0)
n_sobol, n_dgsm = (1024, 1024) if FULL else (64, 64)
sob = sa.sobol(prior, protocol, "rms", n_sobol, key=key)
dg = sa.dgsm(prior, protocol, "rms", n_dgsm, key=key)
print(f"Sobol': {sob[0]['n_simulations']} simulations; DGSM: {n_dgsm} simulations + gradients")
print(f"{'param':6s} {'S1':>7s} {'ST':>7s} {'ST conf':>8s} {'DGSM bound':>11s} {'95 % CI':>20s}  bound holds")
for s, d in zip(sob, dg):
    holds = s["ST"] - s["ST_conf"] <= d["dgsm_high"]
    print(f"{s['parameter']:6s} {s['S1']:7.3f} {s['ST']:7.3f} {s['ST_conf']:8.3f} {d['dgsm']:11.3g} "
          f"[{d['dgsm_low']:8.3g}, {d['dgsm_high']:8.3g}]  {holds}")
x = np.arange(len(names))
fig, ax = plt.subplots(figsize=(9, 3.5))
ax.bar(x - 0.2, [max(s["ST"], 1e-4) for s in sob], 0.4, label="Sobol' ST")
ax.bar(x + 0.2, [d["dgsm"] for d in dg], 0.4, label="DGSM bound")
ax.set_yscale("log"); ax.set_xticks(x, names); ax.legend(); ax.grid(alpha=0.3, axis="y")"""),
    ("md", "## Morris screening (μ*, σ) of the same QoI"),
    ("code", """\
mor = sa.morris(prior, protocol, "rms", 64 if FULL else 8, key=key)
fig, ax = plt.subplots(figsize=(9, 3.5))
ax.bar(x - 0.2, [r["mu_star"] for r in mor], 0.4, yerr=[r["mu_star_conf"] for r in mor], label="μ*")
ax.bar(x + 0.2, [r["sigma"] for r in mor], 0.4, label="σ")
ax.set_xticks(x, names); ax.set_ylabel("elementary effects of the RMS (mV)"); ax.legend(); ax.grid(alpha=0.3, axis="y")
for r in mor:
    print(f"{r['parameter']:6s} mu* {r['mu_star']:9.3g} ± {r['mu_star_conf']:.2g}   sigma {r['sigma']:9.3g}")"""),
    ("md", """\
## The Fisher ceiling

Fisher information of the whole ERP at the defaults under white measurement noise, and the R²
that an efficient estimator could reach under the study's truncated-normal prior (Laplace
approximation). This is a local figure (at one parameter set), to be read beside the Bi-LSTM's
measured R² over the prior (README, recovery table)."""),
    ("code", """\
study_prior = jr_jax.Prior(kind="normal")
snrs = (0, 10, 20, 30) if FULL else (10, 30)
ceilings = {}
with jax.enable_x64(True):
    for snr in snrs:
        res = sa.fisher(jr_jax.JRParams().astype(jnp.float64), protocol, float(snr), prior=study_prior)
        ceilings[snr] = res["r2_ceiling"]
print("R² ceiling at the defaults:")
for snr, c in ceilings.items():
    print(f"  {snr:>2} dB: " + "  ".join(f"{n} {v:.2f}" for n, v in zip(names, c)))
print("Fisher eigenvalues at the last SNR:", np.array2string(res["eigenvalues"], precision=2))
fig, ax = plt.subplots(figsize=(9, 3.5))
for snr, c in ceilings.items():
    ax.plot(names, c, "o-", label=f"{snr} dB")
ax.set_ylim(0, 1.02); ax.set_ylabel("R² ceiling"); ax.legend(); ax.grid(alpha=0.3)"""),
    ("md", """\
## Reading

Printed from the results above. The model depends on C and a_1..a_4 only through the products
C_k = a_k C: scaling C by λ and every a_k by 1/λ leaves the ERP unchanged, so the Fisher
information has an exact null direction and no estimator can separate C from the a_k; only the
prior resolves that direction."""),
    ("code", """\
st = {s["parameter"]: s["ST"] for s in sob}
order = sorted(st, key=st.get, reverse=True)
holds = [s["parameter"] for s, d in zip(sob, dg) if s["ST"] - s["ST_conf"] <= d["dgsm_high"]]
ev = np.abs(res["eigenvalues"])
null = res["eigenvectors"][:, 0]                          # the direction of the smallest eigenvalue
log_scale = np.array([1.0 if n == "C" else -1.0 if n.startswith("a_") else 0.0 for n in names])
log_scale /= np.linalg.norm(log_scale)
theta0 = np.array([float(getattr(jr_jax.JRParams(), n)) for n in names])
rel = null / theta0                                       # as relative changes, d theta / theta
align = abs(float(np.dot(rel, log_scale))) / np.linalg.norm(rel)
print(f"- Sobol' ST of the RMS ({sob[0]['n_simulations']} simulations): largest {', '.join(f'{p} {st[p]:.2f}' for p in order[:4])}; "
      f"smallest {', '.join(f'{p} {st[p]:.3f}' for p in order[-3:])}.")
print(f"- The DGSM bound holds (ST minus its interval below the bound's upper limit) for {len(holds)} of {len(names)} parameters"
      + ("." if len(holds) == len(names) else f" (not for {', '.join(p for p in names if p not in holds)})."))
print(f"- Fisher eigenvalues at {snrs[-1]} dB span {ev.max():.3g} down to {ev.min():.3g}: a ratio of {ev.min() / ev.max():.1e}, "
      f"zero to float64 rounding. Its eigenvector, as a relative change of each parameter, lies along "
      f"(C up, every a_k down) to {align:.4f} (1 = exactly the scaling direction).")
lowest = min(ceilings)
print(f"- R² ceiling at the defaults: at {lowest} dB " + ", ".join(f"{n} {c:.2f}" for n, c in zip(names, ceilings[lowest]))
      + f"; at {snrs[-1]} dB the a_k reach at most {max(ceilings[snrs[-1]][names.index(f'a_{k}')] for k in range(1, 5)):.2f} "
      "(the scaling direction is left to the prior).")"""),
]

OAT = [
    ("md", """\
# The study's one-at-a-time sweeps, with consistent units

Each parameter swept over 0.5–1.5× its JR-1995 default, the others fixed, the ERP at the source
drawn as a heat map over time (left), and the log relative squared deviation from the sweep's mean
(right) — the figures of the reference study, here with mV, s and s⁻¹ throughout. One batched
simulator call per parameter."""),
    ("code", SETUP),
    ("code", """\
factors = np.linspace(0.5, 1.5, 200 if FULL else 21)
params = jr_jax.JRParams()
sweeps = {name: sa.oat(params, protocol, name, factors) for name in names}
fig, axes = plt.subplots(3, 3, figsize=(13, 9), sharex=True)
for ax, name in zip(axes.ravel(), names):
    e = sweeps[name]
    im = ax.imshow(e, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-np.abs(e).max(), vmax=np.abs(e).max(),
                   extent=[protocol.times[0] * 1e3, protocol.times[-1] * 1e3, factors[0], factors[-1]])
    ax.set_title(name); fig.colorbar(im, ax=ax, label="mV")
for ax in axes[-1]:
    ax.set_xlabel("time (ms)")
for ax in axes[:, 0]:
    ax.set_ylabel("factor")
fig.tight_layout()"""),
    ("code", """\
fig, axes = plt.subplots(3, 3, figsize=(13, 9), sharex=True)
for ax, name in zip(axes.ravel(), names):
    e = sweeps[name]
    dev = np.log10((e - e.mean(0)) ** 2 / (e.mean(0) ** 2 + 1e-12) + 1e-12)
    im = ax.imshow(dev, aspect="auto", origin="lower", cmap="viridis", vmin=-6, vmax=2,
                   extent=[protocol.times[0] * 1e3, protocol.times[-1] * 1e3, factors[0], factors[-1]])
    ax.set_title(name); fig.colorbar(im, ax=ax, label="log10 rel. sq. dev.")
fig.tight_layout()
spread = {name: float(np.sqrt(((sweeps[name] - sweeps[name].mean(0)) ** 2).mean())) for name in names}
print("RMS change of the ERP over the sweep (mV):", {k: round(v, 2) for k, v in spread.items()})"""),
    ("md", """\
## Reading

Printed from the sweeps above. In the study's code the sigmoid was nearly flat (volts against r
in mV⁻¹), which made the model close to linear and a_1..a_4 nearly invisible; with consistent
units every parameter changes the ERP, by very different amounts."""),
    ("code", """\
order = sorted(spread, key=spread.get, reverse=True)
print(f"RMS change of the ERP over its 0.5-1.5x sweep ({len(factors)} steps), largest first:")
for name in order:
    print(f"  {name:4s} {spread[name]:7.2f} mV  ({spread[name] / spread[order[0]]:.0%} of {order[0]}'s)")
peak_shift = {name: float(np.ptp(protocol.times[np.argmin(sweeps[name], axis=1)]) * 1e3) for name in names}
print("how far the most negative peak moves over the sweep (ms):", {k: round(v) for k, v in peak_shift.items()})
print(f"the a_k sweeps change the ERP by {min(spread[f'a_{k}'] for k in range(1, 5)):.2f} to "
      f"{max(spread[f'a_{k}'] for k in range(1, 5)):.2f} mV RMS: small beside {order[0]}, but not zero")"""),
]


INFERENCE = [
    ("md", """\
# Parameter inference: simulate, train, evaluate, predict

The workflow of the reference study in a few cells: simulate clean ERPs from the study's prior,
train the Bi-LSTM with fresh measurement noise at SNRs between 0 and 40 dB, evaluate it on the
held-out split beside the prior mean and ridge regression, and call `Estimator.predict` on an ERP
it has never seen. Small sizes by default (under a minute on a 2-core CPU; the first cell prints
them); JR_JAX_FULL=1 selects larger ones. `jr-jax reproduce` runs the whole study with a report,
including a posterior estimator (`jr_jax.train(..., kind="posterior")`) and its calibration."""),
    ("code", """\
import os, tempfile
from pathlib import Path
import jax, numpy as np
import matplotlib.pyplot as plt
import jr_jax

FULL = os.environ.get("JR_JAX_FULL") == "1"   # small sizes unless JR_JAX_FULL=1
n, epochs = (20_000, 30) if FULL else (3_000, 8)
work = Path(tempfile.mkdtemp(prefix="jr_jax_inference_"))
prior = jr_jax.Prior(kind="normal")                    # the study's normal prior, truncated to its ranges
protocol = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study())
ds = jr_jax.make_dataset(prior, protocol, n, work / "train.zarr", key=jax.random.key(0), progress=False)
split = ds.split()
print(f"{n} ERPs (split {len(split.train)}/{len(split.val)}/{len(split.test)}), {epochs} epochs")
print(ds.summary())"""),
    ("md", """\
## Train

The study's Bi-LSTM (one layer, 64 units per direction, dropout 0.1) behind a strided 1-D
convolution (the study's CNN-BiLSTM option: 16 ms windows, 75 LSTM steps instead of 1201), Adam with
a cosine schedule, fresh noise at SNRs drawn in [0, 40] dB for every batch. `kind="point"` is the
study's regressor; the default, `kind="posterior"`, trains a posterior estimator on the same data."""),
    ("code", """\
encoder = dict(conv_channels=32, conv_kernel=16, conv_stride=16)
est, history = jr_jax.train(ds, kind="point", snr_db=(0.0, 40.0), encoder=encoder, epochs=epochs, schedule="cosine",
                            patience=epochs, progress=False)
est.save(work / "model")
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([h["train_loss"] for h in history], label="training"); ax.plot([h["val_loss"] for h in history], label="validation")
ax.set_xlabel("epoch"); ax.set_ylabel("MSE (targets scaled to [0, 1])"); ax.legend()
print(f"{history[-1]['samples'] / history[-1]['seconds']:.0f} training samples/s in the last epoch")"""),
    ("md", """\
## Evaluate on the held-out split

R² per parameter and test SNR, with the prior mean (R² = 0 by construction) and ridge regression on
the ERP downsampled to 100 Hz as baselines."""),
    ("code", """\
rows = jr_jax.evaluate(est, ds, snrs=(None, 30.0, 10.0, 0.0))
print(jr_jax.format_table(rows, "r2"))"""),
    ("md", """\
## Predict the parameters of a new ERP

One ERP simulated with parameters drawn from the prior (a different key from the training data),
60 trials, 20 dB measurement noise: the estimator, loaded from disk, returns each parameter in its
unit."""),
    ("code", """\
est = jr_jax.Estimator.load(work / "model")
truth = prior.sample(jax.random.key(123), 1)
erp = jr_jax.simulate(truth, protocol.replace(snr_db=20.0), key=jax.random.key(7))[0]
estimate = est.predict(np.asarray(erp), fs=protocol.fs)
for name, unit in zip(est.names, est.units):
    print(f"{name:4s} true {float(getattr(truth, name)[0]):9.3f}   estimated {float(estimate[name]):9.3f}  {unit}")
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(protocol.times * 1e3, erp, lw=0.8); ax.axvspan(0, 50, color="0.9", zorder=0)
ax.set_xlabel("time from stimulus onset (ms)"); ax.set_ylabel("ERP (mV)"); ax.set_title("the new ERP, 20 dB")"""),
    ("md", """\
## Reading

Printed from the evaluation above. The gradient-sensitivity notebook shows why C and the a_k stay
poorly determined: they share an exact null direction of the Fisher information."""),
    ("code", """\
r2 = {(r["method"], r["snr_db"], r["parameter"]): r["r2"] for r in rows}
net = "jr_jax Bi-LSTM"
order = sorted(est.names, key=lambda p: -r2[(net, 30.0, p)])
print(f"Trained on {len(split.train)} ERPs for {len(history)} epochs, tested on {len(split.test)}.")
print("At 30 dB the network's R², best first: " + ", ".join(f"{p} {r2[(net, 30.0, p)]:.2f}" for p in order))
weak = [p for p in est.names if r2[(net, 30.0, p)] < 0.1]
print(f"Below R² 0.1 at 30 dB (not recovered at this size): {', '.join(weak) or 'none'}.")
for snr in (None, 0.0):
    a = np.mean([r2[(net, snr, p)] for p in est.names]); b = np.mean([r2[("ridge", snr, p)] for p in est.names])
    verdict = "network ahead" if a > b + 0.01 else "ridge ahead" if b > a + 0.01 else "level (within 0.01)"
    print(f"{'clean' if snr is None else f'{snr:g} dB'}: mean R² network {a:.3f}, ridge {b:.3f}: {verdict}")
print("More simulations and epochs raise the network's R² (JR_JAX_FULL=1 here, or jr-jax reproduce).")"""),
    ("md", """\
The dataset and the model were written to a temporary folder; remove it (or keep `work` and save
the model where you want it with `est.save(...)`)."""),
    ("code", """\
import shutil
shutil.rmtree(work)
print(f"removed {work}")"""),
]


def build(name: str, cells, execute: bool = True) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    if execute:
        NotebookClient(nb, timeout=1200, kernel_name="python3", resources=dict(metadata=dict(path=str(HERE)))).execute()
    path = HERE / name
    nbformat.write(nb, path)
    return path


REAL_ERP = [
    ("md", """\
# Fitting a real ERP

The recording shipped with jr_jax (`jr_jax.eeg.sample_recording()`) is MNE's *sample* subject:
auditory and visual evoked responses, four conditions, 60 EEG channels at 600.6 Hz, −0.2 to 0.5 s,
averaged over only a few epochs each (BSD-3 licence; provenance in `jr_jax/eeg/data/README.md`).

This notebook asks what a single Jansen-Rit column says about one of these ERPs, and whether it
fits. Steps: pick a condition and a signal (here the leading spatial mode of the EEG, as DCM for
ERPs fits spatial modes); estimate the noise from the pre-stimulus baseline; fit with
`jr_jax.fit` (MAP by Levenberg–Marquardt from several starts in one batch, then posterior draws
corrected by the exact likelihood); look at the fit, the posterior, and the residual.

The observation model is stated, never applied silently: the recording is
`gain × (source ERP of the column)(t − latency) + white noise`, with the gain (sensor mV per
source mV, sign free, log-uniform over a wide range), the latency (0–100 ms) and the nine study
parameters fitted together. Nothing is rescaled."""),
    ("code", """\
import os
import jax, numpy as np
import matplotlib.pyplot as plt
import mne
import jr_jax
import jr_jax.eeg as eeg

FULL = os.environ.get("JR_JAX_FULL") == "1"   # small sampler sizes unless JR_JAX_FULL=1
path = eeg.sample_recording()
for ev in mne.read_evokeds(path, verbose=False):
    print(f"{ev.comment:<15} nave {ev.nave}  {ev.info['sfreq']:.1f} Hz  {ev.times[0]:.3f} to {ev.times[-1]:.3f} s")"""),
    ("md", """\
## The signal

`eeg.signal_from_evoked` re-references to the average of the good EEG channels, resamples onto the
model's grid (`eeg.recording_protocol`: the highest of 1000/500/250/… Hz below the recording's
rate, the recording's window), subtracts the baseline, and takes the first left singular vector
of the channels × time data as the spatial mode. Its time course is in mV (unit-norm weights);
the noise SD is the SD of that time course before the stimulus."""),
    ("code", """\
condition = "Left Auditory"
evoked = mne.read_evokeds(path, condition=condition, verbose=False)
rec = eeg.signal_from_evoked(evoked, mode=1)
p = rec.protocol
print(f"{rec.condition}: {rec.signal} of {len(rec.ch_names)} EEG channels, {100 * rec.explained_variance:.0f}% of "
      f"the variance; grid {p.tmin} to {p.tmax} s at {p.fs:g} Hz ({p.n_times} samples)")
print(f"noise SD from the baseline: {1e3 * rec.noise_sd:.2f} µV; signal RMS {1e3 * np.sqrt(np.mean(rec.erp**2)):.2f} µV")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw=dict(width_ratios=[2.2, 1]))
axes[0].plot(p.times * 1e3, rec.erp * 1e3, color="0.2", lw=1)
axes[0].axvline(0, color="k", lw=0.5); axes[0].set_xlabel("time (ms)"); axes[0].set_ylabel("mode 1 (µV)")
info = evoked.copy().pick("eeg").info
mne.viz.plot_topomap(rec.weights, info, axes=axes[1], show=False)
axes[1].set_title("mode 1 weights")
plt.show()"""),
    ("md", """\
## The fit

Eight starts drawn from the prior, each with the gain that best scales its ERP onto the data,
solved in one batch. The posterior comes from importance sampling on the Laplace approximation
of the best optima (in log θ, following the exact C–a_k ridge with the law the prior sets along
it), or, when its Pareto k̂ says that is unreliable, from tempered SMC (started from that
importance proposal mixed with 10 % of the prior, moved by independence draws from it and by
random walks, with exact Metropolis moves along the C–a_k ridge at the end). `result.table()` gives the MAP, the posterior mean, the 90 % interval and how much the data
contract the prior, for each parameter and for log(C·a_k)."""),
    ("code", """\
particles, moves = (1000, 10) if FULL else (200, 4)
print(f"{'full' if FULL else 'small'} sampler sizes: {particles} SMC particles, {moves} moves per step")
result = jr_jax.fit(rec, key=jax.random.key(0), n_starts=8, smc_particles=particles, smc_mcmc_steps=moves)
print(result.table())
print(f"starts converged: {int(result.converged.sum())} of {len(result.converged)}; "
      f"separate optima within 3 nats of the best: {result.n_modes}")
print(f"time: {result.diagnostics['total_s']:.0f} s")
result.plot()
plt.show()"""),
    ("md", """\
## The posterior

Pairs of the parameters the model links most: C with a_1 and their product, the two synaptic
gains and rates, and the nuisance gain and latency. Only the products C·a_k enter the equations,
so C and a_k alone can stay wide while log(C·a_k) is pinned down."""),
    ("code", """\
summary = result.summary()
draws = np.column_stack([result.samples, np.log(result.samples[:, result.names.index("C")]
                                                 * result.samples[:, result.names.index("a_1")])])
labels = list(result.names) + ["log(C*a_1)"]
show = ["C", "a_1", "log(C*a_1)", "A_e", "A_i", "b_e", "b_i", "gain", "latency"]
idx = [labels.index(n) for n in show]
fig, axes = plt.subplots(len(idx), len(idx), figsize=(11, 11))
for i, a in enumerate(idx):
    for j, b in enumerate(idx):
        ax = axes[i, j]
        if i == j:
            ax.hist(draws[:, a], bins=30, color="C0")
        elif i > j:
            ax.plot(draws[:, b], draws[:, a], ".", ms=1, alpha=0.4, color="C0")
        else:
            ax.axis("off")
        ax.tick_params(labelsize=6)
        if i == len(idx) - 1:
            ax.set_xlabel(show[j], fontsize=8)
        if j == 0 and i > 0:
            ax.set_ylabel(show[i], fontsize=8)
plt.tight_layout()
plt.show()"""),
    ("md", """\
## Reading

What the data determine is read from the contraction (one minus the posterior variance over the
prior variance):
near one, the ERP fixes the quantity; near zero, the interval is the prior's. The check of fit is
the reduced χ² of the posterior predictive mean against the baseline noise SD, beside the
residual's spectrum in the figure above. The cell below prints both from the results."""),
    ("code", """\
rows = {r["name"]: r for r in summary.rows()}
determined = [n for n, r in rows.items() if r["contraction"] >= 0.9]
prior_like = [n for n, r in rows.items() if r["contraction"] < 0.5]
print(f"determined by this ERP (contraction >= 0.9): {', '.join(determined) or 'none'}")
print(f"left mostly to the prior (contraction < 0.5): {', '.join(prior_like) or 'none'}")
print(f"waveform R² {result.r2:.2f}; reduced χ² {result.chi2_reduced:.2f} with the baseline noise SD "
      f"({'within' if not result.misfit else 'above'} 1 + 5·sqrt(2/n) = {1 + 5 * np.sqrt(2 / len(result.erp)):.2f})")
res = result.erp - result.erp_fit
f = np.fft.rfftfreq(len(res), 1 / p.fs)
psd = np.abs(np.fft.rfft(res)) ** 2
low, high = psd[(f > 0) & (f < 20)].mean(), psd[f > 60].mean()
n_pre = int(round(-p.tmin * p.fs))
base = np.abs(np.fft.rfft(rec.erp[:n_pre], n=len(res))) ** 2
print(f"residual power below 20 Hz is {low / high:.0f}x that above 60 Hz: the misfit, like the baseline "
      f"itself ({base[(f > 0) & (f < 20)].mean() / base[f > 60].mean():.0f}x), is low-frequency, not white")
print(f"posterior by {result.sampler}: Pareto k-hat of the Laplace importance weights {result.pareto_k:.2f}, "
      f"effective sample size {result.ess:.0f}")"""),
    ("md", """\
Where the single column falls short: the baseline of a few-epoch average is itself low-frequency
EEG, not white noise, so a white-noise χ² against its SD is a strict test, and what the model
leaves is slow activity before and after the response that no input-driven single column makes.
A fit of several sources (DCM's several modes and columns) or a noise model with the baseline's
spectrum would be the next step; the numbers above say how far this one gets.

On the intervals: (C, a_k) → (λC, a_k/λ) leaves every ERP unchanged, so the exact posterior of C
and of each a_k alone stretches along that ridge as far as the prior box allows, while log(C·a_k)
stays fixed. Both samplers spread C and the a_k along that ridge, where the likelihood is
constant: the importance proposal draws along it from the prior's own law, and the SMC ends with
Metropolis moves along it. When the SMC ran (the cell above names the sampler), its moves in the
other directions (on the particles' covariance, and on a local Gauss–Newton proposal) are accepted
at the rate below; the distinct share of the particles says how well they mixed: where few are
distinct, the intervals of the other parameters may be too narrow."""),
    ("code", """\
rate = result.diagnostics.get("smc_acceptance_rate")
print("SMC moves' acceptance:", "not run (importance sampling passed)" if rate is None else f"{rate:.1%}")
if rate is not None:
    print(f"distinct particles at the end of the tempering: {result.diagnostics['smc_distinct_fraction']:.0%} "
          f"(the ESS above counts each distinct point once); the final moves at the posterior were "
          f"accepted {result.diagnostics['smc_final_acceptance']:.0%} of the time")"""),
]

NOTEBOOKS = {"gradient_sensitivity.ipynb": GRADIENT, "oat_sweeps.ipynb": OAT, "inference.ipynb": INFERENCE,
             "real_erp.ipynb": REAL_ERP}
#: how many figures each notebook must draw (tests/test_notebooks.py checks it)
MIN_FIGURES = {"gradient_sensitivity.ipynb": 4, "oat_sweeps.ipynb": 2, "inference.ipynb": 2, "real_erp.ipynb": 3}

if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or NOTEBOOKS:  # e.g. python notebooks/make_notebooks.py inference.ipynb
        print("wrote", build(name, NOTEBOOKS[name]))
