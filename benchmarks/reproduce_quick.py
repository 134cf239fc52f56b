"""Time the README's main job, `jr-jax reproduce` (quick preset), in a fresh output folder.

Runs the command as a user would (a subprocess, so that the CLI uses one host device per core), and
records the wall time, the peak RSS and the headline numbers of the report it wrote.

    python benchmarks/reproduce_quick.py [--out /tmp/jr_jax_quick]
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/jr_jax_quick")
    ap.add_argument("--preset", default="quick")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    jr = Path(sys.executable).with_name("jr-jax")
    t0 = time.perf_counter()
    subprocess.run([str(jr), "reproduce", "--preset", args.preset, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    res = json.loads((out / "results.json").read_text())
    rows = res["robust"]["rows"]
    r2_30 = {r["parameter"]: r["r2"] for r in rows if r["method"] == "jr_jax Bi-LSTM" and r["snr_db"] == 30.0}
    summary = dict(preset=args.preset, wall_seconds=seconds, peak_rss_gib=peak_gib, target_seconds=600,
                   step_seconds=res["meta"]["step_seconds"], robust_r2_30db=r2_30, device=res["meta"]["device"],
                   versions=res["meta"]["versions"])
    dest = ROOT / "benchmarks" / "results" / f"reproduce_{args.preset}.json"
    dest.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"jr-jax reproduce --preset {args.preset}: {seconds:.0f} s wall (target <= 600 s including the install), "
          f"peak RSS {peak_gib:.2f} GiB; R² at 30 dB: " + ", ".join(f"{k} {v:.2f}" for k, v in r2_30.items()))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
