"""One script for a GPU machine: throughput and memory of jr_jax on the first device, in under 5 min.

Measures and writes JSON for:

- sim-steps/s of the batched SDE solve (``jr_jax.solve``, Heun and Euler, float32, 1 s at
  dt = 0.1 ms, noise on y4) for N = 10^4, 10^5 and 10^6 trajectories (each N solved in chunks that
  fit the device: see below);
- ERPs/s of ``jr_jax.simulate`` for the study protocol (study stimulus, 60 trials, 1 s burn-in,
  -0.2..1.0 s at 1 kHz, the default solver and step);
- training samples/s of the posterior estimator (the quick preset's encoder) on 8192 simulated ERPs;
- likelihood evaluations/s (:func:`jr_jax.log_likelihood`, the batched noise-free ERP against an
  observation, as the likelihood correction calls it) and forward-mode gradients/s;
- peak device memory per chunk (``memory_stats()['peak_bytes_in_use']`` where the backend reports it).

Chunk sizes come from the device's memory: the solve needs about (6 state + 6 stage + output) floats
per trajectory per saved sample, so the chunk is the largest power of two whose estimate stays under
a quarter of the free memory (at most 2^20). On a CPU (no memory report) the chunk is 4096 and
``--quick`` shrinks every size, so the script can be checked anywhere; CI never needs a GPU.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--quick]
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jr_jax

T, DT = 1.0, 1e-4
STEPS = int(round(T / DT))
TS = np.arange(0, T + 1e-9, 1e-3)


def device_memory():
    """(free bytes, limit bytes) of the first device, or (None, None) where it reports none."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return None, None
    return limit - stats.get("bytes_in_use", 0), limit


def peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def chunk_for(bytes_per_trajectory: float, cap: int = 2**20) -> int:
    free, _ = device_memory()
    if free is None:
        return 4096
    n = 1
    while n * 2 <= cap and (n * 2) * bytes_per_trajectory < free / 4:
        n *= 2
    return n


def timed(f, *args):
    """(compile + first run seconds, best of 2 later runs)."""
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    first = time.perf_counter() - t
    best = np.inf
    for _ in range(2):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return first, best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--quick", action="store_true", help="small sizes (a check of the script, e.g. on a CPU)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    free, limit = device_memory()
    res = dict(device=str(dev), platform=dev.platform, device_kind=getattr(dev, "device_kind", ""),
               memory_limit_gib=None if limit is None else limit / 2**30, jax=jax.__version__,
               jr_jax=jr_jax.__version__, host=platform.platform(), cpus=os.cpu_count(), quick=args.quick)
    print(f"device: {res['device']} ({res['device_kind']}), memory limit "
          f"{'unknown' if limit is None else f'{limit / 2**30:.1f} GiB'}", flush=True)

    # 1. sim-steps/s, Heun and Euler, for N = 1e4, 1e5, 1e6 in chunks that fit
    sizes = [1000, 4000] if args.quick else [10**4, 10**5, 10**6]
    chunk = chunk_for(4 * (6 * 3 + len(TS)) * 1.5)
    res["solve_chunk"] = chunk
    res["sim_steps_per_s"] = {}
    prior = jr_jax.Prior()
    for solver in ("heun", "euler"):
        f = jax.jit(lambda p, k, s=solver: jr_jax.solve(p, TS, key=k, dt=DT, solver=s))
        for n in sizes:
            c = min(chunk, n)
            params = prior.sample(jax.random.key(0), c).replace(sigma=jr_jax.SIGMA_ABLEIDINGER_2017).broadcast()
            keys = jax.random.split(jax.random.key(1), c)
            first, best = timed(f, params, keys)
            seconds = best * (n / c)  # n / c chunks of the same compiled solve, one after another
            rate = n * STEPS / seconds
            res["sim_steps_per_s"][f"{solver}_{n}"] = dict(n=n, chunk=c, seconds=seconds, rate=rate,
                                                           compile_s=max(first - best, 0.0), peak_bytes=peak_bytes())
            print(f"solve {solver:5s} N={n:8d} (chunks of {c}): {rate / 1e6:9.1f} M sim-steps/s", flush=True)

    # 2. ERPs/s for the study protocol
    protocol = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study(), n_trials=60)
    n_erp = 256 if args.quick else 8192
    per_erp = 4 * 6 * 3 * 1.5 * 60  # state and stages per trial, float32, some slack
    c = min(chunk_for(per_erp + 4 * protocol.n_times * 60, cap=2**16), n_erp)
    params = prior.sample(jax.random.key(2), n_erp).replace(sigma=jr_jax.SIGMA_ABLEIDINGER_2017)
    sim = lambda p, k: jr_jax.simulate(p, protocol, key=k, chunk_size=c)  # noqa: E731
    first, best = timed(sim, params, jax.random.key(3))
    res["study_protocol"] = dict(n=n_erp, chunk=c, seconds=best, erps_per_s=n_erp / best,
                                 compile_s=max(first - best, 0.0), peak_bytes=peak_bytes())
    print(f"study protocol (60 trials): {n_erp / best:.0f} ERPs/s (chunks of {c})", flush=True)

    # 3. training samples/s of the posterior estimator
    from jr_jax._reproduce import _ENCODER

    clean = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study(), n_trials=1)
    n_train = 1024 if args.quick else 8192
    p_train = prior.sample(jax.random.key(4), n_train)
    erp = np.asarray(jr_jax.simulate(p_train, clean, chunk_size=min(c * 60, n_train)))
    ok = np.isfinite(erp).all(axis=1)
    theta = np.asarray(prior.to_array(p_train), np.float64)[ok]
    data = jr_jax.TrainingData.from_arrays(theta, erp[ok], names=prior.names, units=prior.units, lows=prior.lows,
                                           highs=prior.highs, fs=clean.fs, tmin=clean.tmin, seed=0)
    batch = 256
    t = time.perf_counter()
    est, history = jr_jax.train(data, kind="posterior", snr_db=(0.0, 40.0), encoder=_ENCODER, epochs=2,
                                batch_size=batch, patience=2, progress=False)
    res["training"] = dict(n_train=data.n_train, batch_size=batch, epochs=len(history),
                           samples_per_s_last_epoch=history[-1]["samples"] / history[-1]["seconds"],
                           first_epoch_s=history[0]["seconds"], total_s=time.perf_counter() - t)
    print(f"training: {res['training']['samples_per_s_last_epoch']:.0f} samples/s (batch {batch})", flush=True)

    # 4. likelihood evaluations/s and forward-mode gradients/s
    obs = erp[ok][0] + 0.01 * np.random.default_rng(0).standard_normal(erp.shape[1])
    n_ll = 1024 if args.quick else 65536
    draws = np.asarray(prior.sample_array(jax.random.key(5), n_ll), np.float64)
    t = time.perf_counter()
    jr_jax.log_likelihood(draws[:64], obs, protocol=clean, prior=prior, snr_db=20.0)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    ll = jr_jax.log_likelihood(draws, obs, protocol=clean, prior=prior, snr_db=20.0)
    seconds = time.perf_counter() - t
    res["likelihood"] = dict(n=n_ll, seconds=seconds, evaluations_per_s=n_ll / seconds, warmup_s=warm,
                             finite=int(np.isfinite(ll).sum()))
    n_grad = 64 if args.quick else 4096
    x = jnp.asarray(obs, jnp.float32)

    def loglik(theta):
        sim = jr_jax.simulate(prior.to_params(theta[None]), clean, chunk_size=1, differentiation="forward")[0]
        return -0.5 * jnp.sum((sim - x) ** 2)

    grad = jax.jit(jax.vmap(jax.jacfwd(loglik)))
    th = jnp.asarray(draws[:n_grad], jnp.float32)
    first, best = timed(grad, th)
    res["likelihood"].update(gradients_per_s=n_grad / best, gradient_batch=n_grad, gradient_compile_s=max(first - best, 0))
    print(f"likelihood: {n_ll / seconds:.0f} evaluations/s, {n_grad / best:.0f} forward-mode gradients/s", flush=True)

    res["total_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(f"total {res['total_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
