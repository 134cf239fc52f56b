"""Likelihood throughput: batched log-likelihood evaluations/s and forward-mode gradients/s of jr_jax,
beside a vectorised NumPy implementation of the same likelihood, in one run.

Observations: those of the reference posteriors (``benchmarks/results/reference_posteriors.npz``:
study prior, study stimulus, noise-free dynamics, white noise at 30 and 10 dB), or, without that
file, one simulated ERP of the same problem. The likelihood is :func:`jr_jax.log_likelihood` with
``snr_db`` (as the likelihood correction calls it), at the default solver and step (Heun, 0.25 ms).

- jr_jax: ``log_likelihood`` on a batch of ``--batch`` prior draws (one batched ``simulate``), and
  the gradient of the log-likelihood in all nine parameters by forward mode
  (``jax.jacfwd`` through ``simulate(..., differentiation="forward")``, vmapped over the draws);
- NumPy: the same Heun steps, stimulus and Gaussian log-likelihood vectorised over the batch
  (float32), and its gradient by central finite differences (2 x 9 + 1 evaluations per gradient),
  the derivative-free baseline a NumPy user has.

Both are checked against each other before timing (log-likelihoods agree to 1e-3 relative).

    python benchmarks/likelihood.py [--batch 1024] [--grad-batch 256] [--out benchmarks/results/likelihood.json]
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

PRIOR = jr_jax.Prior(kind="normal")
PROTOCOL = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study(), n_trials=1)


def numpy_erps(theta: np.ndarray) -> np.ndarray:
    """Noise-free ERPs ``(B, n_times)`` of the protocol by vectorised NumPy Heun (float32)."""
    f32 = np.float32
    p = {k: np.full(len(theta), getattr(jr_jax.JRParams(), k), f32) for k in jr_jax.JRParams.names}
    for j, name in enumerate(PRIOR.names):
        p[name] = theta[:, j].astype(f32)
    aeb, aib = p["A_e"] * p["b_e"], p["A_i"] * p["b_i"]
    c1, c2, c3, c4 = (p[f"a_{k}"] * p["C"] for k in (1, 2, 3, 4))
    st = PROTOCOL.stimulus
    g3, g4, g5 = (f32(g) for g in st.gains)
    dt = f32(PROTOCOL.dt)

    def s(v):
        return 2 * p["e0"] / (1 + np.exp(p["r"] * (p["v0"] - v)))

    def f(y, stim):
        y0, y1, y2, y3, y4, y5 = y
        d3 = aeb * (s(y1 - y2) + g3 * stim) - 2 * p["b_e"] * y3 - p["b_e"] ** 2 * y0
        d4 = aeb * (p["mu"] + g4 * stim + c2 * s(c1 * y0)) - 2 * p["b_e"] * y4 - p["b_e"] ** 2 * y1
        d5 = aib * (c4 * s(c3 * y0) + g5 * stim) - 2 * p["b_i"] * y5 - p["b_i"] ** 2 * y2
        return np.stack([y3, y4, y5, d3, d4, d5])

    n_burn = int(round(PROTOCOL.burn_in / PROTOCOL.dt))
    sps = PROTOCOL.steps_per_sample
    n_epoch = (PROTOCOL.n_times - 1) * sps
    onset = int(round(-PROTOCOL.tmin / PROTOCOL.dt))
    # the rectangular pulse integrated exactly over each step, as jr_jax does
    edges = (np.arange(n_epoch + 1) - onset) * PROTOCOL.dt
    mean_stim = (np.diff(np.clip(edges, 0.0, st.duration)) * st.amplitude / PROTOCOL.dt).astype(f32)
    y = np.zeros((6, len(theta)), f32)
    out = np.zeros((PROTOCOL.n_times, len(theta)), f32)
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(n_burn + n_epoch):
            stim = f32(0.0) if k < n_burn else mean_stim[k - n_burn]
            k1 = f(y, stim)
            y = y + 0.5 * dt * (k1 + f(y + dt * k1, stim))
            if k >= n_burn - 1 and (k + 1 - n_burn) % sps == 0:
                out[(k + 1 - n_burn) // sps] = y[1] - y[2]
    erp = out.T
    n_pre = int(round(-PROTOCOL.tmin * PROTOCOL.fs))
    return erp - erp[:, :n_pre].mean(axis=1, keepdims=True)


def numpy_loglik(theta, x, snr_db):
    sim = numpy_erps(theta).astype(np.float64)
    var = np.mean(sim**2, axis=1) / 10 ** (snr_db / 10)
    return -0.5 * np.sum((sim - x) ** 2, axis=1) / var - 0.5 * x.size * np.log(2 * np.pi * var)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--grad-batch", type=int, default=256)
    ap.add_argument("--reference", default="benchmarks/results/reference_posteriors.npz")
    ap.add_argument("--out", default="benchmarks/results/likelihood.json")
    args = ap.parse_args()
    if Path(args.reference).exists():
        ref = np.load(args.reference)
        obs, snrs = ref["erp"][:, 0], [float(s) for s in ref["snr_db"]]
    else:
        clean = np.asarray(jr_jax.simulate(PRIOR.sample(jax.random.key(9), 1), PROTOCOL))[0]
        obs, snrs = clean[None] + 0.01 * np.random.default_rng(0).standard_normal((1, clean.size)), [30.0]
    theta = np.asarray(PRIOR.sample_array(jax.random.key(0), args.batch), np.float64)
    res = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), device=str(jax.devices()[0])),
               protocol=PROTOCOL.to_dict(), batch=args.batch, grad_batch=args.grad_batch, rows=[])
    for x, snr in zip(obs, snrs):
        x = np.asarray(x, np.float64)
        ll = lambda th: jr_jax.log_likelihood(th, x, protocol=PROTOCOL, prior=PRIOR, snr_db=snr)  # noqa: E731
        ll(theta)  # compile
        t = time.perf_counter()
        mine = ll(theta)
        t_mine = time.perf_counter() - t
        t = time.perf_counter()
        ref_ll = numpy_loglik(theta, x, snr)
        t_np = time.perf_counter() - t
        ok = np.isfinite(mine) & np.isfinite(ref_ll)
        rel = float(np.max(np.abs(mine[ok] - ref_ll[ok]) / np.maximum(np.abs(ref_ll[ok]), 1.0)))
        if rel > 1e-3:
            raise SystemExit(f"jr_jax and NumPy log-likelihoods disagree: max relative difference {rel:.2e}")

        xj = jnp.asarray(x, jnp.float32)

        def loglik_one(th):
            sim = jr_jax.simulate(PRIOR.to_params(th[None]), PROTOCOL, chunk_size=1, differentiation="forward")[0]
            var = jnp.mean(sim**2) / 10 ** (snr / 10)
            return -0.5 * jnp.sum((sim - xj) ** 2) / var - 0.5 * x.size * jnp.log(2 * jnp.pi * var)

        grad = jax.jit(jax.vmap(jax.jacfwd(loglik_one)))
        g_in = jnp.asarray(theta[: args.grad_batch], jnp.float32)
        jax.block_until_ready(grad(g_in))
        t = time.perf_counter()
        jax.block_until_ready(grad(g_in))
        t_grad = time.perf_counter() - t
        # NumPy: central differences, all 2d + 1 points of every draw in one vectorised batch
        d = theta.shape[1]
        th = theta[: args.grad_batch]
        h = 1e-3 * (np.asarray(PRIOR.highs) - np.asarray(PRIOR.lows))
        pts = np.concatenate([th] + [th + s * h[j] * np.eye(d)[j] for j in range(d) for s in (1, -1)])
        t = time.perf_counter()
        numpy_loglik(pts, x, snr)
        t_fd = time.perf_counter() - t
        row = dict(snr_db=snr, loglik_per_s=args.batch / t_mine, numpy_loglik_per_s=args.batch / t_np,
                   loglik_ratio=t_np / t_mine, max_rel_difference=rel, grads_per_s=args.grad_batch / t_grad,
                   numpy_fd_grads_per_s=args.grad_batch / t_fd, grad_ratio=t_fd / t_grad)
        res["rows"].append(row)
        print(f"{snr:g} dB: log-likelihood {row['loglik_per_s']:.0f}/s (NumPy {row['numpy_loglik_per_s']:.0f}/s, "
              f"{row['loglik_ratio']:.1f}x); gradients {row['grads_per_s']:.0f}/s forward mode "
              f"(NumPy central differences {row['numpy_fd_grads_per_s']:.1f}/s, {row['grad_ratio']:.1f}x)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
