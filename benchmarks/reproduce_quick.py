"""Time the README's main job, `jr-jax reproduce` (quick preset), in a fresh output folder.

Runs the command as a user would (a subprocess, so that the CLI uses one host device per core), and
records the wall time (target: 5 minutes), the peak RSS, the load average around the run (a box
shared with other work runs slower), and the headline numbers of the report it wrote. Each run is
also appended, dated, to the file's ``runs``, so that the README gives the latest time with the range
seen from one day to the next (this shared machine's speed varies by up to 2x).

    python benchmarks/reproduce_quick.py [--out /tmp/jr_jax_quick]
    python benchmarks/reproduce_quick.py --fresh-clone     # the README's first command, install included,
                                                           # in a fresh clone of this repository
"""

import argparse
import datetime
import json
import os
import re
import resource
import tempfile
import shutil
import subprocess
import sys
import time
from pathlib import Path

from test_suite import commit  # benchmarks/ is on the path when this script runs

ROOT = Path(__file__).resolve().parent.parent


SIZE_KEYS = ("n_levels", "grid_epochs", "robust_epochs", "posterior_epochs", "n_large", "posterior_embedding")


def sizes(config: dict) -> dict:
    """The preset's sizes that set its time (simulations and epochs): runs are compared only with
    runs of the same sizes."""
    return {k: config.get(k) for k in SIZE_KEYS}


def posterior_summary(res: dict) -> dict:
    """Per calibrated test SNR of a reproduce run's results: the worst calibration error, the quantities
    failing SBC at p < 0.01, the z-score SDs of b_e and b_i, the posterior mean's R² beside the robust
    regressor's per parameter, on how many parameters it reaches it and the largest shortfall."""
    levels = {}
    for snr in res["posterior"]["levels_db"]:
        at = [r for r in res["posterior"]["rows"] if r["snr_db"] == snr]
        worst = max(at, key=lambda r: r["calibration_error"])
        point = {r["parameter"]: r["r2"] for r in res["robust"]["rows"]
                 if r["snr_db"] == snr and r["method"] == "jr_jax Bi-LSTM"}
        mean_r2 = {r["parameter"]: r["r2"] for r in at if r["parameter"] in point}
        levels[f"{snr:g}"] = dict(
            worst_calibration_error=worst["calibration_error"], worst_quantity=worst["parameter"],
            sbc_failures={r["parameter"]: r["sbc_pvalue"] for r in at if r["sbc_pvalue"] < 0.01},
            z_sd={r["parameter"]: r["z_sd"] for r in at if r["parameter"] in ("b_e", "b_i")},
            posterior_mean_r2=mean_r2, point_r2=point,
            r2_at_least_point=sum(mean_r2[q] >= point[q] for q in mean_r2),
            largest_r2_shortfall=max(point[q] - mean_r2[q] for q in mean_r2))
    return levels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/jr_jax_quick")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--fresh-clone", action="store_true",
                    help="time the README's first command (venv, install, jr-jax reproduce) in a fresh clone")
    args = ap.parse_args()
    if args.fresh_clone:
        return fresh_clone()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    jr = Path(sys.executable).with_name("jr-jax")
    load_before = os.getloadavg()
    # a first run, as on a fresh machine: an empty compilation cache (programs compiled earlier in
    # the run are still loaded from it, as a user's first run loads them)
    cache = tempfile.mkdtemp(prefix="jr_jax_xla_")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JR_JAX_COMPILATION_CACHE"] = cache
    t0 = time.perf_counter()
    subprocess.run([str(jr), "reproduce", "--preset", args.preset, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    seconds = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    load_after = os.getloadavg()
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    res = json.loads((out / "results.json").read_text())
    head = res["headline_snr_db"]
    rows = res["robust"]["rows"]
    r2 = {r["parameter"]: r["r2"] for r in rows if r["method"] == "jr_jax Bi-LSTM" and r["snr_db"] == head}
    post = [r for r in res["posterior"]["rows"] if r["snr_db"] == head]
    calibration = {r["parameter"]: {k: r[k] for k in ("calibration_error", "sbc_pvalue", "coverage_90", "contraction")}
                   for r in post}
    posterior_levels = posterior_summary(res)
    # the box is shared when the 1-minute load exceeds what this run itself puts on it (one process per core)
    cores = os.cpu_count() or 1
    summary = dict(preset=args.preset, wall_seconds=seconds, peak_rss_gib=peak_gib, target_seconds=300,
                   load_average_1min_before=load_before[0], load_average_1min_after=load_after[0],
                   load_average_15min_after=load_after[2], cpu_cores=cores,
                   box_shared=load_before[0] > 0.5 or load_after[2] > cores + 0.5,
                   step_seconds=res["meta"]["step_seconds"], headline_snr_db=head, robust_r2=r2,
                   posterior_calibration=calibration, posterior_levels=posterior_levels, device=res["meta"]["device"],
                   versions=res["meta"]["versions"],
                   sizes=sizes(res["meta"]["config"]))
    summary["date_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    summary["commit"] = commit()
    dest = ROOT / "benchmarks" / "results" / f"reproduce_{args.preset}.json"
    runs = []
    if dest.exists():  # keep the fresh-clone timing of the README's command (--fresh-clone writes it)
        previous = json.loads(dest.read_text())
        summary.update({k: v for k, v in previous.items() if k.startswith("readme_command")})
        runs = previous.get("runs", [])
    summary["runs"] = runs + [{k: summary[k] for k in ("date_utc", "commit", "wall_seconds", "peak_rss_gib",
                                                       "load_average_1min_before", "load_average_15min_after",
                                                       "box_shared", "sizes")}]
    dest.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"jr-jax reproduce --preset {args.preset}: {seconds:.0f} s wall (target <= 300 s), peak RSS {peak_gib:.2f} GiB, "
          f"load average {load_before[0]:.1f} before, {load_after[2]:.1f} over the last 15 min"
          + (" (the box was shared)" if summary["box_shared"] else ""))
    print(f"R² at {head:g} dB: " + ", ".join(f"{k} {v:.2f}" for k, v in r2.items()))
    for snr, lv in posterior_levels.items():
        fails = ", ".join(f"{q} (p {p:.0e})" for q, p in lv["sbc_failures"].items()) or "none"
        print(f"posterior at {snr} dB: worst calibration error {lv['worst_calibration_error']:.3f} "
              f"({lv['worst_quantity']}), SBC p < 0.01: {fails}, posterior-mean R² >= the regressor's on "
              f"{lv['r2_at_least_point']} of 9 (largest shortfall {lv['largest_r2_shortfall']:.3f})")
    print(f"wrote {dest}")


def fresh_clone():
    """git clone this repository into a temporary folder and run the README's first command there."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1)
    command = next(line for line in block.splitlines() if "jr-jax reproduce" in line)
    cloned = commit()  # the commit the clone gets (HEAD now; later commits do not move it)
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "jr_jax"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        t0 = time.perf_counter()
        subprocess.run(["bash", "-c", command], cwd=clone, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        assert (clone / "jr_jax_out" / "quick" / "report.md").is_file()
    dest = ROOT / "benchmarks" / "results" / "reproduce_quick.json"
    summary = json.loads(dest.read_text()) if dest.exists() else {}
    summary.update(readme_command=command, readme_command_fresh_clone_seconds=seconds,
                   readme_command_fresh_clone_commit=cloned,
                   readme_command_fresh_clone_date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds"))
    dest.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"README's first command in a fresh clone (pip may use its cache): {seconds:.0f} s (target <= 600 s)")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
