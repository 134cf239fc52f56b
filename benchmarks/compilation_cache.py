"""What the ``jr-jax`` command's compilation cache saves: the same command run twice in fresh
processes, first with an empty cache folder (everything compiles and is kept), then with the kept
programs, side by side in one run. Tracing is not cached; only XLA's compilation is.

The command is ``jr-jax fit`` on the shipped recording with its defaults (the fit compiles its
solve, Jacobians, log posterior and SMC step: most of a first call's time on a CPU), the second run
into another output folder. Writes benchmarks/results/compilation_cache.json.

    python benchmarks/compilation_cache.py [--condition "Left Auditory"] [--out FILE]
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from test_suite import commit, cpu_name  # benchmarks/ is on the path when this script runs

ROOT = Path(__file__).resolve().parent.parent


def _run(args, cache: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XLA_FLAGS")}
    env["JR_JAX_COMPILATION_CACHE"] = str(cache)
    jr_jax = Path(sys.executable).parent / "jr-jax"
    t0 = time.perf_counter()
    proc = subprocess.run([str(jr_jax), *args, "--out", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"jr-jax {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    fit_s = float(re.findall(r"^([\d.]+) s$", proc.stdout, re.MULTILINE)[-1])  # the fit's own total_s
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("noise SD")]
    return dict(wall_seconds=wall, fit_seconds=fit_s, summary=table[-1] if table else "",
                cached_files=sum(1 for _ in cache.iterdir()) if cache.exists() else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--condition", default="Left Auditory")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compilation_cache.json"))
    args = ap.parse_args()
    recording = ROOT / "jr_jax" / "eeg" / "data" / "sample_audvis-ave.fif.gz"
    command = ["fit", str(recording), "--condition", args.condition, "--mode", "1"]
    with tempfile.TemporaryDirectory(prefix="jr_jax_cache_bench_") as tmp:
        cache = Path(tmp) / "xla"
        cold = _run(command, cache, Path(tmp) / "fit1")
        warm = _run(command, cache, Path(tmp) / "fit2")
    result = dict(
        command="jr-jax " + " ".join(command[:1] + ["sample_audvis-ave.fif.gz"] + command[2:]),
        cold=cold, warm=warm, warm_over_cold_wall=warm["wall_seconds"] / cold["wall_seconds"],
        warm_over_cold_fit=warm["fit_seconds"] / cold["fit_seconds"],
        same_answer=cold["summary"] == warm["summary"],
        date=datetime.date.today().isoformat(), commit=commit(),
        device=dict(platform="cpu", cpu=cpu_name(), cpu_cores=os.cpu_count()))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['command']}: empty cache {cold['wall_seconds']:.0f} s (fit {cold['fit_seconds']:.0f} s), "
          f"kept programs {warm['wall_seconds']:.0f} s (fit {warm['fit_seconds']:.0f} s): "
          f"{result['warm_over_cold_wall']:.2f}x the wall time; {cold['cached_files']} programs kept; "
          f"same printed fit: {result['same_answer']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
