import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import jr_jax
from jr_jax.cli import main
from jr_jax.eeg import sample_recording

# the installed console script (pip puts it beside the interpreter's other scripts)
JR_JAX = str(Path(sysconfig.get_path("scripts")) / ("jr-jax.exe" if os.name == "nt" else "jr-jax"))


def _run(*argv, drop=(), **env):
    """``jr-jax ARGV`` as a real process: its own JAX start-up, exit status and output (``drop``:
    environment variables of this run it does not inherit)."""
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and k not in drop}
    environment.update(JAX_PLATFORMS="cpu", **env)
    return subprocess.run([JR_JAX, *argv], env=environment, capture_output=True, text=True, timeout=300)


def test_the_installed_command_prints_its_help():
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for command in ("simulate", "train", "evaluate", "infer", "sensitivity", "info", "reproduce"):
        assert command in out.stdout
    out = _run("simulate", "--n", "0")
    assert out.returncode == 2 and "n must be an integer >= 1" in out.stderr and "Traceback" not in out.stderr


def test_the_command_line_imports_no_numerical_library_until_a_command_needs_it():
    """``jr-jax --help`` and argument errors answer without importing JAX, NumPy or MNE (their
    import took about 4 s): importing the CLI module and building its parser loads none of them."""
    code = ("import sys, jr_jax.cli as c; c._parser(); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'numpy', 'mne', 'equinox', "
            "'diffrax', 'optax', 'zarr', 'dask')); print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_compilation_cache_folder_follows_the_environment(tmp_path):
    """``jr-jax``'s compilation cache: $XDG_CACHE_HOME/jr_jax/xla, else ~/.cache/jr_jax/xla; moved by
    JR_JAX_COMPILATION_CACHE=DIR, off with =off; none of its own when JAX's variable is set."""
    from jr_jax.cli import compilation_cache_dir

    assert compilation_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "jr_jax" / "xla"
    assert compilation_cache_dir({}) == Path.home() / ".cache" / "jr_jax" / "xla"
    assert compilation_cache_dir({"JR_JAX_COMPILATION_CACHE": str(tmp_path / "x"), "XDG_CACHE_HOME": "/y"}) == tmp_path / "x"
    assert compilation_cache_dir({"JR_JAX_COMPILATION_CACHE": "OFF"}) is None
    assert compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": str(tmp_path)}) is None


def test_jr_jax_train_defaults_to_the_library_encoder():
    """``jr-jax train`` without encoder or posterior options trains what ``jr_jax.train`` trains
    without them (and what the reproduce presets train): one default, not two."""
    from jr_jax._reproduce import PRESETS
    from jr_jax._train import DEFAULT_ENCODER, DEFAULT_POSTERIOR
    from jr_jax.cli import _parser

    args = _parser().parse_args(["train", "data.zarr"])
    cli = dict(hidden=args.hidden, layers=args.layers, dropout=args.dropout, conv_channels=args.conv_channels,
               conv_kernel=args.conv_kernel, conv_stride=args.conv_stride)
    assert cli == DEFAULT_ENCODER
    assert PRESETS["quick"].encoder == DEFAULT_ENCODER and PRESETS["study"].encoder == DEFAULT_ENCODER
    posterior = dict(noise_feature=args.noise_feature, regression_weight=args.regression_weight)
    assert posterior == DEFAULT_POSTERIOR


def test_the_installed_command_simulates_on_every_core(tmp_path):
    """In a fresh process jr-jax exposes each CPU core as a JAX device before JAX starts (only a
    real process shows this: in-process calls find JAX already started). It keeps its compiled
    programs in $XDG_CACHE_HOME/jr_jax/xla, and a second run that loads them writes the same bytes."""
    args = ("simulate", "--n", "4", "--trials", "1", "--chunk-size", "4", "--out")
    no_suite_cache = dict(drop=("JAX_COMPILATION_CACHE_DIR", "JR_JAX_COMPILATION_CACHE"),
                          XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = _run(*args, str(tmp_path / "d.zarr"), **no_suite_cache)
    assert out.returncode == 0, out.stderr
    assert f"on {os.cpu_count()} cpu device(s)" in out.stdout and "dataset: 4 ERPs, 4 valid" in out.stdout
    first = jr_jax.load_dataset(tmp_path / "d.zarr", verify=True).erp
    assert first.shape == (4, 1201)
    cached = sorted(p.name for p in (tmp_path / "cache" / "jr_jax" / "xla").iterdir())
    assert cached, "no program was kept in the compilation cache"
    assert _run(*args, str(tmp_path / "d2.zarr"), **no_suite_cache).returncode == 0
    assert np.asarray(jr_jax.load_dataset(tmp_path / "d2.zarr").erp[:]).tobytes() == np.asarray(first[:]).tobytes()
    out = _run("info", str(tmp_path / "d.zarr"), "--verify")
    assert out.returncode == 0 and "4 in 1 chunks of 4; complete" in out.stdout, out.stdout + out.stderr


def test_simulate_writes_a_dataset_and_a_plot_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "run" / "erps.zarr"
    assert main(["simulate", "--n", "3", "--out", str(out), "--trials", "2", "--seed", "1", "--chunk-size", "2",
                 "--prior", "study", "--stimulus", "study"]) == 0
    ds = jr_jax.load_dataset(out, verify=True)
    assert ds.erp.shape == (3, 1201) and ds.theta.shape == (3, 9) and np.asarray(ds.valid[:]).all()
    assert ds.protocol.n_trials == 2 and ds.prior.kind == "normal" and ds.protocol.stimulus == jr_jax.Stimulus.study()
    assert (tmp_path / "run" / "erps.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "simulated 3 ERPs in" in printed and "ERPs/s" in printed and "3 ERPs, 3 valid" in printed

    before = np.asarray(ds.erp[:]).tobytes()
    assert main(["simulate", "--n", "5", "--out", str(out), "--trials", "2", "--chunk-size", "2", "--prior", "study",
                 "--stimulus", "study"]) == 2
    assert "n: stored 3, requested 5" in capsys.readouterr().err
    assert np.asarray(jr_jax.load_dataset(out).erp[:]).tobytes() == before  # untouched
    assert main(["simulate", "--n", "5", "--out", str(out), "--trials", "2", "--chunk-size", "2", "--force"]) == 0
    assert jr_jax.load_dataset(out).erp.shape == (5, 1201)

    assert main(["info", str(out), "--verify"]) == 0
    assert "5 in 3 chunks of 2; complete" in capsys.readouterr().out


def test_bad_arguments_are_reported(tmp_path, capsys):
    assert main(["simulate", "--n", "0", "--out", str(tmp_path / "x.zarr")]) == 2
    assert main(["simulate", "--sigma", "-1", "--out", str(tmp_path / "y.zarr")]) == 2
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "n must be an integer >= 1" in err and "sigma must be >= 0" in err and "not a jr_jax dataset" in err


def test_train_evaluate_infer(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.zarr"
    assert main(["simulate", "--n", "48", "--out", str(data), "--trials", "1", "--stimulus", "study",
                 "--chunk-size", "48"]) == 0
    model = tmp_path / "model"
    assert main(["train", str(data), "--kind", "point", "--out", str(model), "--snr", "10:30", "--epochs", "2",
                 "--batch-size", "16", "--hidden", "8", "--conv-channels", "4", "--conv-stride", "8"]) == 0
    assert "trained a point estimator for 2 epochs" in capsys.readouterr().out
    est = jr_jax.Estimator.load(model)
    assert est.manifest["snr_db"] == [10.0, 30.0]
    assert main(["train", str(data), "--out", str(model), "--epochs", "1"]) == 2  # no silent overwrite

    csv_out = tmp_path / "eval.csv"
    assert main(["evaluate", str(model), str(data), "--snr", "inf", "10", "--out", str(csv_out)]) == 0
    printed = capsys.readouterr().out
    assert "r2 per parameter" in printed and "ridge" in printed and "prior mean" in printed
    lines = csv_out.read_text().splitlines()
    assert lines[0].startswith("method,snr_db,n_test,parameter,r2") and len(lines) == 1 + 2 * 3 * 9

    assert main(["evaluate", str(model), str(data), "--snr", "0:30"]) == 2
    assert "not ranges" in capsys.readouterr().err
    assert main(["evaluate", str(model), str(data), "--snr", "ten"]) == 2
    assert "--snr takes a number in dB" in capsys.readouterr().err
    before = csv_out.read_text()
    assert main(["evaluate", str(model), str(data), "--out", str(csv_out)]) == 2  # refused before evaluating
    assert "exists; pass --force" in capsys.readouterr().err and csv_out.read_text() == before
    assert main(["evaluate", str(model), str(data), "--out", str(tmp_path / "no" / "e.csv")]) == 2
    assert "existing folder" in capsys.readouterr().err

    erp = np.asarray(jr_jax.load_dataset(data).erp[:2])
    np.save(tmp_path / "erp.npy", erp)
    np.savetxt(tmp_path / "erp.csv", erp, delimiter=",")
    assert main(["infer", str(model), str(tmp_path / "erp.npy"), "--fs", "1000", "--units", "mV"]) == 0
    out_npy = capsys.readouterr().out
    assert main(["infer", str(model), str(tmp_path / "erp.csv"), "--fs", "1000", "--units", "mV"]) == 0
    assert "A_i [mV]" in out_npy and capsys.readouterr().out == out_npy
    assert main(["infer", str(model), str(tmp_path / "erp.npy"), "--fs", "500", "--units", "mV"]) == 2
    assert "fs=500.0 Hz" in capsys.readouterr().err
    # the ERPs' protocol: named when not stated, checked when stated (the data used the study's stimulus, 1 trial)
    assert "note: the ERPs are taken to be made as the training ERPs were (stimulus study, 1 trial(s)" in out_npy
    assert main(["infer", str(model), str(tmp_path / "erp.npy"), "--fs", "1000", "--units", "mV", "--stimulus", "study",
                 "--trials", "1"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert main(["infer", str(model), str(tmp_path / "erp.npy"), "--fs", "1000", "--units", "mV", "--stimulus",
                 "default"]) == 2
    assert "protocol differs" in (err := capsys.readouterr().err) and "stimulus.gains: [0.56, 1.0, 1.0] vs [0.0, 1.0, 0.0]" in err
    assert main(["infer", str(model), str(tmp_path / "erp.npy"), "--fs", "1000", "--units", "mV", "--trials", "60"]) == 2
    assert "n_trials: 1 vs 60" in capsys.readouterr().err

    # the default kind: a posterior estimator; infer prints intervals and writes the draws
    post = tmp_path / "post"
    assert main(["train", str(data), "--out", str(post), "--snr", "10:30", "--epochs", "1", "--batch-size", "16",
                 "--hidden", "8", "--conv-channels", "4", "--conv-stride", "8", "--flow-layers", "2",
                 "--embed-dim", "8", "--knots", "4"]) == 0
    assert "trained a posterior estimator" in capsys.readouterr().out
    samples = tmp_path / "draws.npy"
    assert main(["infer", str(post), str(tmp_path / "erp.npy"), "--fs", "1000", "--units", "mV", "--draws", "200",
                 "--level", "0.8", "--samples", str(samples)]) == 0
    printed = capsys.readouterr().out
    assert "80% interval" in printed and "log(C*a_4)" in printed and "amortised posterior" in printed
    draws = np.load(samples)
    est = jr_jax.Estimator.load(post)
    assert draws.shape == (2, 200, 9) and np.all((draws > est.lows) & (draws < est.highs))
    assert main(["infer", str(post), str(tmp_path / "erp.npy"), "--fs", "1000", "--units", "mV",
                 "--samples", str(samples)]) == 2  # no silent overwrite
    assert "exists; pass --force" in capsys.readouterr().err

    # --embedding: the point estimator loaded and handed to train() with its own encoder (train's
    # side is tested in test_posterior.py); what cannot be an embedding is refused
    from jr_jax import _train as train_module

    seen = {}

    def fake_train(ds, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(train_module, "train", fake_train)
    assert main(["train", str(data), "--out", str(tmp_path / "frozen"), "--embedding", str(model),
                 "--noise-feature", "--conditional-affine", "--snr", "-5:55"]) == 2
    assert seen["snr_db"] == (-5.0, 55.0)  # a range starting below 0 after a space, not taken for an option
    assert isinstance(seen["embedding"], jr_jax.Estimator) and seen["embedding"].kind == "point"
    assert seen["encoder"] is None and "embed_dim" not in seen["posterior"] and seen["posterior"]["noise_feature"]
    assert seen["posterior"]["conditional_affine"]
    # an encoder option the point estimator's own encoder would override is refused, not dropped
    # (also when abbreviated, as argparse allows)
    seen.clear()
    assert main(["train", str(data), "--out", str(tmp_path / "frozen"), "--embedding", str(model),
                 "--hid", "16", "--embed-dim", "8"]) == 2
    assert "--embed-dim, --hidden cannot be given with --embedding" in capsys.readouterr().err and not seen
    # the flow's options with a point estimator are refused, not ignored; a missing embedding folder is one line
    assert main(["train", str(data), "--kind", "point", "--out", str(tmp_path / "p1"), "--knots", "4",
                 "--noise-feature"]) == 2
    assert ("--knots, --noise-feature set(s) the posterior's flow and cannot be given with --kind point"
            in capsys.readouterr().err) and not seen
    assert main(["train", str(data), "--out", str(tmp_path / "p1"), "--embedding", str(tmp_path / "nothere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a saved jr_jax estimator" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(["train", str(data), "--kind", "point", "--out", str(tmp_path / "p2"), "--embedding", str(model)]) == 2
    assert "only for kind='posterior'" in capsys.readouterr().err
    assert main(["train", str(data), "--out", str(tmp_path / "p3"), "--embedding", str(post)]) == 2
    assert "must be a point Estimator" in capsys.readouterr().err


def test_sensitivity_writes_a_table_and_a_figure(tmp_path, capsys):
    out = tmp_path / "sens"
    for method in ("sobol", "morris", "fisher", "oat"):
        assert main(["sensitivity", "--method", method, "--n", "8", "--out", str(out)]) == 0, method
        assert (out / f"{method}.csv").is_file() and (out / f"{method}.png").stat().st_size > 5_000
    lines = (out / "fisher.csv").read_text().splitlines()
    assert lines[0] == "parameter,crlb_sd,r2_ceiling,snr_db" and len(lines) == 10
    assert main(["sensitivity", "--method", "oat", "--n", "8", "--out", str(out)]) == 2  # no silent overwrite
    assert main(["sensitivity", "--method", "sobol", "--n", "6", "--out", str(tmp_path / "x")]) == 2
    assert "power of two" in capsys.readouterr().err


def test_cli_fits_the_shipped_recording(tmp_path, capsys):
    """`jr-jax fit` on the shipped recording: a table with the checks, the figure, the draws; two
    Levenberg-Marquardt steps cannot converge, and every start is reported so (the converged fit of
    this recording, with its SMC, runs in notebooks/real_erp.ipynb); importance sampling forced by
    --sampler from unconverged starts is warned as unreliable; an existing figure is not overwritten
    without --force; bad channel and option errors are one line."""
    rec = sample_recording()
    out, samples = tmp_path / "fit", tmp_path / "draws.npy"
    args = ["fit", rec, "--condition", "Left Auditory", "--mode", "1", "--screen", "2", "--starts", "2", "--max-steps", "2",
            "--draws", "200", "--sampler", "laplace-importance", "--out", str(out), "--samples", str(samples)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "reduced chi2" in text and "latency" in text and "noise SD" in text
    assert "0/2 starts converged" in text and "warning: none of the 2 starts converged" in text
    assert "posterior by laplace-importance" in text and "warning: importance sampling was asked for" in text
    figure = out / "Left_Auditory_mode_1.png"
    assert figure.stat().st_size > 10_000
    assert np.load(samples).shape == (200, 11)
    assert main(args) == 2
    assert "exist(s); pass --force" in capsys.readouterr().err
    assert main(["fit", rec, "--condition", "Left Auditory", "--channel", "NOPE", "--out", str(out)]) == 2
    assert "'NOPE' is not in the recording" in capsys.readouterr().err
    assert main(["fit", rec, "--channel", "EEG 021", "--mode", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", rec, "--sampler", "mcmc"])
    assert "invalid choice: 'mcmc'" in capsys.readouterr().err
    assert main(["fit", str(samples)]) == 2
    assert "must be an MNE Evoked file" in capsys.readouterr().err
