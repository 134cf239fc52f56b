"""Posterior inference on the study's problem, small budget: NPE beside the point regressor trained on
the same simulations, calibration on held-out simulations per test SNR, and the likelihood
correction on a few observations (k-hat, ESS, the sampler it needed, wall time).

Design: the study's truncated-normal prior over its nine parameters, its stimulus, noise-free
dynamics (sigma = 0, so one trial is the ERP and the likelihood is exact), white measurement noise
drawn per batch with SNR uniform in [snr_low, snr_high] dB for training and fixed per test SNR.
Both estimators use the quick preset's encoder (the Bi-LSTM behind a strided convolution) and the
same data, epochs and seed. Not yet here: sbi's NPE, reference posteriors and C2ST (see docs/guides/inference.md).

    python benchmarks/posterior.py [--n 12000] [--epochs 12] [--test 1000] [--correct 5]

Writes benchmarks/results/posterior.json and posterior_calibration_<snr>dB.png.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

import jr_jax
from jr_jax._reproduce import _ENCODER


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=12000, help="training + validation simulations")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--test", type=int, default=1000, help="held-out simulations for calibration")
    ap.add_argument("--snrs", type=float, nargs="+", default=[30.0, 10.0])
    ap.add_argument("--correct", type=int, default=5, help="observations per SNR for the likelihood correction")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    prior = jr_jax.Prior(kind="normal")
    protocol = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study(), n_trials=1)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    n_all = args.n + args.test
    params = prior.sample(jax.random.fold_in(key, 0), n_all)
    erp = np.asarray(jr_jax.simulate(params, protocol))
    theta = np.asarray(prior.to_array(params), np.float64)
    ok = np.isfinite(erp).all(axis=1)
    t_sim = time.perf_counter() - t0
    theta, erp = theta[ok], erp[ok]
    tr_theta, tr_erp, te_theta, te_erp = theta[:-args.test], erp[:-args.test], theta[-args.test:], erp[-args.test:]
    data = jr_jax.TrainingData.from_arrays(tr_theta, tr_erp, names=prior.names, units=prior.units, lows=prior.lows,
                                           highs=prior.highs, fs=protocol.fs, tmin=protocol.tmin, seed=0)
    data.prior, data.protocol = prior.to_dict(), protocol.to_dict()
    common = dict(snr_db=(0.0, 40.0), encoder=_ENCODER, epochs=args.epochs, patience=args.epochs, progress=False)
    result = dict(n_simulations=int(ok.sum()), n_train=data.n_train, n_test=args.test, epochs=args.epochs,
                  simulate_seconds=t_sim, invalid=int((~ok).sum()))
    models = {}
    for kind in ("posterior", "point"):
        t0 = time.perf_counter()
        models[kind], history = jr_jax.train(data, kind=kind, **common)
        result[f"{kind}_train_seconds"] = time.perf_counter() - t0
        result[f"{kind}_val_loss"] = [h["val_loss"] for h in history]
        print(f"{kind}: {result[f'{kind}_train_seconds']:.0f} s, val loss {history[-1]['val_loss']:.4f}", flush=True)
    npe, point = models["posterior"], models["point"]

    from jr_jax._train import add_noise_batch

    result["snr"] = {}
    for snr in args.snrs:
        k = jax.random.fold_in(key, int(snr * 10))
        noisy = np.asarray(add_noise_batch(jax.numpy.asarray(te_erp[..., None]), k, (snr, snr)))[..., 0]
        t0 = time.perf_counter()
        cal = jr_jax.calibrate(npe, te_theta, noisy, key=jax.random.fold_in(k, 1), snr_db=None)
        t_cal = time.perf_counter() - t0
        cal = dataclasses.replace(cal, snr_db=snr)  # the noise was added above, shared with the regressor
        cal.plot(out / f"posterior_calibration_{snr:g}dB.png")
        point_metrics = jr_jax.parameter_metrics(te_theta, point.predict_array(noisy), npe.lows, npe.highs)
        rows = cal.rows()
        for r in rows:
            if r["parameter"] in prior.names:
                r["point_r2"] = float(point_metrics["r2"][prior.names.index(r["parameter"])])
        entry = dict(calibration=rows, draws_per_erp=cal.n_draws,
                     sample_seconds_per_erp=t_cal / args.test)
        print(f"\n{snr:g} dB (calibration on {args.test} ERPs, {cal.n_draws} draws each)")
        print(jr_jax.calibration_table([cal]))
        print("point regressor R2:", {r["parameter"]: round(r["point_r2"], 3) for r in rows if "point_r2" in r})
        corr = []
        for i in range(args.correct):
            t0 = time.perf_counter()
            res = jr_jax.correct_posterior(npe, noisy[i], key=jax.random.fold_in(k, 100 + i), snr_db=snr, n=2000)
            dt = time.perf_counter() - t0
            corr.append(dict(pareto_k=res.pareto_k, ess=res.ess, method=res.method, converged=res.converged,
                             seconds=dt, smc_steps=res.diagnostics.get("smc_steps"),
                             acceptance=res.diagnostics.get("acceptance_rate"),
                             likelihood_evaluations=res.diagnostics["likelihood_evaluations"]))
            print(f"  correction {i}: k-hat {res.pareto_k:.2f}, ESS {res.ess:.0f}, {res.method}, {dt:.1f} s", flush=True)
        entry["correction"] = corr
        result["snr"][f"{snr:g}"] = entry
    (out / "posterior.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out / 'posterior.json'}")


if __name__ == "__main__":
    main()
