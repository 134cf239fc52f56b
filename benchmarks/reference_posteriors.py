"""Reference posteriors for the posterior benchmark: long tempered SMC from the prior, in several
independent runs per observation, with R-hat across the runs.

The benchmark problem is that of ``benchmarks/posterior.py``: the study's truncated-normal prior over
its nine parameters, its stimulus, noise-free dynamics (sigma = 0, so the likelihood is exact) and
white measurement noise at a fixed SNR, the noise SD following the simulated ERP's power
(``snr_db`` in :func:`jr_jax.log_likelihood`, as the NPE is trained). ``--n-obs`` parameter sets are
drawn from the prior with a fixed seed, each observed at every SNR of ``--snrs``.

Sampler: adaptive tempered SMC (BlackJAX, :func:`jr_jax._likelihood.tempered_smc`) from the prior
to the posterior (likelihood tempering, the ESS kept at half between temperatures), random-walk
Metropolis moves on the particles' covariance, in log coordinates (log theta, with the prior's box
as hard walls): there the exact ridge (C, a_k) -> (lambda C, a_k / lambda) is a straight line, which
moves on the particles' covariance follow. Nothing of
the NPE enters: the references are independent of what they judge. Each observation is sampled in
``--runs`` independent runs; for each parameter and for log(C a_k) the Gelman-Rubin R-hat across
runs (between-run against within-run variance) says whether the runs found the same posterior. An
observation is marked converged when every run reached temperature 1 with a mean acceptance above
0.05 and every R-hat is below ``--rhat-max``; the others are stored with their diagnostics and
flagged, never passed off as converged.

    python benchmarks/reference_posteriors.py [--n-obs 10] [--snrs 30 10] [--runs 4] [--particles 1000]
                                              [--mcmc-steps 10] [--keep 1000]

Writes benchmarks/results/reference_posteriors.npz (compressed: true parameters, clean and noisy ERPs,
``--keep`` pooled draws per observation) and reference_posteriors.json (diagnostics, timings).
"""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jr_jax
from jr_jax._summary import derived_quantities
from jr_jax._likelihood import _gaussian_loglik, _log_prior, particle_batched, tempered_smc

PRIOR = jr_jax.Prior(kind="normal")
PROTOCOL = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study(), n_trials=1)


def derived(theta: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The parameters and log(C a_k), k = 1..4: ``(..., 13)`` and their names."""
    extra, labels = derived_quantities(theta, PRIOR.names)
    return np.concatenate([theta, extra], axis=-1), list(PRIOR.names) + labels


def rhat(runs: np.ndarray) -> np.ndarray:
    """Gelman-Rubin R-hat across independent runs, ``runs (m, n, p) -> (p,)``."""
    m, n = runs.shape[:2]
    means = runs.mean(axis=1)
    w = runs.var(axis=1, ddof=1).mean(axis=0)
    b = n * means.var(axis=0, ddof=1)
    return np.sqrt(((n - 1) / n * w + b / n) / w)


def _batch_loglik(u, data):
    x, snr = data
    sim = jr_jax.simulate(PRIOR.to_params(jnp.exp(u)), PROTOCOL, chunk_size=u.shape[0])
    return _gaussian_loglik(sim, x, None, snr)


LOGLIK = particle_batched(_batch_loglik)


def log_q(u, data):
    """The prior in log coordinates u = log(theta) (-inf outside the prior's box)."""
    return _log_prior(PRIOR, jnp.exp(u)) + jnp.sum(u, axis=-1)


def log_target(u, data):
    lq = log_q(u, data)
    return jnp.where(jnp.isfinite(lq), LOGLIK(u, data) + lq, -jnp.inf)


def sample_q(key, n):
    return jnp.log(PRIOR.sample_array(key, n))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-obs", type=int, default=10)
    ap.add_argument("--snrs", type=float, nargs="+", default=[30.0, 10.0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--particles", type=int, default=1000)
    ap.add_argument("--mcmc-steps", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=200, help="most tempering steps per run")
    ap.add_argument("--keep", type=int, default=1000, help="pooled draws stored per observation")
    ap.add_argument("--rhat-max", type=float, default=1.05)
    ap.add_argument("--seed", type=int, default=2406)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    key = jax.random.key(args.seed)
    theta = np.asarray(PRIOR.sample_array(jax.random.fold_in(key, 0), 4 * args.n_obs), np.float64)
    clean = np.asarray(jr_jax.simulate(PRIOR.to_params(jnp.asarray(theta, jnp.float32)), PROTOCOL), np.float64)
    ok = np.flatnonzero(np.isfinite(clean).all(axis=1))[: args.n_obs]  # a diverging draw is skipped, said below
    skipped = int(ok[-1] + 1 - len(ok))  # diverging draws passed over before the last one kept
    theta, clean = theta[ok], clean[ok]
    rng = np.random.default_rng(args.seed)
    d = len(PRIOR.names)
    draws = np.zeros((len(args.snrs), len(theta), args.keep, d), np.float32)
    noisy = np.zeros((len(args.snrs), *clean.shape), np.float32)
    report = dict(problem="study truncated-normal prior, study stimulus, noise-free dynamics, white noise at the SNR "
                          "(SD from each simulated ERP's RMS, as in training)",
                  protocol=PROTOCOL.to_dict(), prior=PRIOR.to_dict(), seed=args.seed, runs=args.runs,
                  particles=args.particles, mcmc_steps=args.mcmc_steps, rhat_max=args.rhat_max,
                  diverging_draws_skipped=skipped, observations=[])
    names = None
    t_all = time.perf_counter()
    for s, snr in enumerate(args.snrs):
        for i in range(len(theta)):
            sd = np.sqrt(np.mean(clean[i] ** 2)) / 10 ** (snr / 20)
            noisy[s, i] = clean[i] + sd * rng.standard_normal(clean.shape[1])
            data = (jnp.asarray(noisy[s, i]), jnp.float32(snr))
            t0 = time.perf_counter()
            runs, diags = [], []
            for r in range(args.runs):
                k = jax.random.fold_in(key, 1000 * s + 10 * i + r + 1)
                z, log_z, diag = tempered_smc(log_q, sample_q, log_target, k, d, args.particles, args.mcmc_steps,
                                              args.max_steps, data=data)
                runs.append(np.exp(np.asarray(z, np.float64)))
                diags.append(dict(log_evidence=float(log_z), steps=diag["smc_steps"],
                                  acceptance=diag["acceptance_rate"], final_ess=diag["final_ess"],
                                  reached_posterior=diag["reached_posterior"]))
            seconds = time.perf_counter() - t0
            full, names = derived(np.stack(runs))
            r_hat = rhat(full)
            converged = all(g["reached_posterior"] and g["acceptance"] > 0.05 for g in diags) and bool(
                np.all(r_hat < args.rhat_max))
            pooled = np.concatenate(runs)
            pick = np.random.default_rng(i).choice(len(pooled), args.keep, replace=len(pooled) < args.keep)
            draws[s, i] = pooled[pick]
            report["observations"].append(dict(
                snr_db=snr, index=i, theta=theta[i].tolist(), noise_sd=float(sd), converged=converged,
                rhat=dict(zip(names, np.round(r_hat, 4).tolist())), max_rhat=float(r_hat.max()),
                runs=diags, seconds=seconds, likelihood_evaluations=int(sum(
                    g["steps"] * args.particles * (args.mcmc_steps + 1) for g in diags))))
            print(f"{snr:g} dB obs {i}: max R-hat {r_hat.max():.3f} ({names[int(r_hat.argmax())]}), steps "
                  f"{[g['steps'] for g in diags]}, acceptance {np.mean([g['acceptance'] for g in diags]):.2f}, "
                  f"{'converged' if converged else 'NOT converged'}, {seconds:.0f} s", flush=True)
    report["seconds"] = time.perf_counter() - t_all
    report["converged"] = int(sum(o["converged"] for o in report["observations"]))
    np.savez_compressed(out / "reference_posteriors.npz", theta=theta.astype(np.float32), erp_clean=clean.astype(np.float32),
                        erp=noisy, snr_db=np.asarray(args.snrs, np.float32), draws=draws,
                        converged=np.array([[o["converged"] for o in report["observations"]
                                             if o["snr_db"] == snr] for snr in args.snrs]))
    (out / "reference_posteriors.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['converged']} of {len(report['observations'])} observations converged; "
          f"{report['seconds'] / 60:.1f} min; wrote {out / 'reference_posteriors.npz'}")


if __name__ == "__main__":
    main()
