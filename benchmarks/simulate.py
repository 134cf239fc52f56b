"""Simulation throughput: jr_jax against a hand-written lax.scan, NumPy, and the noise roofline.

One run measures, side by side, sim-steps/s (one time step of one trajectory) for N = 1024 and
4096 trajectories x 1 s at dt = 0.1 ms in float32 (10^4 steps each):

- jr_jax.solve, batched SDE (Euler-Maruyama and Heun) and ODE (Euler and Heun), jitted, and
  jax.vmap over single solves (works, but runs Diffrax's loop batched);
- jr_jax.simulate over the same 1 s (SDE, Euler), on 1 and on 2 host devices (the second in a
  subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=2, which puts both cores to work);
- a hand-written lax.scan Euler-Maruyama with the noise drawn by jax.random.normal up front;
- a vectorised NumPy Euler-Maruyama (float32, Generator.standard_normal per step);
- jax.random.normal drawing the same number of normals (the noise roofline).

Also: compile time apart from run time, recompilation for new parameter values, and the peak
memory of 100 000 ERPs (default protocol, noise-free) simulated in chunks. Prints a table of
ratios and writes JSON.

    python benchmarks/simulate.py [--out benchmarks/results/simulate.json] [--quick]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jr_jax
from jr_jax._model import drift, noise_scale
from jr_jax._solve import brownian_increments

T, DT = 1.0, 1e-4
STEPS = int(round(T / DT))
TS = np.arange(0, T + 1e-9, 1e-3)


def best_time(f, *args, repeat=3):
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def first_call(f, *args):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t


def params_for(n, seed=0):
    return jr_jax.Prior().sample(jax.random.key(seed), n).replace(sigma=jr_jax.SIGMA_ABLEIDINGER_2017).broadcast()


def scan_euler_maruyama(params, key):
    """Hand-written Euler-Maruyama over a (6, N) state, noise drawn up front, 1 kHz output."""
    n = params.A_e.shape[0]
    noise = jax.random.normal(key, (STEPS, n), jnp.float32) * np.float32(np.sqrt(DT))
    g = noise_scale(params)
    stride = int(round(1e-3 / DT))

    def step(y, dw):
        y = y + DT * drift(None, y, params)
        return y.at[4].add(g * dw), None

    def block(y, dws):
        y, _ = jax.lax.scan(step, y, dws)
        return y, y[1] - y[2]

    _, out = jax.lax.scan(block, jnp.zeros((6, n), jnp.float32), noise.reshape(-1, stride, n))
    return out


def numpy_euler_maruyama(theta: dict, n_steps, seed=0):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    p = {k: np.asarray(v, f32) for k, v in theta.items()}
    y = np.zeros((6, len(p["A_e"])), f32)
    aeb, aib = p["A_e"] * p["b_e"], p["A_i"] * p["b_i"]
    c1, c2, c3, c4 = (p[f"a_{k}"] * p["C"] for k in (1, 2, 3, 4))
    g = aeb * p["sigma"] * f32(np.sqrt(DT))
    dt = f32(DT)

    def s(v):
        return 2 * p["e0"] / (1 + np.exp(p["r"] * (p["v0"] - v)))

    with np.errstate(over="ignore"):
        for _ in range(n_steps):
            y0, y1, y2, y3, y4, y5 = y
            d3 = aeb * s(y1 - y2) - 2 * p["b_e"] * y3 - p["b_e"] ** 2 * y0
            d4 = aeb * (p["mu"] + c2 * s(c1 * y0)) - 2 * p["b_e"] * y4 - p["b_e"] ** 2 * y1
            d5 = aib * c4 * s(c3 * y0) - 2 * p["b_i"] * y5 - p["b_i"] ** 2 * y2
            y = y + dt * np.stack([y3, y4, y5, d3, d4, d5])
            y[4] += g * rng.standard_normal(y.shape[1], dtype=np.float32)
    return y


SIM_PROTOCOL = dict(burn_in=0.0, tmin=0.0, tmax=T, baseline=False, dt=DT, solver="euler", n_trials=1)

_SUBPROCESS_SIMULATE = """
import json, time, jax, numpy as np, jr_jax
n = {n}
p = jr_jax.Prior().sample(jax.random.key(0), n).replace(sigma=jr_jax.SIGMA_ABLEIDINGER_2017)
pr = jr_jax.Protocol(**{protocol})
jax.block_until_ready(jr_jax.simulate(p, pr, key=jax.random.key(1), chunk_size=n))
best = 1e9
for i in range(3):
    t = time.perf_counter(); jax.block_until_ready(jr_jax.simulate(p, pr, key=jax.random.key(2 + i), chunk_size=n))
    best = min(best, time.perf_counter() - t)
print(json.dumps(dict(devices=len(jax.devices()), seconds=best)))
"""

_SUBPROCESS_MEMORY = """
import json, resource, time, jax, numpy as np, jr_jax
n = {n}
p = jr_jax.Prior().sample(jax.random.key(0), n)
t = time.perf_counter()
erp = jr_jax.simulate(p, jr_jax.Protocol(), chunk_size={chunk})
valid = int(np.isfinite(np.asarray(erp)).all(axis=1).sum())
seconds = time.perf_counter() - t
print(json.dumps(dict(n=n, seconds=seconds, valid=valid, shape=list(erp.shape),
                      peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""


def run_subprocess(code, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/simulate.json")
    ap.add_argument("--quick", action="store_true", help="N = 1024 only, 10 000 ERPs for the memory check")
    args = ap.parse_args()
    sizes = [1024] if args.quick else [1024, 4096]
    rows, results = [], dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), device=str(jax.devices()[0]),
                     jax=jax.__version__, jr_jax=jr_jax.__version__),
        workload=f"N trajectories x {T} s at dt = {DT} s, float32, output at 1 kHz", sizes={},
    )

    def record(n, name, seconds, steps=STEPS):
        rate = n * steps / seconds
        results["sizes"].setdefault(str(n), {})[name] = dict(seconds=seconds, msteps_per_s=rate / 1e6)
        rows.append((n, name, rate / 1e6))
        print(f"N={n:5d}  {name:44s} {rate / 1e6:8.1f} M sim-steps/s   ({seconds:.3f} s)", flush=True)
        return rate

    for n in sizes:
        params = params_for(n)
        results["sizes"][str(n)] = {}
        keys = jax.random.split(jax.random.key(1), n)
        for solver in ("euler", "heun"):
            sde = jax.jit(lambda p, k, s=solver: jr_jax.solve(p, TS, key=k, dt=DT, solver=s))
            ode = jax.jit(lambda p, s=solver: jr_jax.solve(p, TS, dt=DT, solver=s))
            compile_and_run = first_call(sde, params, keys)
            t_sde = best_time(sde, params, keys)
            if solver == "euler":
                results["sizes"][str(n)]["compile_s_sde_euler"] = compile_and_run - t_sde
                before = sde._cache_size()
                t_new = first_call(sde, params_for(n, seed=5), keys)
                results["sizes"][str(n)]["recompiled_for_new_values"] = sde._cache_size() != before
                results["sizes"][str(n)]["first_call_new_values_s"] = t_new
            record(n, f"jr_jax.solve SDE ({solver})", t_sde)
            if solver == "euler":
                vm = jax.jit(jax.vmap(lambda p, k: jr_jax.solve(p, TS, key=k, dt=DT, solver="euler")))
                first_call(vm, params, keys)
                record(n, "jax.vmap over single jr_jax.solve SDE (euler)", best_time(vm, params, keys, repeat=1))
            first_call(ode, params)
            record(n, f"jr_jax.solve ODE ({solver})", best_time(ode, params))

        protocol = jr_jax.Protocol(**SIM_PROTOCOL)
        sim = lambda p, k: jr_jax.simulate(p, protocol, key=k, chunk_size=n)  # noqa: E731
        first_call(sim, params, jax.random.key(0))
        record(n, "jr_jax.simulate SDE (euler), 1 device", best_time(sim, params, jax.random.key(3)))
        two = run_subprocess(_SUBPROCESS_SIMULATE.format(n=n, protocol=SIM_PROTOCOL),
                             {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
        record(n, f"jr_jax.simulate SDE (euler), {two['devices']} host devices", two["seconds"])

        scan = jax.jit(scan_euler_maruyama)
        first_call(scan, params, jax.random.key(0))
        record(n, "hand-written lax.scan Euler-Maruyama", best_time(scan, params, jax.random.key(0)))

        theta = {k: np.asarray(getattr(params, k)) for k in jr_jax.JRParams.names}
        numpy_steps = 3000
        t = time.perf_counter()
        numpy_euler_maruyama(theta, numpy_steps)
        record(n, "NumPy vectorised Euler-Maruyama", time.perf_counter() - t, steps=numpy_steps)

        increments = jax.jit(lambda k: brownian_increments(k, STEPS, DT, jnp.float32))
        first_call(increments, keys)
        record(n, "jr_jax Brownian increments alone (per-key)", best_time(increments, keys))

        normals = jax.jit(lambda k: jax.random.normal(k, (STEPS, n), jnp.float32))
        first_call(normals, jax.random.key(0))
        record(n, "jax.random.normal, same count (roofline)", best_time(normals, jax.random.key(0)))

    print("\nRatios (same run):")
    ratios = {}
    for n in sizes:
        r = {name: rate for (m, name, rate) in rows if m == n}
        em = r["jr_jax.solve SDE (euler)"]
        ratios[str(n)] = dict(
            sde_euler_over_numpy=em / r["NumPy vectorised Euler-Maruyama"],
            sde_euler_over_roofline=em / r["jax.random.normal, same count (roofline)"],
            sde_euler_over_scan=em / r["hand-written lax.scan Euler-Maruyama"],
            sde_heun_over_numpy=r["jr_jax.solve SDE (heun)"] / r["NumPy vectorised Euler-Maruyama"],
            simulate_2dev_over_roofline=max(v for k, v in r.items() if "host devices" in k)
            / r["jax.random.normal, same count (roofline)"],
            ode_euler_msteps=r["jr_jax.solve ODE (euler)"],
        )
        for k, v in ratios[str(n)].items():
            print(f"N={n:5d}  {k:32s} {v:7.2f}")
        c = results["sizes"][str(n)]
        print(f"N={n:5d}  compile time (SDE Euler) {c['compile_s_sde_euler']:.2f} s; "
              f"recompiled for new values: {c['recompiled_for_new_values']}")
    results["ratios"] = ratios

    n_mem = 10_000 if args.quick else 100_000
    mem = run_subprocess(_SUBPROCESS_MEMORY.format(n=n_mem, chunk=1024))
    results["memory"] = mem
    print(f"\n{mem['n']} ERPs (default protocol, noise-free, chunks of 1024): {mem['seconds']:.1f} s, "
          f"{mem['n'] / mem['seconds']:.0f} ERPs/s, peak RSS {mem['peak_rss_gib']:.2f} GiB, {mem['valid']} valid")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
