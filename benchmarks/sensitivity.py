"""How many simulations a stable parameter ranking needs: DGSM (exact gradients) against Sobol' ST.

One run. QoI: post-stimulus RMS of the ERP (study stimulus), uniform prior over the study's nine
ranges. For increasing budgets, each method ranks the parameters; stability is the 5th percentile,
over 200 bootstrap resamples of the run's own samples, of the Spearman correlation between the
resampled ranking and the run's ranking. A method is called stable from the smallest budget at
which that figure is >= 0.9 and stays so at every larger budget tried.
Simulations counted: Sobol' needs N (d + 2) ERPs for base size N; DGSM one ERP and one reverse-mode
gradient per draw (its wall time includes the gradients). Also checked: the DGSM bound
ST_i <= (b-a)² ν_i / (π² V) for every parameter at the largest budgets. Writes JSON.

    python benchmarks/sensitivity.py [--out benchmarks/results/sensitivity.json]
"""

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

import jr_jax
from jr_jax import sensitivity as sa

QOI = "rms"


def spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def sobol_run(prior, protocol, n, seed):
    from SALib.analyze import sobol as analyze
    from SALib.sample import sobol as sample

    prob = sa.problem(prior.names, prior.lows, prior.highs)
    t = time.perf_counter()
    x = sample.sample(prob, n, calc_second_order=False, seed=seed)
    y = sa._salib.erp_model(prior, protocol, sa.get_qoi(QOI))(x)
    si = analyze.analyze(prob, y, calc_second_order=False, num_resamples=200, keep_resamples=True, seed=seed)
    seconds = time.perf_counter() - t
    st = np.asarray(si["ST"])
    boots = np.asarray(si["ST_conf_all"]) if "ST_conf_all" in si else None
    stab = float(np.percentile([spearman(b, st) for b in boots], 5)) if boots is not None else float("nan")
    return dict(n_simulations=len(x), seconds=seconds, ST=st.tolist(), ST_conf=np.asarray(si["ST_conf"]).tolist(),
                stability=stab)


def dgsm_stability(prior, protocol, n, seed):
    """DGSM with its per-sample gradients kept, for the bootstrap of the ranking."""
    import jax.numpy as jnp

    q = sa.get_qoi(QOI)
    times = protocol.times
    theta = np.asarray(prior.sample_array(jax.random.key(seed), n))
    t = time.perf_counter()

    def total(th):
        qs = jax.vmap(lambda e: q(e, times))(jr_jax.simulate(prior.to_params(th), protocol, chunk_size=th.shape[0]))
        return jnp.sum(qs), qs

    grads, values = [], []
    step = jax.jit(lambda th: jax.value_and_grad(total, has_aux=True)(th))
    for lo in range(0, n, 256):
        (_, qs), g = step(jnp.asarray(theta[lo:lo + 256], jnp.float32))
        grads.append(np.asarray(g))
        values.append(np.asarray(qs))
    seconds = time.perf_counter() - t
    g, v = np.concatenate(grads), np.concatenate(values)
    rows = sa.dgsm_from_gradients(g, v, prior.lows, prior.highs, prior.names)
    bound = np.array([r["dgsm"] for r in rows])
    rng = np.random.default_rng(seed)
    widths = prior.highs - prior.lows
    stats = []
    for _ in range(200):
        idx = rng.integers(0, n, n)
        stats.append(spearman((g[idx] ** 2).mean(0) * widths**2 / v[idx].var(), bound))
    return dict(n_simulations=n, seconds=seconds, dgsm=bound.tolist(),
                dgsm_low=[r["dgsm_low"] for r in rows], dgsm_high=[r["dgsm_high"] for r in rows],
                stability=float(np.percentile(stats, 5)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/sensitivity.json")
    args = ap.parse_args()
    prior = jr_jax.Prior()
    protocol = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study())
    # warm up the compilations so that wall times are run times
    sobol_run(prior, protocol, 8, 0)
    dgsm_stability(prior, protocol, 256, 99)
    results = dict(qoi=QOI, names=list(prior.names), sobol=[], dgsm=[])
    print(f"{'method':6s} {'simulations':>11s} {'seconds':>8s} {'stability (5th pct Spearman)':>30s}")
    for n in (32, 64, 128, 256, 512, 1024):
        r = sobol_run(prior, protocol, n, 1)
        results["sobol"].append(r)
        print(f"sobol  {r['n_simulations']:11d} {r['seconds']:8.2f} {r['stability']:30.3f}")
    for n in (32, 64, 128, 256, 512, 1024):
        r = dgsm_stability(prior, protocol, n, 1)
        results["dgsm"].append(r)
        print(f"dgsm   {r['n_simulations']:11d} {r['seconds']:8.2f} {r['stability']:30.3f}")

    def first_stable(runs):
        """The smallest budget from which every larger budget is stable too (None if none is)."""
        for i, r in enumerate(runs):
            if all(x["stability"] >= 0.9 for x in runs[i:]):
                return r["n_simulations"]
        return None

    need_sobol, need_dgsm = first_stable(results["sobol"]), first_stable(results["dgsm"])
    st, dg = results["sobol"][-1], results["dgsm"][-1]
    holds = [st["ST"][j] - st["ST_conf"][j] <= dg["dgsm_high"][j] for j in range(len(prior.names))]
    results.update(stable_at=dict(sobol=need_sobol, dgsm=need_dgsm),
                   ratio=(need_dgsm / need_sobol) if need_sobol and need_dgsm else None,
                   bound_holds=dict(zip(prior.names, holds)))
    print(f"\nstable ranking: Sobol' ST from {need_sobol} simulations, DGSM from {need_dgsm} (None: not within "
          f"{results['dgsm'][-1]['n_simulations']})"
          + (f" (ratio {need_dgsm / need_sobol:.3f}; target <= 0.1)" if need_sobol and need_dgsm else ""))
    print("bound ST <= DGSM at the largest budgets (ST - conf <= upper DGSM):")
    for j, name in enumerate(prior.names):
        print(f"  {name:5s} ST {st['ST'][j]:7.3f} ± {st['ST_conf'][j]:.3f}   DGSM {dg['dgsm'][j]:9.3g} "
              f"[{dg['dgsm_low'][j]:.3g}, {dg['dgsm_high'][j]:.3g}]   {'holds' if holds[j] else 'VIOLATED'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
