"""Parameter recovery: the Bi-LSTM's accuracy per parameter at test SNRs {clean, 30, 20, 10, 0} dB,
beside the prior-mean and ridge baselines and the reference study's published Pearson r.

Design (the study's, with consistent units): the study's truncated-normal prior over its nine
parameters, its stimulus pattern, 60-trial ERPs without intrinsic noise, measurement noise added
to the averaged ERP at training time (one noise-robust model trained on SNRs drawn uniformly in
[0, 40] dB) and at test time (each SNR in turn). Split 80/10/10 by the dataset's seed.
On a 2-core CPU the full-length Bi-LSTM trains at about 110-140 samples/s, so this script uses the
strided-convolution front-end (the study's CNN-BiLSTM option) by default. Writes JSON and CSV.

    python benchmarks/recovery.py [--n 12000] [--epochs 15] [--out benchmarks/results/recovery]
    python benchmarks/recovery.py --grid --epochs 10     # then: train at each SNR, test at every SNR
"""

import argparse
import csv
import json
import time
from pathlib import Path

import jax
import numpy as np

import jr_jax
from jr_jax._evaluate import format_table

from jr_jax._reproduce import STUDY_PEARSON as STUDY_BEST_R  # the study's transformer, noise factor 1, ~50 dB


def figures(est, ds, rows, out: Path) -> None:
    """True-vs-predicted scatter at 30 dB and Pearson r against SNR (with the study's marks)."""
    from jr_jax._evaluate import _load_rows, _noisy, plot_metric_vs_snr, plot_scatter

    theta, erp = _load_rows(ds, ds.split().test)
    noisy = _noisy(erp, 30.0, jax.random.key(30), est.manifest.get("noise_color", "white"))
    plot_scatter(theta, est.predict_array(noisy), est.names, est.units, out / "scatter_30db.png",
                 title=f"jr_jax Bi-LSTM, test split ({len(theta)} ERPs), 30 dB")
    plot_metric_vs_snr(rows, out / "pearson_vs_snr.png", metric="pearson", reference=STUDY_BEST_R)


def grid(args) -> None:
    """Train at each noise level, test at every level (the study's design); mean R² over parameters."""
    out = Path(args.out)
    ds = jr_jax.load_dataset(out / "data.zarr")  # the dataset of the main run
    encoder = dict(hidden=args.hidden, conv_channels=args.conv_channels, conv_kernel=args.conv_stride,
                   conv_stride=args.conv_stride)
    train_snrs, test_snrs = (30.0, 20.0, 10.0, 0.0), (None, 30.0, 20.0, 10.0, 0.0)
    table, t0 = [], time.perf_counter()
    for snr in train_snrs:
        est, history = jr_jax.train(ds, kind="point", snr_db=snr, encoder=encoder, epochs=args.epochs, patience=10,
                                    schedule="cosine", checkpoint_dir=out / f"grid_checkpoint_{snr:g}", progress=True)
        rows = jr_jax.evaluate(est, ds, test_snrs, baselines=False)
        for r in rows:
            table.append(dict(r, train_snr_db=snr))
    names = list(dict.fromkeys(r["parameter"] for r in table))
    print("mean R² over the nine parameters (rows: training SNR, columns: test SNR)")
    print("train \\ test " + " ".join(f"{'clean' if s is None else f'{s:g} dB':>8s}" for s in test_snrs))
    for snr in train_snrs:
        vals = [np.mean([r["r2"] for r in table if r["train_snr_db"] == snr and r["snr_db"] == s]) for s in test_snrs]
        print(f"{snr:>8g} dB  " + " ".join(f"{v:8.3f}" for v in vals))
    with open(out / "grid.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    (out / "grid.json").write_text(json.dumps(dict(train_snrs=train_snrs, test_snrs=test_snrs, names=names,
                                                   epochs=args.epochs, seconds=time.perf_counter() - t0,
                                                   rows=table), indent=2) + "\n")
    print(f"wrote {out / 'grid.csv'} and grid.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--conv-channels", type=int, default=32)
    ap.add_argument("--conv-stride", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/recovery")
    ap.add_argument("--figures-only", action="store_true", help="redraw the figures from a finished run")
    ap.add_argument("--grid", action="store_true", help="the study's grid instead: one model per training SNR "
                    "(30, 20, 10, 0 dB), each tested at every SNR")
    args = ap.parse_args()
    if args.grid:
        return grid(args)
    if args.figures_only:
        out = Path(args.out)
        ds, est = jr_jax.load_dataset(out / "data.zarr"), jr_jax.Estimator.load(out / "model")
        figures(est, ds, json.loads((out / "recovery.json").read_text())["rows"], out)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prior = jr_jax.Prior(kind="normal")
    protocol = jr_jax.Protocol(stimulus=jr_jax.Stimulus.study())
    t0 = time.perf_counter()
    ds = jr_jax.make_dataset(prior, protocol, args.n, out / "data.zarr", key=jax.random.key(2406), chunk_size=1000,
                             progress=False)
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder = dict(hidden=args.hidden, conv_channels=args.conv_channels, conv_kernel=args.conv_stride,
                   conv_stride=args.conv_stride)
    est, history = jr_jax.train(ds, kind="point", snr_db=(0.0, 40.0), encoder=encoder, epochs=args.epochs, patience=10,
                                schedule="cosine", checkpoint_dir=out / "checkpoint", progress=True)
    t_train = time.perf_counter() - t0
    est.save(out / "model", overwrite=True)
    rows = jr_jax.evaluate(est, ds, (None, 30.0, 20.0, 10.0, 0.0))
    for metric in ("r2", "pearson"):
        print(format_table(rows, metric))
        print()
    r30 = {r["parameter"]: r["pearson"] for r in rows if r["method"] == "jr_jax Bi-LSTM" and r["snr_db"] == 30.0}
    beats = {p: r30[p] >= STUDY_BEST_R[p] for p in r30}
    print("Pearson r at 30 dB vs the study's best (transformer, ~50 dB):")
    for p in r30:
        print(f"  {p:5s} jr_jax {r30[p]:6.3f}  study {STUDY_BEST_R[p]:5.2f}  {'>=' if beats[p] else '<'}")
    with open(out / "recovery.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = dict(n=args.n, split=dict(train=int(est.manifest["data"]["n_train"]),
                                        val=int(est.manifest["data"]["n_val"]), test=rows[0]["n_test"]),
                   encoder=est.manifest["encoder"], epochs=len(history), simulate_s=t_sim, train_s=t_train,
                   study_best_pearson=STUDY_BEST_R, pearson_30db=r30, beats_study_at_30db=beats, rows=rows,
                   history=history, jax=jax.__version__, jr_jax=jr_jax.__version__)
    (out / "recovery.json").write_text(json.dumps(summary, indent=2) + "\n")
    figures(est, ds, rows, out)
    print(f"simulated in {t_sim:.0f} s, trained {len(history)} epochs in {t_train:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
