"""jr_jax.fit on simulated ERPs with known parameters and on the four conditions of the shipped real
recording, with the targets as measured.

Simulated: ``--n`` ERPs whose parameters are drawn from the study prior (``jr_jax.Prior()``),
noise-free dynamics on the protocol the real recording is fitted on (500 Hz, -0.198 to 0.498 s,
baseline-corrected), and white measurement noise at each SNR (default 30 and 10 dB) of known SD
``rms(clean) / 10^(snr / 20)``, passed to the fit as ``noise_sd``. The same clean ERPs are used at
every SNR, each with its own noise draw. Three estimates are compared against the truth:

- ``amortised``: the posterior mean of a posterior estimator trained on this protocol
  (``--model DIR``); without one this column is skipped and the fit starts from prior draws;
- ``fit MAP``: ``FitResult.params``;
- ``fit mean``: the mean of ``FitResult.samples``.

For each: parameter R² per parameter (``jr_jax.parameter_metrics`` against the truth), waveform R²
and reduced chi-square against the noisy ERP (the fit's ``r2``/``chi2_reduced`` for its posterior
predictive mean, ``r2_map``/``chi2_reduced_map`` at the MAP; the amortised estimate's ERP is
simulated here, with the same n_times - 9 degrees of freedom), and the time per recording. The
first fit of a run compiles the solver: its time is reported apart, as compile+first, and left
out of the per-recording times (a later fit that is the first to fall back to SMC still includes
the SMC's compilation; the sampler of every fit is recorded).

Real: mode 1 of ``jr_jax.eeg.signal_from_evoked`` for each condition of
``jr_jax.eeg.sample_recording()`` (noise SD from the baseline, gain and latency fitted): reduced
chi-square, R², the starts' agreement (modes, converged starts), ESS, sampler, time. The first real
fit compiles the recording's model (free gain and latency) and is marked so. The real recording
runs first, and the JSON is written after it and after every simulated fit (``"complete": false``
until the end), so that a run stopped early keeps what it measured; ``--resume`` goes on from those
fits (the same arguments give the same ERPs, noise and keys; the rows are checked against them,
and the source of the modules the fit runs on must be unchanged: ``FIT_MODULES``).
Each fit records its wall time, the process' CPU time and the load average, so that a fit slowed
by other work on the machine can be told apart.

Targets (docs: the fit's targets): simulated, median reduced chi-square <= 1.1 from the amortised
starts at <= 10 s per recording on a 2-core CPU; real, posterior predictive reduced chi-square
<= 1.5 and ESS >= 100 on each condition. Each is printed PASS or FAIL with the figure, or NOT
MEASURED where its condition (an estimator) is absent.

    python benchmarks/fit.py [--n 200] [--snrs 30 10] [--model DIR [--train N]] [--n-starts K]
                             [--smc-particles 1000] [--no-real] [--note TEXT] [--resume]

``--train N`` with ``--model DIR`` trains that estimator first when DIR does not exist: N
noise-free ERPs on the protocol from ``jr_jax.Prior()``, ``jr_jax.train(kind="posterior")`` (the reproduction's encoder) with
fresh white noise at 0-40 dB per batch for ``--train-epochs`` epochs; its time is reported apart.

The fits run as ``jr-jax fit`` runs them: one JAX host device per CPU core (``XLA_FLAGS``, unless
set), over which the fit splits its batched simulations; the JSON records the device count.

Writes benchmarks/results/fit.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

TARGET_SIM_CHI2 = 1.1
TARGET_SIM_SECONDS = 10.0
TARGET_REAL_CHI2 = 1.5
TARGET_REAL_ESS = 100.0
FULL_N = 200
CONDITIONS = ("Left Auditory", "Right Auditory", "Left visual", "Right visual")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def _waveform_r2(x, fitted):
    x, fitted = np.asarray(x, np.float64), np.asarray(fitted, np.float64)
    return 1.0 - float(np.sum((x - fitted) ** 2)) / float(np.sum((x - x.mean()) ** 2))


#: a fit whose process had the CPU for less than this fraction of its wall time is left out of the
#: timings (a fit took 1.1-1.8 CPU-s per second of wall time on 2 cores with the machine to itself)
STARVED_CPU_FRACTION = 0.5

def timed_fits(rows) -> tuple[list, list]:
    """The fit rows whose time counts, and those left out because the fit had the CPU for less
    than :data:`STARVED_CPU_FRACTION` of its wall time (the run paused, or the machine busy with
    other work). The run's first fit (compilation) is in neither."""
    starved = [r for r in rows if r.get("cpu_s") is not None and r["cpu_s"] < STARVED_CPU_FRACTION * r["wall_s"]]
    return [r for r in rows if not r["first_call"] and r not in starved], starved


#: the modules that ``jr_jax.fit`` and ``jr_jax.Estimator`` import: the code behind every figure here
FIT_MODULES = ("_estimator", "_fit", "_flow", "_likelihood", "_model", "_nn", "_params", "_simulate", "_solve")


def _source_digest() -> str:
    """SHA-256 of the source of :data:`FIT_MODULES`: a resumed run must fit with the code its first
    part used."""
    import hashlib

    import jr_jax

    root = Path(jr_jax.__file__).parent
    h = hashlib.sha256()
    for name in FIT_MODULES:
        h.update(name.encode() + b"\0" + (root / f"{name}.py").read_bytes() + b"\0")
    return h.hexdigest()


def _chi2_reduced(x, fitted, noise_sd, d):
    x, fitted = np.asarray(x, np.float64), np.asarray(fitted, np.float64)
    return float(np.sum((x - fitted) ** 2) / noise_sd**2 / max(len(x) - d, 1))


def _fit_one(erp, protocol, *, noise_sd, estimator, key, fit_kw):
    """One fit with its warnings recorded; returns (result, wall seconds, warning messages)."""
    import jr_jax

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        res = jr_jax.fit(erp, protocol, noise_sd=noise_sd, estimator=estimator, key=key, **fit_kw)
        wall = time.perf_counter() - t0
    msgs = [f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught]
    return res, wall, msgs


def _summary_stats(values):
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return dict(n=0, median=None, mean=None, q10=None, q90=None, min=None, max=None)
    return dict(n=int(len(v)), median=float(np.median(v)), mean=float(np.mean(v)), q10=float(np.quantile(v, 0.1)),
                q90=float(np.quantile(v, 0.9)), min=float(v.min()), max=float(v.max()))


def _status(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def simulated(args, prior, protocol, estimator, fit_kw, key, checkpoint=lambda out: None, done=None):
    import jax

    import jr_jax

    names = tuple(prior.names)
    d = len(names)
    # truth: draw until N ERPs are finite and not flat (a flat ERP has no SNR)
    theta_all, clean_all, drawn = [], [], 0
    while sum(len(t) for t in theta_all) < args.n:
        m = max(2 * (args.n - sum(len(t) for t in theta_all)), 8)
        theta = np.asarray(prior.sample_array(jax.random.fold_in(key, 1000 + drawn), m), np.float64)
        clean = np.asarray(jr_jax.simulate(prior.to_params(theta), protocol), np.float64)
        ok = np.all(np.isfinite(clean), axis=1) & (np.sqrt(np.mean(clean**2, axis=1)) > 0)
        theta_all.append(theta[ok])
        clean_all.append(clean[ok])
        drawn += m
    theta = np.concatenate(theta_all)[: args.n]
    clean = np.concatenate(clean_all)[: args.n]
    n_discarded = drawn - sum(len(t) for t in theta_all)
    rms = np.sqrt(np.mean(clean**2, axis=1))
    print(f"simulated: {args.n} ERPs of {protocol.n_times} samples ({drawn} drawn, {n_discarded} non-finite or flat "
          f"left out); clean RMS median {np.median(rms):.3g} mV", flush=True)

    out = dict(n_drawn=drawn, n_discarded=n_discarded, clean_rms_median_mv=float(np.median(rms)), snr={})
    rng = np.random.default_rng(args.seed)
    first_done = False
    state = {}  # per SNR: noise SD, noisy ERPs, amortised estimates, fits so far
    for snr in args.snrs:
        sd = rms / 10 ** (snr / 20)
        noisy = clean + rng.standard_normal(clean.shape) * sd[:, None]
        per = [r for r in (done or {}).get(f"{snr:g}", []) if r["index"] < args.n]
        for r in per:  # a resumed run: the rows must be of these ERPs
            if not np.allclose(r["truth"], theta[r["index"]], rtol=1e-6) or not np.isclose(r["noise_sd"], sd[r["index"]]):
                raise SystemExit(f"--resume: the row {r['index']} at {snr:g} dB of {args.out} is of another ERP")
        if per:
            print(f"  {snr:g} dB: {len(per)} fits resumed from {args.out}", flush=True)
        amort = None
        if estimator is not None:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", jr_jax.MisspecificationWarning)
                theta_a = np.asarray(estimator.predict_array(noisy.astype(np.float32), protocol=protocol), np.float64)
            t_amort = (time.perf_counter() - t0) / len(noisy)
            erp_a = np.asarray(jr_jax.simulate(prior.to_params(theta_a), protocol), np.float64)
            amort = dict(theta=theta_a, seconds_per_recording=t_amort,
                         r2=[_waveform_r2(x, e) for x, e in zip(noisy, erp_a)],
                         chi2=[_chi2_reduced(x, e, s, d) for x, e, s in zip(noisy, erp_a, sd)])
        state[snr] = dict(sd=sd, noisy=noisy, amort=amort, per=per)
        if per:
            out["snr"][f"{snr:g}"] = _snr_summary(per, theta, prior, sd, amort)

    # ERP by ERP, every SNR in turn: a run stopped early has its fits spread evenly over the SNRs
    for i in range(args.n):
        for snr in args.snrs:
            st = state[snr]
            if any(r["index"] == i for r in st["per"]):
                continue
            sd, noisy = st["sd"], st["noisy"]
            k = jax.random.fold_in(key, int(snr * 1000) * 100003 + i)
            cpu0, load0 = time.process_time(), os.getloadavg()[0]
            res, wall, msgs = _fit_one(noisy[i], protocol, noise_sd=float(sd[i]), estimator=estimator, key=k,
                                       fit_kw=fit_kw)
            row = dict(index=i, snr_db=snr, noise_sd=float(sd[i]), first_call=not first_done, wall_s=wall,
                       cpu_s=time.process_time() - cpu0, load_average=[load0, os.getloadavg()[0]],
                       total_s=res.diagnostics["total_s"], solve_s=res.diagnostics["solve_s"],
                       posterior_s=res.diagnostics["posterior_s"], r2=res.r2, r2_map=res.r2_map,
                       r2_clean=_waveform_r2(clean[i], res.erp_fit), chi2_reduced=res.chi2_reduced,
                       chi2_reduced_map=res.chi2_reduced_map, converged=int(res.converged.sum()),
                       n_starts=int(len(res.converged)), n_modes=res.n_modes, sampler=res.sampler,
                       pareto_k=res.pareto_k, ess=res.ess,
                       smc_reached_posterior=res.diagnostics.get("smc_reached_posterior"),
                       smc_acceptance=res.diagnostics.get("smc_acceptance_rate"),
                       smc_distinct_fraction=res.diagnostics.get("smc_distinct_fraction"),
                       map=[float(res.params[n]) for n in names], mean=res.samples[:, :d].mean(axis=0),
                       truth=theta[i], warnings=msgs)
            first_done = True
            st["per"].append(row)
            print(f"  {snr:g} dB #{i:3d}: chi2 {res.chi2_reduced:6.3f} (MAP {res.chi2_reduced_map:6.3f})  R2 "
                  f"{res.r2:6.3f}  {row['converged']}/{row['n_starts']} conv, {res.n_modes} mode(s), {res.sampler}, "
                  f"ESS {res.ess:6.0f}  {wall:6.1f} s{'  (compile+first)' if row['first_call'] else ''}", flush=True)
            out["snr"][f"{snr:g}"] = _snr_summary(st["per"], theta, prior, sd, st["amort"])
            checkpoint(out)  # after every fit: a run stopped early keeps its fits and --resume goes on from them
    for snr in args.snrs:
        st = state[snr]
        out["snr"][f"{snr:g}"] = _snr_summary(st["per"], theta, prior, st["sd"], st["amort"])
    checkpoint(out)
    return out


def _snr_summary(per, theta, prior, sd, amort) -> dict:
    """The figures of one SNR from its fits so far (``per``: rows in any order, each with its ERP's
    ``index``); the amortised column over the same ERPs."""
    import jr_jax

    names, d = tuple(prior.names), len(prior.names)
    per = sorted(per, key=lambda r: r["index"])
    idx = np.array([r["index"] for r in per])
    est = {"fit MAP": np.array([r["map"] for r in per], np.float64).reshape(-1, d),
           "fit mean": np.array([r["mean"] for r in per], np.float64).reshape(-1, d)}
    if amort is not None:
        est = {"amortised": amort["theta"][idx], **est}
    param_r2 = {m: dict(zip(names, jr_jax.parameter_metrics(theta[idx], e, prior.lows, prior.highs)["r2"]))
                for m, e in est.items()} if len(per) >= 2 else {}
    timed, starved = timed_fits(per)
    first = [r for r in per if r["first_call"]]
    methods = {}
    if amort is not None:
        methods["amortised"] = dict(waveform_r2=_summary_stats(np.asarray(amort["r2"])[idx]),
                                    chi2_reduced=_summary_stats(np.asarray(amort["chi2"])[idx]),
                                    seconds_per_recording=amort["seconds_per_recording"])
    methods["fit MAP"] = dict(waveform_r2=_summary_stats([r["r2_map"] for r in per]),
                              chi2_reduced=_summary_stats([r["chi2_reduced_map"] for r in per]))
    methods["fit mean"] = dict(waveform_r2=_summary_stats([r["r2"] for r in per]),
                               waveform_r2_vs_clean=_summary_stats([r["r2_clean"] for r in per]),
                               chi2_reduced=_summary_stats([r["chi2_reduced"] for r in per]))
    return dict(
        n_fits=len(per), noise_sd_median_mv=float(np.median(sd)), parameter_r2=param_r2, methods=methods,
        timing=dict(n_timed=len(timed), n_starved=len(starved), total_s=_summary_stats([r["total_s"] for r in timed]),
                    wall_s=_summary_stats([r["wall_s"] for r in timed]),
                    cpu_s=_summary_stats([r["cpu_s"] for r in timed if r.get("cpu_s") is not None]),
                    solve_s=_summary_stats([r["solve_s"] for r in timed]),
                    posterior_s=_summary_stats([r["posterior_s"] for r in timed]),
                    compile_plus_first_s=first[0]["wall_s"] if first else None),
        samplers={s: sum(r["sampler"] == s for r in per) for s in sorted({r["sampler"] for r in per})},
        all_starts_converged=sum(r["converged"] == r["n_starts"] for r in per),
        none_converged=sum(r["converged"] == 0 for r in per),
        several_modes=sum(r["n_modes"] > 1 for r in per),
        map_worse_than_mean=sum(r["chi2_reduced_map"] > r["chi2_reduced"] for r in per),
        ess=_summary_stats([r["ess"] for r in per]),
        misfit_warnings=sum(any("MisspecificationWarning" in m for m in r["warnings"]) for r in per),
        fits=per)


def train_estimator(args, prior, protocol, key) -> dict:
    """Train and save the posterior estimator of ``--model`` (module docstring); returns its record."""
    import jr_jax
    from jr_jax._reproduce import _ENCODER

    t0 = time.perf_counter()
    theta = np.asarray(prior.sample_array(key, args.train), np.float64)
    erp = np.asarray(jr_jax.simulate(prior.to_params(theta), protocol), np.float32)
    ok = np.all(np.isfinite(erp), axis=1)
    t_sim = time.perf_counter() - t0
    data = jr_jax.TrainingData.from_arrays(theta[ok], erp[ok], names=prior.names, units=prior.units,
                                           lows=prior.lows, highs=prior.highs, fs=protocol.fs, tmin=protocol.tmin,
                                           seed=args.seed)
    data.prior, data.protocol = prior.to_dict(), protocol.to_dict()
    print(f"training a posterior estimator on {int(ok.sum())} simulations ({t_sim:.0f} s to simulate), "
          f"{args.train_epochs} epochs", flush=True)
    t0 = time.perf_counter()
    est, history = jr_jax.train(data, kind="posterior", snr_db=(0.0, 40.0), encoder=_ENCODER,
                                epochs=args.train_epochs,
                                patience=args.train_epochs, progress=False)
    t_train = time.perf_counter() - t0
    est.save(args.model)
    print(f"  trained in {t_train:.0f} s, val loss {history[-1]['val_loss']:.3f}; saved to {args.model}", flush=True)
    return dict(n_simulations=int(ok.sum()), invalid=int((~ok).sum()), epochs=args.train_epochs,
                simulate_seconds=t_sim, train_seconds=t_train, val_loss=[h["val_loss"] for h in history],
                snr_db=[0.0, 40.0])


def real(args, fit_kw, key):
    import jax

    from jr_jax.eeg import sample_recording, signal_from_evoked

    path = sample_recording()
    rows = []
    for j, cond in enumerate(args.conditions):
        rec = signal_from_evoked(path, condition=cond, mode=1)
        res, wall, msgs = _fit_one(rec, None, noise_sd=None, estimator=None, key=jax.random.fold_in(key, 777 + j),
                                   fit_kw=fit_kw)
        row = dict(condition=cond, signal=rec.signal, nave=rec.nave, explained_variance=rec.explained_variance,
                   noise_sd_mv=rec.noise_sd, n_times=int(rec.protocol.n_times), first_call=j == 0, wall_s=wall,
                   total_s=res.diagnostics["total_s"], solve_s=res.diagnostics["solve_s"],
                   posterior_s=res.diagnostics["posterior_s"], chi2_reduced=res.chi2_reduced,
                   chi2_reduced_map=res.chi2_reduced_map, r2=res.r2, r2_map=res.r2_map,
                   converged=int(res.converged.sum()), n_starts=int(len(res.converged)), n_modes=res.n_modes,
                   sampler=res.sampler, pareto_k=res.pareto_k, ess=res.ess,
                   smc_reached_posterior=res.diagnostics.get("smc_reached_posterior"),
                   smc_steps=res.diagnostics.get("smc_smc_steps"),
                   smc_acceptance=res.diagnostics.get("smc_acceptance_rate"),
                   smc_final_acceptance=res.diagnostics.get("smc_final_acceptance"),
                   smc_distinct_fraction=res.diagnostics.get("smc_distinct_fraction"),
                   map={k: float(v) for k, v in res.params.items()}, warnings=msgs,
                   protocol=rec.protocol.to_dict())
        if args.figures:
            fig_path = Path(args.figures) / f"fit_real_{cond.lower().replace(' ', '_')}.png"
            fig_path.parent.mkdir(parents=True, exist_ok=True)
            res.plot(fig_path, title=f"{cond} (sample_audvis, nave {rec.nave}), mode 1: R² {res.r2:.2f}, "
                                     f"reduced χ² {res.chi2_reduced:.2f}")
            row["figure"] = str(fig_path)
        rows.append(row)
        print(f"  {cond:15s}: chi2 {res.chi2_reduced:7.3f} (MAP {res.chi2_reduced_map:7.3f})  R2 {res.r2:6.3f}  "
              f"{row['converged']}/{row['n_starts']} conv, {res.n_modes} mode(s), {res.sampler}, ESS {res.ess:6.0f}  "
              f"{wall:6.1f} s{'  (compile+first)' if j == 0 else ''}", flush=True)
    return dict(path=os.path.basename(path), signal="mode 1", fits=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=FULL_N, help="simulated test ERPs per SNR (the same ERPs at each SNR)")
    ap.add_argument("--snrs", type=float, nargs="+", default=[30.0, 10.0], help="test SNRs (dB)")
    ap.add_argument("--model", default=None, help="a posterior estimator trained on the protocol (jr_jax.Estimator)")
    ap.add_argument("--train", type=int, default=0,
                    help="with --model DIR: train a posterior estimator on N simulations first if DIR does not exist")
    ap.add_argument("--train-epochs", type=int, default=30)
    ap.add_argument("--fs", type=float, default=500.0)
    ap.add_argument("--tmin", type=float, default=-0.198)
    ap.add_argument("--tmax", type=float, default=0.498)
    ap.add_argument("--n-starts", type=int, default=None, help="default: jr_jax.fit's (4 with --model, 8 without)")
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--n-proposal", type=int, default=2000)
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--smc-particles", type=int, default=1000)
    ap.add_argument("--smc-mcmc-steps", type=int, default=10)
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), help="conditions of the real recording")
    ap.add_argument("--no-real", action="store_true", help="skip the real recording")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulated ERPs")
    ap.add_argument("--figures", default=None,
                    help="a folder for each real condition's figure (FitResult.plot), fit_real_<condition>.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="a remark stored with the results (e.g. the machine was shared)")
    ap.add_argument("--out", default="benchmarks/results/fit.json")
    ap.add_argument("--resume", action="store_true",
                    help="go on from the fits already in --out (a run of the same arguments stopped early)")
    args = ap.parse_args()
    source = _source_digest()
    previous = None
    if args.resume and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        # the file's place does not change the fits: a moved results file resumes too
        same = lambda a: {k: v for k, v in a.items() if k not in ("resume", "note", "out")}  # noqa: E731
        if same(previous.get("arguments", {})) != same(_jsonable(vars(args))):
            ap.error(f"--resume: {args.out} was written with other arguments: "
                     f"{previous.get('command')!r}; rerun with those, or without --resume")
        if previous.get("source_sha256") != source:
            ap.error(f"--resume: the source of jr_jax's fit ({', '.join(FIT_MODULES)}) changed since {args.out} "
                     "was started (its rows would mix two versions); start a new run without --resume")
    if args.n < 2:
        ap.error("--n must be >= 2 (parameter R² needs two ERPs)")

    # as the jr-jax command runs: one host device per CPU core, over which the fit splits its
    # batched simulations (log posteriors, SMC particles, predictive curves); before JAX starts
    flag = "--xla_force_host_platform_device_count"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={os.cpu_count() or 1}".strip()

    import jax

    import jr_jax

    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    t_run = time.perf_counter()
    prior = jr_jax.Prior()
    protocol = jr_jax.Protocol(fs=args.fs, tmin=args.tmin, tmax=args.tmax)
    rec_protocol = jr_jax.eeg.recording_protocol(jr_jax.eeg.sample_recording())
    same_grid = (rec_protocol.fs, rec_protocol.tmin, rec_protocol.tmax, rec_protocol.baseline) == \
        (protocol.fs, protocol.tmin, protocol.tmax, protocol.baseline)
    estimator = None
    trained = None
    if args.train and not args.model:
        ap.error("--train needs --model DIR (where the trained estimator is saved)")
    if previous is not None:
        trained = previous.get("estimator_training")
    if args.train and not Path(args.model).exists():
        trained = train_estimator(args, prior, protocol, jax.random.fold_in(jax.random.key(args.seed), 3))
    if args.model:
        estimator = jr_jax.Estimator.load(args.model)
        if estimator.kind != "posterior":
            ap.error(f"--model {args.model} is a {estimator.kind} estimator; the fit's starts need a posterior one")
        if estimator.manifest.get("prior") and jr_jax.Prior.from_dict(estimator.manifest["prior"]).to_dict() \
                != prior.to_dict():
            print("warning: the estimator's prior differs from jr_jax.Prior(), the prior the truth is drawn from",
                  flush=True)
    fit_kw = dict(n_starts=args.n_starts, n_samples=args.n_samples, n_proposal=args.n_proposal,
                  max_steps=args.max_steps, smc_particles=args.smc_particles, smc_mcmc_steps=args.smc_mcmc_steps)
    key = jax.random.key(args.seed)

    notes = []
    if args.n < FULL_N:
        notes.append(f"N reduced to {args.n} simulated ERPs per SNR (the benchmark's size is {FULL_N})")
    if estimator is None:
        notes.append("no posterior estimator on this protocol (--model not given): the amortised column is skipped "
                     "and the fits start from prior draws, so the amortised-start target is not measured")
    if args.note:
        notes.append(args.note)
    if previous is not None:
        notes = [n for n in previous.get("notes", []) if n not in notes] + notes
    for n in notes:
        print("note:", n, flush=True)

    result = dict(
        command=" ".join([os.path.basename(sys.executable), *sys.argv]), arguments=vars(args),
        date_utc=started.isoformat(timespec="seconds"),
        machine=dict(os_cpu_count=os.cpu_count(), platform=platform.platform(), processor=platform.processor(),
                     python=platform.python_version(), jax=jax.__version__, jax_backend=jax.default_backend(),
                     jax_local_devices=len(jax.local_devices()),
                     jr_jax=jr_jax.__version__, load_average_start=load_start),
        notes=notes, protocol=protocol.to_dict(), recording_protocol_same_grid=same_grid,
        prior=prior.to_dict(), fit_options=fit_kw, estimator=args.model, estimator_training=trained,
        source_sha256=source,
    )
    if previous is not None:  # resumed: the first start's date and machine stay, each resumption is listed
        result["date_utc"] = previous["date_utc"]
        result["resumed_utc"] = previous.get("resumed_utc", []) + [started.isoformat(timespec="seconds")]
        result["machine"]["load_average_start"] = previous["machine"].get("load_average_start")
    if not same_grid:
        print(f"note: the simulated protocol differs from the recording's grid ({rec_protocol.fs:g} Hz, "
              f"{rec_protocol.tmin} to {rec_protocol.tmax} s)", flush=True)

    def checkpoint(partial):
        result["simulated"] = partial
        report(result, args, prior, estimator, notes, t_run, final=False)

    if not args.no_real:  # first: four fits, so that a run stopped early still has them
        if previous is not None and "real" in previous:
            print("real recording: resumed", flush=True)
            result["real"] = previous["real"]
        else:
            print("real recording, mode 1:", flush=True)
            result["real"] = real(args, fit_kw, jax.random.fold_in(key, 2))
            report(result, args, prior, estimator, notes, t_run, final=False)
    if not args.no_sim:
        done = None if previous is None else {snr: v["fits"] for snr, v in previous.get("simulated", {}).get("snr",
                                                                                                              {}).items()}
        result["simulated"] = simulated(args, prior, protocol, estimator, fit_kw, jax.random.fold_in(key, 1),
                                        checkpoint, done)
    report(result, args, prior, estimator, notes, t_run, final=True)


def report(result, args, prior, estimator, notes, t_run, *, final: bool):
    """The tables and targets of ``result``, printed when ``final``, and the JSON written (also
    after each SNR, marked incomplete, so that an interrupted run keeps what it measured)."""
    # --- tables ------------------------------------------------------------------------------
    lines = []
    names = prior.names
    if "simulated" in result:
        sim = result["simulated"]
        lines.append(f"Simulated ERPs: N = {args.n} per SNR, {args.n_starts or (4 if estimator else 8)} starts, "
                     f"{'amortised' if estimator else 'prior'} starts")
        head = f"{'SNR':>4s} {'method':10s} " + " ".join(f"{n:>6s}" for n in names) + \
            f" {'wR2 med':>8s} {'chi2 med':>8s} {'chi2 q90':>8s}"
        lines += ["parameter R² (per parameter), waveform R² and reduced chi-square (medians over ERPs)", head,
                  "-" * len(head)]
        for snr, s in sim["snr"].items():
            if estimator is None:
                lines.append(f"{snr:>4s} {'amortised':10s} (skipped: no --model)")
            for m, pr2 in s["parameter_r2"].items():
                w, c = s["methods"][m]["waveform_r2"], s["methods"][m]["chi2_reduced"]
                lines.append(f"{snr:>4s} {m:10s} " + " ".join(f"{pr2[n]:6.2f}" for n in names)
                             + f" {w['median']:8.3f} {c['median']:8.3f} {c['q90']:8.3f}")
        lines.append("")
        head = f"{'SNR':>4s} {'compile+first':>13s} {'total med':>9s} {'solve med':>9s} {'post med':>9s} " \
               f"{'total q90':>9s} {'samplers':24s} {'all conv':>8s} {'>1 mode':>7s} {'ESS med':>7s} {'MAP>mean':>8s}"
        lines += ["time per recording (s; the first fit of the run apart) and diagnostics (ESS: of the importance "
                  "weights, or the SMC's final particles; MAP>mean: fits whose MAP has a larger chi2 than the "
                  "posterior predictive mean)", head, "-" * len(head)]
        for snr, s in sim["snr"].items():
            t = s["timing"]
            cf = "-" if t["compile_plus_first_s"] is None else f"{t['compile_plus_first_s']:.1f}"
            samplers = ", ".join(f"{k} {v}" for k, v in s["samplers"].items())
            lines.append(f"{snr:>4s} {cf:>13s} {t['total_s']['median'] or float('nan'):9.1f} "
                         f"{t['solve_s']['median'] or float('nan'):9.1f} {t['posterior_s']['median'] or float('nan'):9.1f} "
                         f"{t['total_s']['q90'] or float('nan'):9.1f} {samplers:24s} "
                         f"{s['all_starts_converged']:>4d}/{s.get('n_fits', args.n):<3d} {s['several_modes']:>7d} "
                         f"{s['ess']['median']:7.0f} {s.get('map_worse_than_mean', -1):>8d}")
            if estimator is not None:
                lines.append(f"{snr:>4s} amortised estimate: {s['methods']['amortised']['seconds_per_recording']:.3f} "
                             "s per recording (batched)")
        lines.append("")
    if "real" in result:
        head = f"{'condition':15s} {'nave':>4s} {'chi2':>7s} {'chi2 MAP':>8s} {'R2':>6s} {'conv':>5s} {'modes':>5s} " \
               f"{'sampler':18s} {'ESS':>6s} {'k-hat':>5s} {'total s':>8s}"
        lines += ["Real recording (sample_audvis, mode 1, noise SD from the baseline)", head, "-" * len(head)]
        for r in result["real"]["fits"]:
            lines.append(f"{r['condition']:15s} {r['nave']:>4d} {r['chi2_reduced']:7.3f} {r['chi2_reduced_map']:8.3f} "
                         f"{r['r2']:6.3f} {r['converged']:>2d}/{r['n_starts']:<2d} {r['n_modes']:>5d} "
                         f"{r['sampler']:18s} {r['ess']:6.0f} {r['pareto_k']:5.2f} {r['wall_s']:8.1f}"
                         + ("  (compile+first)" if r["first_call"] else ""))
        lines.append("")

    # --- targets -----------------------------------------------------------------------------
    targets = []
    if "simulated" in result:
        for snr, s in result["simulated"]["snr"].items():
            chi2_med = s["methods"]["fit mean"]["chi2_reduced"]["median"]
            t_med = s["timing"]["total_s"]["median"]
            ok = chi2_med is not None and chi2_med <= TARGET_SIM_CHI2 and t_med is not None and t_med <= TARGET_SIM_SECONDS
            figure = f"median chi2_reduced {chi2_med:.3f}, median {t_med:.1f} s per recording ({s['n_fits']} fits)" \
                if chi2_med is not None and t_med is not None else "not enough fits"
            if estimator is not None:
                targets.append(dict(target=f"simulated {snr} dB: median chi2_reduced <= {TARGET_SIM_CHI2} from amortised "
                                    f"starts at <= {TARGET_SIM_SECONDS:g} s per recording", status=_status(ok),
                                    figure=figure))
            else:
                targets.append(dict(target=f"simulated {snr} dB: median chi2_reduced <= {TARGET_SIM_CHI2} from amortised "
                                    f"starts at <= {TARGET_SIM_SECONDS:g} s per recording", status="NOT MEASURED",
                                    figure="no estimator; with prior starts instead: " + figure
                                    + f" ({_status(ok)} on those criteria)"))
    if "real" in result:
        for r in result["real"]["fits"]:
            targets.append(dict(target=f"real {r['condition']}: chi2_reduced <= {TARGET_REAL_CHI2}",
                                status=_status(r["chi2_reduced"] <= TARGET_REAL_CHI2),
                                figure=f"chi2_reduced {r['chi2_reduced']:.3f}"))
            targets.append(dict(target=f"real {r['condition']}: ESS >= {TARGET_REAL_ESS:g}",
                                status=_status(r["ess"] >= TARGET_REAL_ESS),
                                figure=f"ESS {r['ess']:.0f} ({r['sampler']})"))
    lines.append("Targets")
    for t in targets:
        lines.append(f"  {t['status']:12s} {t['target']}: {t['figure']}")
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]

    result["targets"] = targets
    result["seconds"] = time.perf_counter() - t_run
    result["machine"]["load_average_end"] = os.getloadavg()
    text = "\n".join(lines)
    result["table"] = text
    result["complete"] = final
    if final:
        print()
        print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")  # written whole, then renamed: a run killed mid-write keeps the last
    tmp.write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    os.replace(tmp, out)
    if final:
        print(f"\nwrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
