"""The reproduce posterior's settings, compared on one finished quick-preset run: the posterior step
(training and calibration) is redone in a copy of the run's folder for each setting, on the same
data, the same robust point regressor and the same noisy test ERPs, and each setting's calibration
summary per test SNR is printed and written to benchmarks/results/reproduce_posterior.json.

Settings (``ReproduceConfig`` fields; the quick preset's are ``frozen_wide_25``):

- ``end_to_end_10``: the flow and its own encoder trained end to end, 10 epochs on 0-40 dB (the
  preset's posterior before it was trained on the regressor);
- ``frozen_plain_15``: the flow on the frozen robust regressor, no options, 15 epochs, 0-40 dB;
- ``frozen_affine_15``: the same with the conditional affine layer;
- ``frozen_noise_affine_15``: and the noise feature;
- ``frozen_wide_15`` / ``frozen_wide_25``: the noise feature and the affine layer, trained on
  -5 to 55 dB, 15 or 25 epochs.

Each entry of the results file records the commit, date and learning rate it ran with; a run
replaces the entries of the settings it ran and keeps the others. The flow on a frozen regressor
learned at 1e-3 until ``jr_jax.train`` gave it 4e-3 by default: the stored entry
``frozen_wide_25_lr1e-3`` is ``frozen_wide_25`` as measured then (the frozen rows without a suffix
other than it, measured before the change, also ran at 1e-3: see each entry's ``learning_rate``).

    jr-jax reproduce --out /tmp/jr_jax_quick          # or python benchmarks/reproduce_quick.py
    python benchmarks/reproduce_posterior.py --run /tmp/jr_jax_quick [--settings frozen_wide_25 ...]
"""

import argparse
import dataclasses
import datetime
import json
import shutil
import tempfile
import time
from pathlib import Path

from reproduce_quick import posterior_summary  # benchmarks/ is on the path when this script runs
from test_suite import commit, cpu_name

ROOT = Path(__file__).resolve().parent.parent

_NOISE_AFFINE = dict(noise_feature=True, conditional_affine=True)
SETTINGS = {
    "end_to_end_10": dict(posterior_embedding=None, posterior_options={}, posterior_snr_db=None, posterior_epochs=10),
    "frozen_plain_15": dict(posterior_embedding="robust", posterior_options={}, posterior_snr_db=None,
                            posterior_epochs=15),
    "frozen_affine_15": dict(posterior_embedding="robust", posterior_options=dict(conditional_affine=True),
                             posterior_snr_db=None, posterior_epochs=15),
    "frozen_noise_affine_15": dict(posterior_embedding="robust", posterior_options=_NOISE_AFFINE,
                                   posterior_snr_db=None, posterior_epochs=15),
    "frozen_wide_15": dict(posterior_embedding="robust", posterior_options=_NOISE_AFFINE,
                           posterior_snr_db=(-5.0, 55.0), posterior_epochs=15),
    "frozen_wide_25": dict(posterior_embedding="robust", posterior_options=_NOISE_AFFINE,
                           posterior_snr_db=(-5.0, 55.0), posterior_epochs=25),
}
POSTERIOR_STEPS = ("train_posterior.json", "calibrate_posterior.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished jr-jax reproduce folder of the quick preset")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reproduce_posterior.json"))
    args = ap.parse_args()

    import jax

    from jr_jax._reproduce import ReproduceConfig, reproduce

    run = Path(args.run)
    base = ReproduceConfig(**json.loads((run / "config.json").read_text()))
    if base.preset != "quick" or not (run / "results.json").is_file():
        raise SystemExit(f"{run} is not a finished quick-preset reproduce run")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = dict(date_utc=now, commit=commit(), cpu=cpu_name(), devices=len(jax.devices()), run=str(run), settings={})
    if Path(args.out).is_file():  # keep the settings not rerun now, each with its own commit and date
        results["settings"] = json.loads(Path(args.out).read_text())["settings"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            config = dataclasses.replace(base, posterior_patience=SETTINGS[name]["posterior_epochs"], **SETTINGS[name])
            out = Path(tmp) / name
            shutil.copytree(run, out, ignore=shutil.ignore_patterns("posterior", *POSTERIOR_STEPS))
            (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            t0 = time.perf_counter()
            res = reproduce(config, out, progress=False, log=lambda *a: None)
            manifest = json.loads((out / "models" / "posterior" / "manifest.json").read_text())
            entry = dict(config=SETTINGS[name], commit=results["commit"], date_utc=now,
                         learning_rate=manifest["training"]["learning_rate"], seconds=time.perf_counter() - t0,
                         train_seconds=res["meta"]["step_seconds"]["train_posterior"],
                         best_val_loss=res["posterior"]["training"]["best_val_loss"], levels=posterior_summary(res))
            results["settings"][name] = entry
            print(f"{name}: training {entry['train_seconds']:.0f} s, best validation loss {entry['best_val_loss']:.3f}")
            for snr, lv in entry["levels"].items():
                fails = ", ".join(f"{q} (p {p:.0e})" for q, p in lv["sbc_failures"].items()) or "none"
                print(f"  {snr:>3} dB: worst cal. error {lv['worst_calibration_error']:.3f} ({lv['worst_quantity']}), "
                      f"SBC p < 0.01: {fails}; z SD b_e {lv['z_sd']['b_e']:.2f}, b_i {lv['z_sd']['b_i']:.2f}; "
                      f"R² b_e {lv['posterior_mean_r2']['b_e']:.3f} (point {lv['point_r2']['b_e']:.3f}), "
                      f"b_i {lv['posterior_mean_r2']['b_i']:.3f} (point {lv['point_r2']['b_i']:.3f})", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
