"""The ``jr-jax`` command."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path


def _simulate(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from ._data import DatasetError, _is_dataset, make_dataset
    from ._model import Stimulus
    from ._params import JRParams, Prior
    from ._simulate import Protocol

    out = Path(args.out)
    png = out.with_suffix(".png")
    if png.exists() and not _is_dataset(out) and not args.force:  # the plot of no dataset of ours
        print(f"error: {png} already exists; pass --force to overwrite, or choose --out", file=sys.stderr)
        return 2
    try:
        prior = Prior(kind="uniform" if args.prior == "uniform" else "normal", base=JRParams(sigma=args.sigma))
        protocol = Protocol(n_trials=args.trials, stimulus=Stimulus.study() if args.stimulus == "study" else Stimulus())
        ds = make_dataset(prior, protocol, args.n, out, key=jax.random.key(args.seed), chunk_size=args.chunk_size,
                          overwrite=args.force, scheduler=args.scheduler)
    except (ValueError, FileExistsError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shown = min(ds.n, 16)
    _plot(png, ds.times, np.asarray(ds.erp[:shown]), np.asarray(ds.theta[:shown]), list(ds.names), ds.n)
    devices = jax.devices()
    run = ds.last_run
    resumed = f" (resumed: {ds.n - run['samples']} were on disk)" if run["samples"] < ds.n else ""
    print(f"simulated {run['samples']} ERPs in {run['seconds']:.1f} s ({run['samples'] / max(run['seconds'], 1e-9):.0f} "
          f"ERPs/s) on {len(devices)} {devices[0].platform} device(s)"
          + (f" with Dask ({args.scheduler})" if args.scheduler else "") + resumed)
    print(f"dataset: {ds.n} ERPs, {ds.n_valid()} valid")
    print(f"wrote {out} (read it with jr_jax.load_dataset or zarr) and {png}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ._data import DatasetError, load_dataset

    try:
        ds = load_dataset(args.path, verify=args.verify)
        summary = ds.summary()
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    if args.verify:
        print("  verify: every finished chunk matches its SHA-256 digest")
    return 0


def _parse_snr(text: str | None):
    """'20' -> 20.0; '0:30' -> (0.0, 30.0); None / 'inf' / 'clean' -> None."""
    if text is None or text.lower() in ("inf", "clean", "none"):
        return None
    try:
        if ":" in text:
            lo, hi = text.split(":")
            return (float(lo), float(hi))
        return float(text)
    except ValueError:
        raise ValueError(f"--snr takes a number in dB, LOW:HIGH (a range) or inf (clean); got {text!r}") from None


def _train(args: argparse.Namespace) -> int:
    from ._data import DatasetError, load_dataset
    from ._train import train

    out = Path(args.out)
    if (out / "manifest.json").exists() and not args.force:
        print(f"error: {out} already holds an estimator; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        snr = _parse_snr(args.snr)
        ds = load_dataset(args.data)
        encoder = dict(hidden=args.hidden, layers=args.layers, dropout=args.dropout, conv_channels=args.conv_channels,
                       conv_kernel=args.conv_kernel, conv_stride=args.conv_stride)
        ckpt = out / "checkpoint"
        if ckpt.exists() and not ckpt.is_dir():
            raise ValueError(f"{ckpt} is a file, not a jr_jax checkpoint folder; it will not be deleted: "
                             "choose another --out")
        # only once the data are known to load, and only a jr_jax checkpoint (train() writes state.json
        # there; without it training starts afresh anyway, and nothing of the user's is deleted)
        if args.force and (ckpt / "state.json").is_file() and not ckpt.is_symlink():
            import shutil

            shutil.rmtree(ckpt)  # --force starts the training afresh
        posterior, embedding = None, None
        if args.kind == "point":
            flow_flags = ["--" + name.replace("_", "-") for name, default in _FLOW_DEFAULTS.items()
                          if getattr(args, name) != default]
            if flow_flags:
                raise ValueError(f"{', '.join(flow_flags)} set(s) the posterior's flow and cannot be given with "
                                 "--kind point; drop it, or train a posterior (--kind posterior)")
        if args.kind == "posterior":
            posterior = dict(embed_dim=args.embed_dim, flow_layers=args.flow_layers, knots=args.knots,
                             noise_feature=args.noise_feature, regression_weight=args.regression_weight,
                             conditional_affine=args.conditional_affine)
        if args.embedding is not None:
            from ._estimator import Estimator

            overridden = sorted(getattr(args, "given", None) or ())
            if overridden:
                raise ValueError(f"{', '.join(overridden)} cannot be given with --embedding: the embedding is the "
                                 "point estimator's own network, with its own encoder; drop them")

            embedding = Estimator.load(args.embedding)
            encoder = None  # the point estimator's
            if posterior is not None:
                posterior = {k: v for k, v in posterior.items() if k != "embed_dim"}
        est, history = train(ds, kind=args.kind, posterior=posterior, embedding=embedding, snr_db=snr,
                             encoder=encoder, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                             patience=args.patience, schedule=args.schedule, seed=args.seed, checkpoint_dir=ckpt)
    except (ValueError, FileNotFoundError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    est.save(out, overwrite=True)
    last = history[-1]
    loss = ("negative log posterior density in the logit of the prior box" if args.kind == "posterior"
            else "MSE of targets scaled to [0, 1]")
    print(f"trained a {args.kind} estimator for {last['epoch']} epochs; best validation loss "
          f"{est.manifest['training']['best_val_loss']:.4f} ({loss}); {last['samples'] / last['seconds']:.0f} "
          "samples/s in the last epoch")
    print(f"wrote {out} (load it with jr_jax.Estimator.load)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ._data import DatasetError, load_dataset
    from ._estimator import Estimator
    from ._evaluate import evaluate, format_table

    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to overwrite", file=sys.stderr)
        return 2
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        print(f"error: --out must be a CSV file path in an existing folder, got {out}", file=sys.stderr)
        return 2
    try:
        snrs = [_parse_snr(t) for t in args.snr]
        if any(isinstance(s, tuple) for s in snrs):
            raise ValueError("evaluate takes single test SNRs (numbers or inf), not ranges")
        est, ds = Estimator.load(args.model), load_dataset(args.data)
        rows = evaluate(est, ds, snrs, seed=args.seed, baselines=not args.no_baselines)
    except (ValueError, FileNotFoundError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for metric in args.metrics:
        print(format_table(rows, metric))
        print()
    if out is not None:
        _write_csv(out, rows)
        print(f"wrote {out}")
    return 0


def _infer(args: argparse.Namespace) -> int:
    import numpy as np

    from ._estimator import Estimator

    try:
        est = Estimator.load(args.model)
        protocol = _stated_protocol(est, args.stimulus, args.trials)
        path = Path(args.erp)
        picks = None if args.picks is None else [c.strip() for c in args.picks.split(",") if c.strip()]
        if path.name.endswith(".fif") or path.name.endswith(".fif.gz"):
            from .eeg import from_evoked

            if args.fs is not None:
                raise ValueError("--fs is for .npy/.csv files: an Evoked file states its own rate")
            if args.units is not None:
                raise ValueError("--units is for .npy/.csv files: an Evoked file states its own unit (volts)")
            condition = int(args.condition) if args.condition.isdigit() else args.condition
            erp, names = from_evoked(path, picks, estimator=est, condition=condition,
                                     reference=None if args.reference == "none" else "average", return_ch_names=True)
            theta = _checked_point_estimates(est, erp, None, protocol)
            labels = names if est.n_channels == 1 else [f"{len(names)} channels"]
        elif path.suffix in (".npy", ".csv"):
            if args.fs is None:
                raise ValueError("--fs (Hz) is required for .npy/.csv files")
            if picks is not None:
                raise ValueError("--picks is for Evoked (.fif) files")
            erp = _read_erp_file(path, args.units)
            theta = _checked_point_estimates(est, erp, args.fs, protocol)
            labels = [str(i) for i in range(1 if est._single(erp) else len(erp))]
        else:
            raise ValueError(f"ERP file must be .npy or .csv (one ERP per row, in mV) or an MNE Evoked file "
                             f"(-ave.fif), got {path.name}")
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if protocol is None and est.manifest.get("protocol"):
        stim, trials = est.manifest["protocol"].get("stimulus", {}), est.manifest["protocol"].get("n_trials")
        print(f"note: the ERPs are taken to be made as the training ERPs were (stimulus {_stimulus_name(stim)}, "
              f"{trials} trial(s) averaged); --stimulus and --trials have that checked")
    if est.kind == "posterior":
        return _print_posteriors(est, np.asarray(erp)[None] if est._single(erp) else erp, labels, args)
    width = max(4, *(len(lab) for lab in labels))
    print(f"{'erp':<{width}s} " + " ".join(f"{f'{n} [{u}]':>14s}" for n, u in zip(est.names, est.units)))
    for lab, row in zip(labels, theta):
        print(f"{lab:<{width}s} " + " ".join(f"{v:14.4g}" for v in row))
    return 0


def _checked_point_estimates(est, erp, fs, protocol):
    """A point estimator's estimates ``(N, n_params)``; for a posterior estimator only the checks of
    :meth:`Estimator.predict` (shape, rate, scale, offset, protocol), since its draws come later."""
    import numpy as np

    if est.kind == "posterior":
        est._check_protocol(protocol)
        est._check(erp, fs)
        return None
    return np.atleast_2d(est.predict_array(erp, fs=fs, protocol=protocol))


def _stimulus_name(stimulus: dict) -> str:
    """``"study"``, ``"default"`` or the stimulus's fields, for the stimulus of a ``Protocol.to_dict()``."""
    from ._model import Stimulus
    from ._simulate import Protocol

    for name, s in (("study", Stimulus.study()), ("default", Stimulus())):
        if stimulus == Protocol(stimulus=s).to_dict()["stimulus"]:
            return name
    return str(stimulus)


def _stated_protocol(est, stimulus: str | None, trials: int | None):
    """The estimator's training protocol with the --stimulus and --trials the user stated, or None when
    neither was given (then nothing is compared); refused when the manifest records no protocol."""
    if stimulus is None and trials is None:
        return None
    from ._model import Stimulus
    from ._simulate import Protocol

    if not est.manifest.get("protocol"):
        raise ValueError("this estimator's manifest records no training protocol, so --stimulus and --trials "
                         "cannot be checked")
    if trials is not None and trials < 1:
        raise ValueError(f"--trials must be an integer >= 1, got {trials}")
    protocol = Protocol.from_dict(est.manifest["protocol"])
    if stimulus is not None:
        protocol = protocol.replace(stimulus=Stimulus.study() if stimulus == "study" else Stimulus())
    if trials is not None:
        protocol = protocol.replace(n_trials=trials)
    return protocol


def _print_posteriors(est, erps, labels, args) -> int:
    """jr-jax infer with a posterior estimator: a table of intervals per ERP (amortised, or corrected
    by the exact likelihood with --noise-sd/--snr), and the draws to --samples."""
    import jax
    import numpy as np

    from ._likelihood import correct_posterior
    from ._summary import PosteriorSummary

    key = jax.random.key(args.seed)
    draws, notes = [], []
    try:
        if args.samples is not None and Path(args.samples).exists() and not args.force:
            raise ValueError(f"{args.samples} exists; pass --force to overwrite it")
        correct = args.noise_sd is not None or args.snr is not None
        for i, x in enumerate(erps):
            if correct:
                res = correct_posterior(est, x, key=jax.random.fold_in(key, i), noise_sd=args.noise_sd,
                                        snr_db=args.snr, n=args.draws)
                draws.append(res.samples[:args.draws])
                notes.append(f"corrected by the exact likelihood: {res.method}, Pareto k-hat {res.pareto_k:.2f}, "
                             f"ESS {res.ess:.0f} of {res.proposal.shape[0]} NPE draws, "
                             f"reduced chi-square {res.chi2_reduced:.3g}"
                             + (" (MISFIT: the model does not explain this ERP)" if res.misfit else "")
                             + ("" if res.converged else " (NOT CONVERGED)"))
            else:
                draws.append(est.sample(x, args.draws, key=jax.random.fold_in(key, i)))
                notes.append("amortised posterior (no likelihood correction: pass --noise-sd or --snr for one)")
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prior_sd = est.prior_sd()
    for lab, d, note in zip(labels, draws, notes):
        summary = PosteriorSummary.from_draws(d, est.names, est.units, level=args.level, prior_sd=prior_sd)
        print(f"erp {lab}: {args.draws} draws, {note}")
        print(summary.table())
        print()
    if args.samples is not None:
        np.save(args.samples, np.stack(draws))
        print(f"wrote {args.samples}: draws of shape (n_erps, n_draws, n_params) = {np.stack(draws).shape}, "
              f"parameters {', '.join(est.names)}")
    return 0


#: --units of an ERP file -> factor to mV
_ERP_UNITS = {"mV": 1.0, "uV": 1e-3, "V": 1e3}
_CSV_LAYOUT = ("a .csv ERP file holds comma-separated numbers in the unit given by --units: one ERP per row "
               "(one column per time sample), or a single ERP as one column (one number per row); one "
               "first line of column names may precede them")


def _read_erp_file(path: Path, units: str | None):
    """The ERP(s) of a .npy or .csv file in mV, from a file in ``units`` (mV, uV or V; required).

    A .csv file holds one ERP per row, or a single ERP as one column; a first line that is not
    numbers (column names) is skipped. Returns ``(n_times,)`` for one ERP, else the file's array.
    """
    import numpy as np

    if units is None:
        raise ValueError(f"--units (one of {', '.join(_ERP_UNITS)}) is required for .npy/.csv files: the file "
                         "does not say its unit, and none is guessed")
    if units not in _ERP_UNITS:
        raise ValueError(f"--units must be one of {', '.join(_ERP_UNITS)}, got {units!r}")
    if path.suffix == ".npy":
        try:
            erp = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path} is not a NumPy .npy file of numbers ({e})") from None
        if not isinstance(erp, np.ndarray) or erp.dtype.kind not in "biuf":
            raise ValueError(f"{path} must hold an array of numbers (one ERP per row, in {units}), got "
                             f"{getattr(erp, 'dtype', type(erp).__name__)}")
    else:
        lines = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]

        def numbers(line):
            fields = [f.strip() for f in line.split(",")]
            if len(fields) > 1 and fields[-1] == "":  # a trailing comma
                fields = fields[:-1]
            return [float(f) for f in fields]

        if lines:
            try:
                numbers(lines[0][1])
            except ValueError:
                lines = lines[1:]  # a header line (column names)
        if not lines:
            raise ValueError(f"{path} holds no numbers; {_CSV_LAYOUT}")
        rows = []
        for i, line in lines:
            try:
                rows.append(numbers(line))
            except ValueError:
                raise ValueError(f"{path}, line {i}: not comma-separated numbers ({line[:60]!r}); "
                                 f"{_CSV_LAYOUT}") from None
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"{path}: the rows hold different numbers of values "
                             f"({sorted({len(r) for r in rows})}); {_CSV_LAYOUT}")
        erp = np.asarray(rows, dtype=float)
        erp = erp[0] if erp.shape[0] == 1 else erp[:, 0] if erp.shape[1] == 1 else erp
    return np.asarray(erp, dtype=float) * _ERP_UNITS[units]


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Tidy rows as CSV, one column per key of any row (in first-seen order; empty where a row lacks it)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def _fit(args: argparse.Namespace) -> int:
    """jr-jax fit: one signal of a recording, fitted; a table, a figure and optionally the draws."""
    import re
    import warnings

    import jax
    import numpy as np

    from ._estimator import MisspecificationWarning

    try:
        from ._fit import fit
        from .eeg import recording_protocol, signal_from_evoked

        path = Path(args.recording)
        if not (path.name.endswith(".fif") or path.name.endswith(".fif.gz")):
            raise ValueError(f"the recording must be an MNE Evoked file (-ave.fif or -ave.fif.gz), got {path.name}")
        if args.channel is not None and args.mode is not None:
            raise ValueError("give --channel or --mode, not both")
        condition = int(args.condition) if args.condition.isdigit() else args.condition
        estimator = None
        if args.model is not None:
            from ._estimator import Estimator
            from ._simulate import Protocol

            estimator = Estimator.load(args.model)
            if not estimator.manifest.get("protocol"):
                raise ValueError(f"{args.model}: the manifest records no protocol, so the recording cannot be put on "
                                 "its grid")
            protocol = Protocol.from_dict(estimator.manifest["protocol"]).replace(snr_db=None)
        else:
            protocol = recording_protocol(path, condition=condition)
        rec = signal_from_evoked(path, protocol=protocol, condition=condition, channel=args.channel,
                                 mode=args.mode if args.channel is None else None,
                                 reference=None if args.reference == "none" else "average")
        out = Path(args.out)
        stem = re.sub(r"[^A-Za-z0-9]+", "_", f"{rec.condition}_{rec.signal}").strip("_")
        figure = out / f"{stem}.png"
        targets = [figure] + ([Path(args.samples)] if args.samples else [])
        existing = [str(t) for t in targets if t.exists()]
        if existing and not args.force:
            raise ValueError(f"{', '.join(existing)} exist(s); pass --force to overwrite")
        print(f"{path.name}: condition {rec.condition!r} (nave {rec.nave}), {rec.signal} of {len(rec.ch_names)} "
              f"channel(s) ({100 * rec.explained_variance:.0f}% of the variance), {protocol.tmin:g} to "
              f"{protocol.tmax:g} s at {protocol.fs:g} Hz; noise SD {rec.noise_sd:.3g} mV "
              f"{'(given)' if args.noise_sd else 'from the baseline'}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MisspecificationWarning)
            warnings.simplefilter("always", RuntimeWarning)
            result = fit(rec, noise_sd=args.noise_sd, estimator=estimator, key=jax.random.key(args.seed),
                         n_screen=args.screen, n_starts=args.starts, n_samples=args.draws, level=args.level, max_steps=args.max_steps,
                         smc_particles=args.smc_particles, sampler=args.sampler)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    for w in caught:
        print(f"warning: {w.message}")
    out.mkdir(parents=True, exist_ok=True)
    result.plot(figure, title=f"{rec.condition}, {rec.signal}: R² {result.r2:.2f}, reduced χ² "
                              f"{result.chi2_reduced:.2f}")
    print(f"figure: {figure}")
    if args.samples:
        np.save(args.samples, result.samples)
        print(f"samples: {args.samples} ({result.samples.shape[0]} draws of {', '.join(result.names)})")
    print(f"{result.diagnostics['total_s']:.1f} s")
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from . import sensitivity as sa
    from ._model import Stimulus
    from ._params import JRParams, Prior
    from ._simulate import Protocol

    out = Path(args.out)
    table, figure = out / f"{args.method}.csv", out / f"{args.method}.png"
    existing = [str(p) for p in (table, figure) if p.exists()]
    if existing and not args.force:
        print(f"error: {', '.join(existing)} exist; pass --force to overwrite", file=sys.stderr)
        return 2
    protocol = Protocol(stimulus=Stimulus.study() if args.stimulus == "study" else Stimulus())
    key = jax.random.key(args.seed)
    try:
        if args.method in ("sobol", "morris", "dgsm"):
            prior = Prior()
            fn = dict(sobol=sa.sobol, morris=sa.morris, dgsm=sa.dgsm)[args.method]
            rows = fn(prior, protocol, args.qoi, args.n, key=key)
            out.mkdir(parents=True, exist_ok=True)
            sa.plot_indices(rows, figure, title=f"{args.method}, QoI {args.qoi}, {rows[0]['n_simulations']} simulations")
        elif args.method == "fisher":
            with jax.enable_x64(True):
                res = sa.fisher(JRParams().astype("float64"), protocol, args.snr, prior=Prior())
            rows = [dict(parameter=n, crlb_sd=float(res["crlb_sd"][j]), r2_ceiling=float(res["r2_ceiling"][j]),
                         snr_db=args.snr) for j, n in enumerate(res["names"])]
            out.mkdir(parents=True, exist_ok=True)
            sa.plot_fisher(res, figure, title=f"Fisher information at the defaults, {args.snr:g} dB")
        else:
            factors = np.linspace(0.5, 1.5, args.n)
            erps = sa.oat(JRParams(), protocol, args.param, factors)
            rows = [dict(factor=float(f), **{f"t={t:.3f}": float(v) for t, v in zip(protocol.times, e)})
                    for f, e in zip(factors, erps)]
            out.mkdir(parents=True, exist_ok=True)
            sa.plot_oat(erps, protocol.times, factors, args.param, figure)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _write_csv(table, rows)
    if args.method != "oat":
        keys = [k for k in rows[0] if k not in ("parameter", "qoi", "n_simulations", "snr_db")]
        print(f"{'parameter':10s} " + " ".join(f"{k:>12s}" for k in keys))
        for r in rows:
            if "other" not in r:
                print(f"{r['parameter']:10s} " + " ".join(f"{r[k]:12.4g}" for k in keys))
    print(f"wrote {table} and {figure}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from ._reproduce import reproduce

    out = args.out or f"jr_jax_out/{args.preset}"
    try:
        reproduce(args.preset, out, force=args.force, scheduler=args.scheduler)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _plot(path: Path, times, erp, theta, names, n_total: int) -> None:
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
    ax.set_title(f"{shown} of {n_total} simulated ERPs (prior draws); grey: stimulus")
    if shown <= 8:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _use_all_cpu_cores() -> None:
    """Expose each CPU core as a JAX host device, so that simulate() shards over all of them.

    XLA reads the flag when JAX first initialises its backends, so this works after ``import jax``
    as long as no computation has run yet (otherwise it has no effect). Skipped when the user has
    set the flag; on a GPU machine the accelerators stay the default devices.
    """
    flag = "--xla_force_host_platform_device_count"
    if flag in os.environ.get("XLA_FLAGS", ""):
        return
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={os.cpu_count() or 1}".strip()


#: the environment variable that moves (a folder) or turns off ("off") the command's compilation cache
CACHE_ENV = "JR_JAX_COMPILATION_CACHE"
_CACHE_MAX_BYTES = 2 * 1024**3  # least recently used programs are evicted beyond this


def compilation_cache_dir(environ=os.environ) -> Path | None:
    """Where ``jr-jax`` keeps its compiled XLA programs: ``$JR_JAX_COMPILATION_CACHE`` if set
    (``off``: none), else ``$XDG_CACHE_HOME/jr_jax/xla`` (default ``~/.cache/jr_jax/xla``); None
    also when the user set JAX's own ``JAX_COMPILATION_CACHE_DIR``, which JAX then uses."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    chosen = environ.get(CACHE_ENV, "").strip()
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jr_jax" / "xla"


def _use_compilation_cache() -> None:
    """Keep the XLA programs a command compiles (fit, train, simulate: tens of seconds on a CPU) in
    :func:`compilation_cache_dir`, so that the next command with the same shapes loads them.
    Equinox's runtime checks become NaN results (``EQX_ON_ERROR=nan``, unless the user set it): as
    host callbacks they would keep a program out of the cache, and jr_jax's solves already flag
    failures by value (``throw=False``). Set before JAX compiles anything (no effect after)."""
    jax_own = bool(os.environ.get("JAX_COMPILATION_CACHE_DIR"))  # JAX reads its own variable
    folder = compilation_cache_dir()
    if folder is not None or jax_own:
        os.environ.setdefault("EQX_ON_ERROR", "nan")
    if folder is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_compilation_cache_max_size", _CACHE_MAX_BYTES)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help: argparse's "(default: X)" unless the text states its own
    "(default: ...)"; flags (options without a value) are off unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.nargs == 0 or action.required:
            return text
        return super()._get_help_string(action)


class _StoreGiven(argparse.Action):
    """``store``, and remember that the option was given on the command line (``args.given``), so that a
    command can refuse an option that another one overrides instead of dropping it silently."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = set(getattr(namespace, "given", None) or ())
        given.add(option_string)
        namespace.given = given


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jr-jax", description="Jansen-Rit ERPs in JAX", formatter_class=_HelpFormatter,
        epilog=f"Compiled programs are kept in ~/.cache/jr_jax/xla (or $XDG_CACHE_HOME/jr_jax/xla), at most "
               f"{_CACHE_MAX_BYTES // 1024**3} GiB, so that a repeated command skips most of its compilation; "
               f"{CACHE_ENV}=DIR moves it, {CACHE_ENV}=off turns it off.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        return p

    r = command("reproduce", "the study end to end: simulate, train at each noise level, evaluate, sensitivity; "
                "writes report.md/.html, results.json, CSV tables and figures", _reproduce)
    r.add_argument("--preset", choices=["quick", "study", "test"], default="quick",
                   help="quick: about 5 min on a 2-core CPU; study: the study's ten noise levels with "
                        "1000 simulations each plus a 50 000-simulation model, about 2 h on a 2-core CPU; test: "
                        "about a minute, for the tests")
    r.add_argument("--out", default=None, help="output folder; an interrupted run in it resumes where it stopped "
                   "(default: jr_jax_out/PRESET)")
    r.add_argument("--force", action="store_true", help="delete an earlier jr_jax reproduce run with a different "
                   "configuration at --out (anything else there is never deleted)")
    r.add_argument("--scheduler", default=None, help="simulate the datasets with Dask: 'local' or a scheduler "
                   "address (default: none, in this process)")
    s = command("simulate", "simulate a dataset of clean ERPs drawn from the prior (zarr) and plot a few", _simulate)
    s.add_argument("--n", type=int, default=16, help="number of ERPs")
    s.add_argument("--out", default="jr_jax_out/erps.zarr", help="dataset path; the plot goes beside it with the "
                   "suffix .png")
    s.add_argument("--prior", choices=["uniform", "study", "normal"], default="uniform",
                   help="box-uniform over the study's ranges, or the study's normal truncated to them "
                        "('study' and 'normal' are the same)")
    s.add_argument("--stimulus", choices=["default", "study"], default="default",
                   help="default: 60/s for 50 ms into p(t); study: the reference study's injection pattern")
    s.add_argument("--sigma", type=float, default=0.0, help="intrinsic noise sigma (1/sqrt(s)); 0 = deterministic")
    s.add_argument("--trials", type=int, default=60, help="trials averaged per ERP")
    s.add_argument("--seed", type=int, default=0, help="random seed of the prior draws and the noise")
    s.add_argument("--chunk-size", type=int, default=1024, help="samples per chunk on disk and per solve")
    s.add_argument("--scheduler", default=None,
                   help="Dask: 'local' for a LocalCluster of 2 workers, or a scheduler address (tcp://host:8786) "
                        "(default: none, in this process over its local devices)")
    s.add_argument("--force", action="store_true", help="delete an existing jr_jax dataset at --out (and replace "
                   "its plot) and start again; anything else at --out (a folder that is not a jr_jax dataset, a "
                   "file) is never deleted")
    t = command("train", "train an estimator on a dataset (default: a posterior, the Bi-LSTM embedding into a "
                "normalizing flow); write an estimator folder", _train)
    t.add_argument("data", help="dataset made by jr-jax simulate")
    t.add_argument("--kind", choices=["posterior", "point"], default="posterior",
                   help="posterior: draws and credible intervals (jr-jax infer prints them); point: the study's "
                        "regressor (one number per parameter)")
    t.add_argument("--embed-dim", action=_StoreGiven, type=int, default=_FLOW_DEFAULTS["embed_dim"],
                   help="posterior: size of the ERP embedding")
    t.add_argument("--flow-layers", type=int, default=_FLOW_DEFAULTS["flow_layers"],
                   help="posterior: coupling spline layers")
    t.add_argument("--knots", type=int, default=_FLOW_DEFAULTS["knots"], help="posterior: spline knots per layer")
    t.add_argument("--noise-feature", action=argparse.BooleanOptionalAction, default=_FLOW_DEFAULTS["noise_feature"],
                   help="posterior: condition the flow on each ERP's measured noise level as well (default: off)")
    t.add_argument("--conditional-affine", action=argparse.BooleanOptionalAction,
                   default=_FLOW_DEFAULTS["conditional_affine"],
                   help="posterior: a conditional affine layer after the flow's coupling layers, which places and "
                        "scales each ERP's posterior (default: off)")
    t.add_argument("--regression-weight", type=float, default=_FLOW_DEFAULTS["regression_weight"],
                   help="posterior: weight of the squared error "
                   "of a linear head from the embedding to the parameters, added to the training loss (0: none)")
    t.add_argument("--embedding", default=None, metavar="POINT_MODEL",
                   help="posterior: a point estimator folder trained on the same dataset (jr-jax train --kind "
                        "point); the flow is trained on its frozen estimates; its encoder is the point estimator's, "
                        "so --embed-dim and the encoder options are refused with it (default: none, the embedding "
                        "is trained with the flow)")
    t.add_argument("--out", default="jr_jax_out/model", help="estimator folder")
    t.add_argument("--snr", default=None, help="training SNR in dB: a number, a range LOW:HIGH, or inf (clean) "
                   "(default: inf, clean ERPs); a negative value may be written --snr -5:55 or --snr=-5:55")
    t.add_argument("--epochs", type=int, default=60, help="most epochs (the study: 150); the expected duration is "
                   "printed a few seconds into the first")
    t.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    t.add_argument("--lr", type=float, default=None, help="learning rate (Adam) (default: 1e-3, or 4e-3 for a "
                   "posterior on a frozen --embedding)")
    t.add_argument("--schedule", choices=["cosine"], default=None,
                   help="learning-rate schedule (default: none, a constant rate)")
    t.add_argument("--patience", type=int, default=15, help="stop after this many epochs without a better "
                   "validation loss (the study: 50)")
    t.add_argument("--hidden", action=_StoreGiven, type=int, default=64, help="LSTM units per direction (study: 64)")
    t.add_argument("--layers", action=_StoreGiven, type=int, default=1, help="Bi-LSTM layers")
    t.add_argument("--dropout", action=_StoreGiven, type=float, default=0.1, help="dropout rate")
    t.add_argument("--conv-channels", action=_StoreGiven, type=int, default=32,
                   help="strided Conv1d front-end channels before the Bi-LSTM (0: none, the study's plain Bi-LSTM, "
                        "several times slower to train)")
    t.add_argument("--conv-kernel", action=_StoreGiven, type=int, default=16, help="Conv1d kernel size (samples)")
    t.add_argument("--conv-stride", action=_StoreGiven, type=int, default=16, help="Conv1d stride (samples)")
    t.add_argument("--seed", type=int, default=0, help="random seed of the weights, batches and noise")
    t.add_argument("--force", action="store_true", help="replace an existing estimator at --out and start the "
                   "training afresh (deletes --out/checkpoint only if it is a jr_jax checkpoint)")
    e = command("evaluate", "accuracy per parameter and test SNR, with baselines", _evaluate)
    e.add_argument("model", help="estimator folder made by jr-jax train")
    e.add_argument("data", help="dataset made by jr-jax simulate (its test split is used)")
    e.add_argument("--snr", nargs="+", default=["inf", "30", "20", "10", "0"],
                   help="test SNRs in dB (inf: clean) (default: inf 30 20 10 0)")
    e.add_argument("--metrics", nargs="+", default=["r2", "pearson"],
                   choices=["r2", "pearson", "spearman", "nrmse", "bias"], help="tables to print (default: r2 pearson)")
    e.add_argument("--out", default=None, help="write all rows to this CSV (default: none, print only)")
    e.add_argument("--no-baselines", action="store_true", help="skip the ridge and prior-mean baselines")
    e.add_argument("--seed", type=int, default=0, help="random seed of the test noise")
    e.add_argument("--force", action="store_true", help="overwrite the CSV file at --out")
    f = command("infer", "estimate the parameters of ERPs in a .npy or .csv file (one per row, unit given by "
                "--units) or in an MNE Evoked file (-ave.fif: one row per channel, or one for a multichannel model)",
                _infer)
    f.add_argument("model", help="estimator folder made by jr-jax train")
    f.add_argument("erp", help=".npy/.csv (one ERP per row, or one number per row for a single ERP; a .csv may "
                   "start with one line of column names; with --fs and --units) or -ave.fif (MNE Evoked, volts)")
    f.add_argument("--fs", type=float, default=None,
                   help=".npy/.csv: sampling rate of the ERP (Hz), must match the model's; required there "
                        "(default: none)")
    f.add_argument("--units", choices=list(_ERP_UNITS), default=None,
                   help=".npy/.csv: the unit of the numbers in the file, converted to mV; required there, "
                        "nothing is guessed; not for -ave.fif, which states its own unit (default: none)")
    f.add_argument("--picks", default=None, help="-ave.fif: channel names separated by commas (default: all good EEG "
                   "channels, or the multichannel model's training channels)")
    f.add_argument("--condition", default="0", help="-ave.fif: which Evoked of the file (index or comment)")
    f.add_argument("--reference", choices=["average", "none"], default="average",
                   help="-ave.fif: re-reference to the average of the good EEG channels, or keep the file's")
    f.add_argument("--stimulus", choices=["default", "study"], default=None,
                   help="the stimulus the ERPs were made with, checked against the estimator's training protocol "
                        "(refused if they differ) (default: not checked; a note names the training protocol)")
    f.add_argument("--trials", type=int, default=None, help="the number of trials averaged into each ERP, checked "
                   "likewise (default: not checked)")
    f.add_argument("--draws", type=int, default=1000, help="posterior estimators: draws per ERP")
    f.add_argument("--level", type=float, default=0.9, help="posterior estimators: central credible interval level")
    f.add_argument("--noise-sd", type=float, default=None, help="posterior estimators: correct the draws by the "
                   "exact likelihood with this measurement-noise SD (mV) (default: none, amortised draws)")
    f.add_argument("--snr", type=float, default=None, help="posterior estimators: correct the draws by the exact "
                   "likelihood with noise at this SNR in dB (default: none, amortised draws)")
    f.add_argument("--samples", default=None, help="posterior estimators: write the draws to this .npy file, shape "
                   "(n_erps, draws, n_params) (default: none)")
    f.add_argument("--seed", type=int, default=0, help="posterior estimators: random seed of the draws")
    f.add_argument("--force", action="store_true", help="overwrite the --samples file")
    g = command("fit", "fit the model to a recorded ERP (MNE Evoked): MAP, posterior intervals, R², reduced "
                "chi-square and a figure of the fit", _fit)
    g.add_argument("recording", help="MNE Evoked file (-ave.fif or -ave.fif.gz, volts)")
    g.add_argument("--condition", default="0", help="which Evoked of the file (index or comment)")
    g.add_argument("--channel", default=None, help="fit this channel (default: none, the spatial mode --mode)")
    g.add_argument("--mode", type=int, default=None, help="fit the k-th spatial mode (principal component) of the good "
                   "EEG channels (default: 1 unless --channel is given)")
    g.add_argument("--model", default=None, help="posterior estimator folder whose draws start the fit; the recording "
                   "is put on its protocol (default: none, prior draws start it, on the recording's own grid)")
    g.add_argument("--noise-sd", type=float, default=None, help="measurement noise SD (mV) (default: none, the SD "
                   "of the pre-stimulus baseline)")
    g.add_argument("--reference", choices=["average", "none"], default="average",
                   help="re-reference to the average of the good EEG channels, or keep the file's")
    g.add_argument("--screen", type=int, default=None, help="candidate starts (estimator or prior draws) ranked by "
                   "their log posterior in one batch; the best half of --starts and random others are solved "
                   "(default: 1000 with --model, 20000 without)")
    g.add_argument("--starts", type=int, default=None, help="Levenberg-Marquardt starts, solved in one batch "
                   "(default: 4 with --model, 8 without)")
    g.add_argument("--max-steps", type=int, default=100, help="most Levenberg-Marquardt steps per start (a start "
                   "that does not converge within them is reported as not converged)")
    g.add_argument("--draws", type=int, default=1000, help="posterior draws")
    g.add_argument("--sampler", choices=["auto", "laplace-importance", "smc"], default="auto",
                   help="posterior sampler: importance sampling from the Laplace mixture, falling back to tempered "
                   "SMC when its weights are unreliable (auto), or either one forced (a forced importance sample "
                   "with unreliable weights is reported by a warning)")
    g.add_argument("--smc-particles", type=int, default=1000, help="particles of the tempered SMC used when the "
                   "Laplace importance weights are unreliable (Pareto k-hat > 0.7)")
    g.add_argument("--level", type=float, default=0.9, help="central credible interval level")
    g.add_argument("--out", default="jr_jax_out/fit", help="folder of the figure (CONDITION_SIGNAL.png)")
    g.add_argument("--samples", default=None, help="write the posterior draws to this .npy file, shape (draws, "
                   "n_params) in the order of the table (default: none)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the starts and the draws")
    g.add_argument("--force", action="store_true", help="overwrite the figure and the --samples file")
    a = command("sensitivity", "Sobol', Morris, DGSM, Fisher or one-at-a-time sensitivity; table + figure",
                _sensitivity)
    a.add_argument("--method", choices=["sobol", "morris", "dgsm", "fisher", "oat"], required=True,
                   help="the analysis (required)")
    a.add_argument("--qoi", default="rms", help="sobol/morris/dgsm: N1_amplitude, N1_latency, P2_amplitude, "
                   "P2_latency, rms, theta_power, alpha_power, beta_power")
    a.add_argument("--n", type=int, default=64, help="sobol: base samples (power of 2); morris: trajectories; "
                   "dgsm: prior draws; oat: sweep points")
    a.add_argument("--param", default="A_i", help="oat: the parameter swept over 0.5-1.5x its default")
    a.add_argument("--snr", type=float, default=20.0, help="fisher: measurement SNR in dB")
    a.add_argument("--stimulus", choices=["study", "default"], default="study",
                   help="study: the reference study's injection pattern; default: 60/s for 50 ms into p(t)")
    a.add_argument("--seed", type=int, default=0, help="random seed of the samples")
    a.add_argument("--out", default="jr_jax_out/sensitivity", help="folder of the table (METHOD.csv) and figure "
                   "(METHOD.png)")
    a.add_argument("--force", action="store_true", help="overwrite the table and figure")
    i = command("info", "describe a dataset", _info)
    i.add_argument("path", help="dataset folder")
    i.add_argument("--verify", action="store_true", help="check every chunk against its SHA-256 digest")
    return parser


#: the flow options of jr-jax train and their defaults: refused with --kind point when changed
_FLOW_DEFAULTS = dict(embed_dim=32, flow_layers=6, knots=8, noise_feature=False, conditional_affine=False,
                      regression_weight=0.0)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--snr -5:55`` as ``--snr=-5:55``: argparse reads a value that starts with "-" and is not a plain
    negative number (a range) as an option, and refuses it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--snr" and i + 1 < len(argv) and re.fullmatch(r"-[0-9.]+:.*", argv[i + 1]):
            out.append(f"--snr={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    _use_all_cpu_cores()
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(argv)
    _use_compilation_cache()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
