"""The ``jr-jax`` command."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path


def _simulate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from ._params import Prior
    from ._simulate import Protocol, simulate

    out = Path(args.out)
    targets = [out / "erps.npz", out / "params.csv", out / "erps.png", out / "run.json"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        print(f"error: {', '.join(existing)} already exist; pass --force to overwrite, or choose --out", file=sys.stderr)
        return 2
    if args.n < 1:
        print(f"error: --n must be >= 1, got {args.n}", file=sys.stderr)
        return 2
    try:
        prior = Prior(kind=args.prior)
        protocol = Protocol(n_trials=args.trials, snr_db=args.snr, noise_color=args.noise_color)
        key_prior, key_sim = jax.random.split(jax.random.key(args.seed))
        params = prior.sample(key_prior, args.n).replace(sigma=args.sigma)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    erp = np.asarray(simulate(params, protocol, key=key_sim, chunk_size=args.chunk_size))
    seconds = time.perf_counter() - t0
    theta = np.asarray(prior.to_array(params))
    valid = np.isfinite(erp).all(axis=1)

    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / "erps.npz", erp=erp, theta=theta, valid=valid, times=protocol.times,
        names=np.array(prior.names), units=np.array(prior.units),
    )
    with open(out / "params.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample", *(f"{n} [{u}]" for n, u in zip(prior.names, prior.units)), "valid"])
        for i, row in enumerate(theta):
            w.writerow([i, *(f"{v:.6g}" for v in row), bool(valid[i])])
    run = dict(
        n=args.n, seed=args.seed, prior=args.prior, sigma=args.sigma, n_trials=args.trials, snr_db=args.snr,
        noise_color=args.noise_color, fs=protocol.fs, tmin=protocol.tmin, tmax=protocol.tmax,
        dt=protocol.dt, solver=protocol.solver, seconds=seconds, n_valid=int(valid.sum()),
        device=str(jax.devices()[0]), n_devices=len(jax.devices()), jax=jax.__version__,
    )
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    _plot(out / "erps.png", protocol.times, erp, theta, prior.names)
    print(f"simulated {args.n} ERPs ({int(valid.sum())} valid) in {seconds:.2f} s on {jax.devices()[0].platform}")
    print(f"wrote {out / 'erps.npz'}, {out / 'params.csv'}, {out / 'erps.png'}, {out / 'run.json'}")
    return 0


def _plot(path: Path, times, erp, theta, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    shown = min(len(erp), 16)
    for i in range(shown):
        ax.plot(times * 1e3, erp[i], lw=1, label=f"A_i={theta[i, names.index('A_i')]:.1f}, b_i={theta[i, names.index('b_i')]:.0f}")
    ax.axvspan(0, 50, color="0.9", zorder=0)
    ax.set_xlabel("time from stimulus onset (ms)")
    ax.set_ylabel("ERP, y1 - y2 (mV, baseline-corrected)")
    ax.set_title(f"{shown} of {len(erp)} simulated ERPs (prior draws); grey: stimulus")
    if shown <= 8:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _use_all_cpu_cores() -> None:
    """Expose each CPU core as a JAX host device, so that simulate() shards over all of them.

    Only when JAX is not yet imported and the user has not set the flag; on a GPU machine the
    accelerators are still the default devices.
    """
    flag = "--xla_force_host_platform_device_count"
    if "jax" in sys.modules or flag in os.environ.get("XLA_FLAGS", ""):
        return
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={os.cpu_count() or 1}".strip()


def main(argv: list[str] | None = None) -> int:
    _use_all_cpu_cores()
    parser = argparse.ArgumentParser(prog="jr-jax", description="Jansen-Rit ERPs in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="simulate ERPs drawn from the prior; write them, their parameters and a plot")
    s.add_argument("--n", type=int, default=16, help="number of ERPs (default 16)")
    s.add_argument("--out", default="jr_jax_out", help="output folder (default jr_jax_out)")
    s.add_argument("--prior", choices=["uniform", "normal"], default="uniform",
                   help="box-uniform over the study's ranges, or its normal truncated to them")
    s.add_argument("--sigma", type=float, default=0.0, help="intrinsic noise sigma (1/sqrt(s)); 0 = deterministic")
    s.add_argument("--trials", type=int, default=60, help="trials averaged per ERP (default 60)")
    s.add_argument("--snr", type=float, default=None, help="measurement noise SNR in dB (default: none)")
    s.add_argument("--noise-color", choices=["white", "pink"], default="white")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chunk-size", type=int, default=1024)
    s.add_argument("--force", action="store_true", help="overwrite existing output files")
    s.set_defaults(func=_simulate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
