"""Posterior inference on the study's problem, small budget: NPE beside the point regressor trained on
the same simulations, calibration on held-out simulations per test SNR, and the likelihood
correction on a few observations (k-hat, ESS, the sampler it needed, wall time).

Design: the study's truncated-normal prior over its nine parameters, its stimulus, noise-free
dynamics (sigma = 0, so one trial is the ERP and the likelihood is exact), white measurement noise
drawn per batch with SNR uniform in [snr_low, snr_high] dB for training and fixed per test SNR.
Both estimators use the quick preset's encoder (the Bi-LSTM behind a strided convolution) and the
same data, epochs and seed; the NPE has the noise feature and a regression head of weight 10
(jr_jax.train's posterior options, off by default; --no-noise-feature, --regression-weight), or
with ``--frozen-embedding`` the point regressor's network as its frozen embedding;
``--conditional-affine`` adds the flow's conditional affine layer.

Against reference posteriors (``--reference``, made by ``benchmarks/reference_posteriors.py`` on this
problem): for each reference observation, 1000 draws of jr_jax's NPE, of the NPE corrected by the
exact likelihood (:func:`jr_jax.correct_posterior`, first ``--correct-reference`` observations per
SNR), and of sbi's NPE trained on the same simulations (``--sbi-python``: an interpreter with sbi
0.27 installed; see ``benchmarks/sbi_npe.py``; its training ERPs get their noise once, at an SNR
drawn per simulation from the same range, where jr_jax's NPE draws fresh noise every epoch). Each is
scored by C2ST against the reference draws (:func:`jr_jax.c2st`, 0.5: indistinguishable) and by
the errors of the marginal means (in reference SDs) and SDs (ratio), over the observations whose
reference converged.

    python benchmarks/posterior.py [--n 12000] [--epochs 15] [--schedule cosine] [--regression-weight 10]
                                   [--no-noise-feature] [--conditional-affine] [--frozen-embedding]
                                   [--test 1000] [--correct 5]
                                   [--reference benchmarks/results/reference_posteriors.npz]
                                   [--correct-reference 5] [--sbi-python /tmp/sbi_venv/bin/python]
                                   [--name posterior]

Writes benchmarks/results/NAME.json and NAME_calibration_<snr>dB.png: ``posterior`` for the budget of
10^4 simulations, ``posterior_50000`` for 5 * 10^4 (``--n 50000``).
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
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--schedule", choices=["cosine", "none"], default="cosine",
                    help="learning-rate schedule of both trainings (cosine: decays to 0 over --epochs)")
    ap.add_argument("--test", type=int, default=1000, help="held-out simulations for calibration")
    ap.add_argument("--regression-weight", type=float, default=10.0,
                    help="the NPE's regression head weight (jr_jax.train's posterior option; 0: no head)")
    ap.add_argument("--no-noise-feature", action="store_true", help="the NPE without the noise feature")
    ap.add_argument("--conditional-affine", action="store_true",
                    help="the NPE's flow with a conditional affine layer after its coupling layers")
    ap.add_argument("--frozen-embedding", action="store_true",
                    help="train the NPE's flow on the point regressor's frozen estimates (jr_jax.train's embedding=; "
                         "no regression head); its training seconds then count the regressor's too")
    ap.add_argument("--snrs", type=float, nargs="+", default=[30.0, 10.0])
    ap.add_argument("--correct", type=int, default=5, help="observations per SNR for the likelihood correction")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="posterior",
                    help="results are written to OUT/NAME.json and OUT/NAME_calibration_<snr>dB.png (one name per budget)")
    ap.add_argument("--reference", default=None, help="reference posteriors (.npz of benchmarks/reference_posteriors.py)")
    ap.add_argument("--correct-reference", type=int, default=5,
                    help="reference observations per SNR that get the likelihood correction")
    ap.add_argument("--sbi-python", default=None, help="a Python with sbi 0.27 (benchmarks/sbi_npe.py)")
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
    common = dict(snr_db=(0.0, 40.0), encoder=_ENCODER, epochs=args.epochs, patience=args.epochs, progress=False,
                  schedule=None if args.schedule == "none" else args.schedule)
    posterior_options = dict(noise_feature=not args.no_noise_feature,
                             regression_weight=0.0 if args.frozen_embedding else args.regression_weight,
                             conditional_affine=args.conditional_affine)
    result = dict(n_simulations=int(ok.sum()), n_train=data.n_train, n_test=args.test, epochs=args.epochs,
                  schedule=args.schedule, posterior_options=posterior_options, frozen_embedding=args.frozen_embedding,
                  simulate_seconds=t_sim, invalid=int((~ok).sum()))
    models = {}
    for kind in ("point", "posterior") if args.frozen_embedding else ("posterior", "point"):
        t0 = time.perf_counter()
        if kind == "point":
            models[kind], history = jr_jax.train(data, kind=kind, **common)
        elif args.frozen_embedding:
            models[kind], history = jr_jax.train(data, kind=kind, posterior=posterior_options,
                                                 embedding=models["point"], **dict(common, encoder=None))
        else:
            models[kind], history = jr_jax.train(data, kind=kind, posterior=posterior_options, **common)
        result[f"{kind}_train_seconds"] = time.perf_counter() - t0
        if kind == "posterior" and args.frozen_embedding:
            result["flow_train_seconds"] = result["posterior_train_seconds"]
            result["posterior_train_seconds"] += result["point_train_seconds"]
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
        cal.plot(out / f"{args.name}_calibration_{snr:g}dB.png")
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
    if args.reference:
        result["reference"] = against_references(args, npe, prior, protocol, tr_theta, tr_erp, key, out)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out / (args.name + '.json')}")


def marginal_errors(draws, ref):
    """Mean over parameters of |mean - reference mean| / reference SD, and the median SD ratio."""
    sd = ref.std(axis=0)
    return float(np.mean(np.abs(draws.mean(axis=0) - ref.mean(axis=0)) / sd)), float(np.median(draws.std(axis=0) / sd))


def run_sbi(args, prior, tr_theta, tr_erp, observations, out):
    """sbi's NPE on the same training simulations, in its own interpreter: (draws (m, n, d), info)."""
    import subprocess
    import tempfile

    rng = np.random.default_rng(7)
    snr = rng.uniform(0.0, 40.0, len(tr_erp))
    sd = np.sqrt(np.mean(tr_erp**2, axis=1)) / 10 ** (snr / 20)
    x = tr_erp + sd[:, None] * rng.standard_normal(tr_erp.shape)
    with tempfile.TemporaryDirectory() as tmp:
        sims, draws = Path(tmp) / "sims.npz", Path(tmp) / "draws.npz"
        np.savez(sims, theta=tr_theta.astype(np.float32), x=x.astype(np.float32), lows=np.asarray(prior.lows),
                 highs=np.asarray(prior.highs), observations=observations.astype(np.float32))
        run = subprocess.run([args.sbi_python, str(Path(__file__).with_name("sbi_npe.py")), str(sims), "--out",
                              str(draws)], capture_output=True, text=True, cwd=tmp)  # sbi writes its logs there
        if run.returncode != 0:
            return None, dict(error="sbi could not be run: " + run.stderr.strip()[-400:])
        line = [ln for ln in run.stdout.splitlines() if ln.startswith("sbi_npe result: ")][-1]
        return np.load(draws)["draws"], json.loads(line[len("sbi_npe result: "):])


def against_references(args, npe, prior, protocol, tr_theta, tr_erp, key, out):
    """C2ST and marginal errors of each method against the reference posteriors."""
    ref = np.load(args.reference)
    meta = json.loads(Path(args.reference).with_suffix(".json").read_text())
    same = lambda a, b: json.loads(json.dumps(a)) == json.loads(json.dumps(b))  # noqa: E731
    if not (same(meta["protocol"], protocol.to_dict()) and same(meta["prior"], prior.to_dict())):
        raise SystemExit(f"{args.reference} was made for another protocol or prior than this benchmark's")
    snrs, x_all, ref_draws, converged = ref["snr_db"], ref["erp"], ref["draws"], ref["converged"]
    observations = x_all.reshape(-1, x_all.shape[-1])
    sbi_draws, sbi_info = (None, dict(error="not run: pass --sbi-python")) if not args.sbi_python else run_sbi(
        args, prior, tr_theta, tr_erp, observations, out)
    if sbi_draws is not None:
        sbi_draws = sbi_draws.reshape(len(snrs), -1, *sbi_draws.shape[1:])
    print("sbi:", {k: v for k, v in sbi_info.items() if k != "error"} or sbi_info["error"], flush=True)
    rows = []
    for s, snr in enumerate(snrs):
        for i in range(x_all.shape[1]):
            k = jax.random.fold_in(key, 5000 + 100 * s + i)
            x, r = x_all[s, i], ref_draws[s, i].astype(np.float64)
            t0 = time.perf_counter()
            methods = {"jr_jax NPE": npe.sample(x, len(r), key=k, check_distribution=False)}
            npe_seconds = time.perf_counter() - t0
            row = dict(snr_db=float(snr), index=i, reference_converged=bool(converged[s, i]),
                       npe_sample_seconds=npe_seconds)
            if i < args.correct_reference:
                t0 = time.perf_counter()
                corr = jr_jax.correct_posterior(npe, x, key=jax.random.fold_in(k, 1), snr_db=float(snr), n=len(r),
                                                smc_particles=500, smc_mcmc_steps=6)
                row.update(correction_seconds=time.perf_counter() - t0, correction_method=corr.method,
                           correction_converged=corr.converged, correction_pareto_k=corr.pareto_k)
                methods["jr_jax NPE + likelihood"] = corr.samples
            if sbi_draws is not None:
                methods["sbi NPE"] = sbi_draws[s, i]
            for name, draws in methods.items():
                c = jr_jax.c2st(r, np.asarray(draws, np.float64), key=jax.random.fold_in(k, 2))
                mean_err, sd_ratio = marginal_errors(np.asarray(draws, np.float64), r)
                row[name] = dict(c2st=c, mean_error_sd=mean_err, sd_ratio=sd_ratio)
            rows.append(row)
            print(f"{snr:g} dB obs {i}: " + ", ".join(f"{n} C2ST {row[n]['c2st']:.3f}" for n in methods), flush=True)
    summary = {}
    names = ["jr_jax NPE", "jr_jax NPE + likelihood", "sbi NPE"]
    for snr in snrs:
        use = [r for r in rows if r["snr_db"] == float(snr) and r["reference_converged"]]
        summary[f"{snr:g}"] = {n: dict(n_obs=len([r for r in use if n in r]),
                                       c2st=float(np.mean([r[n]["c2st"] for r in use if n in r])),
                                       mean_error_sd=float(np.mean([r[n]["mean_error_sd"] for r in use if n in r])),
                                       sd_ratio=float(np.median([r[n]["sd_ratio"] for r in use if n in r])))
                               for n in names if any(n in r for r in use)}
        for n, v in summary[f"{snr:g}"].items():
            print(f"{snr:g} dB {n:26s} C2ST {v['c2st']:.3f}  mean error {v['mean_error_sd']:.2f} SD  "
                  f"SD ratio {v['sd_ratio']:.2f}  ({v['n_obs']} observations)")
    return dict(file=str(args.reference), observations=rows, summary=summary, sbi=sbi_info,
                reference_converged=int(converged.sum()), reference_total=int(converged.size))


if __name__ == "__main__":
    main()
