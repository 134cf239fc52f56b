"""Peak memory of stochastic ERP simulation against trials and burn-in, at fixed N.

Each configuration runs in a fresh Python process (so one peak cannot hide another) and reports
``ru_maxrss`` (peak resident set size) after the simulation. The configurations, at N
trajectories (default 1024, one chunk) with intrinsic noise (sigma of Ableidinger et al. 2017):

- ``jr_jax.simulate`` with the default protocol at 1 and at 60 trials (burn-in 1 s), and at
  burn-in 1 s and 10 s (1 trial);
- ``jr_jax.make_dataset`` of 2 chunks at 1 and 60 trials;
- for contrast, the same 10 s burn-in solved with its Brownian increments materialised up front
  (``(n_steps, N)`` floats, how the solver worked before the increments were drawn inside
  ``diffeqsolve``), and a process that only imports jr_jax and compiles a tiny simulation (the
  baseline every process pays).

The targets: peak RSS at 60 trials within 1.2x of 1 trial, and independent of the burn-in.
Writes JSON.

    python benchmarks/memory.py [--n 1024] [--out benchmarks/results/memory.json]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

_HEADER = """
import json, resource, time, tempfile, jax, jax.numpy as jnp, numpy as np, jr_jax
n = {n}
params = jr_jax.Prior().sample(jax.random.key(0), n).replace(sigma=jr_jax.SIGMA_ABLEIDINGER_2017)
t = time.perf_counter()
"""

_FOOTER = """
seconds = time.perf_counter() - t
print(json.dumps(dict(seconds=seconds, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""

CONFIGS = {
    "baseline (import, tiny simulate)": """
pr = jr_jax.Protocol(n_trials=1, burn_in=0.0, tmin=-0.01, tmax=0.01)
np.asarray(jr_jax.simulate(params[:2], pr, key=jax.random.key(1)))
""",
    "simulate, 1 trial, burn-in 1 s": """
np.asarray(jr_jax.simulate(params, jr_jax.Protocol(n_trials=1, burn_in=1.0), key=jax.random.key(1), chunk_size=n))
""",
    "simulate, 60 trials, burn-in 1 s": """
np.asarray(jr_jax.simulate(params, jr_jax.Protocol(n_trials=60, burn_in=1.0), key=jax.random.key(1), chunk_size=n))
""",
    "simulate, 1 trial, burn-in 10 s": """
np.asarray(jr_jax.simulate(params, jr_jax.Protocol(n_trials=1, burn_in=10.0), key=jax.random.key(1), chunk_size=n))
""",
    "make_dataset, 2 chunks, 1 trial": """
prior = jr_jax.Prior(base=jr_jax.JRParams(sigma=jr_jax.SIGMA_ABLEIDINGER_2017))
with tempfile.TemporaryDirectory() as d:
    jr_jax.make_dataset(prior, jr_jax.Protocol(n_trials=1), 2 * n, d + "/ds", key=jax.random.key(1),
                        chunk_size=n, progress=False)
""",
    "make_dataset, 2 chunks, 60 trials": """
prior = jr_jax.Prior(base=jr_jax.JRParams(sigma=jr_jax.SIGMA_ABLEIDINGER_2017))
with tempfile.TemporaryDirectory() as d:
    jr_jax.make_dataset(prior, jr_jax.Protocol(n_trials=60), 2 * n, d + "/ds", key=jax.random.key(1),
                        chunk_size=n, progress=False)
""",
    "burn-in 10 s, increments materialised (previous solver)": """
from jr_jax._solve import brownian_increments, integrate, per_sample_keys, DEFAULT_DT
p = params.broadcast()
steps = int(round(10.0 / DEFAULT_DT))
f = jax.jit(lambda p, k: integrate(p, jnp.zeros((6, n)), steps, np.array([steps]), dt=DEFAULT_DT, solver="heun",
            increments=brownian_increments(k, steps, DEFAULT_DT, jnp.float32))[-1])
np.asarray(f(p, per_sample_keys(jax.random.key(1), n)))
""",
}


def run(code: str, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"configuration failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="trajectories (one chunk)")
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    args = ap.parse_args()
    if args.n < 2:
        raise SystemExit(f"--n must be an integer >= 2, got {args.n}")
    import jax

    import jr_jax

    results = dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), device=str(jax.devices()[0]),
                     jax=jax.__version__, jr_jax=jr_jax.__version__),
        n=args.n, protocol="jr_jax.Protocol() defaults (dt 0.25 ms, epoch -0.2..1.0 s at 1 kHz) with the trials "
        "and burn-in named; sigma = SIGMA_ABLEIDINGER_2017; float32", configs={},
    )
    for name, body in CONFIGS.items():
        r = run(_HEADER.format(n=args.n) + body + _FOOTER)
        results["configs"][name] = r
        print(f"{name:58s} peak RSS {r['peak_rss_mib']:8.1f} MiB   ({r['seconds']:.1f} s)", flush=True)
    c = {k: v["peak_rss_mib"] for k, v in results["configs"].items()}
    base = c["baseline (import, tiny simulate)"]
    ratios = {
        "60_trials_over_1_trial": c["simulate, 60 trials, burn-in 1 s"] / c["simulate, 1 trial, burn-in 1 s"],
        "burn_in_10s_over_1s": c["simulate, 1 trial, burn-in 10 s"] / c["simulate, 1 trial, burn-in 1 s"],
        "make_dataset_60_over_1_trial": c["make_dataset, 2 chunks, 60 trials"] / c["make_dataset, 2 chunks, 1 trial"],
        "materialised_over_fused_burn_in_10s": c["burn-in 10 s, increments materialised (previous solver)"]
        / c["simulate, 1 trial, burn-in 10 s"],
    }
    above = {k: v - base for k, v in c.items() if k != "baseline (import, tiny simulate)"}
    results["ratios"] = ratios
    results["above_baseline_mib"] = above
    sps = int(round(10.0 / 2.5e-4))
    results["materialised_increments_mib_for_10s_burn_in"] = sps * args.n * 4 / 2**20
    print("\nRatios of peak RSS:")
    for k, v in ratios.items():
        print(f"  {k:40s} {v:6.3f}")
    print(f"(the materialised 10 s burn-in alone is {results['materialised_increments_mib_for_10s_burn_in']:.0f} MiB "
          f"of increments at N = {args.n})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
