"""Convergence study that fixes the default solver and step (docs/guides/simulation.md, "Solver and step").

For prior draws, the deterministic ERP of the default protocol (1 s burn-in, epoch -0.2..1.0 s,
study stimulus) is computed in float64 by each solver at several steps and compared with a
reference (Heun at dt = 1e-5 s, itself checked against SciPy's DOP853 in tests/test_solve.py).
Error: relative L2 norm of the ERP difference, ||erp - ref|| / ||ref||. Writes JSON.

    python benchmarks/convergence.py [--n 64] [--out benchmarks/results/convergence.json]
"""

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

import jr_jax


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/convergence.json")
    args = ap.parse_args()
    grid = {"euler": [1e-4, 5e-5, 2.5e-5], "heun": [1e-3, 5e-4, 2.5e-4, 1e-4], "midpoint": [1e-3, 5e-4, 2.5e-4]}
    results = {"n": args.n, "reference": {"solver": "heun", "dt": 1e-5}, "rows": []}
    with jax.enable_x64(True):
        params = jr_jax.Prior().sample(jax.random.key(0), args.n).astype("float64")
        base = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study())
        t = time.perf_counter()
        ref = np.asarray(jr_jax.simulate(params, base.replace(solver="heun", dt=1e-5)))
        print(f"reference in {time.perf_counter() - t:.1f} s")
        norm = np.linalg.norm(ref, axis=1)
        for solver, dts in grid.items():
            for dt in dts:
                erp = np.asarray(jr_jax.simulate(params, base.replace(solver=solver, dt=dt)))
                rel = np.linalg.norm(erp - ref, axis=1) / norm
                row = dict(solver=solver, dt=dt, median=float(np.median(rel)), p95=float(np.percentile(rel, 95)),
                           max=float(rel.max()), steps_per_second_of_signal=round(1 / dt))
                results["rows"].append(row)
                print(f"{solver:8s} dt={dt:8.1e}  rel L2 error: median {row['median']:.2e}  p95 {row['p95']:.2e}  max {row['max']:.2e}")
    # float32 at the default: what users get
    params32 = params.astype("float32")
    erp32 = np.asarray(jr_jax.simulate(params32, base))
    rel32 = np.linalg.norm(erp32 - ref, axis=1) / norm
    results["default_float32"] = dict(solver=base.solver, dt=base.dt, median=float(np.median(rel32)),
                                      p95=float(np.percentile(rel32, 95)), max=float(rel32.max()))
    print(f"default ({base.solver}, dt={base.dt}) in float32: median {np.median(rel32):.2e}  p95 {np.percentile(rel32, 95):.2e}  max {rel32.max():.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
