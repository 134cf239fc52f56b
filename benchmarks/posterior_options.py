"""Options of the posterior estimator compared on benchmarks/posterior.py's problem, one per run.

The same simulations as posterior.py (the study's prior and stimulus, noise-free dynamics, 10^4
simulations: 9000 for training, 1000 for validation, plus 1000 held out), SNR uniform in [0, 40] dB
for training. One run trains one NPE with the options given as JSON (``--encoder``, ``--posterior``,
``--train``: keyword arguments of jr_jax.train) and appends one line to ``--out``: the training
time, the validation losses, C2ST, marginal mean error (reference SDs) and SD ratio against the
reference posteriors (converged observations only), and per test SNR (30 and 10 dB) each
quantity's calibration error, SBC uniformity p-value, z-score mean and SD, 90 % coverage and the
posterior mean's R². The runs that chose posterior.py's options (noise feature, regression
weight 10, 15 epochs, cosine) and left them off by default in jr_jax.train are the lines of
benchmarks/results/posterior_options.jsonl; ``posterior_options`` in each line gives the noise
feature and regression weight in effect. Those runs split the network's key in three (encoder,
flow, head); the network now derives the head's key apart, so a rerun starts from other weights.
With ``--embedding-epochs N`` a point regressor is trained first (N epochs) and the NPE's flow on
its frozen estimates (``jr_jax.train(..., embedding=...)``); the line then also holds the
regressor's training time and its R² per test SNR (``point_r2_<snr>``). The first such line
(tagged "frozen point embedding (15 ep) + noise feature, flow 15 ep, cosine") was made while tests
ran beside it: its training seconds are not comparable. The lines whose ``--posterior`` (in
``args``) sets ``conditional_affine`` add the flow's conditional affine layer (later runs also
record it in ``posterior_options``); the one with ``"n": 50000`` is at 5 * 10^4 simulations.

    python benchmarks/posterior_options.py --tag NAME [--epochs 12] [--encoder JSON] [--posterior JSON]
                                           [--train JSON] [--no-cal] [--embedding-epochs N]
"""
import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

import jr_jax
from jr_jax._reproduce import _ENCODER
from jr_jax._train import add_noise_batch

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=10000)
ap.add_argument("--test", type=int, default=1000)
ap.add_argument("--epochs", type=int, default=12)
ap.add_argument("--encoder", default="{}")
ap.add_argument("--posterior", default="{}")
ap.add_argument("--train", default="{}")
ap.add_argument("--tag", default="x")
ap.add_argument("--embedding-epochs", type=int, default=0,
                help="first train a point regressor this many epochs (same encoder, data and --train options) "
                     "and train the NPE's flow on its frozen estimates (jr_jax.train's embedding=); 0: end to end")
ap.add_argument("--no-cal", action="store_true", help="skip the calibration on the held-out set")
ap.add_argument("--out", default="benchmarks/results/posterior_options.jsonl")
ap.add_argument("--cache", default=None, help="an .npz to keep the simulations in between runs")
args = ap.parse_args()

prior = jr_jax.Prior(kind="normal")
protocol = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study(), n_trials=1)
key = jax.random.key(0)
cache = Path(args.cache) if args.cache else None
if cache is not None and cache.exists():
    d = np.load(cache); theta, erp = d["theta"], d["erp"]
else:
    params = prior.sample(jax.random.fold_in(key, 0), args.n + args.test)
    erp = np.asarray(jr_jax.simulate(params, protocol))
    theta = np.asarray(prior.to_array(params), np.float64)
    ok = np.isfinite(erp).all(axis=1); theta, erp = theta[ok], erp[ok]
    if cache is not None:
        np.savez(cache, theta=theta, erp=erp)
tr_theta, tr_erp, te_theta, te_erp = theta[:-args.test], erp[:-args.test], theta[-args.test:], erp[-args.test:]
data = jr_jax.TrainingData.from_arrays(tr_theta, tr_erp, names=prior.names, units=prior.units, lows=prior.lows,
                                       highs=prior.highs, fs=protocol.fs, tmin=protocol.tmin, seed=0)
data.prior, data.protocol = prior.to_dict(), protocol.to_dict()
enc = dict(_ENCODER, **json.loads(args.encoder))
res = dict(tag=args.tag, args=vars(args))
point = None
if args.embedding_epochs:
    t0 = time.perf_counter()
    point, _ = jr_jax.train(data, kind="point", snr_db=(0.0, 40.0), encoder=enc, epochs=args.embedding_epochs,
                            patience=args.embedding_epochs, progress=False, **json.loads(args.train))
    res["point_train_seconds"] = time.perf_counter() - t0
    print(args.tag, "point regressor", round(res["point_train_seconds"]), "s", flush=True)
t0 = time.perf_counter()
npe, hist = jr_jax.train(data, kind="posterior", snr_db=(0.0, 40.0), encoder=None if point else enc,
                         embedding=point, epochs=args.epochs, patience=args.epochs, progress=False,
                         posterior=json.loads(args.posterior) or None, **json.loads(args.train))
t_train = time.perf_counter() - t0
res.update(posterior_options={k: npe.encoder.config[k] for k in ("noise_feature", "regression_weight",
                                                                 "conditional_affine")},
           frozen_embedding=point is not None, train_seconds=t_train, val=[round(h["val_loss"], 3) for h in hist])
print(args.tag, "train", round(t_train), "s val", res["val"], flush=True)

ref = np.load("benchmarks/results/reference_posteriors.npz")
snrs, x_all, ref_draws, conv = ref["snr_db"], ref["erp"], ref["draws"], ref["converged"]
for s, snr in enumerate(snrs):
    cs, me, sr = [], [], []
    for i in range(x_all.shape[1]):
        if not conv[s, i]:
            continue
        k = jax.random.fold_in(key, 5000 + 100 * s + i)
        r = ref_draws[s, i].astype(np.float64)
        dr = npe.sample(x_all[s, i], len(r), key=k, check_distribution=False).astype(np.float64)
        cs.append(jr_jax.c2st(r, dr, key=jax.random.fold_in(k, 2)))
        sd = r.std(axis=0)
        me.append(np.mean(np.abs(dr.mean(0) - r.mean(0)) / sd)); sr.append(np.median(dr.std(0) / sd))
    res[f"c2st_{snr:g}"] = float(np.mean(cs)); res[f"c2st_each_{snr:g}"] = [round(float(c), 3) for c in cs]
    res[f"mean_err_{snr:g}"] = float(np.mean(me)); res[f"sd_ratio_{snr:g}"] = float(np.median(sr))
    print(args.tag, f"{snr:g} dB C2ST {res[f'c2st_{snr:g}']:.3f} mean err {np.mean(me):.2f} sd ratio {np.median(sr):.2f}", flush=True)
if not args.no_cal:
    for snr in (30.0, 10.0):
        k = jax.random.fold_in(key, int(snr * 10))
        noisy = np.asarray(add_noise_batch(jax.numpy.asarray(te_erp[..., None]), k, (snr, snr)))[..., 0]
        cal = jr_jax.calibrate(npe, te_theta, noisy, key=jax.random.fold_in(k, 1), snr_db=None)
        rows = cal.rows()
        if point is not None:
            pm = jr_jax.parameter_metrics(te_theta, point.predict_array(noisy), npe.lows, npe.highs)
            res[f"point_r2_{snr:g}"] = {n: round(float(v), 3) for n, v in zip(prior.names, pm["r2"])}
        res[f"cal_{snr:g}"] = {r["parameter"]: dict(ce=round(r["calibration_error"], 3), p=float(f"{r['sbc_pvalue']:.2g}"),
                                                    r2=round(r.get("r2", float("nan")), 3),
                                                    z=(round(r["z_mean"], 2), round(r["z_sd"], 2)),
                                                    cov90=r["coverage_90"]) for r in rows}
        worst = max(r["calibration_error"] for r in rows)
        fails = [r["parameter"] for r in rows if r["sbc_pvalue"] < 0.01]
        print(args.tag, f"{snr:g} dB worst cal err {worst:.3f}, SBC fails {fails}, R2",
              {r['parameter']: round(r['r2'], 2) for r in rows if 'r2' in r and r['r2'] == r['r2']}, flush=True)
with open(args.out, "a") as f:
    f.write(json.dumps(res, default=float) + "\n")
