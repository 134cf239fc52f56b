"""Simulation throughput: jr_jax against tvboptim, a hand-written lax.scan, NumPy, and the noise generator.

One run measures, side by side, sim-steps/s (one time step of one trajectory) for N = 1000 and
4096 trajectories x 1 s at dt = 0.1 ms in float32 (10^4 steps each):

- Heun, the issue's comparison: jr_jax.solve (the default path: Brownian increments drawn inside
  diffeqsolve by the counter-based path), the same solve with the increments materialised up
  front (the previous default), a hand-written lax.scan stochastic Heun drawing the same counter
  noise, the noise generator's own throughput (the same draws in a lax.scan, summed), and
  tvboptim's Heun (``tvboptim.experimental.network_dynamics``, bare Jansen-Rit dynamics with
  additive noise on y4, its native solver, default settings: it keeps every step) in a
  subprocess that times it interleaved with jr_jax's Heun;
- jr_jax.solve, batched SDE (Euler-Maruyama) and ODE (Euler and Heun), jitted, and jax.vmap over
  single solves (works, but runs Diffrax's loop batched);
- jr_jax.simulate over the same 1 s (SDE, Euler), on 1 and on 2 host devices (the second in a
  subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=2, which puts both cores to work);
- a hand-written lax.scan Euler-Maruyama with the noise drawn by jax.random.normal up front;
- a vectorised NumPy Euler-Maruyama (float32, Generator.standard_normal per step);
- jax.random.normal drawing the same number of normals (the previous roofline).

Each rate is the best of 3 runs (wall clock) after a first call; the first call's extra time is
reported as compile time. Process CPU time of the best run is recorded beside it (``cpu_seconds``):
on a machine shared with other work, CPU time is the steadier measure of the work done.

tvboptim is a benchmark-only dependency, never one of jr_jax's. Installed beside the project's
environment without touching its packages:

    pip install --no-deps --target /tmp/tvb_site tvboptim numpyro plum-dispatch beartype rich \
        markdown-it-py mdurl pygments multipledispatch typing_extensions
    python benchmarks/simulate.py --tvboptim-path /tmp/tvb_site

(or ``pip install tvboptim`` in an environment of its own, then ``--tvboptim-path`` to its
site-packages). Without it the tvboptim rows say why they are missing.

Also: recompilation for new parameter values, and the peak memory of 100 000 ERPs (default
protocol, noise-free) simulated in chunks. Prints a table of ratios and writes JSON.

    python benchmarks/simulate.py [--out benchmarks/results/simulate.json] [--quick] [--tvboptim-path DIR]
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jr_jax
from jr_jax._model import drift, noise_scale
from jr_jax._solve import CounterBrownianPath, brownian_increments, integrate, per_sample_keys

T, DT = 1.0, 1e-4
STEPS = int(round(T / DT))
TS = np.arange(0, T + 1e-9, 1e-3)
STRIDE = int(round(1e-3 / DT))


def cpu_time():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(f, *args, repeat=3):
    """(best wall seconds, CPU seconds of that run, first call's extra seconds: compile)."""
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    first = time.perf_counter() - t
    best, best_cpu = np.inf, np.inf
    for _ in range(repeat):
        t, c = time.perf_counter(), cpu_time()
        jax.block_until_ready(f(*args))
        wall, cpu = time.perf_counter() - t, cpu_time() - c
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu, max(first - best, 0.0)


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


def heun_materialised(params, keys):
    """jr_jax's Heun SDE with the increments of all steps drawn up front, (STEPS, N) floats."""
    n = keys.shape[0]
    inc = brownian_increments(keys, STEPS, DT, jnp.float32)
    return integrate(params, jnp.zeros((6, n), jnp.float32), STEPS, np.arange(0, STEPS + 1, STRIDE),
                     dt=DT, solver="heun", increments=inc)


def scan_heun(params, keys):
    """Hand-written stochastic Heun over a (6, N) state, the same counter noise drawn per step."""
    n = keys.shape[0]
    path = CounterBrownianPath.from_keys(keys, STEPS, DT, jnp.float32)
    g = noise_scale(params)
    dt = np.float32(DT)

    def step(y, k):
        dw = path.step_increment(k)
        f0 = drift(None, y, params)
        pred = (y + dt * f0).at[4].add(g * dw)
        y = (y + 0.5 * dt * (f0 + drift(None, pred, params))).at[4].add(g * dw)
        return y, None

    def block(y, ks):
        y, _ = jax.lax.scan(step, y, ks)
        return y, y[1] - y[2]

    _, out = jax.lax.scan(block, jnp.zeros((6, n), jnp.float32), jnp.arange(STEPS).reshape(-1, STRIDE))
    return out


def generator_in_loop(keys):
    """The counter noise alone: N increments per step in a lax.scan, summed (nothing stored)."""
    path = CounterBrownianPath.from_keys(keys, STEPS, DT, jnp.float32)
    total, _ = jax.lax.scan(lambda c, k: (c + path.step_increment(k), None),
                            jnp.zeros(keys.shape, jnp.float32), jnp.arange(STEPS))
    return total


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


_SUBPROCESS_TVBOPTIM = """
import importlib, json, resource, time, jax, jax.numpy as jnp, numpy as np, jr_jax
import tvboptim
nd = importlib.import_module("tvboptim.experimental.network_dynamics.solve")
from tvboptim.experimental.network_dynamics.dynamics.tvb.jansen_rit import JansenRit
from tvboptim.experimental.network_dynamics.noise.gaussian import AdditiveNoise
from tvboptim.experimental.network_dynamics.solvers import Heun
n, T, DT, steps = {n}, {T}, {DT}, {steps}
# tvboptim works in ms: 1 s at dt = 0.1 ms; additive noise on y4 only, its default parameters
fn, cfg = nd.prepare(JansenRit(), Heun(), t0=0.0, t1=T * 1e3, dt=DT * 1e3, n_nodes=n,
                     noise=AdditiveNoise(apply_to="y4", sigma=0.1, key=jax.random.key(0)))
tvb = jax.jit(lambda c: jax.tree.leaves(fn(c)))
shapes = [list(x.shape) for x in tvb(cfg)]
params = jr_jax.Prior().sample(jax.random.key(0), n).replace(sigma=jr_jax.SIGMA_ABLEIDINGER_2017).broadcast()
keys = jax.random.split(jax.random.key(1), n)
ts = np.arange(0, T + 1e-9, 1e-3)
mine = jax.jit(lambda p, k: jr_jax.solve(p, ts, key=k, dt=DT, solver="heun"))
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
def once(f, *a):
    t, c = time.perf_counter(), cpu(); jax.block_until_ready(f(*a)); return time.perf_counter() - t, cpu() - c
t = time.perf_counter(); jax.block_until_ready(tvb(cfg)); tvb_first = time.perf_counter() - t
t = time.perf_counter(); jax.block_until_ready(mine(params, keys)); mine_first = time.perf_counter() - t
best = dict(tvb=(1e9, 1e9), mine=(1e9, 1e9))
for _ in range(5):  # interleaved, so both see the same load
    for name, f, a in (("tvb", tvb, (cfg,)), ("mine", mine, (params, keys))):
        w = once(f, *a)
        if w[0] < best[name][0]:
            best[name] = w
print(json.dumps(dict(version=getattr(tvboptim, "__version__", "?"), output_shapes=shapes,
                      tvboptim=dict(seconds=best["tvb"][0], cpu_seconds=best["tvb"][1], compile_s=tvb_first - best["tvb"][0]),
                      jr_jax=dict(seconds=best["mine"][0], cpu_seconds=best["mine"][1], compile_s=mine_first - best["mine"][0]))))
"""


def run_subprocess(code, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _first_core_only():
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def tvboptim_rates(n, path, one_core=False):
    """tvboptim's Heun and jr_jax's, timed interleaved in a subprocess with ``path`` on PYTHONPATH.

    ``one_core``: the subprocess is pinned to one CPU core, where XLA's thread pool cannot spread
    either solve's step over the cores (on this 2-core box that spreading makes wall times vary by
    up to 2x from run to run).
    """
    if not path:
        return dict(error="not measured: pass --tvboptim-path DIR (where tvboptim is installed; see the docstring)")
    env = {"PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    code = _SUBPROCESS_TVBOPTIM.format(n=n, T=T, DT=DT, steps=STEPS)
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                         preexec_fn=_first_core_only if one_core else None)
    if out.returncode != 0:
        return dict(error="tvboptim could not be run: " + out.stderr.strip().splitlines()[-1][:300])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/simulate.json")
    ap.add_argument("--quick", action="store_true", help="N = 1000 only, 10 000 ERPs for the memory check")
    ap.add_argument("--tvboptim-path", default=os.environ.get("TVBOPTIM_PATH"),
                    help="a directory holding tvboptim and its extra dependencies (default: $TVBOPTIM_PATH)")
    args = ap.parse_args()
    sizes = [1000] if args.quick else [1000, 4096]
    rows, results = [], dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), device=str(jax.devices()[0]),
                     jax=jax.__version__, jr_jax=jr_jax.__version__),
        workload=f"N trajectories x {T} s at dt = {DT} s, float32, output at 1 kHz", sizes={},
        note="2-core machine shared with other work while measured: ratios come from one run, side by side",
    )

    def record(n, name, seconds, steps=STEPS, cpu=None, compile_s=None):
        rate = n * steps / seconds
        entry = dict(seconds=seconds, msteps_per_s=rate / 1e6)
        if cpu is not None:
            entry.update(cpu_seconds=cpu, msteps_per_cpu_s=n * steps / cpu / 1e6)
        if compile_s is not None:
            entry["compile_s"] = compile_s
        results["sizes"].setdefault(str(n), {})[name] = entry
        rows.append((n, name, rate / 1e6))
        extra = "" if compile_s is None else f", compile {compile_s:.2f} s"
        extra += "" if cpu is None else f", {n * steps / cpu / 1e6:.1f} per CPU-s"
        print(f"N={n:5d}  {name:58s} {rate / 1e6:8.1f} M sim-steps/s   ({seconds:.3f} s{extra})", flush=True)
        return rate

    for n in sizes:
        params = params_for(n)
        results["sizes"][str(n)] = {}
        keys = jax.random.split(jax.random.key(1), n)

        # Heun, the comparison: measured one after the other, then tvboptim interleaved with jr_jax
        heun = jax.jit(lambda p, k: jr_jax.solve(p, TS, key=k, dt=DT, solver="heun"))
        record(n, "jr_jax.solve SDE (heun)", *timed_args(timed(heun, params, keys)))
        record(n, "jr_jax.solve SDE (heun), increments materialised up front",
               *timed_args(timed(jax.jit(heun_materialised), params, keys)))
        record(n, "hand-written lax.scan Heun, same counter noise", *timed_args(timed(jax.jit(scan_heun), params, keys)))
        record(n, "counter noise generator alone, in a time loop", *timed_args(timed(jax.jit(generator_in_loop), keys)))
        tvb = tvboptim_rates(n, args.tvboptim_path)
        results["sizes"][str(n)]["tvboptim"] = tvb
        if "error" in tvb:
            print(f"N={n:5d}  tvboptim: {tvb['error']}")
        else:
            record(n, f"tvboptim {tvb['version']} Heun (native, keeps every step)", tvb["tvboptim"]["seconds"],
                   cpu=tvb["tvboptim"]["cpu_seconds"], compile_s=tvb["tvboptim"]["compile_s"])
            record(n, "jr_jax.solve SDE (heun), interleaved with tvboptim", tvb["jr_jax"]["seconds"],
                   cpu=tvb["jr_jax"]["cpu_seconds"], compile_s=tvb["jr_jax"]["compile_s"])
            one = tvboptim_rates(n, args.tvboptim_path, one_core=True)
            results["sizes"][str(n)]["tvboptim_one_core"] = one
            if "error" not in one:
                record(n, "tvboptim Heun, both pinned to one core", one["tvboptim"]["seconds"],
                       cpu=one["tvboptim"]["cpu_seconds"])
                record(n, "jr_jax.solve SDE (heun), both pinned to one core", one["jr_jax"]["seconds"],
                       cpu=one["jr_jax"]["cpu_seconds"])

        for solver in ("euler", "heun"):
            ode = jax.jit(lambda p, s=solver: jr_jax.solve(p, TS, dt=DT, solver=s))
            if solver == "euler":
                sde = jax.jit(lambda p, k: jr_jax.solve(p, TS, key=k, dt=DT, solver="euler"))
                wall, cpu, compile_s = timed(sde, params, keys)
                results["sizes"][str(n)]["compile_s_sde_euler"] = compile_s
                before = sde._cache_size()
                t_new = first_call(sde, params_for(n, seed=5), keys)
                results["sizes"][str(n)]["recompiled_for_new_values"] = sde._cache_size() != before
                results["sizes"][str(n)]["first_call_new_values_s"] = t_new
                record(n, "jr_jax.solve SDE (euler)", wall, cpu=cpu, compile_s=compile_s)
                vm = jax.jit(jax.vmap(lambda p, k: jr_jax.solve(p, TS, key=k, dt=DT, solver="euler")))
                first_call(vm, params, keys)
                record(n, "jax.vmap over single jr_jax.solve SDE (euler)", best_time(vm, params, keys, repeat=1))
            record(n, f"jr_jax.solve ODE ({solver})", *timed_args(timed(ode, params)))

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
        record(n, "jr_jax Brownian increments alone (per-key)", *timed_args(timed(increments, keys)))

        normals = jax.jit(lambda k: jax.random.normal(k, (STEPS, n), jnp.float32))
        first_call(normals, jax.random.key(0))
        record(n, "jax.random.normal, same count (roofline)", best_time(normals, jax.random.key(0)))

    print("\nRatios (same run):")
    ratios = {}
    for n in sizes:
        r = {name: rate for (m, name, rate) in rows if m == n}
        em = r["jr_jax.solve SDE (euler)"]
        heun = r["jr_jax.solve SDE (heun)"]
        c = results["sizes"][str(n)]
        ratios[str(n)] = dict(
            sde_heun_over_generator=heun / r["counter noise generator alone, in a time loop"],
            sde_heun_over_materialised=heun / r["jr_jax.solve SDE (heun), increments materialised up front"],
            sde_heun_over_scan_heun=heun / r["hand-written lax.scan Heun, same counter noise"],
            sde_heun_cpu_over_generator_cpu=c["jr_jax.solve SDE (heun)"]["msteps_per_cpu_s"]
            / c["counter noise generator alone, in a time loop"]["msteps_per_cpu_s"],
            sde_euler_over_numpy=em / r["NumPy vectorised Euler-Maruyama"],
            sde_euler_over_roofline=em / r["jax.random.normal, same count (roofline)"],
            sde_euler_over_scan=em / r["hand-written lax.scan Euler-Maruyama"],
            sde_heun_over_numpy=heun / r["NumPy vectorised Euler-Maruyama"],
            simulate_2dev_over_roofline=max(v for k, v in r.items() if "host devices" in k)
            / r["jax.random.normal, same count (roofline)"],
            ode_euler_msteps=r["jr_jax.solve ODE (euler)"],
            sde_heun_over_ode_heun=heun / r["jr_jax.solve ODE (heun)"],
        )
        tvb = c["tvboptim"]
        if "error" not in tvb:
            ratios[str(n)]["sde_heun_over_tvboptim"] = tvb["tvboptim"]["seconds"] / tvb["jr_jax"]["seconds"]
            ratios[str(n)]["sde_heun_over_tvboptim_cpu"] = tvb["tvboptim"]["cpu_seconds"] / tvb["jr_jax"]["cpu_seconds"]
        one = c.get("tvboptim_one_core", {})
        if one and "error" not in one:
            ratios[str(n)]["sde_heun_over_tvboptim_one_core"] = one["tvboptim"]["seconds"] / one["jr_jax"]["seconds"]
        for k, v in ratios[str(n)].items():
            print(f"N={n:5d}  {k:34s} {v:7.2f}")
        print(f"N={n:5d}  compile time (SDE Euler) {c['compile_s_sde_euler']:.2f} s, (SDE Heun) "
              f"{c['jr_jax.solve SDE (heun)']['compile_s']:.2f} s; recompiled for new values: {c['recompiled_for_new_values']}")
    results["ratios"] = ratios

    n_mem = 10_000 if args.quick else 100_000
    mem = run_subprocess(_SUBPROCESS_MEMORY.format(n=n_mem, chunk=1024))
    results["memory"] = mem
    print(f"\n{mem['n']} ERPs (default protocol, noise-free, chunks of 1024): {mem['seconds']:.1f} s, "
          f"{mem['n'] / mem['seconds']:.0f} ERPs/s, peak RSS {mem['peak_rss_gib']:.2f} GiB, {mem['valid']} valid")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def timed_args(t):
    wall, cpu, compile_s = t
    return wall, STEPS, cpu, compile_s


if __name__ == "__main__":
    main()
